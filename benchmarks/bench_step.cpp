// bench_step: one full training step of mptrain (the trainer's loop: zero_grads; per micro-batch forward with
// the fused cross-entropy, backward, accumulate; sync_grads; engine.step) for a given model shape, batch,
// precision, device and thread count, on any number of MPI ranks.
//
// Reported per iteration and reduced with MAX over ranks (the slowest rank sets the step): forward, backward,
// grad sync (phase 3), optimizer (phases 4-7: check + agreement, norm + AdamW, cast + weight all-gather) and
// the whole step; then median/min/max over iterations. Tokens/s counts every rank's tokens (B x K x T x N per
// step). MFU = tokens/s x FLOPs per token / (N x peak FLOP/s), FLOPs per token = 6N_params + 12 L C T (PaLM
// appendix B; mpt::gpt_flops_per_token). Loss-scaling overhead = (check + found_inf agreement, the engine's
// check_seconds, + one scale update, timed on a copy of the scaler) / step, per iteration, median.
//
//   mpiexec -n 2 build/benchmarks/bench_step --precision fp16 --threads 1 --json step.json
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <map>
#include <random>
#include <string>
#include <vector>

#include <omp.h>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "bench_common.hpp"
#include "bench_stats.hpp"
#include "mptrain/config.hpp"
#include "mptrain/cpu_profile.hpp"
#include "mptrain/engine.hpp"
#include "mptrain/model.hpp"

