// CUDA ops of the gradient noise scale (kernels/common/noise_scale.hpp): the FP64 sum of squares of a range
// of a gradient buffer in a fixed shape (kSumBlocks contiguous pieces, each a CUB block reduction, then one
// block over the partials: deterministic for a given length), and the step's estimate folded into the
// averages of the device step state.
#include <cub/block/block_reduce.cuh>

#include "cuda/dtype.cuh"
#include "mptrain/cuda_check.hpp"
#include "mptrain/cuda_ops.hpp"

namespace mpt::cuda {

namespace {
constexpr int kThreads = 256;
}

template <typename T>
__global__ void sum_squares_partial_kernel(double* partials, const T* data, size_t num_elements) {
  using Reduce = cub::BlockReduce<double, kThreads>;
  __shared__ typename Reduce::TempStorage temp;
  const size_t piece = (num_elements + gridDim.x - 1) / gridDim.x;
  const size_t begin = piece * blockIdx.x;
  const size_t end = begin + piece < num_elements ? begin + piece : num_elements;
  double sum = 0.0;
  for (size_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const double x = load_as_float(data, i);
    sum += x * x;
  }
  const double total = Reduce(temp).Sum(sum);
  if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

__global__ void sum_partials_kernel(double* out, const double* partials, int count) {
  using Reduce = cub::BlockReduce<double, kThreads>;
  __shared__ typename Reduce::TempStorage temp;
  const double total = Reduce(temp).Sum(threadIdx.x < count ? partials[threadIdx.x] : 0.0);
  if (threadIdx.x == 0) *out = total;
}

template <typename T>
void sum_squares(double* out, const T* data, size_t num_elements, double* partials, cudaStream_t stream) {
  static_assert(kSumSquaresBlocks <= kThreads, "the second pass reduces one partial per thread");
  if (num_elements == 0) {
    MPT_CUDA_CHECK(cudaMemsetAsync(out, 0, sizeof(double), stream));
    return;
  }
  sum_squares_partial_kernel<T><<<kSumSquaresBlocks, kThreads, 0, stream>>>(partials, data, num_elements);
  MPT_CUDA_LAUNCH_CHECK();
  sum_partials_kernel<<<1, kThreads, 0, stream>>>(out, partials, kSumSquaresBlocks);
  MPT_CUDA_LAUNCH_CHECK();
}

// One block, like amp_prepare_kernel: thread t adds gathered[indices[t]], gathered[indices[t + kThreads]],
// ..., then the fixed CUB tree; thread 0 folds the estimate into the averages.
__global__ void noise_prepare_kernel(common::AmpState* state, const double* gathered, const size_t* indices,
                                     size_t count, common::NoiseRule rule) {
  using Reduce = cub::BlockReduce<double, kThreads>;
  __shared__ typename Reduce::TempStorage temp;
  double sum = 0.0;
  for (size_t i = threadIdx.x; i < count; i += kThreads) sum += gathered[indices[i]];
  const double total = Reduce(temp).Sum(sum);
  if (threadIdx.x == 0) common::noise_prepare(*state, total, rule);
}

void noise_prepare(common::AmpState* state, const double* gathered, const size_t* indices, size_t count,
                   const common::NoiseRule& rule, cudaStream_t stream) {
  noise_prepare_kernel<<<1, kThreads, 0, stream>>>(state, gathered, indices, count, rule);
  MPT_CUDA_LAUNCH_CHECK();
}

template void sum_squares<float>(double*, const float*, size_t, double*, cudaStream_t);
template void sum_squares<half>(double*, const half*, size_t, double*, cudaStream_t);
template void sum_squares<bf16>(double*, const bf16*, size_t, double*, cudaStream_t);

}  // namespace mpt::cuda
