// CUDA causal multi-head self-attention (GPT-2), the device twin of kernels/cpu/attention.cpp.
//
// The unfused path: q, k, v are gathered from qkv[B,T,3C] into contiguous [B*NH, T, hs] arrays so that each
// (batch, head) pair is one matrix of a strided-batched cuBLASLt GEMM. Scores q k^T are kept in FP32 (as on
// the CPU, no rounding before the softmax); the softmax kernel applies the 1/sqrt(hs) scale and the causal
// mask in FP32 and stores the probabilities att[B,NH,T,T] in the storage type with zeros above the diagonal.
// y = att v then reads those stored probabilities (the CPU multiplies with the unrounded ones, so FP16/BF16
// outputs differ by about one rounding of att). Backward follows the CPU's closed form
// dscores = att * (datt - sum(att * datt)) * scale; the score gradients are stored in the storage type for
// the two tensor-core GEMMs that consume them, the q/k/v gradients come out of their GEMMs in FP32 and are
// added into dqkv with one rounding. Intermediates live in the BlasContext's grow-only scratch.
//
// The fused path (cuDNN SDPA, saving only softmax statistics) is in attention_cudnn.cu; the launchers at the
// bottom dispatch to it.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

#include "cuda/attention_cudnn.cuh"
#include "cuda/blas_context.cuh"
#include "cuda/dtype.cuh"
#include "cuda/warp.cuh"
#include "mptrain/cuda_blas.hpp"
#include "mptrain/cuda_check.hpp"
#include "mptrain/error.hpp"

namespace mpt::cuda {

namespace {

constexpr int kThreads = 256;  // elementwise kernels
constexpr int kRowWarps = 4;   // softmax kernels: one warp per row, this many rows per block

/// Raw element of a storage type, for moves that must not convert (half/bf16 as their 16 bits).
template <typename T>
using Bits = std::conditional_t<sizeof(T) == 2, uint16_t, float>;

unsigned grid_for(int64_t n) {
  return static_cast<unsigned>(std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t{1} << 20));
}

}  // namespace

// ---- kernels ----

/// dst[p][bh, t, d] = src[b, t, p*C + h*hs + d] for p < parts, where src rows have `src_row` elements and
/// each dst part holds n = B*NH*T*hs elements ([B*NH, T, hs]).
template <typename W>
__global__ void gather_heads_kernel(W* dst, const W* src, int64_t src_row, int parts, int64_t B, int64_t T_,
                                    int64_t NH, int64_t hs) {
  const int64_t n = B * NH * T_ * hs;
  const int64_t C = NH * hs;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t d = i % hs;
    const int64_t t = (i / hs) % T_;
    const int64_t bh = i / (hs * T_);
    const int64_t b = bh / NH, h = bh % NH;
    const int64_t s = (b * T_ + t) * src_row + h * hs + d;
    for (int p = 0; p < parts; ++p) dst[p * n + i] = src[s + p * C];
  }
}

/// out[b, t, h*hs + d] = y[bh, t, d]: the heads back into [B, T, C].
template <typename W>
__global__ void scatter_heads_kernel(W* out, const W* y, int64_t B, int64_t T_, int64_t NH, int64_t hs) {
  const int64_t n = B * NH * T_ * hs;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t d = i % hs;
    const int64_t t = (i / hs) % T_;
    const int64_t bh = i / (hs * T_);
    const int64_t b = bh / NH, h = bh % NH;
    out[(b * T_ + t) * NH * hs + h * hs + d] = y[i];
  }
}

/// dqkv[b, t, p*C + h*hs + d] = round(dqkv + g[p][bh, t, d]) for p = q, k, v; g is FP32 [3][B*NH, T, hs].
template <typename T>
__global__ void add_heads_kernel(T* dqkv, const float* g, int64_t B, int64_t T_, int64_t NH, int64_t hs) {
  const int64_t n = B * NH * T_ * hs;
  const int64_t C = NH * hs;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t d = i % hs;
    const int64_t t = (i / hs) % T_;
    const int64_t bh = i / (hs * T_);
    const int64_t b = bh / NH, h = bh % NH;
    const int64_t base = (b * T_ + t) * 3 * C + h * hs + d;
    for (int p = 0; p < 3; ++p) {
      const int64_t j = base + p * C;
      store_from_float(dqkv, j, load_as_float(dqkv, j) + g[p * n + i]);
    }
  }
}

