// oneDNN matmul for the CPU linear layer (internal): the native BF16 GEMM on CPUs with AVX512_BF16 or AMX,
// where OpenBLAS (Debian's 0.3.21 has no cblas_sbgemm) would need FP32 copies of every operand.
//
// Numerics: products of BF16 operands are exact in FP32 and accumulated in FP32 (oneDNN's brgemm kernels,
// VDPBF16PS / AMX tiles). Unlike the FP32-copy path these instructions treat BF16 subnormal inputs (|x| <
// 2^-126) as zero, as PyTorch's CPU BF16 matmul does; results are otherwise the FP32-accumulated products in
// a blocked summation order that depends on the shape and the oneDNN version, and not on the thread count
// (tests/test_cpu_matmul_attention.cpp checks 1, 2 and 3 threads bitwise).
#pragma once

#include <cstdint>

#include "mptrain/dtype.hpp"

namespace mpt::cpu {

/// True when oneDNN runs BF16 matmul natively on this CPU (its effective ISA is avx512_core_bf16 or one
/// with AMX), checked once. The environment's MPTRAIN_ONEDNN_BF16 (unset, empty or "auto": that choice) set
/// to 0 gives false (the FP32-copy path, for comparison); set to 1 it requires native BF16. Throws
/// mpt::InputError naming the variable for any other value, or for 1 on a CPU without native BF16 (again on
/// every call, as nothing is cached then).
bool onednn_native_bf16();

/// True when the linear layer's FP32 GEMMs (float storage, and the FP32 copies of FP16 and of BF16 without
/// native BF16) run on oneDNN's f32 matmul instead of OpenBLAS SGEMM: where oneDNN's effective ISA is AVX-512
/// (avx512_core or newer), on which `bench_gemm --benchmark_filter=gemm/` measured it 8-23% faster than
/// OpenBLAS at the model's GEMMs (Zen 4, 2 threads). MPTRAIN_ONEDNN_F32=0 in the environment forces OpenBLAS,
/// =1 oneDNN on any CPU (for comparison); unset, empty or "auto" is the choice above. Its kernels point the
/// stack pointer into the heap while they run, which is safe because no compute thread runs a signal handler
/// (mptrain/stop_signal.hpp). Checked once. Throws mpt::InputError naming the variable for any other value.
bool onednn_f32_preferred();

/// Row-major C[M,N] (FP32) = op(A) op(B) + beta C through a oneDNN matmul, op(X) = X^T when trans_x; A is
/// [M,K] (or [K,M] transposed) with leading dimension lda, B is [K,N] (or [N,K]) with ldb; S is float or
/// bf16; beta is 0 or 1. With `bias` (FP32 [N], may be null) every row also gets + bias, added by oneDNN to
/// the finished FP32 sum (its matmul bias argument), so each output is round(sum + bias) in one rounding.
/// Runs on omp_get_max_threads() threads, or on the calling thread alone inside a parallel region (oneDNN's
/// OpenMP runtime; the primitive is then oneDNN's single-threaded one, whose result depends on the shape
/// alone). Sizes must be positive. Throws mpt::Error when oneDNN rejects the call. Not counted in
/// gemm_seconds() (mptrain/cpu_profile.hpp): its caller in matmul.cpp times the whole blocked GEMM.
template <typename S>
void onednn_gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const S* A, int64_t lda,
                 const S* B, int64_t ldb, float beta, float* C, int64_t ldc, const float* bias = nullptr);

}  // namespace mpt::cpu
