// Bit-exact IEEE binary16 and bfloat16 conversions, shared by the CPU backend, the host types and CUDA code.
//
// float -> half and float -> bf16 round to nearest, ties to even, keep subnormals, map overflow to +-inf
// (|x| >= 65520 becomes inf for half, as on a GPU) and keep NaN a (quiet) NaN with its top payload bits.
// These are the reference the SIMD bulk converters (src/convert.cpp) are tested against.
#pragma once

#include <cstdint>
#include <cstring>

#include "common/host_device.hpp"

namespace mpt::common {

/// Reinterprets the bits of a float (memcpy: no aliasing UB, compiles to a move).
MPT_HD uint32_t float_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}

/// Reinterprets 32 bits as a float.
MPT_HD float bits_float(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

/// float -> binary16 bits, round to nearest even. Overflow (|x| >= 65520) gives +-inf; subnormal halves are
/// produced exactly; NaN stays NaN with the quiet bit set (as x86 F16C and CUDA's __float2half_rn do).
MPT_HD uint16_t float_to_half_bits(float value) {
  const uint32_t x = float_bits(value);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t abs = x & 0x7fffffffu;
  if (abs >= 0x7f800000u) {  // inf or NaN
    if (abs == 0x7f800000u) return static_cast<uint16_t>(sign | 0x7c00u);
    return static_cast<uint16_t>(sign | 0x7e00u | ((abs >> 13) & 0x03ffu));
  }
  if (abs >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520: rounds to inf
  if (abs >= 0x38800000u) {                                              // normal half range (>= 2^-14)
    const uint32_t rebiased = abs - 0x38000000u;                         // exponent bias 127 -> 15
    uint32_t h = rebiased >> 13;
    const uint32_t rem = rebiased & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // carry may ripple into the exponent: correct
    return static_cast<uint16_t>(sign | h);
  }
  const uint32_t exponent = abs >> 23;
  if (exponent < 102) return static_cast<uint16_t>(sign);  // below 2^-25: rounds to (signed) zero
  // Half subnormal: value = mantissa * 2^(exponent-150) = h * 2^-24, so h = mantissa >> (126 - exponent).
  const uint32_t mantissa = (abs & 0x007fffffu) | 0x00800000u;
  const uint32_t shift = 126u - exponent;  // 14 ... 24
  uint32_t h = mantissa >> shift;
  const uint32_t rem = mantissa & ((1u << shift) - 1u);
  const uint32_t halfway = 1u << (shift - 1u);
  if (rem > halfway || (rem == halfway && (h & 1u))) ++h;  // may become 0x400, the smallest normal: correct
  return static_cast<uint16_t>(sign | h);
}

/// binary16 bits -> float (exact: every half is a float).
MPT_HD float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  uint32_t mantissa = h & 0x03ffu;
  if (exponent == 0x1fu) return bits_float(sign | 0x7f800000u | (mantissa << 13));  // inf / NaN
  if (exponent != 0) return bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
  if (mantissa == 0) return bits_float(sign);
  // Subnormal half: normalise into a float.
  uint32_t e = 113;
  while ((mantissa & 0x0400u) == 0) {
    mantissa <<= 1;
    --e;
  }
  return bits_float(sign | (e << 23) | ((mantissa & 0x03ffu) << 13));
}

/// float -> bfloat16 bits, round to nearest even, subnormals kept (bf16 has float's exponent range, so plain
/// RNE on the bits is exact rounding; overflow carries into inf). NaN stays NaN with the quiet bit set.
MPT_HD uint16_t float_to_bf16_bits(float value) {
  const uint32_t x = float_bits(value);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x0040u);
  const uint32_t rounding = 0x7fffu + ((x >> 16) & 1u);
  return static_cast<uint16_t>((x + rounding) >> 16);
}

/// bfloat16 bits -> float (exact).
MPT_HD float bf16_bits_to_float(uint16_t b) {
  return bits_float(static_cast<uint32_t>(b) << 16);
}

/// True when a binary16 pattern is inf or NaN (exponent all ones).
MPT_HD bool half_bits_nonfinite(uint16_t h) {
  return (h & 0x7c00u) == 0x7c00u;
}

/// True when a bfloat16 pattern is inf or NaN.
MPT_HD bool bf16_bits_nonfinite(uint16_t b) {
  return (b & 0x7f80u) == 0x7f80u;
}

}  // namespace mpt::common
