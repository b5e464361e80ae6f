// CUDA fused softmax cross-entropy over padded logits with the logits gradient written in the same kernel;
// the device twin of kernels/cpu/crossentropy.cpp.
//
// One thread block per row. Pass 1 reads the V real columns once: each thread keeps an online softmax state
// (running max m and sum s of exp(x - m), rescaled when m grows: Milakov & Gimelshein, "Online normalizer
// calculation for softmax", arXiv:1805.02867), and the states are merged across the block (warp shuffles,
// then shared memory). Pass 2 writes the gradient. The block synchronises between the passes, so a row is
// read completely before any of it is written and dlogits may alias logits (llm.c's in-place classifier).
// The loss scale is read from device memory by the kernel, so fp16 training needs no host sync for it.
#include <cmath>

#include "cuda/dtype.cuh"
#include "mptrain/cuda_check.hpp"
#include "mptrain/cuda_kernels.hpp"

namespace mpt::cuda {

namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;

/// Online-softmax state: max m and sum of exp(x - m) over the values seen. Empty: m = -inf, s = 0.
struct SoftmaxState {
  float m;
  float s;
};

__device__ __forceinline__ SoftmaxState merge(SoftmaxState a, SoftmaxState b) {
  // An empty side contributes nothing (and -inf - -inf would be NaN).
  if (a.m == -INFINITY) return b;
  if (b.m == -INFINITY) return a;
  const float m = fmaxf(a.m, b.m);
  return {m, a.s * expf(a.m - m) + b.s * expf(b.m - m)};
}

/// Block-wide merge; every thread receives the result.
__device__ SoftmaxState block_merge(SoftmaxState state) {
  __shared__ SoftmaxState warp_states[kWarps];
  __shared__ SoftmaxState result;
  for (int offset = 16; offset > 0; offset >>= 1) {
    SoftmaxState other;
    other.m = __shfl_xor_sync(0xffffffffu, state.m, offset);
    other.s = __shfl_xor_sync(0xffffffffu, state.s, offset);
    state = merge(state, other);
  }
  const int warp = threadIdx.x / 32;
  if (threadIdx.x % 32 == 0) warp_states[warp] = state;
  __syncthreads();
  if (threadIdx.x == 0) {
    SoftmaxState total = warp_states[0];
    for (int w = 1; w < kWarps; ++w) total = merge(total, warp_states[w]);
    result = total;
  }
  __syncthreads();
  return result;
}

}  // namespace

template <typename T>
__global__ void crossentropy_forward_backward_kernel(T* dlogits, float* losses, const T* logits,
                                                     const int32_t* targets, int64_t V, int64_t Vp,
                                                     float dloss, const float* dloss_scale) {
  const int64_t row = blockIdx.x;
  const T* x = logits + row * Vp;
  const int64_t target = targets[row];
  const bool target_ok = target >= 0 && target < V;

  // Pass 1: statistics of the real columns (the padding is never read).
  SoftmaxState state{-INFINITY, 0.0f};
  for (int64_t j = threadIdx.x; j < V; j += kThreads) {
    const float v = load_as_float(x, j);
    if (v > state.m) {
      state.s = state.m == -INFINITY ? 1.0f : state.s * expf(state.m - v) + 1.0f;
      state.m = v;
    } else {
      // -inf adds nothing (also while the state is empty); NaN propagates through expf.
      state.s += v == -INFINITY ? 0.0f : expf(v - state.m);
    }
  }
  // The target logit is read before the block-wide barrier inside block_merge, so before any write.
  const float x_target = target_ok ? load_as_float(x, target) : NAN;
  const SoftmaxState total = block_merge(state);
  if (threadIdx.x == 0) losses[row] = logf(total.s) + total.m - x_target;
  if (dlogits == nullptr) return;

  // Pass 2: (softmax - onehot) * dloss * scale for the real columns, zeros for the padding.
  const float multiplier = dloss_scale != nullptr ? dloss * *dloss_scale : dloss;
  T* dx = dlogits + row * Vp;
  for (int64_t j = threadIdx.x; j < Vp; j += kThreads) {
    float g = 0.0f;
    if (j < V) {
      const float p = expf(load_as_float(x, j) - total.m) / total.s;
      g = target_ok ? (p - (j == target ? 1.0f : 0.0f)) * multiplier : NAN;
    }
    store_from_float(dx, j, g);
  }
}

template <typename T>
void crossentropy_forward_backward(T* dlogits, float* losses, const T* logits, const int32_t* targets,
                                   int64_t rows, int64_t V, int64_t Vp, float dloss, const float* dloss_scale,
                                   cudaStream_t stream) {
  MPT_CHECK(rows > 0, "cuda::crossentropy_forward_backward: rows must be positive, got {}", rows);
  MPT_CHECK(rows <= 0x7fffffff, "cuda::crossentropy_forward_backward: rows = {} exceeds the grid limit",
            rows);
  MPT_CHECK(V > 0, "cuda::crossentropy_forward_backward: V must be positive, got {}", V);
  MPT_CHECK(Vp >= V, "cuda::crossentropy_forward_backward: Vp ({}) must be >= V ({})", Vp, V);
  MPT_CHECK(losses != nullptr, "cuda::crossentropy_forward_backward: losses is null");
  MPT_CHECK(logits != nullptr, "cuda::crossentropy_forward_backward: logits is null");
  MPT_CHECK(targets != nullptr, "cuda::crossentropy_forward_backward: targets is null");
  crossentropy_forward_backward_kernel<T><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
      dlogits, losses, logits, targets, V, Vp, dloss, dloss_scale);
  MPT_CUDA_LAUNCH_CHECK();
}

#define MPT_INSTANTIATE_CROSSENTROPY(T)                                                                  \
  template void crossentropy_forward_backward<T>(T*, float*, const T*, const int32_t*, int64_t, int64_t, \
                                                 int64_t, float, const float*, cudaStream_t);

MPT_INSTANTIATE_CROSSENTROPY(float)
MPT_INSTANTIATE_CROSSENTROPY(half)
MPT_INSTANTIATE_CROSSENTROPY(bf16)

#undef MPT_INSTANTIATE_CROSSENTROPY

}  // namespace mpt::cuda
