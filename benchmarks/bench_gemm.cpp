// Time of the CPU linear layer (kernels/cpu/matmul.cpp) per storage type and thread count, and of its three
// GEMMs alone in each library the backend can use (OpenBLAS SGEMM, oneDNN f32 and bf16 matmul): the
// measurement behind the choice of library (`bench_gemm --benchmark_filter=gemm/`).
//
// Shapes are the GPT MLP of a small model at B=16, T=128 (rows = 2048), C = 128: the expansion fc
// (IC=128 -> OC=512) and the projection back (IC=512 -> OC=128). matmul_backward runs both transposed GEMMs
// (dinp = dout @ W and dweight = dout^T @ inp) plus the bias column sums. float calls SGEMM on the operands;
// half and bf16 add the widening of every operand to FP32, the rounding of every result and, in backward, the
// read-modify-write of the stored gradients, so their difference from float is the cost of the numerics
// contract on a CPU without native FP16/BF16 GEMM.
//
// Thread counts are explicit (omp_set_num_threads for mptrain's loops, openblas_set_num_threads for the
// GEMMs when OpenBLAS is the BLAS), so rows for 1 and 2 threads are comparable on any machine. Times are wall
// clock; the GFLOP/s counter counts 2 * rows * IC * OC per GEMM. Link OpenBLAS's OpenMP build (the project's
// CMake prefers it): with the pthread build, libgomp's spinning workers and OpenBLAS's own threads compete
// for the cores and 2 threads ran 2-4x slower than 1 on a 2-core machine (OMP_WAIT_POLICY=passive also avoids
// it).
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include <benchmark/benchmark.h>
#include <fmt/format.h>
#include <omp.h>

#include "cpu/onednn_gemm.hpp"
#include "cpu/ops.hpp"
#include "mptrain/backend.hpp"
#include "mptrain/dtype.hpp"
#include "mptrain/error.hpp"

// OpenBLAS's thread-count setter, when the BLAS linked in is OpenBLAS (weak: null otherwise).
extern "C" void openblas_set_num_threads(int num_threads) __attribute__((weak));

