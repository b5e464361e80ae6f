// Tests of the FP16/BF16 storage types: the scalar reference conversions (kernels/common/fp16.hpp) against
// independent oracles, and the bulk SIMD converters (src/convert.cpp) against the scalar reference.
//
// 16-bit inputs are checked exhaustively. Float inputs cannot be (2^32 patterns, times every SIMD level), so
// they cover every rounding boundary instead: for each kept-bit prefix, the dropped bits just below, at and
// just above the halfway point and at both ends, plus millions of random patterns. The bulk converters are
// called on misaligned pointers in pieces of odd lengths so both the SIMD body and the scalar tail see every
// kind of input.
#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iostream>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "common/fp16.hpp"
#include "mptrain/dtype.hpp"
#include "mptrain/error.hpp"

namespace {

using mpt::bf16;
using mpt::half;
using mpt::SimdLevel;
using mpt::common::bf16_bits_to_float;
using mpt::common::bits_float;
using mpt::common::float_bits;
using mpt::common::float_to_bf16_bits;
using mpt::common::float_to_half_bits;
using mpt::common::half_bits_to_float;

constexpr uint32_t kSeed = 20240611;

/// Every level this CPU can run, lowest first.
std::vector<SimdLevel> supported_levels() {
  std::vector<SimdLevel> levels;
  for (SimdLevel level : {SimdLevel::scalar, SimdLevel::avx2, SimdLevel::avx512}) {
    if (level <= mpt::detected_simd_level()) levels.push_back(level);
  }
  return levels;
}

bool half_is_nan(uint16_t h) {
  return (h & 0x7fffu) > 0x7c00u;
}
bool bf16_is_nan(uint16_t b) {
  return (b & 0x7fffu) > 0x7f80u;
}

/// A buffer whose data() is one element past an allocation boundary, so SIMD loads and stores are misaligned.
template <typename T>
class Misaligned {
 public:
  explicit Misaligned(size_t n) : storage_(n + 1) {}
  T* data() { return storage_.data() + 1; }
  const T* data() const { return storage_.data() + 1; }
  size_t size() const { return storage_.size() - 1; }
  T& operator[](size_t i) { return storage_[i + 1]; }
  const T& operator[](size_t i) const { return storage_[i + 1]; }

