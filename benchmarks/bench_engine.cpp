// bench_engine: time of the mixed-precision engine's phases per optimizer step on the CPU backend with MPI:
// gradient sync (phase 3), check + found_inf agreement (4-5), norm + AdamW (6) and weight all-gather (7),
// for a flat model of a given size. Each iteration's phase times are reduced with MAX across ranks (the
// slowest rank sets the step time); the report gives median, min and max over iterations, as JSON.
//
//   mpirun -n 2 build/benchmarks/bench_engine --params 20000000 --threads 1 --sync reduce-scatter
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <map>
#include <string>
#include <vector>

#include <omp.h>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "bench_common.hpp"
#include "bench_stats.hpp"
#include "mptrain/comm_mpi.hpp"
#include "mptrain/engine.hpp"

using mpt::bench::Stats;
using mpt::bench::stats;

int main(int argc, char** argv) {
  CLI::App app{"Times the mixed-precision engine's step phases (sync, check, AdamW, all-gather) on the CPU"};
  size_t params = 10'000'000;
  size_t tensor_elements = 1'000'000;
  std::string dtype_name = "fp16";
  std::string sync = "reduce-scatter";
  size_t bucket_mib = 25;
  int warmup = 2, iters = 10, threads = 1;
  app.add_option("--params", params, "parameters (elements) of the flat model")->capture_default_str();
  app.add_option("--tensor-elements", tensor_elements, "elements per parameter tensor")
      ->capture_default_str();
  app.add_option("--dtype", dtype_name, "storage precision")
      ->check(CLI::IsMember({"fp16", "bf16", "fp32"}))
      ->capture_default_str();
  app.add_option("--sync", sync, "gradient sync")
      ->check(CLI::IsMember({"reduce-scatter", "all-reduce"}))
      ->capture_default_str();
  app.add_option("--bucket-mib", bucket_mib, "gradient bucket size in MiB")
      ->check(CLI::Range(size_t{1}, size_t{1} << 20))
      ->capture_default_str();
  mpt::bench::add_timing_flags(app, warmup, iters, "iterations");
  app.add_option("--threads", threads, "OpenMP threads per rank (set explicitly)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  return mpt::bench::run_main(argc, argv, app, "bench_engine", [&](nlohmann::json& report) {
    omp_set_num_threads(threads);

    mpt::MpiCommunicator comm;
    auto backend = mpt::make_cpu_backend();
    std::vector<mpt::TensorSpec> tensors;
    for (size_t done = 0, k = 0; done < params; ++k) {
      const size_t n = std::min(tensor_elements, params - done);
      tensors.push_back({"t" + std::to_string(k), {static_cast<int64_t>(n)}, k % 2 == 0});
      done += n;
    }
    mpt::EngineConfig config;
    config.dtype = dtype_name == "fp16"   ? mpt::DType::f16
                   : dtype_name == "bf16" ? mpt::DType::bf16
                                          : mpt::DType::f32;
    config.grad_sync = sync == "all-reduce" ? mpt::GradSync::all_reduce : mpt::GradSync::reduce_scatter;
    config.bucket_bytes = bucket_mib << 20;
    config.grad_clip = 1.0f;
    mpt::MixedPrecisionEngine engine(tensors, config, comm, *backend);
    engine.set_parameters(std::vector<float>(engine.layout().num_parameters(), 0.01f));

    std::map<std::string, std::vector<double>> samples;
    for (int it = 0; it < warmup + iters; ++it) {
      engine.zero_grads();
      // Small finite gradients, the same on every rank: every step is applied.
      mpt::dispatch_float_dtype(config.dtype, [&]<typename T>() {
        T* g = static_cast<T*>(engine.grads());
        const T value = mpt::from_float<T>(1e-3f * engine.loss_scale());
        for (const auto& t : engine.layout().tensors())
          std::fill(g + t.offset, g + t.offset + t.spec.num_elements(), value);
      });
      comm.barrier();
      const auto t0 = std::chrono::steady_clock::now();
      engine.sync_grads();
      const double sync_seconds =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      const mpt::StepResult r = engine.step();
      std::vector<double> t = {sync_seconds, r.check_seconds, r.optimizer_seconds, r.gather_seconds,
                               sync_seconds + r.check_seconds + r.optimizer_seconds + r.gather_seconds};
      comm.all_reduce(std::span<double>(t), mpt::ReduceOp::max);
      if (it < warmup) continue;
      samples["sync"].push_back(t[0]);
      samples["check_agree"].push_back(t[1]);
      samples["norm_adamw"].push_back(t[2]);
      samples["allgather"].push_back(t[3]);
      samples["total"].push_back(t[4]);
    }

    if (comm.rank() == 0) {
      report["benchmark"] = "engine_step_phases";
      report["backend"] = "cpu";
      report["comm"] = comm.name();
      report["ranks"] = comm.size();
      report["threads_per_rank"] = threads;
      report["params"] = engine.layout().num_parameters();
      report["dtype"] = dtype_name;
      report["sync"] = sync;
      report["buckets"] = engine.layout().buckets().size();
      report["iterations"] = iters;
      report["time_reduction"] = "max over ranks per iteration";
      for (const auto& [phase, v] : samples) {
        const Stats s = stats(v);
        report["seconds"][phase] = {{"median", s.median}, {"min", s.min}, {"max", s.max}};
      }
      const Stats total = stats(samples["total"]);
      const Stats check = stats(samples["check_agree"]);
      report["check_agree_fraction_of_optimizer_phases"] = check.median / total.median;
      const auto memory = engine.memory();
      report["memory_bytes_per_rank"] = {
          {"params", memory.params_bytes}, {"grads", memory.grads_bytes},
          {"master", memory.master_bytes}, {"adam_m", memory.adam_m_bytes},
          {"adam_v", memory.adam_v_bytes}, {"state_total", memory.state_bytes()}};
    }
    return 0;
  });
}
