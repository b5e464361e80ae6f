// CPU backend op templates (internal): instantiated for float, half and bf16 storage, computing in FP32/FP64.
#pragma once

#include <algorithm>
#include <cstdint>
#include <span>
#include <type_traits>
#include <vector>

#include "mptrain/backend.hpp"
#include "mptrain/cpu_profile.hpp"

namespace mpt::cpu {

/// See Backend::grad_check. Blocks are processed in parallel; each block's sum runs in element order, so the
/// result does not depend on the thread count.
template <typename T>
bool grad_check(const T* grads, std::span<const ElementRange> ranges, size_t block_elements,
                std::span<double> block_sums_out);

/// See Backend::amp_prepare: the block sums added one by one in `order`, then common::amp_prepare.
void amp_prepare(common::AmpState& state, const double* gathered_block_sums, std::span<const size_t> order,
                 const common::OptimizerRule& rule);

/// See Backend::sum_losses: FP64, position order.
void sum_losses(double* acc, const float* losses, int64_t n);

/// See Backend::adamw.
template <typename T>
void adamw(float* master, float* m, float* v, const T* grads, std::span<const AdamWSegment> segments,
           const common::AdamWStep& step);

/// See Backend::lamb_moments (the found_inf check is the caller's). Segments in parallel; each segment's sums
/// in a fixed order of its element positions.
template <typename T>
void lamb_moments(const float* master, float* m, float* v, const T* grads,
                  std::span<const LambSegment> segments, double* segment_sums, const common::AdamWStep& step);

/// See Backend::lamb_trust: each tensor's segment sums added one by one in `order`.
void lamb_trust(float* trust, const double* gathered_sums, std::span<const size_t> order,
                std::span<const size_t> tensor_begin);

/// See Backend::lamb_apply (the found_inf check is the caller's).
void lamb_apply(float* master, const float* m, const float* v, std::span<const LambSegment> segments,
                const float* trust, const common::AdamWStep& step);

/// See Backend::sum_squares: fixed chunks in parallel, combined in chunk order.
template <typename T>
double sum_squares(const T* data, size_t num_elements);

/// See Backend::noise_prepare: the gathered values added one by one in `indices` order.
void noise_prepare(common::AmpState& state, const double* gathered, std::span<const size_t> indices,
                   const common::NoiseRule& rule);

/// See Backend::cast_master.
template <typename T>
void cast_master(T* params, const float* master, std::span<const ElementRange> ranges);

}  // namespace mpt::cpu

// ---- model ops: see the Backend methods of the same names for shapes and semantics. Instantiated for
// float, half, bf16 and double (double for finite-difference tests; it computes in double). ----

namespace mpt::cpu {

/// FP32 for float/half/bf16 storage, double for double: the type every op computes and accumulates in.
template <typename T>
using opmath_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

/// Widens a stored value to opmath_t<T> (exact).
template <typename T>
inline opmath_t<T> load(T x) {
  return to_float(x);
}
/// Rounds an opmath_t<T> value to storage type T (round to nearest even; identity for float and double).
template <typename T>
inline T store(opmath_t<T> x) {
  if constexpr (std::is_same_v<T, double> || std::is_same_v<T, float>)
    return x;
  else
    return T(x);
}

/// dst[i] = load(src[i]) for i < n: SIMD bulk conversion for half/bf16 (bit-identical to load<T>).
template <typename T>
inline void load_n(const T* src, opmath_t<T>* dst, int64_t n) {
  if constexpr (std::is_same_v<T, opmath_t<T>>)
    std::copy_n(src, n, dst);
  else
    convert(src, dst, static_cast<size_t>(n));
}

/// dst[i] = store<T>(src[i]) for i < n (round to nearest even, bit-identical to store<T>).
template <typename T>
inline void store_n(const opmath_t<T>* src, T* dst, int64_t n) {
  if constexpr (std::is_same_v<T, opmath_t<T>>)
    std::copy_n(src, n, dst);
  else
    convert(src, dst, static_cast<size_t>(n));
}

template <typename T>
void embedding_forward(T* out, const int32_t* tokens, const T* wte, const T* wpe, int64_t B, int64_t T_,
                       int64_t C);
template <typename T>
void embedding_backward(T* dwte, T* dwpe, const T* dout, const int32_t* tokens, int64_t B, int64_t T_,
                        int64_t C);

/// mean/rstd are opmath_t<T> (float for the Backend's dtypes, double in double tests).
template <typename T>
void layernorm_forward(T* out, opmath_t<T>* mean, opmath_t<T>* rstd, const T* inp, const T* weight,
                       const T* bias, int64_t rows, int64_t C);
/// residual[rows,C] = a + b (rounded once to T, as residual_forward), then layernorm_forward of the stored
/// residual into out/mean/rstd, in one pass over the rows: bitwise the same as the two ops in sequence.
/// residual may alias a or b.
template <typename T>
void residual_layernorm_forward(T* residual, T* out, opmath_t<T>* mean, opmath_t<T>* rstd, const T* a,
                                const T* b, const T* weight, const T* bias, int64_t rows, int64_t C);
template <typename T>
void layernorm_backward(T* dinp, T* dweight, T* dbias, const T* dout, const T* inp, const T* weight,
                        const opmath_t<T>* mean, const opmath_t<T>* rstd, int64_t rows, int64_t C);

/// `workspace` grows as needed (FP32 copies of FP16/BF16 operands for SGEMM; float uses SGEMM and double
/// DGEMM directly on the operands).
template <typename T>
void matmul_forward(T* out, const T* inp, const T* weight, const T* bias, int64_t rows, int64_t IC,
                    int64_t OC, std::vector<float>& workspace);
template <typename T>
void matmul_backward(T* dinp, T* dweight, T* dbias, const T* dout, const T* inp, const T* weight,
                     int64_t rows, int64_t IC, int64_t OC, std::vector<float>& workspace);
/// matmul_forward into pre (bias added, one rounding to T) and out = GELU(pre) in the same pass over the
/// rows, GELU read from the stored pre: bitwise matmul_forward then gelu_forward.
template <typename T>
void matmul_gelu_forward(T* pre, T* out, const T* inp, const T* weight, const T* bias, int64_t rows,
                         int64_t IC, int64_t OC, std::vector<float>& workspace);
/// The backward of out = GELU(pre) feeding this linear layer (inp = GELU(pre)): dpre[rows,IC] =
/// GELU'(pre) * round(dout @ weight) (OVERWRITTEN, one more rounding), dweight +=, dbias += as
/// matmul_backward. Bitwise: zero g; matmul_backward(g, ...); zero dpre; gelu_backward(dpre, pre, g). The
/// weight gradient is computed before dpre is written, so dpre may alias inp (not pre).
template <typename T>
void matmul_backward_gelu(T* dpre, T* dweight, T* dbias, const T* dout, const T* inp, const T* weight,
                          const T* pre, int64_t rows, int64_t IC, int64_t OC, std::vector<float>& workspace);

/// Row-major C[M,N] = alpha op(A) op(B) + beta C through OpenBLAS (SGEMM for float, DGEMM for double), op =
/// transpose when trans_*; sizes must fit int. K == 0 sets C to 0 when beta == 0 (BLAS rejects it). C is cut
/// into fixed blocks (from the shape alone), each a single-threaded BLAS call (OpenBLAS's OpenMP build),
/// spread over the OpenMP threads, or run one after another on the calling thread inside a parallel region,
/// so the result depends neither on the thread count nor on whether the caller's region is active.
template <typename S>
void blas_gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, S alpha, const S* A, int64_t lda,
               const S* B, int64_t ldb, S beta, S* C, int64_t ldc);