namespace {

using mpt::bf16;
using mpt::half;

struct Shape {
  const char* name;
  int64_t rows;
  int64_t IC;
  int64_t OC;
};

constexpr Shape kShapes[] = {
    {"fc", 2048, 128, 512},
    {"proj", 2048, 512, 128},
};
constexpr int kThreadCounts[] = {1, 2};

void set_threads(int threads) {
  omp_set_num_threads(threads);
  if (openblas_set_num_threads != nullptr) openblas_set_num_threads(threads);
}

/// n values ~ N(0, 1) stored as T.
template <typename T>
std::vector<T> random_values(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<T> x(n);
  for (T& v : x) v = mpt::from_float<T>(dist(rng));
  return x;
}

template <typename T>
void bench_forward(benchmark::State& state, Shape s, int threads) {
  set_threads(threads);
  const auto inp = random_values<T>(static_cast<size_t>(s.rows * s.IC), 1);
  const auto weight = random_values<T>(static_cast<size_t>(s.OC * s.IC), 2);
  const auto bias = random_values<T>(static_cast<size_t>(s.OC), 3);
  std::vector<T> out(static_cast<size_t>(s.rows * s.OC));
  std::vector<float> workspace;
  for (auto _ : state) {
    mpt::cpu::matmul_forward<T>(out.data(), inp.data(), weight.data(), bias.data(), s.rows, s.IC, s.OC,
                                workspace);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  state.counters["GFLOP/s"] = benchmark::Counter(2.0 * static_cast<double>(s.rows * s.IC * s.OC) * 1e-9,
                                                 benchmark::Counter::kIsIterationInvariantRate);
}

template <typename T>
void bench_backward(benchmark::State& state, Shape s, int threads) {
  set_threads(threads);
  const auto inp = random_values<T>(static_cast<size_t>(s.rows * s.IC), 1);
  const auto weight = random_values<T>(static_cast<size_t>(s.OC * s.IC), 2);
  const auto dout = random_values<T>(static_cast<size_t>(s.rows * s.OC), 4);
  // Gradients start at zero and grow by one gradient per iteration; the values never matter for the time
  // (no FP16 subnormal or inf slow path: the conversions are branch-free SIMD).
  std::vector<T> dinp(inp.size()), dweight(weight.size()), dbias(static_cast<size_t>(s.OC));
  std::vector<float> workspace;
  for (auto _ : state) {
    mpt::cpu::matmul_backward<T>(dinp.data(), dweight.data(), dbias.data(), dout.data(), inp.data(),
                                 weight.data(), s.rows, s.IC, s.OC, workspace);
    benchmark::DoNotOptimize(dinp.data());
    benchmark::DoNotOptimize(dweight.data());
    benchmark::ClobberMemory();
  }
  state.counters["GFLOP/s"] = benchmark::Counter(4.0 * static_cast<double>(s.rows * s.IC * s.OC) * 1e-9,
                                                 benchmark::Counter::kIsIterationInvariantRate);
}

template <typename T>
void register_dtype(const char* dtype) {
  for (const Shape& s : kShapes) {
    for (int threads : kThreadCounts) {
      const std::string suffix =
          fmt::format("{}/{}/{}x{}x{}/threads:{}", dtype, s.name, s.rows, s.IC, s.OC, threads);
      benchmark::RegisterBenchmark(("matmul_forward/" + suffix).c_str(), bench_forward<T>, s, threads)
          ->Unit(benchmark::kMillisecond)
          ->UseRealTime();
      benchmark::RegisterBenchmark(("matmul_backward/" + suffix).c_str(), bench_backward<T>, s, threads)
          ->Unit(benchmark::kMillisecond)
          ->UseRealTime();
    }
  }
}

// ---- The GEMM libraries alone, on the three GEMMs of the linear layer: which one the CPU backend uses.
// openblas_f32: OpenBLAS in blas_gemm's fixed blocks of single-threaded calls (the model's FP32 GEMM on CPUs
// without AVX-512); onednn_f32 and onednn_bf16: oneDNN with its own threading; mptrain_f32: linear_gemm, the
// model's FP32 GEMM as it runs (oneDNN in the fixed blocks where the CPU has AVX-512). ----

enum class Library { openblas_f32, onednn_f32, onednn_bf16, mptrain_f32 };

/// One of the linear layer's GEMMs, C = op(A) op(B): forward out = inp W^T [rows,OC]; dinp = dout W
/// [rows,IC]; dweight = dout^T inp [OC,IC].
struct Gemm {
  const char* name;
  bool trans_a, trans_b;
  int64_t M, N, K;
};

void bench_library(benchmark::State& state, Library lib, Gemm g, int threads) {
  if (lib == Library::onednn_bf16 && !mpt::cpu::onednn_native_bf16()) {
    // oneDNN has no BF16 matmul for these operands without AVX512_BF16/AMX (it throws); the model uses the
    // FP32-copy path there.
    state.SkipWithError("no native BF16 matmul on this CPU (oneDNN's effective ISA)");
    return;
  }
  set_threads(threads);
  const int64_t lda = g.trans_a ? g.M : g.K, ldb = g.trans_b ? g.K : g.N;
  const auto a = random_values<float>(static_cast<size_t>(g.M * g.K), 1);
  const auto b = random_values<float>(static_cast<size_t>(g.K * g.N), 2);
  const auto a16 = random_values<bf16>(a.size(), 1);
  const auto b16 = random_values<bf16>(b.size(), 2);
  std::vector<float> c(static_cast<size_t>(g.M * g.N));
  for (auto _ : state) {
    switch (lib) {
      case Library::openblas_f32:
        mpt::cpu::blas_gemm<float>(g.trans_a, g.trans_b, g.M, g.N, g.K, 1.0f, a.data(), lda, b.data(), ldb,
                                   0.0f, c.data(), g.N);
        break;
      case Library::onednn_f32:
        mpt::cpu::onednn_gemm<float>(g.trans_a, g.trans_b, g.M, g.N, g.K, a.data(), lda, b.data(), ldb, 0.0f,
                                     c.data(), g.N);
        break;
      case Library::mptrain_f32:
        mpt::cpu::linear_gemm<float>(g.trans_a, g.trans_b, g.M, g.N, g.K, a.data(), lda, b.data(), ldb, 0.0f,
                                     c.data(), g.N);
        break;
      case Library::onednn_bf16:
        mpt::cpu::onednn_gemm<bf16>(g.trans_a, g.trans_b, g.M, g.N, g.K, a16.data(), lda, b16.data(), ldb,
                                    0.0f, c.data(), g.N);
        break;
    }
    benchmark::DoNotOptimize(c.data());
    benchmark::ClobberMemory();
  }
  state.counters["GFLOP/s"] = benchmark::Counter(2.0 * static_cast<double>(g.M * g.N * g.K) * 1e-9,
                                                 benchmark::Counter::kIsIterationInvariantRate);
}

void register_libraries() {
  const std::pair<Library, const char*> libs[] = {{Library::openblas_f32, "openblas_f32"},
                                                  {Library::onednn_f32, "onednn_f32"},
                                                  {Library::onednn_bf16, "onednn_bf16"},
                                                  {Library::mptrain_f32, "mptrain_f32"}};
  for (const Shape& s : kShapes) {
    const Gemm gemms[] = {{"forward", false, true, s.rows, s.OC, s.IC},
                          {"dinp", false, false, s.rows, s.IC, s.OC},
                          {"dweight", true, false, s.OC, s.IC, s.rows}};
    for (const Gemm& g : gemms)
      for (int threads : kThreadCounts)
        for (const auto& [lib, lib_name] : libs) {
          const std::string name = fmt::format("gemm/{}/{}/{}/{}x{}x{}/threads:{}", lib_name, s.name, g.name,
                                               g.M, g.N, g.K, threads);
          benchmark::RegisterBenchmark(name.c_str(), bench_library, lib, g, threads)
              ->Unit(benchmark::kMillisecond)
              ->UseRealTime();
        }
  }
}

}  // namespace

// Google Benchmark's main, after the check of the backend's environment switches (MPTRAIN_ONEDNN_F32,
// MPTRAIN_ONEDNN_BF16), which the library rows read: a bad value is one error line and exit 2.
int main(int argc, char** argv) {
  try {
    mpt::check_cpu_backend_environment();
  } catch (const mpt::InputError& e) {
    std::fprintf(stderr, "bench_gemm: %s\n", e.what());
    return 2;
  }
  register_libraries();
  register_dtype<float>("f32");
  register_dtype<half>("f16");
  register_dtype<bf16>("bf16");
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
