// CUDA AdamW over the rank's FP32 master shard (DESIGN.md phase 6) and the cast back to the storage type
// (phase 7). Both kernels read the device-side found_inf and return at once on an overflowing step, so a
// skipped step costs no host synchronisation. Element math: kernels/common/adamw.hpp.
#include <algorithm>

#include "cuda/dtype.cuh"
#include "mptrain/cuda_check.hpp"
#include "mptrain/cuda_ops.hpp"

namespace mpt::cuda {

namespace {
constexpr int kThreads = 256;
constexpr unsigned kMaxGridY = 65535;

dim3 segment_grid(size_t num_segments, size_t max_segment_elements) {
  const size_t x = std::min<size_t>((max_segment_elements + kThreads - 1) / kThreads, 4096);
  const size_t y = std::min<size_t>(num_segments, kMaxGridY);
  return dim3(static_cast<unsigned>(std::max<size_t>(x, 1)), static_cast<unsigned>(std::max<size_t>(y, 1)));
}
}  // namespace

// Every per-step constant is read from the device step state (common::amp_prepare wrote it): no host value
// of this step enters the launch.
template <typename T>
__global__ void adamw_kernel(float* master, float* m, float* v, const T* grads, const AdamWSegment* segments,
                             size_t num_segments, const common::AmpState* state) {
  if (state->flags[common::kFoundInf] != 0.0f) return;
  const common::AdamWStep step = state->step;
  for (size_t s = blockIdx.y; s < num_segments; s += gridDim.y) {
    const AdamWSegment seg = segments[s];
    for (size_t i = blockIdx.x * size_t{kThreads} + threadIdx.x; i < seg.num_elements;
         i += size_t{gridDim.x} * kThreads) {
      const size_t k = seg.shard_offset + i;
      common::adamw_update(master[k], m[k], v[k], load_as_float(grads, seg.flat_offset + i), seg.decay, step);
    }
  }
}

template <typename T>
__global__ void cast_master_kernel(T* params, const float* master, const AdamWSegment* segments,
                                   size_t num_segments, const float* found_inf) {
  if (found_inf != nullptr && *found_inf != 0.0f) return;
  for (size_t s = blockIdx.y; s < num_segments; s += gridDim.y) {
    const AdamWSegment seg = segments[s];
    for (size_t i = blockIdx.x * size_t{kThreads} + threadIdx.x; i < seg.num_elements;
         i += size_t{gridDim.x} * kThreads)
      store_from_float(params, seg.flat_offset + i, master[seg.shard_offset + i]);
  }
}

template <typename T>
void adamw(float* master, float* m, float* v, const T* grads, const AdamWSegment* segments,
           size_t num_segments, size_t max_segment_elements, const common::AmpState* state,
           cudaStream_t stream) {
  if (num_segments == 0) return;
  adamw_kernel<T><<<segment_grid(num_segments, max_segment_elements), kThreads, 0, stream>>>(
      master, m, v, grads, segments, num_segments, state);
  MPT_CUDA_LAUNCH_CHECK();
}

template <typename T>
void cast_master(T* params, const float* master, const AdamWSegment* segments, size_t num_segments,
                 size_t max_segment_elements, const float* found_inf, cudaStream_t stream) {
  if (num_segments == 0) return;
  cast_master_kernel<T><<<segment_grid(num_segments, max_segment_elements), kThreads, 0, stream>>>(
      params, master, segments, num_segments, found_inf);
  MPT_CUDA_LAUNCH_CHECK();
}

#define MPT_INSTANTIATE(T)                                                                          \
  template void cast_master<T>(T*, const float*, const AdamWSegment*, size_t, size_t, const float*, \
                               cudaStream_t);                                                       \
  template void adamw<T>(float*, float*, float*, const T*, const AdamWSegment*, size_t, size_t,     \
                         const common::AmpState*, cudaStream_t);
MPT_INSTANTIATE(float)
MPT_INSTANTIATE(half)
MPT_INSTANTIATE(bf16)
#undef MPT_INSTANTIATE

}  // namespace mpt::cuda
