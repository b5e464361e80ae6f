// bench_overlap: exposed gradient-communication time with and without bucketed overlap, per bucket size.
//
// The model's backward does not report finished buckets yet, so backward is emulated faithfully: the real GPT
// forward + backward is timed first (max over ranks, median), then, per bucket in the order backward finishes
// them (bucket 0 first, DESIGN.md), real backend GEMMs (matmul_forward, FP32, sized by calibration) run for
// that bucket's share of the measured backward time (its elements / P), and the bucket is handed to the
// communicator. Modes, each timed per iteration with the max over ranks, median over iterations:
//   compute   the emulated backward alone (no communication)                           -> T_c
//   serial    emulated backward, then engine.sync_grads() (compute all, then sync)      -> exposed = T - T_c
//   overlap   engine.bucket_ready(b) after each bucket's compute, sync_grads() at the end -> exposed = T -
//   T_c polled    as overlap, with the same non-blocking collective the engine issues (ireduce_scatter /
//             iall_reduce of the bucket, ReduceOp::avg), and CommRequest::test() on every outstanding request
//             between GEMM chunks, which drives MPI's progress engine from the compute loop
//   comm      sync_grads() alone, no compute (the communication time there is to hide)
// Open MPI 4.1 has no asynchronous progress thread for its shared-memory and TCP transports: a non-blocking
// collective advances only inside MPI calls, so `overlap` hides little, and `polled` shows what polling buys.
//
//   mpiexec -n 2 build/benchmarks/bench_overlap --threads 1 --bucket-kib 64,256,1024,4096 --json overlap.json
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
#include "mptrain/engine.hpp"
#include "mptrain/model.hpp"

