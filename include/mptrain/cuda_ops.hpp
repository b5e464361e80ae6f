// Launchers of the CUDA mixed-precision kernels (kernels/cuda/amp.cu, adamw.cu, lamb.cu, noise.cu), the
// device twins of the CPU ops in kernels/cpu/. All pointers are device memory unless stated; every launcher
// enqueues on `stream` and returns without synchronising. Instantiated for float, half and bf16 storage
// (mpt::half and mpt::bf16 have the same layout as CUDA's __half and __nv_bfloat16). Only built with
// MPTRAIN_WITH_CUDA.
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

// ---- noise.cu: the gradient noise scale ----

/// Pieces of the first pass of sum_squares: `partials` holds this many doubles.
inline constexpr int kSumSquaresBlocks = 128;

/// *out = FP64 sum of squares of data[0, num_elements) (Backend::sum_squares): kSumSquaresBlocks contiguous
/// pieces reduced by CUB into `partials` (device scratch of kSumSquaresBlocks doubles, clobbered), then one
/// block over the partials. Deterministic for a given length.
template <typename T>
void sum_squares(double* out, const T* data, size_t num_elements, double* partials, cudaStream_t stream);

/// Backend::noise_prepare, one thread block: the sum of gathered[indices[i]] for i < count in a fixed-shape
/// tree, then common::noise_prepare(*state, sum, rule).
void noise_prepare(common::AmpState* state, const double* gathered, const size_t* indices, size_t count,
                   const common::NoiseRule& rule, cudaStream_t stream);

// ---- lamb.cu: LAMB (kernels/common/lamb.hpp) with the constants state->step; every launcher's kernel does
// nothing when state->flags[kFoundInf] is set. `segments`, `order` and `tensor_begin` are device arrays. ----

/// Pass 1 (Backend::lamb_moments): one thread block per segment (each at most one norm block long) updates m
/// and v and writes segment_sums[2k] = FP64 sum of w^2, segment_sums[2k + 1] = FP64 sum of r^2 for segment k
/// (CUB fixed-shape tree sums: deterministic and independent of N, but not the CPU's rounding).
template <typename T>
void lamb_moments(const float* master, float* m, float* v, const T* grads, const LambSegment* segments,
                  size_t num_segments, double* segment_sums, const common::AmpState* state,
                  cudaStream_t stream);

/// Trust ratios (Backend::lamb_trust): one thread block per tensor sums that tensor's gathered segment sums
/// order[tensor_begin[t] ..] in a fixed-shape tree and writes trust[t] (num_tensors entries; tensor_begin
/// has num_tensors + 1).
void lamb_trust(float* trust, const double* gathered_sums, const size_t* order, const size_t* tensor_begin,
                size_t num_tensors, const common::AmpState* state, cudaStream_t stream);

/// Pass 2 (Backend::lamb_apply): master -= lr * trust * r for every segment element.
void lamb_apply(float* master, const float* m, const float* v, const LambSegment* segments,
                size_t num_segments, const float* trust, const common::AmpState* state, cudaStream_t stream);

}  // namespace mpt::cuda
