// CUDA LayerNorm over the last dimension (torch.nn.LayerNorm: eps 1e-5, biased variance), forward and
// backward; the device twin of kernels/cpu/layernorm.cpp.
//
// Forward: one warp per row, two passes over the row (mean, then the mean of squared deviations) with
// warp-shuffle reductions, statistics saved in FP32. The residual-fused forward adds the residual in the
// first pass and stores it, so the residual stream is read once.
// Backward: the input gradient is one warp per row. dweight/dbias are sums over rows: rows are cut into a
// number of blocks that depends only on `rows`; one kernel writes each block's FP32 partial sums (a thread
// per channel walks the block's rows in order) to its own workspace slot, a second adds the partials in block
// order per channel and rounds once into the stored gradient. No atomics, so the result is reproducible.
#include <algorithm>

#include "cuda/dtype.cuh"
#include "cuda/warp.cuh"
#include "mptrain/cuda_check.hpp"
#include "mptrain/cuda_kernels.hpp"

namespace mpt::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / 32;
constexpr float kEps = 1e-5f;
/// dweight/dbias reduction: at least this many rows per block, and at most kMaxRowBlocks blocks.
constexpr int64_t kMinRowsPerBlock = 32;
constexpr int64_t kMaxRowBlocks = 1024;

int64_t rows_per_block(int64_t rows) {
  return std::max(kMinRowsPerBlock, (rows + kMaxRowBlocks - 1) / kMaxRowBlocks);
}

unsigned row_grid(int64_t rows) {
  return static_cast<unsigned>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
}

/// The rest of one warp's row of the forward, given this lane's partial sum of the row x[0..C): the mean, the
/// mean of squared deviations (second pass), y = (x - mean) * rstd * weight + bias, and the FP32 statistics.
template <typename T>
__device__ void normalize_row(const T* x, T* y, float* mean, float* rstd, const T* weight, const T* bias,
                              int64_t row, int64_t C, int lane, float sum) {
  const float m = warp_sum(sum) / static_cast<float>(C);
  float sq = 0.0f;
  for (int64_t i = lane; i < C; i += 32) {
    const float d = load_as_float(x, i) - m;
    sq += d * d;
  }
  const float s = 1.0f / sqrtf(warp_sum(sq) / static_cast<float>(C) + kEps);
  for (int64_t i = lane; i < C; i += 32) {
    const float xhat = (load_as_float(x, i) - m) * s;
    store_from_float(y, i, xhat * load_as_float(weight, i) + load_as_float(bias, i));
  }
  if (lane == 0) {
    mean[row] = m;
    rstd[row] = s;
  }
}

}  // namespace

template <typename T>
__global__ void layernorm_forward_kernel(T* out, float* mean, float* rstd, const T* inp, const T* weight,
                                         const T* bias, int64_t rows, int64_t C) {
  const int64_t row = blockIdx.x * int64_t{kWarpsPerBlock} + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const T* x = inp + row * C;
  float sum = 0.0f;
  for (int64_t i = lane; i < C; i += 32) sum += load_as_float(x, i);
  normalize_row(x, out + row * C, mean, rstd, weight, bias, row, C, lane, sum);
}

/// residual = a + b (one rounding), then the forward of layernorm_forward_kernel on the stored residual. Each
/// lane reads back only the elements it wrote, in the same lane order, so the statistics and outputs are
/// bitwise those of residual_forward followed by layernorm_forward.
template <typename T>
__global__ void residual_layernorm_forward_kernel(T* residual, T* out, float* mean, float* rstd, const T* a,
                                                  const T* b, const T* weight, const T* bias, int64_t rows,
                                                  int64_t C) {
  const int64_t row = blockIdx.x * int64_t{kWarpsPerBlock} + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  T* x = residual + row * C;
  const T* xa = a + row * C;
  const T* xb = b + row * C;
  float sum = 0.0f;
  for (int64_t i = lane; i < C; i += 32) {
    store_from_float(x, i, load_as_float(xa, i) + load_as_float(xb, i));
    sum += load_as_float(x, i);
  }
  normalize_row(x, out + row * C, mean, rstd, weight, bias, row, C, lane, sum);
}