/// Causal softmax of one score row per warp: row r (query position t = r % T) of the FP32 scores gives
/// att[r, t2] = exp(s*scale - max) / sum for t2 <= t and 0 above the diagonal, computed in FP32 and stored
/// rounded. Warp-shuffle reductions have a fixed shape, so results are the same on every run.
template <typename T>
__global__ void softmax_forward_kernel(T* att, const float* scores, int64_t rows, int64_t T_, float scale) {
  const int64_t r = blockIdx.x * int64_t{kRowWarps} + threadIdx.x / 32;
  if (r >= rows) return;
  const int lane = static_cast<int>(threadIdx.x % 32);
  const int64_t t = r % T_;
  const float* s = scores + r * T_;
  float max_score = -INFINITY;
  for (int64_t j = lane; j <= t; j += 32) max_score = fmaxf(max_score, s[j] * scale);
  max_score = warp_max(max_score);
  float sum = 0.0f;
  for (int64_t j = lane; j <= t; j += 32) sum += expf(s[j] * scale - max_score);
  sum = warp_sum(sum);
  const float inv_sum = 1.0f / sum;
  T* a = att + r * T_;
  for (int64_t j = lane; j < T_; j += 32)
    store_from_float(a, j, j <= t ? expf(s[j] * scale - max_score) * inv_sum : 0.0f);
}

/// Softmax backward of one row per warp: dscores[r, t2] = att * (datt - sum_t2' att * datt) * scale for
/// t2 <= t, 0 above the diagonal; att stored, datt FP32, math FP32, dscores stored rounded.
template <typename T>
__global__ void softmax_backward_kernel(T* dscores, const T* att, const float* datt, int64_t rows, int64_t T_,
                                        float scale) {
  const int64_t r = blockIdx.x * int64_t{kRowWarps} + threadIdx.x / 32;
  if (r >= rows) return;
  const int lane = static_cast<int>(threadIdx.x % 32);
  const int64_t t = r % T_;
  const T* a = att + r * T_;
  const float* da = datt + r * T_;
  float dot = 0.0f;
  for (int64_t j = lane; j <= t; j += 32) dot += load_as_float(a, j) * da[j];
  dot = warp_sum(dot);
  T* ds = dscores + r * T_;
  for (int64_t j = lane; j < T_; j += 32)
    store_from_float(ds, j, j <= t ? load_as_float(a, j) * (da[j] - dot) * scale : 0.0f);
}

// ---- launchers ----

namespace {

void check_shape(const char* op, int64_t B, int64_t T_, int64_t C, int64_t NH) {
  MPT_CHECK(B >= 0 && T_ >= 0 && C >= 0, "{}: negative size (B = {}, T = {}, C = {})", op, B, T_, C);
  MPT_CHECK(NH >= 1 && C % NH == 0, "{}: C = {} is not a multiple of NH = {}", op, C, NH);
}

/// Carves 256-byte-aligned pieces out of one scratch allocation.
class Carver {
 public:
  /// Reserves `num_bytes`; returns its offset.
  size_t reserve(size_t num_bytes) {
    const size_t at = end_;
    end_ += (num_bytes + 255) / 256 * 256;
    return at;
  }
  size_t total() const { return end_; }

