// Order-preserving integer keys of floating-point bit patterns, for the NaN-propagating max of the NCCL
// communicator (mptrain/cuda_max_keys.hpp) and tested on the CPU. A float's bit pattern read as a
// sign-magnitude integer is ordered like the float; flipping every bit of a negative value and setting the
// sign bit of a non-negative one turns that into unsigned order (-inf < ... < -0 < +0 < ... < +inf). Every
// NaN (any sign, any payload) becomes the largest key, so an unsigned max returns NaN when any input was NaN.
#pragma once

#include <cstdint>

#include "common/host_device.hpp"

namespace mpt::common {

/// Bit layout of one floating-point storage type: Bits is its raw storage, Key the key type (16-bit floats
/// use 32-bit keys, as NCCL has no 16-bit integer type); `inf` is the pattern of +inf (larger magnitude bits
/// are NaN) and `qnan` the NaN that a NaN key becomes.
template <typename Bits, typename Key, Bits Sign, Bits Inf, Bits QNaN>
struct MaxKeyLayout {
  using bits_type = Bits;
  using key_type = Key;
  static constexpr Bits sign = Sign;
  static constexpr Bits inf = Inf;
  static constexpr Bits qnan = QNaN;
  static constexpr Key nan_key = static_cast<Key>(~Key{0});
};
using MaxKeyF32 = MaxKeyLayout<uint32_t, uint32_t, 0x80000000u, 0x7F800000u, 0x7FC00000u>;
using MaxKeyF64 =
    MaxKeyLayout<uint64_t, uint64_t, 0x8000000000000000ull, 0x7FF0000000000000ull, 0x7FF8000000000000ull>;
using MaxKeyF16 = MaxKeyLayout<uint16_t, uint32_t, 0x8000u, 0x7C00u, 0x7E00u>;
using MaxKeyBF16 = MaxKeyLayout<uint16_t, uint32_t, 0x8000u, 0x7F80u, 0x7FC0u>;

/// The key of bit pattern `b`.
template <typename L>
MPT_HD typename L::key_type max_key_of(typename L::bits_type b) {
  using Bits = typename L::bits_type;
  using Key = typename L::key_type;
  if (static_cast<Bits>(b & static_cast<Bits>(~L::sign)) > L::inf) return L::nan_key;
  // Keys of 16-bit floats stay in the low 16 bits; only NaN uses the upper ones.
  const Bits k = (b & L::sign) ? static_cast<Bits>(~b) : static_cast<Bits>(b | L::sign);
  return static_cast<Key>(k);
}

/// The bit pattern of key `k`: the inverse of max_key_of for every non-NaN pattern; the NaN key gives qnan.
template <typename L>
MPT_HD typename L::bits_type max_key_value(typename L::key_type k) {
  using Bits = typename L::bits_type;
  if (k == L::nan_key) return L::qnan;
  const Bits b = static_cast<Bits>(k);
  return (b & L::sign) ? static_cast<Bits>(b & static_cast<Bits>(~L::sign)) : static_cast<Bits>(~b);
}

}  // namespace mpt::common
