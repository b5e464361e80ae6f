// Order-preserving integer keys for the NaN-propagating max of the NCCL communicator
// (mptrain/cuda_max_keys.hpp): element-wise kernels over the key math of common/max_key.hpp.
#include <cstdint>

#include "common/max_key.hpp"
#include "mptrain/cuda_check.hpp"
#include "mptrain/cuda_max_keys.hpp"

namespace mpt::cuda {

namespace {

constexpr int kThreads = 256;
constexpr unsigned kMaxBlocks = 4096;

using F32 = common::MaxKeyF32;
using F64 = common::MaxKeyF64;
using F16 = common::MaxKeyF16;
using BF16 = common::MaxKeyBF16;

template <typename L>
__global__ void to_max_keys_kernel(typename L::key_type* keys, const typename L::bits_type* values,
                                   size_t n) {
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    keys[i] = common::max_key_of<L>(values[i]);
}

template <typename L>
__global__ void from_max_keys_kernel(typename L::bits_type* values, const typename L::key_type* keys,
                                     size_t n) {
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    values[i] = common::max_key_value<L>(keys[i]);
}

unsigned blocks_for(size_t n) {
  const size_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

template <typename L>
void launch_to(void* keys, const void* values, size_t n, cudaStream_t stream) {
  to_max_keys_kernel<L><<<blocks_for(n), kThreads, 0, stream>>>(
      static_cast<typename L::key_type*>(keys), static_cast<const typename L::bits_type*>(values), n);
  MPT_CUDA_LAUNCH_CHECK();
}

template <typename L>
void launch_from(void* values, const void* keys, size_t n, cudaStream_t stream) {
  from_max_keys_kernel<L><<<blocks_for(n), kThreads, 0, stream>>>(
      static_cast<typename L::bits_type*>(values), static_cast<const typename L::key_type*>(keys), n);
  MPT_CUDA_LAUNCH_CHECK();
}

}  // namespace

size_t max_key_size(DType t) {
  switch (t) {
    case DType::f32:
    case DType::f16:
    case DType::bf16:
      return 4;
    case DType::f64:
      return 8;
    default:
      throw Error(MPT_FORMAT("max keys: dtype {} is not floating-point", dtype_name(t)));
  }
}

void to_max_keys(void* keys, const void* values, size_t num_elements, DType t, cudaStream_t stream) {
  (void)max_key_size(t);
  if (num_elements == 0) return;
  MPT_CHECK(keys != nullptr && values != nullptr, "to_max_keys: null buffer for {} elements", num_elements);
  switch (t) {
    case DType::f32:
      return launch_to<F32>(keys, values, num_elements, stream);
    case DType::f64:
      return launch_to<F64>(keys, values, num_elements, stream);
    case DType::f16:
      return launch_to<F16>(keys, values, num_elements, stream);
    default:
      return launch_to<BF16>(keys, values, num_elements, stream);
  }
}

void from_max_keys(void* values, const void* keys, size_t num_elements, DType t, cudaStream_t stream) {
  (void)max_key_size(t);
  if (num_elements == 0) return;
  MPT_CHECK(keys != nullptr && values != nullptr, "from_max_keys: null buffer for {} elements", num_elements);
  switch (t) {
    case DType::f32:
      return launch_from<F32>(values, keys, num_elements, stream);
    case DType::f64:
      return launch_from<F64>(values, keys, num_elements, stream);
    case DType::f16:
      return launch_from<F16>(values, keys, num_elements, stream);
    default:
      return launch_from<BF16>(values, keys, num_elements, stream);
  }
}

}  // namespace mpt::cuda
