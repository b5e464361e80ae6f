// Device-side load/store of mptrain storage types as float (FP32 compute): mpt::half and mpt::bf16 share the
// bit layout of CUDA's __half and __nv_bfloat16, so their buffers are read through those types' intrinsics.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "mptrain/dtype.hpp"

namespace mpt::cuda {

template <typename T>
__device__ __forceinline__ float load_as_float(const T* p, size_t i) {
  if constexpr (std::is_same_v<T, float>)
    return p[i];
  else if constexpr (std::is_same_v<T, half>)
    return __half2float(reinterpret_cast<const __half*>(p)[i]);
  else
    return __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(p)[i]);
}

template <typename T>
__device__ __forceinline__ void store_from_float(T* p, size_t i, float x) {
  if constexpr (std::is_same_v<T, float>)
    p[i] = x;
  else if constexpr (std::is_same_v<T, half>)
    reinterpret_cast<__half*>(p)[i] = __float2half_rn(x);
  else
    reinterpret_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(x);
}

}  // namespace mpt::cuda