namespace {

using Clock = std::chrono::steady_clock;

double since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

/// A fixed FP32 GEMM (rows x K times K x K) on the backend: the unit of emulated backward compute.
struct GemmChunk {
  mpt::Backend& backend;
  int64_t rows, k;
  mpt::Buffer out, inp, weight;
  GemmChunk(mpt::Backend& b, int64_t rows_, int64_t k_)
      : backend(b),
        rows(rows_),
        k(k_),
        out(b.allocate(static_cast<size_t>(rows * k) * 4)),
        inp(b.allocate(static_cast<size_t>(rows * k) * 4)),
        weight(b.allocate(static_cast<size_t>(k * k) * 4)) {}
  void run() {
    backend.matmul_forward(out.data(), inp.data(), weight.data(), nullptr, rows, k, k, mpt::DType::f32);
  }
};

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Exposed gradient communication with and without bucketed overlap (emulated backward), JSON"};
  mpt::RunConfig rc;
  rc.channels = 256;
  rc.micro_batch = 8;
  std::string grad_sync = "reduce-scatter";
  int64_t vocab = 256;
  std::vector<double> bucket_kib = {64, 256, 1024, 4096};
  int threads = 1, warmup = 2, iters = 8;
  int64_t chunk_rows = 64, chunk_k = 256;
  mpt::bench::add_model_flags(app, rc, vocab, "sequences per rank B (sets the backward time)");
  app.add_option("--bucket-kib", bucket_kib, "bucket sizes in KiB (comma separated)")
      ->delimiter(',')
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--grad-sync", grad_sync, "gradient reduction")
      ->check(CLI::IsMember({"reduce-scatter", "all-reduce"}))
      ->capture_default_str();
  app.add_option("--threads", threads, "OpenMP threads per rank")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  mpt::bench::add_timing_flags(app, warmup, iters, "iterations per mode");
  app.add_option("--chunk-rows", chunk_rows, "rows of the emulation GEMM (its granularity and poll interval)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  return mpt::bench::run_main(argc, argv, app, "bench_overlap", [&](nlohmann::json& report) {
    omp_set_num_threads(threads);
    rc.grad_sync = grad_sync;
    rc.command = "train";
    rc.global_batch = rc.micro_batch;  // one micro-batch per rank: only the engine settings matter here
    rc.validate();
    mpt::MpiCommunicator host_comm;
    const int N = host_comm.size();
    const mpt::GPTConfig cfg = rc.model_config(vocab);
    cfg.validate();
    mpt::Runtime runtime = mpt::bench::make_bench_runtime("cpu");
    auto& backend = runtime.backend;
    auto& comm = runtime.grad_comm;
    const auto max_over_ranks = [&](double t) {
      host_comm.all_reduce(std::span<double>(&t, 1), mpt::ReduceOp::max);
      return t;
    };

    // 1. The real backward time of this shape (median over iterations of the max over ranks).
    double backward_seconds = 0;
    size_t num_parameters = 0;
    {
      mpt::MixedPrecisionEngine engine(mpt::gpt_tensors(cfg), rc.engine_config(), *comm, *backend);
      engine.set_parameters(mpt::gpt_init(cfg, rc.seed));
      num_parameters = engine.layout().num_parameters();
      mpt::GPT model(cfg, engine.layout(), *backend, rc.dtype());
      const int64_t B = rc.micro_batch, T = rc.seq_len;
      std::mt19937 rng(static_cast<uint32_t>(host_comm.rank() + 1));
      std::vector<int32_t> tokens(static_cast<size_t>(B * T)), targets(tokens.size());
      for (auto& x : tokens) x = static_cast<int32_t>(rng() % static_cast<uint32_t>(vocab));
      for (auto& x : targets) x = static_cast<int32_t>(rng() % static_cast<uint32_t>(vocab));
      std::vector<double> v;
      for (int it = 0; it < warmup + iters; ++it) {
        model.forward(engine.params(), tokens.data(), targets.data(), B, T, 1.0f);
        host_comm.barrier();
        const auto t0 = Clock::now();
        model.backward(engine.params(), engine.grads());
        const double t = max_over_ranks(since(t0));
        if (it >= warmup) v.push_back(t);
      }
      backward_seconds = mpt::bench::stats(v).median;
    }

    // 2. Calibrate the emulation GEMM.
    GemmChunk chunk(*backend, chunk_rows, chunk_k);
    double chunk_seconds = 0;
    {
      for (int i = 0; i < 5; ++i) chunk.run();
      std::vector<double> v;
      for (int i = 0; i < 30; ++i) {
        const auto t0 = Clock::now();
        chunk.run();
        v.push_back(since(t0));
      }
      chunk_seconds = max_over_ranks(mpt::bench::stats(v).median);
    }

    report["benchmark"] = "gradient_sync_overlap";
    report["config"] = {{"precision", rc.precision},
                        {"layers", cfg.num_layers},
                        {"channels", cfg.channels},
                        {"heads", cfg.num_heads},
                        {"seq_len", rc.seq_len},
                        {"vocab", cfg.vocab_size},
                        {"micro_batch", rc.micro_batch},
                        {"grad_sync", grad_sync},
                        {"ranks", N},
                        {"threads", threads},
                        {"iters", iters}};
    report["machine"] = mpt::bench::machine_json(N, threads);
    report["parameters"] = num_parameters;
    report["measured_backward_seconds"] = backward_seconds;
    report["emulation"] = {{"gemm", {{"rows", chunk_rows}, {"k", chunk_k}, {"dtype", "fp32"}}},
                           {"chunk_seconds", chunk_seconds}};
    report["time"] = "median over iterations of the max over ranks";
    report["exposed_definition"] = "mode time - compute-only time";

    for (const double kib : bucket_kib) {
      mpt::EngineConfig ec = rc.engine_config();
      ec.bucket_bytes = static_cast<size_t>(kib * 1024.0);
      mpt::MixedPrecisionEngine engine(mpt::gpt_tensors(cfg), ec, *comm, *backend);
      const auto& layout = engine.layout();
      const size_t nb = layout.buckets().size();
      std::vector<int64_t> chunks(nb);
      int64_t total_chunks = 0;
      for (size_t b = 0; b < nb; ++b) {
        const double share = backward_seconds * static_cast<double>(layout.buckets()[b].num_elements) /
                             static_cast<double>(num_parameters);
        chunks[b] = std::max<int64_t>(1, static_cast<int64_t>(share / chunk_seconds + 0.5));
        total_chunks += chunks[b];
      }
      const mpt::DType gdt = engine.grad_dtype();
      const size_t esize = mpt::dtype_size(gdt);
      auto* grads = static_cast<std::byte*>(engine.grads());
      // The engine's bucket_ready call, with the request kept here so it can be polled.
      const auto start_bucket = [&](size_t b) {
        const mpt::Bucket& bk = layout.buckets()[b];
        std::byte* base = grads + bk.offset * esize;
        if (ec.grad_sync == mpt::GradSync::reduce_scatter)
          return comm->ireduce_scatter(base, grads + layout.slice_offset(b, comm->rank()) * esize,
                                       bk.slice_elements, gdt, mpt::ReduceOp::avg);
        return comm->iall_reduce(base, base, bk.padded_elements, gdt, mpt::ReduceOp::avg);
      };

      std::map<std::string, std::vector<double>> samples;
      for (const std::string mode : {"compute", "serial", "overlap", "polled", "comm"}) {
        for (int it = 0; it < warmup + iters; ++it) {
          engine.zero_grads();
          host_comm.barrier();
          const auto t0 = Clock::now();
          if (mode == "compute") {
            for (int64_t c = 0; c < total_chunks; ++c) chunk.run();
          } else if (mode == "serial") {
            for (int64_t c = 0; c < total_chunks; ++c) chunk.run();
            engine.sync_grads();
          } else if (mode == "overlap") {
            for (size_t b = 0; b < nb; ++b) {
              for (int64_t c = 0; c < chunks[b]; ++c) chunk.run();
              engine.bucket_ready(b);
            }
            engine.sync_grads();
          } else if (mode == "polled") {
            std::vector<std::unique_ptr<mpt::CommRequest>> pending;
            for (size_t b = 0; b < nb; ++b) {
              for (int64_t c = 0; c < chunks[b]; ++c) {
                chunk.run();
                for (auto& r : pending) r->test();
              }
              pending.push_back(start_bucket(b));
            }
            for (auto& r : pending) r->wait();
          } else {
            engine.sync_grads();
          }
          const double t = max_over_ranks(since(t0));
          // The engine holds its requests until step(); finish the step (outside the timed region).
          if (mode == "serial" || mode == "overlap" || mode == "comm") engine.step();
          if (it >= warmup) samples[mode].push_back(t);
        }
      }
      const double compute = mpt::bench::stats(samples["compute"]).median;
      nlohmann::json row = {
          {"bucket_kib", kib}, {"buckets", nb}, {"gradient_bytes", layout.padded_elements() * esize}};
      for (const auto& [mode, v] : samples) {
        const mpt::bench::Stats s = mpt::bench::stats(v);
        row["seconds"][mode] = {{"median", s.median}, {"min", s.min}, {"max", s.max}};
      }
      for (const char* mode : {"serial", "overlap", "polled"})
        row["exposed_seconds"][mode] = mpt::bench::stats(samples[mode]).median - compute;
      if (host_comm.rank() == 0)
        std::fprintf(
            stderr,
            "bucket %7.0f KiB (%3zu buckets): compute %.2f ms, comm alone %.2f ms; exposed: serial %.2f ms, "
            "overlap %.2f ms, overlap+polling %.2f ms\n",
            kib, nb, 1e3 * compute, 1e3 * mpt::bench::stats(samples["comm"]).median,
            1e3 * row["exposed_seconds"]["serial"].get<double>(),
            1e3 * row["exposed_seconds"]["overlap"].get<double>(),
            1e3 * row["exposed_seconds"]["polled"].get<double>());
      report["results"].push_back(row);
    }
    return 0;
  });
}
