// bench_model: forward + backward time of the GPT model on the CPU backend, per storage dtype and thread
// count, with tokens/s and achieved FLOP/s (6N + 12 L C T per token, PaLM appendix B). Thread counts are set
// explicitly (omp_set_num_threads) for every configuration; the report gives median, min and max over
// iterations as JSON. --init-only times gpt_init (the initial weights, drawn in parallel) per thread count
// instead.
//
//   build/benchmarks/bench_model --layers 4 --channels 128 --heads 4 --seq 128 --batch 16 --threads 1,2
//   build/benchmarks/bench_model --init-only --vocab 50304 --layers 24 --channels 2048 --heads 16
//     --seq 1024 --threads 1,2 --iters 1 --warmup 0   (one command line)
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include <omp.h>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "bench_common.hpp"
#include "bench_stats.hpp"
#include "mptrain/model.hpp"

using mpt::bench::Stats;
using mpt::bench::stats;

int main(int argc, char** argv) {
  CLI::App app{"Times GPT forward + backward on the CPU backend per dtype and thread count"};
  mpt::GPTConfig cfg;
  cfg.vocab_size = 256;
  cfg.num_layers = 4;
  cfg.channels = 128;
  cfg.num_heads = 4;
  int64_t T = 128, B = 16;
  std::vector<int> threads = {1, 2};
  std::vector<std::string> dtypes = {"fp32", "fp16", "bf16"};
  int warmup = 1, iters = 5;
  std::string json_path;
  bool init_only = false;
  app.add_option("--vocab", cfg.vocab_size, "vocabulary size V")->capture_default_str();
  app.add_option("--layers", cfg.num_layers, "transformer blocks L")->capture_default_str();
  app.add_option("--channels", cfg.channels, "channels C")->capture_default_str();
  app.add_option("--heads", cfg.num_heads, "attention heads NH")->capture_default_str();
  app.add_option("--seq", T, "sequence length T (tokens)")->capture_default_str();
  app.add_option("--batch", B, "sequences per forward B")->capture_default_str();
  app.add_option("--threads", threads, "OpenMP thread counts to run (comma separated)")
      ->delimiter(',')
      ->capture_default_str();
  app.add_option("--dtypes", dtypes, "storage dtypes (fp32, fp16, bf16; comma separated)")
      ->delimiter(',')
      ->capture_default_str();
  mpt::bench::add_timing_flags(app, warmup, iters, "iterations per configuration");
  app.add_option("--json", json_path, "also write the JSON report to this file");
  app.add_flag("--init-only", init_only,
               "time gpt_init (the initial weights) per thread count, nothing else");
  CLI11_PARSE(app, argc, argv);
  cfg.max_seq_len = T;
  try {
    cfg.validate();
  } catch (const mpt::Error& e) {
    std::fprintf(stderr, "bench_model: %s\n", e.what());
    return 2;
  }

  nlohmann::json report;
  if (init_only) {
    report["benchmark"] = "gpt_init";
    report["model"] = {
        {"V", cfg.vocab_size}, {"L", cfg.num_layers}, {"C", cfg.channels}, {"NH", cfg.num_heads}};
    for (int nt : threads) {
      omp_set_num_threads(nt);
      std::vector<double> seconds;
      size_t n = 0;
      for (int it = 0; it < warmup + iters; ++it) {
        const auto t0 = std::chrono::steady_clock::now();
        const std::vector<float> values = mpt::gpt_init(cfg, 1);
        const auto t1 = std::chrono::steady_clock::now();
        n = values.size();
        if (it >= warmup) seconds.push_back(std::chrono::duration<double>(t1 - t0).count());
      }
      const Stats st = stats(seconds);
      std::fprintf(stderr, "gpt_init %zu parameters, threads %d: %.3f s median (min %.3f, max %.3f)\n", n, nt,
                   st.median, st.min, st.max);
      report["runs"].push_back({{"threads", nt},
                                {"parameters", n},
                                {"seconds", {{"median", st.median}, {"min", st.min}, {"max", st.max}}}});
    }
    return mpt::bench::emit_json(report, json_path, "bench_model") ? 0 : 1;
  }
  report["benchmark"] = "gpt_forward_backward";
  report["backend"] = "cpu";
  report["model"] = {{"V", cfg.vocab_size},
                     {"L", cfg.num_layers},
                     {"C", cfg.channels},
                     {"NH", cfg.num_heads},
                     {"T", T},
                     {"B", B}};
  const double flops_per_token = mpt::gpt_flops_per_token(cfg, T);
  report["flops_per_token"] = flops_per_token;
  report["flops_formula"] = "6N + 12 L C T (PaLM appendix B), N = all parameters";
  std::mt19937 rng(1);
  std::vector<int32_t> tokens(static_cast<size_t>(B * T)), targets(tokens.size());
  for (auto& x : tokens) x = static_cast<int32_t>(rng() % static_cast<uint32_t>(cfg.vocab_size));
  for (auto& x : targets) x = static_cast<int32_t>(rng() % static_cast<uint32_t>(cfg.vocab_size));

  for (const std::string& name : dtypes) {
    const mpt::DType dt = name == "fp16"   ? mpt::DType::f16
                          : name == "bf16" ? mpt::DType::bf16
                                           : mpt::DType::f32;
    auto backend = mpt::make_cpu_backend();
    const mpt::ParamLayout layout(mpt::gpt_tensors(cfg), mpt::LayoutOptions{}, 1);
    mpt::Buffer params = backend->allocate(layout.padded_elements() * mpt::dtype_size(dt));
    mpt::Buffer grads = backend->allocate(layout.padded_elements() * mpt::dtype_size(dt));
    const auto values = mpt::gpt_init(cfg, 1);
    mpt::dispatch_float_dtype(dt, [&]<typename S>() {
      size_t at = 0;
      for (const auto& t : layout.tensors())
        for (size_t i = 0; i < t.spec.num_elements(); ++i)
          params.as<S>()[t.offset + i] = mpt::from_float<S>(values[at++]);
    });
    mpt::GPT model(cfg, layout, *backend, dt);
    for (int nt : threads) {
      omp_set_num_threads(nt);
      std::vector<double> fwd, bwd;
      for (int it = 0; it < warmup + iters; ++it) {
        const auto t0 = std::chrono::steady_clock::now();
        model.forward(params.data(), tokens.data(), targets.data(), B, T, 1.0f);
        const auto t1 = std::chrono::steady_clock::now();
        model.backward(params.data(), grads.data());
        const auto t2 = std::chrono::steady_clock::now();
        if (it < warmup) continue;
        fwd.push_back(std::chrono::duration<double>(t1 - t0).count());
        bwd.push_back(std::chrono::duration<double>(t2 - t1).count());
      }
      std::vector<double> total(fwd.size());
      for (size_t i = 0; i < fwd.size(); ++i) total[i] = fwd[i] + bwd[i];
      const Stats f = stats(fwd), b = stats(bwd), t = stats(total);
      const double tokens_per_second = static_cast<double>(B * T) / t.median;
      report["runs"].push_back({{"dtype", name},
                                {"threads", nt},
                                {"forward_seconds", {{"median", f.median}, {"min", f.min}, {"max", f.max}}},
                                {"backward_seconds", {{"median", b.median}, {"min", b.min}, {"max", b.max}}},
                                {"total_seconds", {{"median", t.median}, {"min", t.min}, {"max", t.max}}},
                                {"tokens_per_second", tokens_per_second},
                                {"gflops_per_second", tokens_per_second * flops_per_token / 1e9}});
      std::fprintf(stderr, "%-5s threads %d: fwd+bwd %.1f ms median (min %.1f, max %.1f), %.0f tokens/s\n",
                   name.c_str(), nt, 1e3 * t.median, 1e3 * t.min, 1e3 * t.max, tokens_per_second);
    }
  }
  return mpt::bench::emit_json(report, json_path, "bench_model") ? 0 : 1;
}
