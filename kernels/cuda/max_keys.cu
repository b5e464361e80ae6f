// Order-preserving integer keys for the NaN-propagating max of the NCCL communicator (cuda/max_keys.hpp).
// A float's bit pattern read as a sign-magnitude integer is ordered like the float; flipping every bit of a
// negative value and setting the sign bit of a non-negative one turns that into unsigned order. NaNs (any
// sign, any payload) all become the largest key, so an unsigned max returns NaN when any input was NaN.
#include <cstdint>

#include "cuda/max_keys.hpp"
#include "mptrain/cuda_check.hpp"

namespace mpt::cuda {

namespace {

constexpr int kThreads = 256;
constexpr unsigned kMaxBlocks = 4096;

/// Bit layout of one floating-point storage type: Bits is its raw storage, Key the key type; `inf` is the
/// bit pattern of +inf (every value with larger magnitude bits is NaN) and `qnan` the NaN written back.
template <typename Bits, typename Key, Bits Sign, Bits Inf, Bits QNaN>
struct Layout {
  using bits_type = Bits;
  using key_type = Key;
  static constexpr Bits sign = Sign;
  static constexpr Bits inf = Inf;
  static constexpr Bits qnan = QNaN;
  static constexpr Key nan_key = static_cast<Key>(~Key{0});
};
using F32 = Layout<uint32_t, uint32_t, 0x80000000u, 0x7F800000u, 0x7FC00000u>;
using F64 = Layout<uint64_t, uint64_t, 0x8000000000000000ull, 0x7FF0000000000000ull, 0x7FF8000000000000ull>;
using F16 = Layout<uint16_t, uint32_t, 0x8000u, 0x7C00u, 0x7E00u>;
using BF16 = Layout<uint16_t, uint32_t, 0x8000u, 0x7F80u, 0x7FC0u>;

template <typename L>
__device__ __forceinline__ typename L::key_type key_of(typename L::bits_type b) {
  using Bits = typename L::bits_type;
  using Key = typename L::key_type;
  if (static_cast<Bits>(b & static_cast<Bits>(~L::sign)) > L::inf) return L::nan_key;
  // Keys of 16-bit floats live in the low 16 bits; only NaN uses the upper ones.
  const Bits k = (b & L::sign) ? static_cast<Bits>(~b) : static_cast<Bits>(b | L::sign);
  return static_cast<Key>(k);
}

template <typename L>
__device__ __forceinline__ typename L::bits_type value_of(typename L::key_type k) {
  using Bits = typename L::bits_type;
  if (k == L::nan_key) return L::qnan;
  const Bits b = static_cast<Bits>(k);
  return (b & L::sign) ? static_cast<Bits>(b & static_cast<Bits>(~L::sign)) : static_cast<Bits>(~b);
}

template <typename L>
__global__ void to_max_keys_kernel(typename L::key_type* keys, const typename L::bits_type* values,
                                   size_t n) {
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    keys[i] = key_of<L>(values[i]);
}

template <typename L>
__global__ void from_max_keys_kernel(typename L::bits_type* values, const typename L::key_type* keys,
                                     size_t n) {
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    values[i] = value_of<L>(keys[i]);
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
