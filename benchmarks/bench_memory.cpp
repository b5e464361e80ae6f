// bench_memory: measured bytes per rank of weights, gradients, FP32 master shard, Adam m and v (the engine's
// allocated buffers, engine.memory()) and of activations (GPT::activation_bytes() after a forward +
// backward), next to the ZeRO-1 formula 2·e·P + 12P/N (e = bytes per element of the storage type: 4P + 12P/N
// in fp16), and the largest micro-batch that fits a memory budget per rank with sharding (this N) and without
// (every rank holding the full FP32 master weights and Adam state, as plain data parallelism does).
//
// Activations are measured at micro-batch 1 and 2 (and at --micro-batch), giving bytes = fixed + per_sequence
// x B; the largest B is floor((budget - state - fixed) / per_sequence). Run under mpiexec -n N for each N
// (benchmarks/memory_sweep.py runs N = 1..8 and prints the table).
//
//   mpiexec -n 4 --oversubscribe build/benchmarks/bench_memory --budget-mib 512 --json mem4.json
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include <omp.h>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "bench_common.hpp"
#include "mptrain/config.hpp"
#include "mptrain/engine.hpp"
#include "mptrain/model.hpp"

int main(int argc, char** argv) {
  CLI::App app{
      "Measured memory per rank (weights, grads, FP32 shards, activations) vs 4P + 12P/N; largest "
      "micro-batch in a budget, with and without sharding; JSON"};
  mpt::RunConfig rc;
  std::string device = "cpu";
  int64_t vocab = 256;
  double budget_mib = 512;
  app.add_option("--device", device, "backend")->check(CLI::IsMember({"cpu", "cuda"}))->capture_default_str();
  mpt::bench::add_model_flags(app, rc, vocab, "micro-batch whose activations are also measured");
  app.add_option("--budget-mib", budget_mib, "memory budget per rank (MiB) for the largest micro-batch")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  return mpt::bench::run_main(argc, argv, app, "bench_memory", [&](nlohmann::json& report) {
    omp_set_num_threads(1);
    rc.command = "train";
    rc.global_batch = rc.micro_batch;  // one micro-batch per rank: only the engine settings matter here
    rc.validate();
    const mpt::GPTConfig cfg = rc.model_config(vocab);
    cfg.validate();
    mpt::Runtime runtime = mpt::bench::make_bench_runtime(device);
    auto& backend = runtime.backend;
    auto& comm = runtime.grad_comm;
    const int N = comm->size();
    mpt::MixedPrecisionEngine engine(mpt::gpt_tensors(cfg), rc.engine_config(), *comm, *backend);
    engine.set_parameters(mpt::gpt_init(cfg, rc.seed));
    const mpt::MemoryReport m = engine.memory();
    const size_t engine_in_use = backend->bytes_in_use();

    // Activations of a forward + backward at micro-batch B (a fresh model per B: nothing carried over).
    const auto activations = [&](int64_t B) {
      mpt::GPT model(cfg, engine.layout(), *backend, rc.dtype());
      std::mt19937 rng(1);
      std::vector<int32_t> tokens(static_cast<size_t>(B * rc.seq_len));
      for (auto& x : tokens) x = static_cast<int32_t>(rng() % static_cast<uint32_t>(vocab));
      model.forward(engine.params(), tokens.data(), tokens.data(), B, rc.seq_len, 1.0f);
      model.backward(engine.params(), engine.grads());
      return std::pair<size_t, size_t>{model.activation_bytes(), backend->bytes_in_use() - engine_in_use};
    };
    const auto [a1, a1_backend] = activations(1);
    const auto [a2, a2_backend] = activations(2);
    const auto [ab, ab_backend] = activations(rc.micro_batch);
    const double per_sequence = static_cast<double>(a2) - static_cast<double>(a1);
    const double fixed = static_cast<double>(a1) - per_sequence;
    const double predicted_ab = fixed + per_sequence * static_cast<double>(rc.micro_batch);

    if (comm->rank() == 0) {
      const double P = static_cast<double>(m.num_parameters);
      const double e = static_cast<double>(mpt::dtype_size(rc.dtype()));
      const double formula = 2.0 * e * P + 12.0 * P / N;
      const double sharded_state = static_cast<double>(m.state_bytes());
      // Without sharding every rank holds all N shards of the FP32 state.
      const double unsharded_state =
          static_cast<double>(m.params_bytes + m.grads_bytes) +
          static_cast<double>(m.master_bytes + m.adam_m_bytes + m.adam_v_bytes) * N;
      const double budget = budget_mib * 1024.0 * 1024.0;
      const auto largest = [&](double state) {
        const double room = budget - state - fixed;
        return room < per_sequence ? int64_t{0} : static_cast<int64_t>(room / per_sequence);
      };
      report["benchmark"] = "memory_per_rank";
      report["config"] = {
          {"device", device},         {"precision", rc.precision},     {"layers", cfg.num_layers},
          {"channels", cfg.channels}, {"heads", cfg.num_heads},        {"seq_len", rc.seq_len},
          {"vocab", cfg.vocab_size},  {"micro_batch", rc.micro_batch}, {"ranks", N}};
      report["machine"] = mpt::bench::machine_json(N, 1);
      report["parameters"] = m.num_parameters;
      report["bytes_per_rank"] = {{"params", m.params_bytes},        {"grads", m.grads_bytes},
                                  {"master", m.master_bytes},        {"adam_m", m.adam_m_bytes},
                                  {"adam_v", m.adam_v_bytes},        {"state", m.state_bytes()},
                                  {"scratch", m.scratch_bytes},      {"backend_in_use", engine_in_use},
                                  {"activations_at_micro_batch", ab}};
      report["formula"] = "2*e*P + 12P/N (e = storage bytes/element; 4P + 12P/N in fp16)";
      report["formula_bytes"] = formula;
      report["padding_bytes"] = sharded_state - formula;
      report["activations"] = {{"bytes_at_1", a1},
                               {"bytes_at_2", a2},
                               {"fixed_bytes", fixed},
                               {"per_sequence_bytes", per_sequence},
                               {"linear_prediction_at_micro_batch", predicted_ab},
                               {"measured_at_micro_batch", ab},
                               {"backend_bytes_at_micro_batch", ab_backend}};
      report["budget"] = {{"bytes_per_rank", budget},
                          {"state_sharded_bytes", sharded_state},
                          {"state_unsharded_bytes", unsharded_state},
                          {"largest_micro_batch_sharded", largest(sharded_state)},
                          {"largest_micro_batch_unsharded", largest(unsharded_state)}};
      std::fprintf(
          stderr,
          "N=%d: state %.0f B per rank (formula %.0f, padding %.0f); activations %.0f + %.0f x B bytes; "
          "budget %.0f MiB: largest B %lld sharded, %lld unsharded\n",
          N, sharded_state, formula, sharded_state - formula, fixed, per_sequence, budget_mib,
          static_cast<long long>(largest(sharded_state)), static_cast<long long>(largest(unsharded_state)));
    }
    return 0;
  });
}
