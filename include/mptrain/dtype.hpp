// Storage types of mptrain: FP16 (IEEE binary16) and BF16 host types, the DType tag, and bulk conversion.
//
// mpt::half and mpt::bf16 are 2-byte trivially copyable wrappers around their bit pattern. Conversions from
// float round to nearest even with subnormals, inf and NaN handled as the GPU does (kernels/common/fp16.hpp).
// Arithmetic on them is done by converting to float ("compute in float", STYLE.md).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>
#include <type_traits>

#include "common/fp16.hpp"

namespace mpt {

/// IEEE 754 binary16: 1 sign, 5 exponent, 10 mantissa bits. Largest finite 65504.
struct half {
  uint16_t bits = 0;
  half() = default;
  /// Round to nearest even; |x| >= 65520 gives +-inf.
  explicit half(float x) : bits(common::float_to_half_bits(x)) {}
  explicit operator float() const { return common::half_bits_to_float(bits); }
  static half from_bits(uint16_t b) {
    half h;
    h.bits = b;
    return h;
  }
};

/// bfloat16: 1 sign, 8 exponent, 7 mantissa bits (the top half of a float).
struct bf16 {
  uint16_t bits = 0;
  bf16() = default;
  /// Round to nearest even, subnormals kept.
  explicit bf16(float x) : bits(common::float_to_bf16_bits(x)) {}
  explicit operator float() const { return common::bf16_bits_to_float(bits); }
  static bf16 from_bits(uint16_t b) {
    bf16 h;
    h.bits = b;
    return h;
  }
};

static_assert(sizeof(half) == 2 && std::is_trivially_copyable_v<half>);
static_assert(sizeof(bf16) == 2 && std::is_trivially_copyable_v<bf16>);

/// float of any storage type (identity for float and double narrowing-free widening for half/bf16).
inline float to_float(float x) {
  return x;
}
inline float to_float(half x) {
  return static_cast<float>(x);
}
inline float to_float(bf16 x) {
  return static_cast<float>(x);
}
inline double to_float(double x) {
  return x;
}

/// Rounds a float to storage type T (round to nearest even).
template <typename T>
inline T from_float(float x) {
  if constexpr (std::is_same_v<T, float>)
    return x;
  else if constexpr (std::is_same_v<T, double>)
    return static_cast<double>(x);
  else
    return T(x);
}

/// True when the value is inf or NaN.
inline bool is_nonfinite(half x) {
  return common::half_bits_nonfinite(x.bits);
}
inline bool is_nonfinite(bf16 x) {
  return common::bf16_bits_nonfinite(x.bits);
}
inline bool is_nonfinite(float x) {
  return (common::float_bits(x) & 0x7f800000u) == 0x7f800000u;
}

/// Element type tag for buffers, collectives and files.
enum class DType : uint8_t { f32, f16, bf16, f64, i32, i64, u8 };

/// Size of one element in bytes.
constexpr size_t dtype_size(DType t) {
  switch (t) {
    case DType::f32:
      return 4;
    case DType::f16:
      return 2;
    case DType::bf16:
      return 2;
    case DType::f64:
      return 8;
    case DType::i32:
      return 4;
    case DType::i64:
      return 8;
    case DType::u8:
      return 1;
  }
  return 0;
}

/// Lower-case name ("f32", "f16", "bf16", ...), as used in messages and checkpoint headers.
constexpr std::string_view dtype_name(DType t) {
  switch (t) {
    case DType::f32:
      return "f32";
    case DType::f16:
      return "f16";
    case DType::bf16:
      return "bf16";
    case DType::f64:
      return "f64";
    case DType::i32:
      return "i32";
    case DType::i64:
      return "i64";
    case DType::u8:
      return "u8";
  }
  return "?";
}

/// DType of a C++ storage type.
template <typename T>
constexpr DType dtype_of() {
  if constexpr (std::is_same_v<T, float>)
    return DType::f32;
  else if constexpr (std::is_same_v<T, half>)
    return DType::f16;
  else if constexpr (std::is_same_v<T, bf16>)
    return DType::bf16;
  else if constexpr (std::is_same_v<T, double>)
    return DType::f64;
  else if constexpr (std::is_same_v<T, int32_t>)
    return DType::i32;
  else if constexpr (std::is_same_v<T, int64_t>)
    return DType::i64;
  else if constexpr (std::is_same_v<T, uint8_t>)
    return DType::u8;
  else
    static_assert(sizeof(T) == 0, "unsupported storage type");
}

/// Calls f.template operator()<T>() with T the storage type of a floating-point DType (f32, f16, bf16).
/// Throws mpt::Error for other dtypes.
template <typename F>
decltype(auto) dispatch_float_dtype(DType t, F&& f);

// ---- Bulk conversion (src/convert.cpp) --------------------------------------------------------------------

/// Instruction set used by the bulk converters.
enum class SimdLevel : uint8_t {
  scalar,  ///< portable C++ (kernels/common/fp16.hpp)
  avx2,    ///< AVX2 + F16C, 8 lanes
  avx512,  ///< AVX-512F + AVX-512BW, 16 lanes
};

/// Best level this CPU supports (checked once at run time with cpuid).
SimdLevel detected_simd_level();
/// Name of a level ("scalar", "avx2", "avx512").
std::string_view simd_level_name(SimdLevel level);

/// Converts n floats to halves (round to nearest even), src and dst may not overlap.
/// `level` must be supported by the CPU (<= detected_simd_level()); throws mpt::Error otherwise.
void convert(const float* src, half* dst, size_t n, SimdLevel level = detected_simd_level());
/// Converts n halves to floats (exact).
void convert(const half* src, float* dst, size_t n, SimdLevel level = detected_simd_level());
/// Converts n floats to bf16 (round to nearest even, subnormals kept: never uses VCVTNEPS2BF16, which
/// flushes them).
void convert(const float* src, bf16* dst, size_t n, SimdLevel level = detected_simd_level());
/// Converts n bf16 to floats (exact).
void convert(const bf16* src, float* dst, size_t n, SimdLevel level = detected_simd_level());

}  // namespace mpt

#include "mptrain/error.hpp"

template <typename F>
decltype(auto) mpt::dispatch_float_dtype(DType t, F&& f) {
  switch (t) {
    case DType::f32:
      return f.template operator()<float>();
    case DType::f16:
      return f.template operator()<half>();
    case DType::bf16:
      return f.template operator()<bf16>();
    default:
      break;
  }
  throw Error(MPT_FORMAT("dtype {} is not a floating-point storage type", dtype_name(t)));
}
