// The order-preserving keys behind the NCCL communicator's NaN-propagating max (kernels/common/max_key.hpp):
// every 16-bit pattern and a sweep of f32/f64 values, checked against the floats' own order on the CPU.
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include <gtest/gtest.h>

#include "common/max_key.hpp"
#include "mptrain/dtype.hpp"

namespace mpt {
namespace {

using common::max_key_of;
using common::max_key_value;

template <typename L, typename F>
void check_all_16_bit_patterns(F&& to_float_of_bits) {
  for (uint32_t a = 0; a <= 0xFFFF; ++a) {
    const auto ba = static_cast<uint16_t>(a);
    const float fa = to_float_of_bits(ba);
    const uint32_t ka = max_key_of<L>(ba);
    if (std::isnan(fa)) {
      ASSERT_EQ(ka, L::nan_key) << "pattern " << a;
      ASSERT_TRUE(std::isnan(to_float_of_bits(max_key_value<L>(ka))));
      continue;
    }
    ASSERT_LT(ka, L::nan_key) << "pattern " << a;
    ASSERT_EQ(max_key_value<L>(ka), ba) << "round trip of pattern " << a;
    // Against a fixed set of partners (all 2^32 pairs would be slow): keys order like the floats, and
    // -0 < +0 so equal floats differ only in the sign of zero.
    for (uint32_t b = a % 97; b <= 0xFFFF; b += 97) {
      const auto bb = static_cast<uint16_t>(b);
      const float fb = to_float_of_bits(bb);
      if (std::isnan(fb)) continue;
      const uint32_t kb = max_key_of<L>(bb);
      if (fa < fb) {
        ASSERT_LT(ka, kb) << a << " vs " << b;
      } else if (fa > fb) {
        ASSERT_GT(ka, kb) << a << " vs " << b;
      } else if (a != b) {
        ASSERT_EQ(ka < kb, std::signbit(fa)) << a << " vs " << b << " (signed zeros)";
      }
    }
  }
}

TEST(MaxKey, HalfEveryPattern) {
  check_all_16_bit_patterns<common::MaxKeyF16>([](uint16_t b) { return to_float(half::from_bits(b)); });
}

TEST(MaxKey, Bf16EveryPattern) {
  check_all_16_bit_patterns<common::MaxKeyBF16>([](uint16_t b) { return to_float(bf16::from_bits(b)); });
}

template <typename T, typename L, typename Bits>
void check_sorted_values() {
  constexpr T inf = std::numeric_limits<T>::infinity();
  constexpr T tiny = std::numeric_limits<T>::denorm_min();
  constexpr T big = std::numeric_limits<T>::max();
  const std::vector<T> sorted = {-inf,
                                 -big,
                                 T(-1e10),
                                 T(-3),
                                 T(-1),
                                 T(-0.5),
                                 -std::numeric_limits<T>::min(),
                                 -tiny,
                                 T(-0.0),
                                 T(0.0),
                                 tiny,
                                 std::numeric_limits<T>::min(),
                                 T(0.25),
                                 T(1),
                                 T(1) + std::numeric_limits<T>::epsilon(),
                                 T(7e20),
                                 big,
                                 inf};
  std::vector<typename L::key_type> keys;
  for (T v : sorted) {
    Bits b;
    std::memcpy(&b, &v, sizeof(b));
    keys.push_back(max_key_of<L>(b));
    T back;
    const Bits rb = max_key_value<L>(keys.back());
    std::memcpy(&back, &rb, sizeof(back));
    EXPECT_EQ(std::memcmp(&back, &v, sizeof(T)), 0) << "round trip of " << v;
  }
  for (size_t i = 1; i < keys.size(); ++i)
    EXPECT_LT(keys[i - 1], keys[i]) << sorted[i - 1] << " < " << sorted[i];
  for (T nan : {std::numeric_limits<T>::quiet_NaN(), -std::numeric_limits<T>::quiet_NaN(),
                std::numeric_limits<T>::signaling_NaN()}) {
    Bits b;
    std::memcpy(&b, &nan, sizeof(b));
    EXPECT_EQ(max_key_of<L>(b), L::nan_key);
    const Bits back = max_key_value<L>(L::nan_key);
    T f;
    std::memcpy(&f, &back, sizeof(f));
    EXPECT_TRUE(std::isnan(f));
  }
  EXPECT_GT(L::nan_key, keys.back()) << "NaN above +inf";
}

TEST(MaxKey, FloatAndDoubleOrderAndRoundTrip) {
  check_sorted_values<float, common::MaxKeyF32, uint32_t>();
  check_sorted_values<double, common::MaxKeyF64, uint64_t>();
}

}  // namespace
}  // namespace mpt
