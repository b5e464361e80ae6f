// Warp-level reductions shared by the CUDA kernels (LayerNorm, attention softmax). Every lane of a full warp
// of 32 must call them; every lane gets the result. The butterfly (__shfl_xor_sync with offsets 16, 8, 4, 2,
// 1) adds in a fixed order, so a result depends only on the 32 inputs: deterministic run to run.
#pragma once

namespace mpt::cuda {

/// Sum of x over the 32 lanes of the warp (FP32, butterfly order).
__device__ __forceinline__ float warp_sum(float x) {
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

/// Maximum of x over the 32 lanes of the warp (fmaxf: a NaN lane loses to a number).
__device__ __forceinline__ float warp_max(float x) {
  for (int offset = 16; offset > 0; offset >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

}  // namespace mpt::cuda
