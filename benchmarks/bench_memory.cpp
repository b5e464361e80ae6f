// bench_memory: bytes per rank of a training set-up for each ZeRO stage and --recompute mode: the engine's
// buffers (weights, gradients, FP32 master/m/v shard; stage 2: the gradient shard and the staging pool)
// against the formula (stage 1 2·e·P + 12P/N, stage 2 e·P + 14P/N in 16 bits), the activations per sequence,
// and the largest micro-batch that fits a memory budget per rank, all from the memory model
// (include/mptrain/memory_model.hpp), which the trainer uses for --micro-batch auto and its start-up check.
//
// Measured mode (default; run under mpiexec -n N): the engine is built and set, and each mode's model runs a
// forward + backward at micro-batch 1, 2 and --micro-batch on the backend, so the report holds the allocated
// bytes (Backend::bytes_in_use) next to the model's figure. --predict-only allocates nothing and takes N from
// --ranks: shapes too large for this machine (GPT-2 small at T=1024, the 1.3B shape).
// benchmarks/memory_sweep.py runs N = 1..8 and prints the table.
//
//   mpiexec -n 4 --oversubscribe build/benchmarks/bench_memory --budget-mib 512 --json mem4.json
//   build/benchmarks/bench_memory --predict-only --ranks 8 --layers 24 --channels 2048 --heads 16
//       --seq-len 1024 --vocab 50304 --micro-batch 8 --budget-mib 81920   (one command line)
#include <cstdio>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <omp.h>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "bench_common.hpp"
#include "mptrain/config.hpp"
#include "mptrain/engine.hpp"
#include "mptrain/memory_model.hpp"
#include "mptrain/model.hpp"

