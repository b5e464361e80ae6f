// Launchers of the CUDA mixed-precision kernels (kernels/cuda/amp.cu, kernels/cuda/adamw.cu), the device
// twins of the CPU ops in kernels/cpu/. All pointers are device memory unless stated; every launcher enqueues
// on `stream` and returns without synchronising. Instantiated for float, half and bf16 storage (mpt::half and
// mpt::bf16 have the same layout as CUDA's __half and __nv_bfloat16). Only built with MPTRAIN_WITH_CUDA.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "common/adamw.hpp"
#include "common/amp_state.hpp"
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

/// Phase 6 on the device: AdamW (kernels/common/adamw.hpp) over `num_segments` segments (device array) with
/// the constants state->step (written by amp_prepare), nothing when state->flags[kFoundInf] is set, so an
/// overflowing step needs no host sync. `max_segment_elements` only sizes the grid (any upper bound
/// of the largest segment works).
template <typename T>
void adamw(float* master, float* m, float* v, const T* grads, const AdamWSegment* segments,
           size_t num_segments, size_t max_segment_elements, const common::AmpState* state,
           cudaStream_t stream);

/// *flag = value on `stream` (a one-thread kernel: a host value without a host buffer that must outlive the
/// copy). The engine's stop request into AmpState::flags[kStopRequested].
void write_flag(float* flag, float value, cudaStream_t stream);

/// Phase 6 before AdamW, one thread block: sums gathered_block_sums[order[i]] for i < count (`order`: device,
/// ParamLayout::global_block_order()) in a fixed-shape tree (deterministic and independent of the number of
/// ranks, but not the CPU's sequential rounding), then common::amp_prepare(*state, sum, rule). The sums are
/// not read when state->flags[kFoundInf] is set.
void amp_prepare(common::AmpState* state, const double* gathered_block_sums, const size_t* order,
                 size_t count, const common::OptimizerRule& rule, cudaStream_t stream);

/// End of the step, one thread: common::amp_update(*state, rule) (scaler state machine, Adam's t,
/// min_scale_stop).
void amp_update(common::AmpState* state, const common::ScalerRule& rule, cudaStream_t stream);

/// *acc += FP64 sum of losses[0..n), one thread block, fixed-shape tree (deterministic for a given n).
void sum_losses(double* acc, const float* losses, int64_t n, cudaStream_t stream);

/// Phase 7 on the device: params[flat_offset + i] = round(master[shard_offset + i]) for every segment;
/// skipped when *found_inf is non-zero (pass &state->flags[common::kFoundInf]); null found_inf: always cast.
template <typename T>
void cast_master(T* params, const float* master, const AdamWSegment* segments, size_t num_segments,
                 size_t max_segment_elements, const float* found_inf, cudaStream_t stream);

}  // namespace mpt::cuda