/// dinp += the input gradient; one warp per row.
template <typename T>
__global__ void layernorm_backward_dinp_kernel(T* dinp, const T* dout, const T* inp, const T* weight,
                                               const float* mean, const float* rstd, int64_t rows,
                                               int64_t C) {
  const int64_t row = blockIdx.x * int64_t{kWarpsPerBlock} + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const T* x = inp + row * C;
  const T* dy = dout + row * C;
  T* dx = dinp + row * C;
  const float m = mean[row];
  const float s = rstd[row];
  float dnorm_sum = 0.0f;
  float dnorm_xhat_sum = 0.0f;
  for (int64_t i = lane; i < C; i += 32) {
    const float xhat = (load_as_float(x, i) - m) * s;
    const float dnorm = load_as_float(dy, i) * load_as_float(weight, i);
    dnorm_sum += dnorm;
    dnorm_xhat_sum += dnorm * xhat;
  }
  const float dnorm_mean = warp_sum(dnorm_sum) / static_cast<float>(C);
  const float dnorm_xhat_mean = warp_sum(dnorm_xhat_sum) / static_cast<float>(C);
  for (int64_t i = lane; i < C; i += 32) {
    const float xhat = (load_as_float(x, i) - m) * s;
    const float dnorm = load_as_float(dy, i) * load_as_float(weight, i);
    store_from_float(dx, i, load_as_float(dx, i) + (dnorm - dnorm_mean - xhat * dnorm_xhat_mean) * s);
  }
}

/// Grid (channel piece, row block): partial[k][0][c] = sum of dout*xhat, partial[k][1][c] = sum of dout over
/// block k's rows, in row order.
template <typename T>
__global__ void layernorm_backward_partial_kernel(float* partial, const T* dout, const T* inp,
                                                  const float* mean, const float* rstd, int64_t rows,
                                                  int64_t C, int64_t block_rows) {
  const int64_t c = blockIdx.x * int64_t{kThreads} + threadIdx.x;
  if (c >= C) return;
  const int64_t k = blockIdx.y;
  const int64_t row_end = std::min(rows, (k + 1) * block_rows);
  float dw = 0.0f;
  float db = 0.0f;
  for (int64_t r = k * block_rows; r < row_end; ++r) {
    const float dy = load_as_float(dout, r * C + c);
    const float xhat = (load_as_float(inp, r * C + c) - mean[r]) * rstd[r];
    dw += dy * xhat;
    db += dy;
  }
  partial[(2 * k) * C + c] = dw;
  partial[(2 * k + 1) * C + c] = db;
}

template <typename T>
__global__ void layernorm_backward_reduce_kernel(T* dweight, T* dbias, const float* partial, int64_t C,
                                                 int64_t blocks) {
  const int64_t c = blockIdx.x * int64_t{kThreads} + threadIdx.x;
  if (c >= C) return;
  float sw = 0.0f;
  float sb = 0.0f;
  for (int64_t k = 0; k < blocks; ++k) {
    sw += partial[(2 * k) * C + c];
    sb += partial[(2 * k + 1) * C + c];
  }
  store_from_float(dweight, c, load_as_float(dweight, c) + sw);
  store_from_float(dbias, c, load_as_float(dbias, c) + sb);
}

template <typename T>
void layernorm_forward(T* out, float* mean, float* rstd, const T* inp, const T* weight, const T* bias,
                       int64_t rows, int64_t C, cudaStream_t stream) {
  MPT_CHECK(rows > 0, "cuda::layernorm_forward: rows must be positive, got {}", rows);
  MPT_CHECK(C > 0, "cuda::layernorm_forward: C must be positive, got {}", C);
  MPT_CHECK(out != nullptr, "cuda::layernorm_forward: out is null");
  MPT_CHECK(mean != nullptr, "cuda::layernorm_forward: mean is null");
  MPT_CHECK(rstd != nullptr, "cuda::layernorm_forward: rstd is null");
  MPT_CHECK(inp != nullptr, "cuda::layernorm_forward: inp is null");
  MPT_CHECK(weight != nullptr, "cuda::layernorm_forward: weight is null");
  MPT_CHECK(bias != nullptr, "cuda::layernorm_forward: bias is null");
  layernorm_forward_kernel<T>
      <<<row_grid(rows), kThreads, 0, stream>>>(out, mean, rstd, inp, weight, bias, rows, C);
  MPT_CUDA_LAUNCH_CHECK();
}

template <typename T>
void residual_layernorm_forward(T* residual, T* out, float* mean, float* rstd, const T* a, const T* b,
                                const T* weight, const T* bias, int64_t rows, int64_t C,
                                cudaStream_t stream) {
  MPT_CHECK(rows > 0, "cuda::residual_layernorm_forward: rows must be positive, got {}", rows);
  MPT_CHECK(C > 0, "cuda::residual_layernorm_forward: C must be positive, got {}", C);
  MPT_CHECK(residual != nullptr, "cuda::residual_layernorm_forward: residual is null");
  MPT_CHECK(out != nullptr, "cuda::residual_layernorm_forward: out is null");
  MPT_CHECK(mean != nullptr, "cuda::residual_layernorm_forward: mean is null");
  MPT_CHECK(rstd != nullptr, "cuda::residual_layernorm_forward: rstd is null");
  MPT_CHECK(a != nullptr, "cuda::residual_layernorm_forward: a is null");
  MPT_CHECK(b != nullptr, "cuda::residual_layernorm_forward: b is null");
  MPT_CHECK(weight != nullptr, "cuda::residual_layernorm_forward: weight is null");
  MPT_CHECK(bias != nullptr, "cuda::residual_layernorm_forward: bias is null");
  residual_layernorm_forward_kernel<T>
      <<<row_grid(rows), kThreads, 0, stream>>>(residual, out, mean, rstd, a, b, weight, bias, rows, C);
  MPT_CUDA_LAUNCH_CHECK();
}