 private:
  size_t end_ = 0;
};

template <typename P>
P* at(void* base, size_t offset) {
  return reinterpret_cast<P*>(static_cast<char*>(base) + offset);
}

/// Strided-batched row-major GEMM over the B*NH (batch, head) matrices.
void batched_gemm(BlasContext& ctx, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
                  const void* A, int64_t lda, int64_t stride_a, const void* B, int64_t ldb, int64_t stride_b,
                  void* C, int64_t ldc, int64_t stride_c, int64_t batch, cudaDataType_t ab_type,
                  cudaDataType_t c_type, cudaStream_t stream) {
  GemmCall g;
  g.trans_a = trans_a;
  g.trans_b = trans_b;
  g.M = M;
  g.N = N;
  g.K = K;
  g.A = A;
  g.lda = lda;
  g.stride_a = stride_a;
  g.B = B;
  g.ldb = ldb;
  g.stride_b = stride_b;
  g.C = C;
  g.ldc = ldc;
  g.stride_c = stride_c;
  g.batch = batch;
  g.ab_type = ab_type;
  g.c_type = c_type;
  ctx.state().gemm(g, stream);
}

template <typename T>
void unfused_forward(BlasContext& ctx, T* out, T* att, const T* qkv, int64_t B, int64_t T_, int64_t C,
                     int64_t NH, cudaStream_t stream) {
  using W = Bits<T>;
  const int64_t hs = C / NH, BH = B * NH;
  const int64_t n = BH * T_ * hs;  // elements of one of q, k, v, y
  MPT_CHECK(BH * T_ / kRowWarps < (int64_t{1} << 31),
            "cuda::attention_forward: B*NH*T = {} rows are too many", BH * T_);
  const auto es = sizeof(T);
  const float scale = 1.0f / std::sqrt(static_cast<float>(hs));
  const cudaDataType_t type = blas_type(dtype_of<T>(), "cuda::attention_forward");

  Carver carve;
  const size_t o_qkv = carve.reserve(3 * n * es);
  const size_t o_y = carve.reserve(n * es);
  const size_t o_scores = carve.reserve(static_cast<size_t>(BH * T_ * T_) * sizeof(float));
  void* base = ctx.state().scratch_for(carve.total(), stream);
  T* q = at<T>(base, o_qkv);
  T* k = q + n;
  T* v = k + n;
  T* y = at<T>(base, o_y);
  float* scores = at<float>(base, o_scores);

  gather_heads_kernel<W><<<grid_for(n), kThreads, 0, stream>>>(
      reinterpret_cast<W*>(q), reinterpret_cast<const W*>(qkv), 3 * C, 3, B, T_, NH, hs);
  MPT_CUDA_LAUNCH_CHECK();
  // scores[bh] = q[bh] @ k[bh]^T  (FP32, [T, T])
  batched_gemm(ctx, false, true, T_, T_, hs, q, hs, T_ * hs, k, hs, T_ * hs, scores, T_, T_ * T_, BH, type,
               CUDA_R_32F, stream);
  const int64_t rows = BH * T_;
  softmax_forward_kernel<T>
      <<<static_cast<unsigned>((rows + kRowWarps - 1) / kRowWarps), kRowWarps * 32, 0, stream>>>(
          att, scores, rows, T_, scale);
  MPT_CUDA_LAUNCH_CHECK();
  // y[bh] = att[bh] @ v[bh]  ([T, hs])
  batched_gemm(ctx, false, false, T_, hs, T_, att, T_, T_ * T_, v, hs, T_ * hs, y, hs, T_ * hs, BH, type,
               type, stream);
  scatter_heads_kernel<W><<<grid_for(n), kThreads, 0, stream>>>(reinterpret_cast<W*>(out),
                                                                reinterpret_cast<const W*>(y), B, T_, NH, hs);
  MPT_CUDA_LAUNCH_CHECK();
}

template <typename T>
void unfused_backward(BlasContext& ctx, T* dqkv, const T* dout, const T* qkv, const T* att, int64_t B,
                      int64_t T_, int64_t C, int64_t NH, cudaStream_t stream) {
  using W = Bits<T>;
  const int64_t hs = C / NH, BH = B * NH;
  const int64_t n = BH * T_ * hs;
  MPT_CHECK(BH * T_ / kRowWarps < (int64_t{1} << 31),
            "cuda::attention_backward: B*NH*T = {} rows are too many", BH * T_);
  const auto es = sizeof(T);
  const float scale = 1.0f / std::sqrt(static_cast<float>(hs));
  const cudaDataType_t type = blas_type(dtype_of<T>(), "cuda::attention_backward");
  const auto tt = static_cast<size_t>(BH * T_ * T_);

  Carver carve;
  const size_t o_qkv = carve.reserve(3 * n * es);           // q, k, v gathered
  const size_t o_dy = carve.reserve(n * es);                // dout gathered
  const size_t o_datt = carve.reserve(tt * sizeof(float));  // d(att), FP32
  const size_t o_dscores = carve.reserve(tt * es);          // d(scores), stored
  const size_t o_g = carve.reserve(3 * n * sizeof(float));  // dq, dk, dv in FP32
  void* base = ctx.state().scratch_for(carve.total(), stream);
  T* q = at<T>(base, o_qkv);
  T* k = q + n;
  T* v = k + n;
  T* dy = at<T>(base, o_dy);
  float* datt = at<float>(base, o_datt);
  T* dscores = at<T>(base, o_dscores);
  float* dq = at<float>(base, o_g);
  float* dk = dq + n;
  float* dv = dk + n;

  gather_heads_kernel<W><<<grid_for(n), kThreads, 0, stream>>>(
      reinterpret_cast<W*>(q), reinterpret_cast<const W*>(qkv), 3 * C, 3, B, T_, NH, hs);
  MPT_CUDA_LAUNCH_CHECK();
  gather_heads_kernel<W><<<grid_for(n), kThreads, 0, stream>>>(
      reinterpret_cast<W*>(dy), reinterpret_cast<const W*>(dout), C, 1, B, T_, NH, hs);
  MPT_CUDA_LAUNCH_CHECK();
  // datt[bh] = dy[bh] @ v[bh]^T  (FP32, [T, T])
  batched_gemm(ctx, false, true, T_, T_, hs, dy, hs, T_ * hs, v, hs, T_ * hs, datt, T_, T_ * T_, BH, type,
               CUDA_R_32F, stream);
  // dv[bh] = att[bh]^T @ dy[bh]  (FP32, [T, hs])
  batched_gemm(ctx, true, false, T_, hs, T_, att, T_, T_ * T_, dy, hs, T_ * hs, dv, hs, T_ * hs, BH, type,
               CUDA_R_32F, stream);
  const int64_t rows = BH * T_;
  softmax_backward_kernel<T>
      <<<static_cast<unsigned>((rows + kRowWarps - 1) / kRowWarps), kRowWarps * 32, 0, stream>>>(
          dscores, att, datt, rows, T_, scale);
  MPT_CUDA_LAUNCH_CHECK();
  // dq[bh] = dscores[bh] @ k[bh];  dk[bh] = dscores[bh]^T @ q[bh]  (FP32, [T, hs])
  batched_gemm(ctx, false, false, T_, hs, T_, dscores, T_, T_ * T_, k, hs, T_ * hs, dq, hs, T_ * hs, BH, type,
               CUDA_R_32F, stream);
  batched_gemm(ctx, true, false, T_, hs, T_, dscores, T_, T_ * T_, q, hs, T_ * hs, dk, hs, T_ * hs, BH, type,
               CUDA_R_32F, stream);
  add_heads_kernel<T><<<grid_for(n), kThreads, 0, stream>>>(dqkv, dq, B, T_, NH, hs);
  MPT_CUDA_LAUNCH_CHECK();
}

void require_supported(BlasContext& ctx, AttentionImpl impl, int64_t B, int64_t T_, int64_t C, int64_t NH,
                       DType dtype, const char* op) {
  std::string why_not;
  MPT_CHECK(attention_supported(ctx, impl, B, T_, C, NH, dtype, &why_not),
            "{}: the {} attention path does not support B = {}, T = {}, C = {}, NH = {}, dtype {}: {}", op,
            impl == AttentionImpl::cudnn ? "cuDNN" : "unfused", B, T_, C, NH, std::string(dtype_name(dtype)),
            why_not);
}

}  // namespace

