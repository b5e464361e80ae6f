// CUDA mixed-precision check (DESIGN.md phase 4): found_inf and FP64 per-block sums of squares of the rank's
// gradient shard in one read-only pass. One thread block per norm block; CUB's BlockReduce gives a
// fixed-shape, run-to-run deterministic sum. Also the one-block kernels on the step state common::AmpState:
// the norm/clip/lr preparation over the gathered block sums, the loss-scaler update (PyTorch's
// _amp_update_scale_ on device memory, with kernels/common/amp_state.hpp's rule), the flag write, and the
// model's FP64 loss sum.
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

__global__ void write_flag_kernel(float* flag, float value) {
  *flag = value;
}

void write_flag(float* flag, float value, cudaStream_t stream) {
  write_flag_kernel<<<1, 1, 0, stream>>>(flag, value);
  MPT_CUDA_LAUNCH_CHECK();
}

// One block of kThreads: thread t adds values[order[t]], values[order[t + kThreads]], ... in sequence, then
// CUB's BlockReduce combines the kThreads partials in its fixed tree. The shape depends only on `count`, so
// the sum is run-to-run and N-independent (order and values are the same for every number of ranks).
__global__ void amp_prepare_kernel(common::AmpState* state, const double* gathered, const size_t* order,
                                   size_t count, common::OptimizerRule rule) {
  using Reduce = cub::BlockReduce<double, kThreads>;
  __shared__ typename Reduce::TempStorage temp;
  const bool skip = state->flags[common::kFoundInf] != 0.0f;  // uniform over the block
  double sum = 0.0;
  if (!skip)
    for (size_t i = threadIdx.x; i < count; i += kThreads) sum += gathered[order[i]];
  const double total = Reduce(temp).Sum(sum);
  if (threadIdx.x == 0) common::amp_prepare(*state, total, rule);
}

void amp_prepare(common::AmpState* state, const double* gathered_block_sums, const size_t* order,
                 size_t count, const common::OptimizerRule& rule, cudaStream_t stream) {
  amp_prepare_kernel<<<1, kThreads, 0, stream>>>(state, gathered_block_sums, order, count, rule);
  MPT_CUDA_LAUNCH_CHECK();
}

__global__ void amp_update_kernel(common::AmpState* state, common::ScalerRule rule) {
  common::amp_update(*state, rule);
}

void amp_update(common::AmpState* state, const common::ScalerRule& rule, cudaStream_t stream) {
  amp_update_kernel<<<1, 1, 0, stream>>>(state, rule);
  MPT_CUDA_LAUNCH_CHECK();
}

// One block, the same fixed shape as amp_prepare_kernel: deterministic for a given n.
__global__ void sum_losses_kernel(double* acc, const float* losses, int64_t n) {
  using Reduce = cub::BlockReduce<double, kThreads>;
  __shared__ typename Reduce::TempStorage temp;
  double sum = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) sum += static_cast<double>(losses[i]);
  const double total = Reduce(temp).Sum(sum);
  if (threadIdx.x == 0) *acc += total;
}

void sum_losses(double* acc, const float* losses, int64_t n, cudaStream_t stream) {
  MPT_CHECK(n >= 0, "cuda::sum_losses: negative count {}", n);
  sum_losses_kernel<<<1, kThreads, 0, stream>>>(acc, losses, n);
  MPT_CUDA_LAUNCH_CHECK();
}

template void grad_check<float>(double*, float*, const float*, const size_t*, size_t, size_t, cudaStream_t);
template void grad_check<half>(double*, float*, const half*, const size_t*, size_t, size_t, cudaStream_t);
template void grad_check<bf16>(double*, float*, const bf16*, const size_t*, size_t, size_t, cudaStream_t);

}  // namespace mpt::cuda
