// CUDA elementwise ops of the GPT-2 block: tanh-GELU forward/backward (element math shared with the CPU in
// kernels/common/gelu.hpp), the residual add and gradient accumulation (storage type and FP32 main_grad).
//
// Grid-stride loops with 64-bit indices and scalar loads: element i is read and written by the same thread,
// so an output may alias an input, and any element offset works (no vector-width alignment is assumed).
// Every value is widened to FP32, computed, and rounded once on store, exactly as the CPU twins do.
#include <algorithm>

#include "common/gelu.hpp"
#include "cuda/dtype.cuh"
#include "mptrain/cuda_check.hpp"
#include "mptrain/cuda_kernels.hpp"

namespace mpt::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65536;

unsigned grid_for(int64_t n) {
  return static_cast<unsigned>(std::clamp<int64_t>((n + kThreads - 1) / kThreads, 1, kMaxBlocks));
}

}  // namespace

template <typename T>
__global__ void gelu_forward_kernel(T* out, const T* inp, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{kThreads} + threadIdx.x; i < n; i += int64_t{gridDim.x} * kThreads)
    store_from_float(out, i, common::gelu_tanh(load_as_float(inp, i)));
}

template <typename T>
__global__ void gelu_backward_kernel(T* dinp, const T* inp, const T* dout, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{kThreads} + threadIdx.x; i < n; i += int64_t{gridDim.x} * kThreads) {
    const float grad = load_as_float(dout, i) * common::gelu_tanh_derivative(load_as_float(inp, i));
    store_from_float(dinp, i, load_as_float(dinp, i) + grad);
  }
}

template <typename T>
__global__ void gelu_backward_inplace_kernel(T* dpre, const T* pre, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{kThreads} + threadIdx.x; i < n; i += int64_t{gridDim.x} * kThreads) {
    const float grad = load_as_float(dpre, i) * common::gelu_tanh_derivative(load_as_float(pre, i));
    store_from_float(dpre, i, 0.0f + grad);
  }
}

template <typename T>
__global__ void residual_forward_kernel(T* out, const T* a, const T* b, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{kThreads} + threadIdx.x; i < n; i += int64_t{gridDim.x} * kThreads)
    store_from_float(out, i, load_as_float(a, i) + load_as_float(b, i));
}

template <typename T>
__global__ void accumulate_kernel(T* acc, const T* x, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{kThreads} + threadIdx.x; i < n; i += int64_t{gridDim.x} * kThreads)
    store_from_float(acc, i, load_as_float(acc, i) + load_as_float(x, i));
}

template <typename T>
__global__ void accumulate_f32_kernel(float* acc, const T* x, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{kThreads} + threadIdx.x; i < n; i += int64_t{gridDim.x} * kThreads)
    acc[i] += load_as_float(x, i);
}

template <typename T>
void gelu_forward(T* out, const T* inp, int64_t n, cudaStream_t stream) {
  MPT_CHECK(n > 0, "cuda::gelu_forward: n must be positive, got {}", n);
  MPT_CHECK(out != nullptr, "cuda::gelu_forward: out is null");
  MPT_CHECK(inp != nullptr, "cuda::gelu_forward: inp is null");
  gelu_forward_kernel<T><<<grid_for(n), kThreads, 0, stream>>>(out, inp, n);
  MPT_CUDA_LAUNCH_CHECK();
}

template <typename T>
void gelu_backward(T* dinp, const T* inp, const T* dout, int64_t n, cudaStream_t stream) {
  MPT_CHECK(n > 0, "cuda::gelu_backward: n must be positive, got {}", n);
  MPT_CHECK(dinp != nullptr, "cuda::gelu_backward: dinp is null");
  MPT_CHECK(inp != nullptr, "cuda::gelu_backward: inp is null");
  MPT_CHECK(dout != nullptr, "cuda::gelu_backward: dout is null");
  gelu_backward_kernel<T><<<grid_for(n), kThreads, 0, stream>>>(dinp, inp, dout, n);
  MPT_CUDA_LAUNCH_CHECK();
}

template <typename T>
void gelu_backward_inplace(T* dpre, const T* pre, int64_t n, cudaStream_t stream) {
  MPT_CHECK(n > 0, "cuda::gelu_backward_inplace: n must be positive, got {}", n);
  MPT_CHECK(dpre != nullptr, "cuda::gelu_backward_inplace: dpre is null");
  MPT_CHECK(pre != nullptr, "cuda::gelu_backward_inplace: pre is null");
  gelu_backward_inplace_kernel<T><<<grid_for(n), kThreads, 0, stream>>>(dpre, pre, n);
  MPT_CUDA_LAUNCH_CHECK();
}

template <typename T>
void residual_forward(T* out, const T* a, const T* b, int64_t n, cudaStream_t stream) {
  MPT_CHECK(n > 0, "cuda::residual_forward: n must be positive, got {}", n);
  MPT_CHECK(out != nullptr, "cuda::residual_forward: out is null");
  MPT_CHECK(a != nullptr, "cuda::residual_forward: a is null");
  MPT_CHECK(b != nullptr, "cuda::residual_forward: b is null");
  residual_forward_kernel<T><<<grid_for(n), kThreads, 0, stream>>>(out, a, b, n);
  MPT_CUDA_LAUNCH_CHECK();
}

template <typename T>
void accumulate(T* acc, const T* x, int64_t n, cudaStream_t stream) {
  MPT_CHECK(n > 0, "cuda::accumulate: n must be positive, got {}", n);
  MPT_CHECK(acc != nullptr, "cuda::accumulate: acc is null");
  MPT_CHECK(x != nullptr, "cuda::accumulate: x is null");
  accumulate_kernel<T><<<grid_for(n), kThreads, 0, stream>>>(acc, x, n);
  MPT_CUDA_LAUNCH_CHECK();
}

template <typename T>
void accumulate_f32(float* acc, const T* x, int64_t n, cudaStream_t stream) {
  MPT_CHECK(n >= 0, "cuda::accumulate_f32: n must be >= 0, got {}", n);
  if (n == 0) return;
  MPT_CHECK(acc != nullptr, "cuda::accumulate_f32: acc is null");
  MPT_CHECK(x != nullptr, "cuda::accumulate_f32: x is null");
  accumulate_f32_kernel<T><<<grid_for(n), kThreads, 0, stream>>>(acc, x, n);
  MPT_CUDA_LAUNCH_CHECK();
}

#define MPT_INSTANTIATE_ELEMENTWISE(T)                                              \
  template void gelu_forward<T>(T*, const T*, int64_t, cudaStream_t);               \
  template void gelu_backward<T>(T*, const T*, const T*, int64_t, cudaStream_t);    \
  template void gelu_backward_inplace<T>(T*, const T*, int64_t, cudaStream_t);      \
  template void residual_forward<T>(T*, const T*, const T*, int64_t, cudaStream_t); \
  template void accumulate<T>(T*, const T*, int64_t, cudaStream_t);                 \
  template void accumulate_f32<T>(float*, const T*, int64_t, cudaStream_t);

MPT_INSTANTIATE_ELEMENTWISE(float)
MPT_INSTANTIATE_ELEMENTWISE(half)
MPT_INSTANTIATE_ELEMENTWISE(bf16)

#undef MPT_INSTANTIATE_ELEMENTWISE

}  // namespace mpt::cuda