namespace {

using Clock = std::chrono::steady_clock;

double seconds_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

nlohmann::json to_json(const mpt::bench::Stats& s) {
  return {{"median", s.median}, {"min", s.min}, {"max", s.max}};
}

/// Seconds of one DynamicLossScaler::update(false) (the scale update of phase 6), averaged over many calls
/// on a copy of the engine's scaler, so the engine's state is untouched.
double scale_update_seconds(const mpt::DynamicLossScaler& scaler) {
  mpt::DynamicLossScaler copy = scaler;
  constexpr int kCalls = 20000;
  int skipped = 0;
  const auto t0 = Clock::now();
  for (int i = 0; i < kCalls; ++i) skipped += copy.update(false) ? 1 : 0;
  const double s = seconds_between(t0, Clock::now()) / kCalls;
  return skipped >= 0 ? s : 0.0;  // `skipped` keeps the loop from being optimised away
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Times mptrain's training step (forward, backward, grad sync, optimizer), tokens/s and MFU"};
  mpt::RunConfig rc;  // the trainer's defaults: model shape, AdamW hyper-parameters, clipping, loss scaler
  std::string device = "cpu", grad_sync = "reduce-scatter";
  int64_t vocab = 256, accumulation = 1;
  int threads = 1, warmup = 2, iters = 10;
  double peak_tflops = 0.0;
  bool noise_scale = true;
  app.add_option("--device", device, "backend")->check(CLI::IsMember({"cpu", "cuda"}))->capture_default_str();
  mpt::bench::add_model_flags(app, rc, vocab, "sequences per rank per forward B");
  app.add_option("--recompute", rc.recompute, "activations recomputed in backward: none, selective, block")
      ->check(CLI::IsMember({"none", "selective", "block"}))
      ->capture_default_str();
  app.add_option("--accumulation", accumulation, "micro-batches per optimizer step K")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--threads", threads, "OpenMP threads per rank (set explicitly)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  mpt::bench::add_timing_flags(app, warmup, iters, "steps");
  app.add_option("--grad-sync", grad_sync, "gradient reduction of phase 3")
      ->check(CLI::IsMember({"reduce-scatter", "all-reduce"}))
      ->capture_default_str();
  app.add_option("--bucket-mib", rc.bucket_mib, "gradient bucket size in MiB")->capture_default_str();
  app.add_option("--peak-tflops", peak_tflops,
                 "peak FLOP/s per rank for MFU in TFLOP/s; 0 = the backend's (CPU: measured SGEMM)")
      ->capture_default_str();
  app.add_option("--noise-scale", noise_scale,
                 "measure the gradient noise scale (each rank's bucket squares before the reduction, or the "
                 "first micro-batch on one rank) as the trainer does by default")
      ->capture_default_str();
  return mpt::bench::run_main(argc, argv, app, "bench_step", [&](nlohmann::json& report) {
    omp_set_num_threads(threads);
    mpt::MpiCommunicator host_comm;  // reduces the timings (host doubles) whatever the engine's transport
    const int N = host_comm.size();
    rc.command = "train";
    rc.grad_sync = grad_sync;
    rc.steps = warmup + iters;
    rc.global_batch = rc.micro_batch * accumulation * N;
    rc.validate();
    const mpt::GPTConfig cfg = rc.model_config(vocab);
    cfg.validate();

    mpt::Runtime runtime = mpt::bench::make_bench_runtime(device);
    auto& backend = runtime.backend;
    auto& comm = runtime.grad_comm;
    mpt::EngineConfig ec = rc.engine_config();
    ec.noise_scale = noise_scale;
    mpt::MixedPrecisionEngine engine(mpt::gpt_tensors(cfg), ec, *comm, *backend);
    engine.set_parameters(mpt::gpt_init(cfg, rc.seed));
    // The trainer's noise-scale batches (Trainer begin_step): each rank's gradient, or the first micro-batch.
    mpt::StepBatch batch;
    batch.samples = rc.global_batch;
    if (N > 1) {
      batch.small_samples = static_cast<double>(rc.global_batch / N);
    } else if (accumulation > 1) {
      batch.small_samples = static_cast<double>(rc.micro_batch);
      batch.small_grad_factor = static_cast<double>(accumulation);
    }
    engine.set_batch(batch);
    mpt::GPT model(cfg, engine.layout(), *backend, rc.dtype(), mpt::parse_recompute(rc.recompute));

    // A fixed random batch per rank and micro-batch (the step's cost does not depend on the token values).
    const int64_t B = rc.micro_batch, T = rc.seq_len;
    std::mt19937 rng(static_cast<uint32_t>(rc.seed) + static_cast<uint32_t>(host_comm.rank()));
    std::vector<std::vector<int32_t>> tokens(static_cast<size_t>(accumulation)), targets(tokens.size());
    for (size_t k = 0; k < tokens.size(); ++k) {
      tokens[k].resize(static_cast<size_t>(B * T));
      targets[k].resize(tokens[k].size());
      for (auto& x : tokens[k]) x = static_cast<int32_t>(rng() % static_cast<uint32_t>(vocab));
      for (auto& x : targets[k]) x = static_cast<int32_t>(rng() % static_cast<uint32_t>(vocab));
    }

    // Phase names in the order of the reduced vector.
    const std::vector<std::string> names = {"forward", "backward",   "grad_sync",  "optimizer",
                                            "check",   "norm_adamw", "all_gather", "step"};
    std::map<std::string, std::vector<double>> samples;
    std::vector<double> overhead_fraction;
    std::vector<double> gemm_share;  // CPU: GEMM wall time (attention's per-thread time / threads) / step
    int64_t skipped = 0;
    double last_loss = 0;
    const double update_seconds = scale_update_seconds(engine.scaler());
    for (int it = 0; it < warmup + iters; ++it) {
      host_comm.barrier();
      backend->synchronize();
      const auto t0 = Clock::now();
      const mpt::cpu::GemmSeconds gemm0 = mpt::cpu::gemm_seconds();
      double forward_seconds = 0, backward_seconds = 0;
      engine.zero_grads();
      const float factor = engine.loss_scale() / static_cast<float>(accumulation);
      double loss = 0;
      for (int64_t k = 0; k < accumulation; ++k) {
        backend->synchronize();
        const auto f0 = Clock::now();
        loss += model.forward(engine.params(), tokens[static_cast<size_t>(k)].data(),
                              targets[static_cast<size_t>(k)].data(), B, T, factor);
        backend->synchronize();
        const auto f1 = Clock::now();
        model.backward(engine.params(), engine.grads());
        engine.accumulate_micro_batch();
        if (noise_scale && k == 0 && accumulation > 1 && N == 1) engine.sample_micro_batch();
        backend->synchronize();
        const auto f2 = Clock::now();
        forward_seconds += seconds_between(f0, f1);
        backward_seconds += seconds_between(f1, f2);
      }
      last_loss = loss / static_cast<double>(accumulation);
      const auto s0 = Clock::now();
      engine.sync_grads();
      backend->synchronize();
      const auto s1 = Clock::now();
      const mpt::StepResult r = engine.step();
      backend->synchronize();
      const auto s2 = Clock::now();
      const double sync_seconds = seconds_between(s0, s1), optimizer_seconds = seconds_between(s1, s2);
      std::vector<double> t = {forward_seconds,   backward_seconds,       sync_seconds,
                               optimizer_seconds, r.check_seconds,        r.optimizer_seconds,
                               r.gather_seconds,  seconds_between(t0, s2)};
      host_comm.all_reduce(std::span<double>(t), mpt::ReduceOp::max);
      const mpt::cpu::GemmSeconds gemm1 = mpt::cpu::gemm_seconds();
      const double gemm_wall = (gemm1.outside_seconds - gemm0.outside_seconds) +
                               (gemm1.inside_thread_seconds - gemm0.inside_thread_seconds) / threads;
      if (it < warmup) continue;
      gemm_share.push_back(gemm_wall / seconds_between(t0, s2));
      skipped += r.skipped ? 1 : 0;
      for (size_t i = 0; i < names.size(); ++i) samples[names[i]].push_back(t[i]);
      overhead_fraction.push_back((t[4] + update_seconds) / t[7]);
    }

    if (host_comm.rank() == 0) {
      const double flops_per_token = mpt::gpt_flops_per_token(cfg, T);
      const double peak = peak_tflops > 0 ? peak_tflops * 1e12 : backend->peak_flops();
      const double tokens_per_step = static_cast<double>(B * accumulation * T * N);
      const mpt::bench::Stats step = mpt::bench::stats(samples["step"]);
      report["benchmark"] = "training_step";
      report["config"] = {{"device", device},
                          {"backend", backend->name()},
                          {"comm", comm->name()},
                          {"precision", rc.precision},
                          {"layers", cfg.num_layers},
                          {"channels", cfg.channels},
                          {"heads", cfg.num_heads},
                          {"seq_len", T},
                          {"vocab", cfg.vocab_size},
                          {"micro_batch", B},
                          {"recompute", rc.recompute},
                          {"accumulation", accumulation},
                          {"ranks", N},
                          {"threads", threads},
                          {"warmup", warmup},
                          {"iters", iters},
                          {"noise_scale", noise_scale},
                          {"grad_sync", grad_sync},
                          {"bucket_mib", rc.bucket_mib},
                          {"buckets", engine.layout().buckets().size()},
                          {"adamw",
                           {{"lr", rc.lr},
                            {"beta1", rc.beta1},
                            {"beta2", rc.beta2},
                            {"eps", rc.eps},
                            {"weight_decay", rc.weight_decay},
                            {"grad_clip", rc.grad_clip}}}};
      report["machine"] = mpt::bench::machine_json(N, threads);
      report["parameters"] = engine.layout().num_parameters();
      report["tokens_per_step"] = tokens_per_step;
      report["time_reduction"] = "max over ranks per iteration; median/min/max over iterations";
      report["step_seconds"] = to_json(step);
      // Throughput statistics from the step times: the fastest step gives the max tokens/s.
      report["tokens_per_second"] = {{"median", tokens_per_step / step.median},
                                     {"min", tokens_per_step / step.max},
                                     {"max", tokens_per_step / step.min}};
      for (const char* phase : {"forward", "backward", "grad_sync", "optimizer"})
        report["phases_seconds"][phase] = to_json(mpt::bench::stats(samples[phase]));
      for (const char* phase : {"check", "norm_adamw", "all_gather"})
        report["optimizer_subphases_seconds"][phase] = to_json(mpt::bench::stats(samples[phase]));
      report["flops_per_token"] = flops_per_token;
      report["flops_formula"] = "6N + 12*L*C*T per token (PaLM appendix B), N = all parameters";
      report["peak_flops"] = peak;
      report["peak_flops_source"] =
          peak_tflops > 0 ? "--peak-tflops" : backend->name() + " backend peak_flops() (CPU: measured SGEMM)";
      report["mfu"] = tokens_per_step / step.median * flops_per_token / (static_cast<double>(N) * peak);
      const mpt::bench::Stats overhead = mpt::bench::stats(overhead_fraction);
      report["loss_scaling_overhead"] = overhead.median;
      report["loss_scaling_overhead_detail"] = {
          {"definition",
           "(phase 4-5 check + found_inf agreement + one scale update) / step, per iteration, median"},
          {"fraction", to_json(overhead)},
          {"scale_update_seconds", update_seconds},
          {"scaler_enabled", rc.precision == "fp16"},
          {"note",
           "the check pass also produces the grad-norm block sums that clipping needs in every mode"}};
      if (backend->name() == "cpu") {
        report["gemm_share"] = to_json(mpt::bench::stats(gemm_share));
        report["gemm_share_definition"] =
            "rank 0: wall time inside OpenBLAS/oneDNN GEMM calls per step / step time, per iteration "
            "(attention's "
            "per-head GEMMs run inside a parallel region: their summed thread time / threads)";
      }
      report["skipped_steps"] = skipped;
      report["loss_last_step"] = last_loss;
      report["loss_scale"] = engine.loss_scale();
      const mpt::MemoryReport m = engine.memory();
      report["memory_bytes_per_rank"] = {{"state", m.state_bytes()},
                                         {"activations", model.activation_bytes()}};
      std::fprintf(
          stderr,
          "bench_step %s %s L=%lld C=%lld T=%lld B=%lld K=%lld ranks=%d threads=%d: step %.1f ms "
          "(min %.1f max %.1f), %.0f tokens/s, MFU %.1f%%, loss scaling %.3f%%, GEMM %.1f%% of step\n",
          device.c_str(), rc.precision.c_str(), static_cast<long long>(cfg.num_layers),
          static_cast<long long>(cfg.channels), static_cast<long long>(T), static_cast<long long>(B),
          static_cast<long long>(accumulation), N, threads, 1e3 * step.median, 1e3 * step.min, 1e3 * step.max,
          tokens_per_step / step.median, 100.0 * report["mfu"].get<double>(), 100.0 * overhead.median,
          gemm_share.empty() ? 0.0 : 100.0 * mpt::bench::stats(gemm_share).median);
    }
    return 0;
  });
}