size_t attention_saved_bytes(AttentionImpl impl, int64_t B, int64_t T, int64_t NH, DType dtype) {
  const auto b = static_cast<size_t>(B), t = static_cast<size_t>(T), nh = static_cast<size_t>(NH);
  if (impl == AttentionImpl::cudnn) return b * nh * t * sizeof(float);
  return b * nh * t * t * dtype_size(dtype);
}

bool attention_supported(BlasContext& ctx, AttentionImpl impl, int64_t B, int64_t T, int64_t C, int64_t NH,
                         DType dtype, std::string* why_not) {
  check_shape("cuda::attention_supported", B, T, C, NH);
  if (impl == AttentionImpl::cudnn)
    return cudnn_attention_supported(ctx.state(), B, T, NH, C / NH, dtype, why_not);
  const bool storage_type = dtype == DType::f32 || dtype == DType::f16 || dtype == DType::bf16;
  if (!storage_type && why_not != nullptr)
    *why_not = "dtype " + std::string(dtype_name(dtype)) + " is not a CUDA storage type (f32, f16, bf16)";
  return storage_type;
}

void attention_forward(BlasContext& ctx, AttentionImpl impl, void* out, void* att, const void* qkv, int64_t B,
                       int64_t T, int64_t C, int64_t NH, DType dtype, cudaStream_t stream) {
  check_shape("cuda::attention_forward", B, T, C, NH);
  require_supported(ctx, impl, B, T, C, NH, dtype, "cuda::attention_forward");
  if (B == 0 || T == 0 || C == 0) return;
  MPT_CHECK(out != nullptr, "cuda::attention_forward: out is null");
  MPT_CHECK(att != nullptr, "cuda::attention_forward: att is null");
  MPT_CHECK(qkv != nullptr, "cuda::attention_forward: qkv is null");
  if (impl == AttentionImpl::cudnn) {
    cudnn_attention_forward(ctx.state(), out, static_cast<float*>(att), qkv, B, T, NH, C / NH, dtype, stream);
    return;
  }
  dispatch(dtype, "cuda::attention_forward", [&]<typename S>() {
    unfused_forward<S>(ctx, static_cast<S*>(out), static_cast<S*>(att), static_cast<const S*>(qkv), B, T, C,
                       NH, stream);
  });
}

