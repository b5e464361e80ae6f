// CUDA LAMB over the rank's FP32 master shard (DESIGN.md phase 6, "Large batch"): pass 1 (moments and the
// per-segment FP64 sums of w^2 and r^2), the per-tensor trust ratios from the gathered segment sums, and
// pass 2 (the update). Every kernel reads the device-side found_inf and returns at once on an overflowing
// step, so a skipped step costs no host synchronisation. Element math: kernels/common/lamb.hpp.
#include <algorithm>
#include <cub/block/block_reduce.cuh>

#include "common/lamb.hpp"
#include "cuda/dtype.cuh"
#include "mptrain/cuda_check.hpp"
#include "mptrain/cuda_ops.hpp"

namespace mpt::cuda {

namespace {
constexpr int kThreads = 256;
constexpr unsigned kMaxGridY = 65535;
}  // namespace

// One thread block per segment (a segment is at most one norm block long); CUB's BlockReduce gives each sum
// a fixed shape, so it depends only on the segment's elements: the same for every N.
template <typename T>
__global__ void lamb_moments_kernel(const float* master, float* m, float* v, const T* grads,
                                    const LambSegment* segments, double* segment_sums,
                                    const common::AmpState* state) {
  if (state->flags[common::kFoundInf] != 0.0f) return;
  using Reduce = cub::BlockReduce<double, kThreads>;
  __shared__ typename Reduce::TempStorage temp;
  const common::AdamWStep step = state->step;
  const LambSegment s = segments[blockIdx.x];
  double w_sq = 0.0, r_sq = 0.0;
  for (size_t i = threadIdx.x; i < s.num_elements; i += kThreads) {
    const size_t j = s.shard_offset + i;
    float mj = m[j], vj = v[j];
    common::lamb_moments(mj, vj, load_as_float(grads, s.flat_offset + i), step);
    m[j] = mj;
    v[j] = vj;
    const float w = master[j];
    const float r = common::lamb_direction(w, mj, vj, s.decay, step);
    w_sq += static_cast<double>(w) * static_cast<double>(w);
    r_sq += static_cast<double>(r) * static_cast<double>(r);
  }
  const double w_total = Reduce(temp).Sum(w_sq);
  __syncthreads();  // the temporary storage is reused
  const double r_total = Reduce(temp).Sum(r_sq);
  if (threadIdx.x == 0) {
    segment_sums[2 * size_t{blockIdx.x}] = w_total;
    segment_sums[2 * size_t{blockIdx.x} + 1] = r_total;
  }
}

// One thread block per tensor: thread t adds the tensor's segments t, t + kThreads, ... in order, then the
// block combines the partials in CUB's fixed tree. The shape depends only on the tensor's segment count,
// which does not depend on N, so the trust ratio is the same for every N.
__global__ void lamb_trust_kernel(float* trust, const double* gathered_sums, const size_t* order,
                                  const size_t* tensor_begin, const common::AmpState* state) {
  if (state->flags[common::kFoundInf] != 0.0f) return;
  using Reduce = cub::BlockReduce<double, kThreads>;
  __shared__ typename Reduce::TempStorage temp;
  const size_t begin = tensor_begin[blockIdx.x], end = tensor_begin[blockIdx.x + 1];
  double w_sq = 0.0, r_sq = 0.0;
  for (size_t j = begin + threadIdx.x; j < end; j += kThreads) {
    w_sq += gathered_sums[2 * order[j]];
    r_sq += gathered_sums[2 * order[j] + 1];
  }
  const double w_total = Reduce(temp).Sum(w_sq);
  __syncthreads();
  const double r_total = Reduce(temp).Sum(r_sq);
  if (threadIdx.x == 0) trust[blockIdx.x] = common::lamb_trust(w_total, r_total, true);
}

__global__ void lamb_apply_kernel(float* master, const float* m, const float* v, const LambSegment* segments,
                                  size_t num_segments, const float* trust, const common::AmpState* state) {
  if (state->flags[common::kFoundInf] != 0.0f) return;
  const common::AdamWStep step = state->step;
  for (size_t k = blockIdx.x; k < num_segments; k += gridDim.x) {
    const LambSegment s = segments[k];
    const float ratio = s.decay ? trust[s.tensor] : 1.0f;
    for (size_t i = threadIdx.x; i < s.num_elements; i += kThreads) {
      const size_t j = s.shard_offset + i;
      float w = master[j];
      const float r = common::lamb_direction(w, m[j], v[j], s.decay, step);
      common::lamb_apply(w, r, ratio, step);
      master[j] = w;
    }
  }
}

template <typename T>
void lamb_moments(const float* master, float* m, float* v, const T* grads, const LambSegment* segments,
                  size_t num_segments, double* segment_sums, const common::AmpState* state,
                  cudaStream_t stream) {
  if (num_segments == 0) return;
  MPT_CHECK(num_segments < (size_t{1} << 31), "cuda::lamb_moments: {} segments exceed the grid limit",
            num_segments);
  lamb_moments_kernel<T><<<static_cast<unsigned>(num_segments), kThreads, 0, stream>>>(
      master, m, v, grads, segments, segment_sums, state);
  MPT_CUDA_LAUNCH_CHECK();
}

void lamb_trust(float* trust, const double* gathered_sums, const size_t* order, const size_t* tensor_begin,
                size_t num_tensors, const common::AmpState* state, cudaStream_t stream) {
  if (num_tensors == 0) return;
  MPT_CHECK(num_tensors < (size_t{1} << 31), "cuda::lamb_trust: {} tensors exceed the grid limit",
            num_tensors);
  lamb_trust_kernel<<<static_cast<unsigned>(num_tensors), kThreads, 0, stream>>>(trust, gathered_sums, order,
                                                                                 tensor_begin, state);
  MPT_CUDA_LAUNCH_CHECK();
}

void lamb_apply(float* master, const float* m, const float* v, const LambSegment* segments,
                size_t num_segments, const float* trust, const common::AmpState* state, cudaStream_t stream) {
  if (num_segments == 0) return;
  const auto grid = static_cast<unsigned>(std::min<size_t>(num_segments, size_t{kMaxGridY} * 16));
  lamb_apply_kernel<<<grid, kThreads, 0, stream>>>(master, m, v, segments, num_segments, trust, state);
  MPT_CUDA_LAUNCH_CHECK();
}

#define MPT_INSTANTIATE(T)                                                                                   \
  template void lamb_moments<T>(const float*, float*, float*, const T*, const LambSegment*, size_t, double*, \
                                const common::AmpState*, cudaStream_t);
MPT_INSTANTIATE(float)
MPT_INSTANTIATE(half)
MPT_INSTANTIATE(bf16)
#undef MPT_INSTANTIATE

}  // namespace mpt::cuda
