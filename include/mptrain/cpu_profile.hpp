// Profiling counters of the CPU backend's GEMMs, for benchmarks (bench_step's GEMM share of the step).
#pragma once

#include <cstdint>

namespace mpt::cpu {

/// Seconds spent in the CPU backend's GEMM library calls (OpenBLAS, oneDNN) since the process started
/// (process-wide relaxed atomics, a few ns per call; never reset: callers take differences).
/// `outside_seconds`: wall time of the calls made outside an OpenMP parallel region (the linear layer's
/// GEMMs, which use all threads). `inside_thread_seconds`: the summed per-thread time of the calls made
/// inside one (attention's per-head GEMMs; divide by the thread count for wall time).
struct GemmSeconds {
  double outside_seconds = 0;
  double inside_thread_seconds = 0;
};
GemmSeconds gemm_seconds();

}  // namespace mpt::cpu