void attention_backward(BlasContext& ctx, AttentionImpl impl, void* dqkv, const void* dout, const void* qkv,
                        const void* att, const void* out, int64_t B, int64_t T, int64_t C, int64_t NH,
                        DType dtype, cudaStream_t stream) {
  check_shape("cuda::attention_backward", B, T, C, NH);
  require_supported(ctx, impl, B, T, C, NH, dtype, "cuda::attention_backward");
  if (B == 0 || T == 0 || C == 0) return;
  MPT_CHECK(dqkv != nullptr, "cuda::attention_backward: dqkv is null");
  MPT_CHECK(dout != nullptr, "cuda::attention_backward: dout is null");
  MPT_CHECK(qkv != nullptr, "cuda::attention_backward: qkv is null");
  MPT_CHECK(att != nullptr, "cuda::attention_backward: att is null");
  if (impl == AttentionImpl::cudnn) {
    MPT_CHECK(out != nullptr, "cuda::attention_backward: out is null (the cuDNN path reads it)");
    cudnn_attention_backward(ctx.state(), dqkv, dout, qkv, static_cast<const float*>(att), out, B, T, NH,
                             C / NH, dtype, stream);
    return;
  }
  dispatch(dtype, "cuda::attention_backward", [&]<typename S>() {
    unfused_backward<S>(ctx, static_cast<S*>(dqkv), static_cast<const S*>(dout), static_cast<const S*>(qkv),
                        static_cast<const S*>(att), B, T, C, NH, stream);
  });
}

}  // namespace mpt::cuda
