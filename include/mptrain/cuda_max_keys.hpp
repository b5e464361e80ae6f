// NaN-propagating max for the NCCL communicator. NCCL's floating-point max (fmaxf, __hmax) drops a NaN
// whenever the other operand is a number, but mptrain's Communicator contract says a max returns NaN wherever
// any rank holds one. So a floating-point max travels as an unsigned-integer max over order-preserving keys
// (common/max_key.hpp): every float maps to a key whose unsigned order is the float order (-inf < ... < -0 <
// +0 < ... < +inf), and every NaN maps to the largest key. Keys are u32 for f32/f16/bf16 (16-bit floats are
// widened: NCCL has no 16-bit integer type) and u64 for f64. Only built with MPTRAIN_WITH_CUDA.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "mptrain/dtype.hpp"

namespace mpt::cuda {

/// Bytes of one max key for floating-point dtype `t` (4 for f32/f16/bf16, 8 for f64). Throws mpt::Error for
/// a non-floating-point dtype.
size_t max_key_size(DType t);

/// keys[i] = order-preserving key of values[i], i < num_elements; values has dtype `t`, keys
/// max_key_size(t) bytes each (device memory, no overlap). Enqueued on `stream`, no sync. Throws mpt::Error
/// for a non-floating-point dtype, LibraryError on launch failure.
void to_max_keys(void* keys, const void* values, size_t num_elements, DType t, cudaStream_t stream);

/// values[i] = the float whose key is keys[i] (the largest key becomes a quiet NaN); inverse of to_max_keys
/// for every non-NaN value, bit for bit. Enqueued on `stream`, no sync. Same throws.
void from_max_keys(void* values, const void* keys, size_t num_elements, DType t, cudaStream_t stream);

}  // namespace mpt::cuda
