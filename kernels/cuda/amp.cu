// CUDA mixed-precision check (DESIGN.md phase 4): found_inf and FP64 per-block sums of squares of the rank's
// gradient shard in one read-only pass. One thread block per norm block; CUB's BlockReduce gives a
// fixed-shape, run-to-run deterministic sum.
#include <cub/block/block_reduce.cuh>

#include "cuda/dtype.cuh"
#include "mptrain/cuda_check.hpp"
#include "mptrain/cuda_ops.hpp"

namespace mpt::cuda {

namespace {
constexpr int kThreads = 256;
}

template <typename T>
__global__ void grad_check_kernel(double* block_sums, float* found_inf, const T* grads,
                                  const size_t* block_starts, size_t block_elements) {
  using Reduce = cub::BlockReduce<double, kThreads>;
  __shared__ typename Reduce::TempStorage temp;
  const T* g = grads + block_starts[blockIdx.x];
  double sum = 0.0;
  bool bad = false;
  for (size_t i = threadIdx.x; i < block_elements; i += kThreads) {
    const float x = load_as_float(g, i);
    bad |= !isfinite(x);
    sum += static_cast<double>(x) * static_cast<double>(x);
  }
  // Any thread may raise the flag; all write the same value, so the race is benign.
  if (bad) *found_inf = 1.0f;
  const double total = Reduce(temp).Sum(sum);
  if (threadIdx.x == 0) block_sums[blockIdx.x] = total;
}

template <typename T>
void grad_check(double* block_sums, float* found_inf, const T* grads, const size_t* block_starts,
                size_t num_blocks, size_t block_elements, cudaStream_t stream) {
  MPT_CHECK(block_elements >= 1, "cuda::grad_check: block_elements must be >= 1");
  MPT_CHECK(num_blocks < (size_t{1} << 31), "cuda::grad_check: {} blocks exceed the grid limit", num_blocks);
  MPT_CUDA_CHECK(cudaMemsetAsync(found_inf, 0, sizeof(float), stream));
  if (num_blocks == 0) return;
  grad_check_kernel<T><<<static_cast<unsigned>(num_blocks), kThreads, 0, stream>>>(
      block_sums, found_inf, grads, block_starts, block_elements);
  MPT_CUDA_LAUNCH_CHECK();
}

template void grad_check<float>(double*, float*, const float*, const size_t*, size_t, size_t, cudaStream_t);
template void grad_check<half>(double*, float*, const half*, const size_t*, size_t, size_t, cudaStream_t);
template void grad_check<bf16>(double*, float*, const bf16*, const size_t*, size_t, size_t, cudaStream_t);

}  // namespace mpt::cuda