size_t layernorm_backward_workspace_bytes(int64_t rows, int64_t C) {
  MPT_CHECK(rows > 0 && C > 0,
            "cuda::layernorm_backward_workspace_bytes: rows ({}) and C ({}) must be positive", rows, C);
  const int64_t blocks = (rows + rows_per_block(rows) - 1) / rows_per_block(rows);
  return static_cast<size_t>(blocks) * 2 * static_cast<size_t>(C) * sizeof(float);
}

template <typename T>
void layernorm_backward(T* dinp, T* dweight, T* dbias, const T* dout, const T* inp, const T* weight,
                        const float* mean, const float* rstd, int64_t rows, int64_t C, void* workspace,
                        size_t workspace_bytes, cudaStream_t stream) {
  MPT_CHECK(rows > 0, "cuda::layernorm_backward: rows must be positive, got {}", rows);
  MPT_CHECK(C > 0, "cuda::layernorm_backward: C must be positive, got {}", C);
  MPT_CHECK(dinp != nullptr, "cuda::layernorm_backward: dinp is null");
  MPT_CHECK(dweight != nullptr, "cuda::layernorm_backward: dweight is null");
  MPT_CHECK(dbias != nullptr, "cuda::layernorm_backward: dbias is null");
  MPT_CHECK(dout != nullptr, "cuda::layernorm_backward: dout is null");
  MPT_CHECK(inp != nullptr, "cuda::layernorm_backward: inp is null");
  MPT_CHECK(weight != nullptr, "cuda::layernorm_backward: weight is null");
  MPT_CHECK(mean != nullptr, "cuda::layernorm_backward: mean is null");
  MPT_CHECK(rstd != nullptr, "cuda::layernorm_backward: rstd is null");
  const size_t needed = layernorm_backward_workspace_bytes(rows, C);
  MPT_CHECK(workspace != nullptr && workspace_bytes >= needed,
            "cuda::layernorm_backward: workspace of {} bytes is smaller than the {} needed", workspace_bytes,
            needed);
  layernorm_backward_dinp_kernel<T>
      <<<row_grid(rows), kThreads, 0, stream>>>(dinp, dout, inp, weight, mean, rstd, rows, C);
  MPT_CUDA_LAUNCH_CHECK();
  const int64_t block_rows = rows_per_block(rows);
  const int64_t blocks = (rows + block_rows - 1) / block_rows;
  const auto channel_pieces = static_cast<unsigned>((C + kThreads - 1) / kThreads);
  auto* partial = static_cast<float*>(workspace);
  layernorm_backward_partial_kernel<T>
      <<<dim3(channel_pieces, static_cast<unsigned>(blocks)), kThreads, 0, stream>>>(
          partial, dout, inp, mean, rstd, rows, C, block_rows);
  MPT_CUDA_LAUNCH_CHECK();
  layernorm_backward_reduce_kernel<T>
      <<<channel_pieces, kThreads, 0, stream>>>(dweight, dbias, partial, C, blocks);
  MPT_CUDA_LAUNCH_CHECK();
}

#define MPT_INSTANTIATE_LAYERNORM(T)                                                                        \
  template void layernorm_forward<T>(T*, float*, float*, const T*, const T*, const T*, int64_t, int64_t,    \
                                     cudaStream_t);                                                         \
  template void layernorm_backward<T>(T*, T*, T*, const T*, const T*, const T*, const float*, const float*, \
                                      int64_t, int64_t, void*, size_t, cudaStream_t);                       \
  template void residual_layernorm_forward<T>(T*, T*, float*, float*, const T*, const T*, const T*,         \
                                              const T*, int64_t, int64_t, cudaStream_t);

MPT_INSTANTIATE_LAYERNORM(float)
MPT_INSTANTIATE_LAYERNORM(half)
MPT_INSTANTIATE_LAYERNORM(bf16)

#undef MPT_INSTANTIATE_LAYERNORM

}  // namespace mpt::cuda