/// The linear layer's GEMM (the one matmul_forward/backward run): row-major C[M,N] = op(A) op(B) + beta C
/// (+ bias[N] on every row when bias is non-null, which needs beta = 0), beta 0 or 1, float or double, called
/// outside a parallel region. C is cut into blas_gemm's fixed blocks over the OpenMP threads, each block one
/// single-threaded call of oneDNN's f32 matmul where onednn_f32_preferred() (cpu/onednn_gemm.hpp), else of
/// OpenBLAS (the bias then goes in as C's rows with beta = 1); each output is round(sum + C or bias), the
/// same for every thread count. Throws mpt::Error for another beta, or a bias with beta = 1.
template <typename S>
void linear_gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const S* A, int64_t lda,
                 const S* B, int64_t ldb, S beta, S* C, int64_t ldc, const S* bias = nullptr);

/// Adds one GEMM call's duration to gemm_seconds() (mptrain/cpu_profile.hpp) (outside or inside a parallel
/// region, by omp_in_parallel).
void record_gemm_nanoseconds(int64_t nanoseconds);

/// FLOP/s of an n x n x n SGEMM on the current OpenMP thread count: the best of `repeats` runs each of
/// OpenBLAS's threaded SGEMM, blas_gemm (fixed blocks) and, where the linear layer uses it, oneDNN's f32
/// matmul.
double measure_sgemm_flops(int n, int repeats);

/// `workspace` (grow-only) holds the per-thread [T, hs] operands and the [T, T] probabilities; the overload
/// without it allocates its own.
template <typename T>
void attention_forward(T* out, T* att, const T* qkv, int64_t B, int64_t T_, int64_t C, int64_t NH,
                       std::vector<opmath_t<T>>& workspace);
template <typename T>
void attention_forward(T* out, T* att, const T* qkv, int64_t B, int64_t T_, int64_t C, int64_t NH);
template <typename T>
void attention_backward(T* dqkv, const T* dout, const T* qkv, const T* att, int64_t B, int64_t T_, int64_t C,
                        int64_t NH, std::vector<opmath_t<T>>& workspace);

template <typename T>
void gelu_forward(T* out, const T* inp, int64_t n);
template <typename T>
void gelu_backward(T* dinp, const T* inp, const T* dout, int64_t n);

template <typename T>
void residual_forward(T* out, const T* a, const T* b, int64_t n);
template <typename T>
void accumulate(T* acc, const T* x, int64_t n);
/// acc[i] += float(x[i]) (FP32 accumulation of a micro-batch's gradients).
template <typename T>
void accumulate_f32(float* acc, const T* x, int64_t n);

template <typename T>
void crossentropy_forward_backward(T* dlogits, opmath_t<T>* losses, const T* logits, const int32_t* targets,
                                   int64_t rows, int64_t V, int64_t Vp, opmath_t<T> dloss);

}  // namespace mpt::cpu
