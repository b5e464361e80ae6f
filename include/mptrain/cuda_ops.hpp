// Launchers of the CUDA mixed-precision kernels (kernels/cuda/amp.cu, kernels/cuda/adamw.cu), the device
// twins of the CPU ops in kernels/cpu/. All pointers are device memory unless stated; every launcher enqueues
// on `stream` and returns without synchronising. Instantiated for float, half and bf16 storage (mpt::half and
// mpt::bf16 have the same layout as CUDA's __half and __nv_bfloat16). Only built with MPTRAIN_WITH_CUDA.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "common/adamw.hpp"
#include "mptrain/backend.hpp"

namespace mpt::cuda {

/// Number of CUDA devices this process can use; 0 when there is no device or no driver (never throws).
int device_count();

/// Phase 4 on the device. `block_starts` (device, num_blocks entries) holds the flat index of each norm
/// block's first element; every block has `block_elements` elements. Writes block_sums[k] = FP64 sum of
/// squares of block k (a fixed-shape tree sum: deterministic, but not the CPU's element-order rounding) and
/// sets *found_inf (device float) to 1 when any element is inf or NaN. The launcher zeroes *found_inf first,
/// on `stream`, so the flag always describes this pass. Throws mpt::Error for bad sizes, LibraryError on
/// launch failure.
template <typename T>
void grad_check(double* block_sums, float* found_inf, const T* grads, const size_t* block_starts,
                size_t num_blocks, size_t block_elements, cudaStream_t stream);

/// Phase 6 on the device: AdamW (kernels/common/adamw.hpp) over `num_segments` segments (device array).
/// Reads *found_inf and does nothing when it is non-zero, so an overflowing step needs no host sync. The
/// gradient multiplier is computed on the device as (*clip_factor) / (*loss_scale); `step.grad_multiplier`
/// is ignored.
template <typename T>
void adamw(float* master, float* m, float* v, const T* grads, const AdamWSegment* segments,
           size_t num_segments, size_t max_segment_elements, const common::AdamWStep& step,
           const float* found_inf, const float* loss_scale, const float* clip_factor, cudaStream_t stream);

/// Phase 7 on the device: params[flat_offset + i] = round(master[shard_offset + i]) for every segment;
/// skipped when *found_inf is non-zero.
template <typename T>
void cast_master(T* params, const float* master, const AdamWSegment* segments, size_t num_segments,
                 size_t max_segment_elements, const float* found_inf, cudaStream_t stream);

}  // namespace mpt::cuda