 private:
  std::vector<T> storage_;
};

/// Piece lengths for bulk_convert: below, at and above the 8- and 16-lane widths, and long runs.
constexpr std::array<size_t, 10> kPieceLengths = {1, 3, 7, 8, 9, 15, 16, 17, 63, 4097};

/// Converts src into dst twice at `level`: once in a single call, once in consecutive pieces of the lengths
/// above (so every SIMD body/tail split occurs at many offsets). Fails the test if the two disagree.
template <typename From, typename To>
void bulk_convert(const Misaligned<From>& src, Misaligned<To>& dst, SimdLevel level) {
  const size_t n = src.size();
  mpt::convert(src.data(), dst.data(), n, level);
  Misaligned<To> pieces(n);
  size_t begin = 0;
  for (size_t k = 0; begin < n; ++k) {
    const size_t len = std::min(kPieceLengths[k % kPieceLengths.size()], n - begin);
    mpt::convert(src.data() + begin, pieces.data() + begin, len, level);
    begin += len;
  }
  size_t first_bad = n;
  for (size_t i = 0; i < n && first_bad == n; ++i) {
    if (std::memcmp(&dst[i], &pieces[i], sizeof(To)) != 0) first_bad = i;
  }
  EXPECT_EQ(first_bad, n) << "level " << mpt::simd_level_name(level)
                          << ": one call and piecewise calls differ first at index " << first_bad;
}

/// Compares bulk output bits with the scalar reference; reports the first mismatch with its index and input.
template <typename In, typename Out>
testing::AssertionResult same_bits(const char* what, SimdLevel level, const Misaligned<In>& in,
                                   const std::vector<Out>& expected, const Misaligned<Out>& got) {
  size_t mismatches = 0;
  size_t first = 0;
  for (size_t i = 0; i < expected.size(); ++i) {
    if (expected[i] != got[i]) {
      if (mismatches++ == 0) first = i;
    }
  }
  if (mismatches == 0) return testing::AssertionSuccess();
  uint64_t in_bits = 0;
  std::memcpy(&in_bits, &in[first], sizeof(In));
  return testing::AssertionFailure() << fmt::format(
             "{} at level {}: {} of {} differ; first at index {}: input 0x{:x}, got 0x{:x}, expected 0x{:x}",
             what, mpt::simd_level_name(level), mismatches, expected.size(), first, in_bits, got[first],
             expected[first]);
}

/// Float patterns on every float -> half rounding boundary, plus random patterns; odd length.
std::vector<uint32_t> half_boundary_patterns() {
  std::vector<uint32_t> patterns;
  // Normal halves keep the top 19 bits (sign, exponent, 10 mantissa bits) and round on the low 13.
  constexpr std::array<uint32_t, 6> kLow13 = {0x0000, 0x0001, 0x0fff, 0x1000, 0x1001, 0x1fff};
  patterns.reserve((size_t{1} << 19) * kLow13.size() + 5'000'000);
  for (uint32_t top = 0; top < (1u << 19); ++top) {
    for (uint32_t low : kLow13) patterns.push_back((top << 13) | low);
  }
  // Subnormal halves (float exponent 102..112) drop `shift` = 126 - exponent bits of the 24-bit significand.
  for (uint32_t sign : {0u, 0x80000000u}) {
    for (uint32_t exponent = 102; exponent <= 112; ++exponent) {
      const uint32_t shift = 126 - exponent;
      // When shift is 24 the implicit bit is dropped too, and all 23 field bits (halfway is then the implicit
      // bit itself, i.e. field 0; the mask below folds the out-of-field patterns onto 0 and 1).
      const uint32_t field_dropped = std::min(shift, 23u);
      const uint32_t halfway = 1u << (shift - 1);
      for (uint32_t kept = 0; kept < (1u << (23 - field_dropped)); ++kept) {
        for (uint32_t low : {0u, 1u, halfway - 1, halfway, halfway + 1, (1u << field_dropped) - 1}) {
          const uint32_t field = (kept << field_dropped) | (low & ((1u << field_dropped) - 1));
          patterns.push_back(sign | (exponent << 23) | field);
        }
      }
    }
  }
  std::mt19937 rng(kSeed);
  for (int i = 0; i < 2'000'000; ++i) patterns.push_back(static_cast<uint32_t>(rng()));
  // Random patterns concentrated where halves live (float exponent 100..143, both signs).
  std::uniform_int_distribution<uint32_t> exponent(100, 143);
  for (int i = 0; i < 2'000'001; ++i) {
    patterns.push_back((static_cast<uint32_t>(rng()) & 0x807fffffu) | (exponent(rng) << 23));
  }
  if (patterns.size() % 2 == 0) patterns.push_back(0x3c00'1000u);
  return patterns;
}

/// Float patterns on every float -> bf16 rounding boundary, plus random patterns; odd length.
std::vector<uint32_t> bf16_boundary_patterns() {
  std::vector<uint32_t> patterns;
  constexpr std::array<uint32_t, 6> kLow16 = {0x0000, 0x0001, 0x7fff, 0x8000, 0x8001, 0xffff};
  patterns.reserve((size_t{1} << 16) * kLow16.size() + 3'000'000);
  for (uint32_t top = 0; top < (1u << 16); ++top) {
    for (uint32_t low : kLow16) patterns.push_back((top << 16) | low);
  }
  std::mt19937 rng(kSeed + 1);
  for (int i = 0; i < 3'000'000; ++i) patterns.push_back(static_cast<uint32_t>(rng()));
  if (patterns.size() % 2 == 0) patterns.push_back(0x3f80'8000u);
  return patterns;
}

Misaligned<float> as_floats(const std::vector<uint32_t>& patterns) {
  Misaligned<float> floats(patterns.size());
  for (size_t i = 0; i < patterns.size(); ++i) floats[i] = bits_float(patterns[i]);
  return floats;
}

// ---- Independent oracles ---------------------------------------------------------------------------------

/// Value of half bits 0..0x7c00 from the IEEE definition; 0x7c00 stands for 2^16, the next value the format
/// would have with an unbounded exponent (rounding to it is overflow).
double half_value_oracle(uint32_t abs_bits) {
  const int exponent = static_cast<int>(abs_bits >> 10);
  const double mantissa = static_cast<double>(abs_bits & 0x3ffu);
  if (exponent == 0) return std::ldexp(mantissa, -24);
  return std::ldexp(1024.0 + mantissa, exponent - 25);
}

/// Nearest half by binary search over the sorted non-negative halves, ties to the even bit pattern.
class HalfOracle {
 public:
  HalfOracle() : values_(0x7c01) {
    for (uint32_t b = 0; b <= 0x7c00; ++b) values_[b] = half_value_oracle(b);
  }

  uint16_t round(float x) const {
    const uint32_t sign = std::signbit(x) ? 0x8000u : 0u;
    const double a = std::fabs(static_cast<double>(x));
    const auto it = std::lower_bound(values_.begin(), values_.end(), a);
    if (it == values_.end()) return static_cast<uint16_t>(sign | 0x7c00u);
    const uint32_t hi = static_cast<uint32_t>(it - values_.begin());
    if (*it == a || hi == 0) return static_cast<uint16_t>(sign | hi);
    const uint32_t lo = hi - 1;
    // Both differences are exact in double: the operands are a float and a half within one binade or two.
    const double below = a - values_[lo];
    const double above = values_[hi] - a;
    const uint32_t pick = below < above ? lo : above < below ? hi : ((lo & 1u) == 0 ? lo : hi);
    return static_cast<uint16_t>(sign | pick);
  }

 private:
  std::vector<double> values_;
};

/// Nearest bf16 by comparing the distances to the two neighbouring bf16 values in double, ties to even.
uint16_t bf16_oracle(float x) {
  const uint32_t bits = float_bits(x);
  const uint32_t sign = (bits >> 16) & 0x8000u;
  const uint32_t lo = bits & 0x7fff0000u;
  const uint32_t hi = lo + 0x10000u;
  const double a = std::fabs(static_cast<double>(x));
  const double lo_value = static_cast<double>(bits_float(lo));
  if (a == lo_value) return static_cast<uint16_t>(sign | (lo >> 16));
  // Past the largest finite bf16 the next value "would be" 2^128; rounding to it is overflow to inf.
  const double hi_value = hi == 0x7f800000u ? std::ldexp(1.0, 128) : static_cast<double>(bits_float(hi));
  const double below = a - lo_value;
  const double above = hi_value - a;
  const uint32_t pick = below < above ? lo : above < below ? hi : (((lo >> 16) & 1u) == 0 ? lo : hi);
  return static_cast<uint16_t>(sign | (pick >> 16));
}

// ---- Scalar reference ------------------------------------------------------------------------------------

TEST(HalfScalar, EveryPatternRoundTripsThroughFloat) {
  for (uint32_t h = 0; h <= 0xffff; ++h) {
    const uint16_t back = float_to_half_bits(half_bits_to_float(static_cast<uint16_t>(h)));
    if (half_is_nan(static_cast<uint16_t>(h))) {
      // A NaN stays a NaN; the round trip quiets a signalling one and keeps its payload.
      ASSERT_TRUE(half_is_nan(back)) << fmt::format("0x{:04x} -> 0x{:04x}", h, back);
      ASSERT_EQ(back, h | 0x0200u) << fmt::format("0x{:04x}", h);
    } else {
      ASSERT_EQ(back, h) << fmt::format("0x{:04x} does not round-trip: got 0x{:04x}", h, back);
    }
  }
}

TEST(HalfScalar, ToFloatMatchesIeeeDefinition) {
  for (uint32_t h = 0; h <= 0xffff; ++h) {
    const float got = half_bits_to_float(static_cast<uint16_t>(h));
    const uint32_t abs = h & 0x7fffu;
    const bool negative = (h & 0x8000u) != 0;
    if (abs > 0x7c00u) {
      ASSERT_TRUE(std::isnan(got)) << fmt::format("0x{:04x}", h);
      // Payload and quiet bit are kept bit for bit (documented behaviour of the scalar reference).
      ASSERT_EQ(float_bits(got), (negative ? 0x80000000u : 0u) | 0x7f800000u | ((h & 0x3ffu) << 13))
          << fmt::format("0x{:04x}", h);
      continue;
    }
    const double magnitude =
        abs == 0x7c00u ? std::numeric_limits<double>::infinity() : half_value_oracle(abs);
    const double expected = negative ? -magnitude : magnitude;
    ASSERT_EQ(static_cast<double>(got), expected) << fmt::format("0x{:04x}", h);
    ASSERT_EQ(std::signbit(got), negative) << fmt::format("0x{:04x}", h);
  }
}

TEST(HalfScalar, FromFloatMatchesNearestHalfOracle) {
  const HalfOracle oracle;
  const std::vector<uint32_t> patterns = half_boundary_patterns();
  size_t checked = 0;
  for (uint32_t bits : patterns) {
    const float x = bits_float(bits);
    const uint16_t got = float_to_half_bits(x);
    if (std::isnan(x)) {
      ASSERT_TRUE(half_is_nan(got)) << fmt::format("input 0x{:08x} -> 0x{:04x}", bits, got);
      continue;
    }
    const uint16_t expected = oracle.round(x);
    ASSERT_EQ(got, expected) << fmt::format("input 0x{:08x} ({:a}): got 0x{:04x}, oracle 0x{:04x}", bits, x,
                                            got, expected);
    ++checked;
  }
  EXPECT_GT(checked, size_t{6'000'000});
}

TEST(Bf16Scalar, FromFloatMatchesNearestBf16Oracle) {
  const std::vector<uint32_t> patterns = bf16_boundary_patterns();
  for (uint32_t bits : patterns) {
    const float x = bits_float(bits);
    const uint16_t got = float_to_bf16_bits(x);
    if (std::isnan(x)) {
      ASSERT_TRUE(bf16_is_nan(got)) << fmt::format("input 0x{:08x} -> 0x{:04x}", bits, got);
      ASSERT_EQ(got, (bits >> 16) | 0x0040u) << fmt::format("input 0x{:08x}", bits);
      continue;
    }
    ASSERT_EQ(got, bf16_oracle(x)) << fmt::format("input 0x{:08x} ({:a})", bits, x);
  }
}

TEST(Bf16Scalar, ToFloatIsExactForEveryPattern) {
  for (uint32_t b = 0; b <= 0xffff; ++b) {
    const float x = bf16_bits_to_float(static_cast<uint16_t>(b));
    ASSERT_EQ(float_bits(x), b << 16);
    if (!bf16_is_nan(static_cast<uint16_t>(b))) {
      ASSERT_EQ(float_to_bf16_bits(x), b);
    }
  }
}

// ---- Known values, at every level, in the SIMD body and in the tail --------------------------------------

/// Converts x at every supported level, at every position of a 37-element misaligned buffer (body and tail of
/// both lane widths), checks that all of them agree with the scalar reference, and returns the result.
template <typename Storage>
uint16_t convert_everywhere(float x) {
  const uint16_t reference = std::is_same_v<Storage, half> ? float_to_half_bits(x) : float_to_bf16_bits(x);
  Misaligned<float> src(37);
  std::fill(src.data(), src.data() + src.size(), x);
  for (SimdLevel level : supported_levels()) {
    Misaligned<Storage> dst(37);
    mpt::convert(src.data(), dst.data(), dst.size(), level);
    for (size_t i = 0; i < dst.size(); ++i) {
      EXPECT_EQ(dst[i].bits, reference)
          << fmt::format("{:a} at level {} index {}", x, mpt::simd_level_name(level), i);
    }
  }
  return reference;
}

uint16_t to_half(float x) {
  return convert_everywhere<half>(x);
}
uint16_t to_bf16(float x) {
  return convert_everywhere<bf16>(x);
}

/// Widens one 16-bit pattern at every level and position; returns the float's bits.
template <typename Storage>
uint32_t widen_everywhere(uint16_t bits) {
  const float reference = std::is_same_v<Storage, half> ? half_bits_to_float(bits) : bf16_bits_to_float(bits);
  Misaligned<Storage> src(37);
  for (size_t i = 0; i < src.size(); ++i) src[i] = Storage::from_bits(bits);
  for (SimdLevel level : supported_levels()) {
    Misaligned<float> dst(37);
    mpt::convert(src.data(), dst.data(), dst.size(), level);
    for (size_t i = 0; i < dst.size(); ++i) {
      EXPECT_EQ(float_bits(dst[i]), float_bits(reference))
          << fmt::format("0x{:04x} at level {} index {}", bits, mpt::simd_level_name(level), i);
    }
  }
  return float_bits(reference);
}

float p2(int e) {
  return std::ldexp(1.0f, e);
}

TEST(HalfKnownValues, OverflowBoundary) {
  EXPECT_EQ(to_half(65504.0f), 0x7bff);
  EXPECT_EQ(to_half(65519.99f), 0x7bff);
  EXPECT_EQ(to_half(std::nextafter(65520.0f, 0.0f)), 0x7bff);
  EXPECT_EQ(to_half(65520.0f), 0x7c00);  // the tie goes to the even "2^16", i.e. overflow
  EXPECT_EQ(to_half(-65520.0f), 0xfc00);
  EXPECT_EQ(to_half(1e10f), 0x7c00);
  EXPECT_EQ(to_half(std::numeric_limits<float>::max()), 0x7c00);
  EXPECT_EQ(to_half(-std::numeric_limits<float>::max()), 0xfc00);
}

TEST(HalfKnownValues, TiesToEven) {
  EXPECT_EQ(to_half(1.0f), 0x3c00);
  EXPECT_EQ(to_half(1.0f + p2(-11)), 0x3c00);            // halfway 1 | 1+2^-10: 1 is even
  EXPECT_EQ(to_half(1.0f + p2(-11) + p2(-23)), 0x3c01);  // just above halfway
  EXPECT_EQ(to_half(1.0f + 3 * p2(-11)), 0x3c02);        // halfway 1+2^-10 | 1+2^-9: 1+2^-9 is even
  EXPECT_EQ(to_half(-(1.0f + 3 * p2(-11))), 0xbc02);
  EXPECT_EQ(to_half(2048.0f + 1.0f), 0x6800);  // 2049: halfway 2048 | 2050
  EXPECT_EQ(to_half(2048.0f + 3.0f), 0x6802);  // 2051: halfway 2050 | 2052
  EXPECT_EQ(to_half(0.1f), 0x2e66);
}

TEST(HalfKnownValues, Subnormals) {
  EXPECT_EQ(to_half(p2(-24)), 0x0001);                        // smallest subnormal
  EXPECT_EQ(to_half(p2(-25)), 0x0000);                        // halfway 0 | 2^-24: 0 is even
  EXPECT_EQ(to_half(-p2(-25)), 0x8000);                       // keeps the sign of zero
  EXPECT_EQ(to_half(std::nextafter(p2(-25), 1.0f)), 0x0001);  // just above halfway
  EXPECT_EQ(to_half(1.5f * p2(-25)), 0x0001);
  EXPECT_EQ(to_half(3 * p2(-25)), 0x0002);        // 1.5 * 2^-24: halfway 1 | 2, 2 is even
  EXPECT_EQ(to_half(5 * p2(-25)), 0x0002);        // 2.5 * 2^-24: halfway 2 | 3
  EXPECT_EQ(to_half(1023 * p2(-24)), 0x03ff);     // largest subnormal
  EXPECT_EQ(to_half(1023.5f * p2(-24)), 0x0400);  // halfway 0x3ff | 0x400, into the normals
  EXPECT_EQ(to_half(p2(-14)), 0x0400);            // smallest normal
  EXPECT_EQ(to_half(std::numeric_limits<float>::denorm_min()), 0x0000);
  EXPECT_EQ(to_half(-std::numeric_limits<float>::min()), 0x8000);
}

TEST(HalfKnownValues, ZerosInfinitiesNaN) {
  EXPECT_EQ(to_half(0.0f), 0x0000);
  EXPECT_EQ(to_half(-0.0f), 0x8000);
  EXPECT_EQ(to_half(std::numeric_limits<float>::infinity()), 0x7c00);
  EXPECT_EQ(to_half(-std::numeric_limits<float>::infinity()), 0xfc00);
  EXPECT_EQ(to_half(std::numeric_limits<float>::quiet_NaN()), 0x7e00);
  EXPECT_EQ(to_half(bits_float(0x7f800001u)), 0x7e00);  // signalling NaN: quieted, low payload dropped
  EXPECT_EQ(to_half(bits_float(0x7f802000u)), 0x7e01);  // payload bits above bit 13 survive
  EXPECT_EQ(to_half(bits_float(0xffffffffu)), 0xffff);
}

TEST(HalfKnownValues, ToFloat) {
  EXPECT_EQ(widen_everywhere<half>(0x7bff), float_bits(65504.0f));
  EXPECT_EQ(widen_everywhere<half>(0x0001), float_bits(p2(-24)));
  EXPECT_EQ(widen_everywhere<half>(0x03ff), float_bits(1023 * p2(-24)));
  EXPECT_EQ(widen_everywhere<half>(0x0400), float_bits(p2(-14)));
  EXPECT_EQ(widen_everywhere<half>(0x3c00), float_bits(1.0f));
  EXPECT_EQ(widen_everywhere<half>(0xc000), float_bits(-2.0f));
  EXPECT_EQ(widen_everywhere<half>(0x8000), 0x80000000u);
  EXPECT_EQ(widen_everywhere<half>(0x7c00), 0x7f800000u);
  EXPECT_EQ(widen_everywhere<half>(0xfc00), 0xff800000u);
  EXPECT_EQ(widen_everywhere<half>(0x7e00), 0x7fc00000u);
  // Signalling NaNs stay signalling: the SIMD paths must undo VCVTPH2PS's quieting to match the reference.
  EXPECT_EQ(widen_everywhere<half>(0x7c01), 0x7f802000u);
  EXPECT_EQ(widen_everywhere<half>(0xfd55), 0xffaaa000u);
}

TEST(Bf16KnownValues, TiesToEven) {
  EXPECT_EQ(to_bf16(1.0f), 0x3f80);
  EXPECT_EQ(to_bf16(1.0f + p2(-8)), 0x3f80);            // halfway 1 | 1+2^-7: 1 is even
  EXPECT_EQ(to_bf16(bits_float(0x3f808001u)), 0x3f81);  // just above halfway
  EXPECT_EQ(to_bf16(1.0f + 3 * p2(-8)), 0x3f82);        // halfway 1+2^-7 | 1+2^-6
  EXPECT_EQ(to_bf16(-(1.0f + 3 * p2(-8))), 0xbf82);
  EXPECT_EQ(to_bf16(bits_float(0x3f80ffffu)), 0x3f81);
  EXPECT_EQ(to_bf16(bits_float(0x3fffffffu)), 0x4000);  // carry into the exponent
}

TEST(Bf16KnownValues, SubnormalsKept) {
  EXPECT_EQ(to_bf16(p2(-130)), 0x0008);  // float subnormal exactly representable in bf16
  EXPECT_EQ(bf16_bits_to_float(0x0008), p2(-130));
  EXPECT_EQ(to_bf16(p2(-133)), 0x0001);  // smallest bf16 subnormal
  EXPECT_EQ(to_bf16(-p2(-133)), 0x8001);
  EXPECT_EQ(to_bf16(bits_float(0x00008000u)), 0x0000);  // 2^-134, halfway 0 | 2^-133: 0 is even
  EXPECT_EQ(to_bf16(bits_float(0x00008001u)), 0x0001);
  EXPECT_EQ(to_bf16(bits_float(0x00018000u)), 0x0002);  // halfway 1 | 2 (units of 2^-133)
  EXPECT_EQ(to_bf16(std::numeric_limits<float>::denorm_min()), 0x0000);
  EXPECT_EQ(to_bf16(1e-40f), 0x0001);                   // 0x000116c2: rounds down, stays nonzero
  EXPECT_EQ(to_bf16(bits_float(0x007fffffu)), 0x0080);  // largest float subnormal rounds up to FLT_MIN
}

TEST(Bf16KnownValues, OverflowZerosInfinitiesNaN) {
  EXPECT_EQ(to_bf16(std::numeric_limits<float>::max()), 0x7f80);  // 0x7f7fffff rounds up to inf
  EXPECT_EQ(to_bf16(-std::numeric_limits<float>::max()), 0xff80);
  EXPECT_EQ(to_bf16(bits_float(0x7f7f7fffu)), 0x7f7f);
  EXPECT_EQ(to_bf16(bits_float(0x7f7f8000u)), 0x7f80);  // halfway, 0x7f7f is odd
  EXPECT_EQ(to_bf16(0.0f), 0x0000);
  EXPECT_EQ(to_bf16(-0.0f), 0x8000);
  EXPECT_EQ(to_bf16(std::numeric_limits<float>::infinity()), 0x7f80);
  EXPECT_EQ(to_bf16(-std::numeric_limits<float>::infinity()), 0xff80);
  EXPECT_EQ(to_bf16(std::numeric_limits<float>::quiet_NaN()), 0x7fc0);
  EXPECT_EQ(to_bf16(bits_float(0x7f800001u)), 0x7fc0);  // must not round to inf
  EXPECT_EQ(to_bf16(bits_float(0x7f810000u)), 0x7fc1);
  EXPECT_EQ(to_bf16(bits_float(0xffffffffu)), 0xffff);  // must not wrap to zero
  EXPECT_EQ(to_bf16(bits_float(0xff800001u)), 0xffc0);
}

TEST(Bf16KnownValues, ToFloat) {
  EXPECT_EQ(widen_everywhere<bf16>(0x3f80), float_bits(1.0f));
  EXPECT_EQ(widen_everywhere<bf16>(0x0001), 0x00010000u);
  EXPECT_EQ(widen_everywhere<bf16>(0x8000), 0x80000000u);
  EXPECT_EQ(widen_everywhere<bf16>(0xff80), 0xff800000u);
  EXPECT_EQ(widen_everywhere<bf16>(0x7f81), 0x7f810000u);
}

// ---- Bulk converters equal the scalar reference ----------------------------------------------------------

TEST(ConvertBulk, HalfToFloatEveryPatternAtEveryLevel) {
  Misaligned<half> src(0x10000);
  std::vector<uint32_t> expected(src.size());
  for (uint32_t h = 0; h <= 0xffff; ++h) {
    src[h] = half::from_bits(static_cast<uint16_t>(h));
    expected[h] = float_bits(half_bits_to_float(static_cast<uint16_t>(h)));
  }
  for (SimdLevel level : supported_levels()) {
    Misaligned<float> dst(src.size());
    bulk_convert(src, dst, level);
    // Compared as bits, NaNs included: the SIMD paths are required to be identical, payloads and all.
    Misaligned<uint32_t> got(src.size());
    for (size_t i = 0; i < src.size(); ++i) got[i] = float_bits(dst[i]);
    EXPECT_TRUE(same_bits("half -> float", level, src, expected, got));
  }
}

TEST(ConvertBulk, Bf16ToFloatEveryPatternAtEveryLevel) {
  Misaligned<bf16> src(0x10000);
  std::vector<uint32_t> expected(src.size());
  for (uint32_t b = 0; b <= 0xffff; ++b) {
    src[b] = bf16::from_bits(static_cast<uint16_t>(b));
    expected[b] = float_bits(bf16_bits_to_float(static_cast<uint16_t>(b)));
  }
  for (SimdLevel level : supported_levels()) {
    Misaligned<float> dst(src.size());
    bulk_convert(src, dst, level);
    Misaligned<uint32_t> got(src.size());
    for (size_t i = 0; i < src.size(); ++i) got[i] = float_bits(dst[i]);
    EXPECT_TRUE(same_bits("bf16 -> float", level, src, expected, got));
  }
}

TEST(ConvertBulk, FloatToHalfRoundingBoundariesAtEveryLevel) {
  const Misaligned<float> src = as_floats(half_boundary_patterns());
  ASSERT_EQ(src.size() % 2, 1u);
  std::vector<uint16_t> expected(src.size());
  for (size_t i = 0; i < src.size(); ++i) expected[i] = float_to_half_bits(src[i]);
  for (SimdLevel level : supported_levels()) {
    Misaligned<half> dst(src.size());
    bulk_convert(src, dst, level);
    Misaligned<uint16_t> got(src.size());
    for (size_t i = 0; i < src.size(); ++i) got[i] = dst[i].bits;
    EXPECT_TRUE(same_bits("float -> half", level, src, expected, got));
  }
}

TEST(ConvertBulk, FloatToBf16RoundingBoundariesAtEveryLevel) {
  const Misaligned<float> src = as_floats(bf16_boundary_patterns());
  ASSERT_EQ(src.size() % 2, 1u);
  std::vector<uint16_t> expected(src.size());
  for (size_t i = 0; i < src.size(); ++i) expected[i] = float_to_bf16_bits(src[i]);
  for (SimdLevel level : supported_levels()) {
    Misaligned<bf16> dst(src.size());
    bulk_convert(src, dst, level);
    Misaligned<uint16_t> got(src.size());
    for (size_t i = 0; i < src.size(); ++i) got[i] = dst[i].bits;
    EXPECT_TRUE(same_bits("float -> bf16", level, src, expected, got));
  }
}

TEST(ConvertBulk, EmptyInputIsANoOp) {
  for (SimdLevel level : supported_levels()) {
    mpt::convert(static_cast<const float*>(nullptr), static_cast<half*>(nullptr), 0, level);
    mpt::convert(static_cast<const half*>(nullptr), static_cast<float*>(nullptr), 0, level);
    mpt::convert(static_cast<const float*>(nullptr), static_cast<bf16*>(nullptr), 0, level);
    mpt::convert(static_cast<const bf16*>(nullptr), static_cast<float*>(nullptr), 0, level);
  }
}

TEST(ConvertBulk, DoesNotWritePastTheEnd) {
  for (SimdLevel level : supported_levels()) {
    for (size_t n : {size_t{1}, size_t{7}, size_t{9}, size_t{15}, size_t{17}, size_t{33}}) {
      Misaligned<float> src(n);
      std::fill(src.data(), src.data() + n, 1.0f);
      Misaligned<half> dst(n + 16);
      for (size_t i = 0; i < dst.size(); ++i) dst[i] = half::from_bits(0xdead);
      mpt::convert(src.data(), dst.data(), n, level);
      for (size_t i = n; i < dst.size(); ++i) ASSERT_EQ(dst[i].bits, 0xdead) << "n " << n << " i " << i;
      Misaligned<float> wide(n + 16);
      std::fill(wide.data(), wide.data() + wide.size(), -7.0f);
      mpt::convert(dst.data(), wide.data(), n, level);
      for (size_t i = n; i < wide.size(); ++i) ASSERT_EQ(wide[i], -7.0f) << "n " << n << " i " << i;
    }
  }
}

// ---- Dispatch ---------------------------------------------------------------------------------------------

TEST(SimdDispatch, LevelNames) {
  EXPECT_EQ(mpt::simd_level_name(SimdLevel::scalar), "scalar");
  EXPECT_EQ(mpt::simd_level_name(SimdLevel::avx2), "avx2");
  EXPECT_EQ(mpt::simd_level_name(SimdLevel::avx512), "avx512");
  EXPECT_EQ(mpt::detected_simd_level(), mpt::detected_simd_level());
  std::cout << "[          ] detected SIMD level: " << mpt::simd_level_name(mpt::detected_simd_level())
            << "\n";
}

TEST(SimdDispatch, UnsupportedLevelThrows) {
  if (mpt::detected_simd_level() == SimdLevel::avx512) {
    GTEST_SKIP() << "this CPU supports every SimdLevel (avx512 detected), so none can be refused";
  }
  const SimdLevel above = static_cast<SimdLevel>(static_cast<uint8_t>(mpt::detected_simd_level()) + 1);
  const std::string name(mpt::simd_level_name(above));
  float f[1] = {1.0f};
  half h[1];
  bf16 b[1];
  auto expect_refused = [&](auto&& call) {
    try {
      call();
      ADD_FAILURE() << "convert at unsupported level " << name << " did not throw";
    } catch (const mpt::Error& e) {
      EXPECT_NE(std::string(e.what()).find(name), std::string::npos) << e.what();
    }
  };
  expect_refused([&] { mpt::convert(f, h, 1, above); });
  expect_refused([&] { mpt::convert(h, f, 1, above); });
  expect_refused([&] { mpt::convert(f, b, 1, above); });
  expect_refused([&] { mpt::convert(b, f, 1, above); });
  EXPECT_EQ(f[0], 1.0f);  // nothing was written before the refusal
}

}  // namespace