namespace {

std::vector<std::string> split_commas(const std::string& text) {
  std::vector<std::string> out;
  std::stringstream in(text);
  for (std::string item; std::getline(in, item, ',');) out.push_back(item);
  return out;
}

/// Activations of a forward + backward at micro-batch B on a fresh model (nothing carried over): the
/// model's own count and the backend's.
std::pair<size_t, size_t> measure_activations(const mpt::GPTConfig& cfg, mpt::MixedPrecisionEngine& engine,
                                              mpt::Backend& backend, mpt::DType dtype, mpt::Recompute mode,
                                              int64_t B, int64_t T) {
  const size_t before = backend.bytes_in_use();
  mpt::GPT model(cfg, engine.layout(), backend, dtype, mode);
  std::mt19937 rng(1);
  std::vector<int32_t> tokens(static_cast<size_t>(B * T));
  for (auto& x : tokens) x = static_cast<int32_t>(rng() % static_cast<uint32_t>(cfg.vocab_size));
  model.forward(engine.params(), tokens.data(), tokens.data(), B, T, 1.0f);
  if (engine.config().zero_stage == 2) {
    model.backward(
        engine.params(), [&](size_t t) { return engine.grad_address(t); },
        [&](size_t t) { engine.grad_done(t); });
    engine.sync_grads();
  } else {
    model.backward(engine.params(), engine.grads());
  }
  return {model.activation_bytes(), backend.bytes_in_use() - before - sizeof(double)};  // - loss accumulator
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{
      "Memory per rank per ZeRO stage and --recompute mode (engine buffers vs 4P + 12P/N or 2P + 14P/N, "
      "activations per sequence, largest micro-batch in a budget) from the memory model, measured against "
      "the "
      "allocation; JSON"};
  mpt::RunConfig rc;
  std::string device = "cpu", modes = "none,selective,block", stages = "1,2";
  int64_t vocab = 256;
  double budget_mib = 512;
  bool predict_only = false;
  int ranks = 0;
  app.add_option("--device", device, "backend")->check(CLI::IsMember({"cpu", "cuda"}))->capture_default_str();
  mpt::bench::add_model_flags(app, rc, vocab, "micro-batch whose bytes per rank are reported");
  app.add_option("--recompute", modes, "comma-separated recompute modes")->capture_default_str();
  app.add_option("--zero-stages", stages, "comma-separated ZeRO stages (1, 2)")->capture_default_str();
  app.add_option("--bucket-mib", rc.bucket_mib, "gradient bucket size in MiB")->capture_default_str();
  app.add_option("--budget-mib", budget_mib, "memory budget per rank (MiB) for the largest micro-batch")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_flag("--predict-only", predict_only, "the memory model alone: allocate nothing, N from --ranks");
  app.add_option("--ranks", ranks, "N for --predict-only (default: the MPI world size)");
  return mpt::bench::run_main(argc, argv, app, "bench_memory", [&](nlohmann::json& report) {
    int world_rank = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
    omp_set_num_threads(1);
    rc.command = "train";
    rc.global_batch = rc.micro_batch;  // one micro-batch per rank: only the engine settings matter here
    rc.validate();
    const mpt::GPTConfig cfg = rc.model_config(vocab);
    cfg.validate();
    mpt::Runtime runtime = mpt::bench::make_bench_runtime(device);
    mpt::Backend& backend = *runtime.backend;
    const int N = predict_only && ranks > 0 ? ranks : runtime.grad_comm->size();
    const double budget = budget_mib * 1024.0 * 1024.0;
    nlohmann::json rows = nlohmann::json::array(), engines = nlohmann::json::array();
    for (const std::string& stage_text : split_commas(stages)) {
      mpt::EngineConfig ec = rc.engine_config();
      ec.zero_stage = std::stoi(stage_text);
      const mpt::MemoryReport m = mpt::MixedPrecisionEngine::predict_memory(mpt::gpt_tensors(cfg), ec, N);
      std::unique_ptr<mpt::MixedPrecisionEngine> engine;
      size_t engine_in_use = 0;
      if (!predict_only) {
        engine = std::make_unique<mpt::MixedPrecisionEngine>(mpt::gpt_tensors(cfg), ec, *runtime.grad_comm,
                                                             backend);
        engine->set_parameters(mpt::gpt_init(cfg, rc.seed));
        engine_in_use = backend.bytes_in_use();
      }
      const double formula = m.formula_bytes(mpt::dtype_size(rc.dtype()));
      engines.push_back({{"stage", ec.zero_stage},
                         {"params", m.params_bytes},
                         {"grads", m.grads_bytes},
                         {"master", m.master_bytes},
                         {"adam_m", m.adam_m_bytes},
                         {"adam_v", m.adam_v_bytes},
                         {"staging", m.staging_bytes},
                         {"state", m.state_bytes()},
                         {"scratch", m.scratch_bytes},
                         {"backend_in_use", engine_in_use},
                         {"formula_bytes", formula},
                         {"padding_bytes", m.padding_bytes(mpt::dtype_size(rc.dtype()))}});
      for (const std::string& name : split_commas(modes)) {
        const mpt::Recompute mode = mpt::parse_recompute(name);
        const auto estimate = [&](int64_t B) {
          return mpt::estimate_memory(cfg, ec, N, mode, B, rc.seq_len, backend);
        };
        const mpt::MemoryEstimate e1 = estimate(1), e2 = estimate(2), eb = estimate(rc.micro_batch);
        const double per_sequence = static_cast<double>(e2.activations) - static_cast<double>(e1.activations);
        const int64_t largest =
            mpt::largest_micro_batch(estimate, static_cast<size_t>(budget), int64_t{1} << 30);
        nlohmann::json row = {{"recompute", name},
                              {"stage", ec.zero_stage},
                              {"state_bytes", m.state_bytes()},
                              {"staging_bytes", m.staging_bytes},
                              {"grads_bytes", m.grads_bytes},
                              {"activations_per_sequence_bytes", per_sequence},
                              {"activations_fixed_bytes", static_cast<double>(e1.activations) - per_sequence},
                              {"activations_at_micro_batch", eb.activations},
                              {"workspace_at_micro_batch", eb.workspace},
                              {"bytes_per_rank_at_micro_batch", eb.total()},
                              {"largest_micro_batch", largest}};
        if (!predict_only) {
          const auto [a_model, a_backend] =
              measure_activations(cfg, *engine, backend, rc.dtype(), mode, rc.micro_batch, rc.seq_len);
          row["measured_activations_at_micro_batch"] = a_model;
          row["backend_bytes_at_micro_batch"] = engine_in_use + a_backend + sizeof(double);
          row["model_allocated_at_micro_batch"] = eb.allocated();
        }
        if (world_rank == 0)
          std::fprintf(
              stderr,
              "N=%d stage %d %-9s: state %zu B per rank (formula %.0f, staging %zu); activations %.0f "
              "B/sequence, %zu at B=%lld; %.0f MiB budget: largest B %lld\n",
              N, ec.zero_stage, name.c_str(), m.state_bytes(), formula, m.staging_bytes, per_sequence,
              eb.activations, static_cast<long long>(rc.micro_batch), budget_mib,
              static_cast<long long>(largest));
        rows.push_back(row);
      }
    }
    const mpt::MemoryReport m =
        mpt::MixedPrecisionEngine::predict_memory(mpt::gpt_tensors(cfg), rc.engine_config(), N);
    if (world_rank == 0) {
      report["benchmark"] = "memory_per_rank";
      report["config"] = {{"device", device},
                          {"precision", rc.precision},
                          {"layers", cfg.num_layers},
                          {"channels", cfg.channels},
                          {"heads", cfg.num_heads},
                          {"seq_len", rc.seq_len},
                          {"vocab", cfg.vocab_size},
                          {"micro_batch", rc.micro_batch},
                          {"bucket_mib", rc.bucket_mib},
                          {"ranks", N},
                          {"predict_only", predict_only}};
      report["machine"] = mpt::bench::machine_json(N, 1);
      report["parameters"] = m.num_parameters;
      report["engine_bytes_per_rank"] = engines;  // per ZeRO stage
      report["formula"] =
          "stage 1: 2*e*P + 12P/N; stage 2: e*P + e*P/N + 12P/N (e = storage bytes/element; 4P + 12P/N and "
          "2P + 14P/N in fp16), plus bucket padding, plus the stage-2 staging pool";
      report["budget_bytes_per_rank"] = budget;
      report["modes"] = rows;
    }
    return 0;
  });
}
