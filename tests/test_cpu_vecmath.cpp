// Tests of the vectorised FP32 math of the CPU backend (kernels/cpu/vecmath.hpp: SLEEF tanh-GELU forward and
// backward, the softmax exponential) at every SIMD level this CPU supports:
//  - against a long double reference of the same formula, with the error bound the header states;
//  - the result of an element does not depend on where a caller cuts the array (odd sizes, tails), which is
//    what makes the elementwise ops independent of the thread count; and the elementwise GELU ops give the
//    same bits on 1, 2 and 3 OpenMP threads;
//  - special values: exp(-inf) = 0, GELU of large |x| and of 0.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iostream>
#include <limits>
#include <random>
#include <vector>

#include <gtest/gtest.h>

#include "common/gelu.hpp"
#include "cpu/ops.hpp"
#include "cpu/vecmath.hpp"
#include "mptrain/dtype.hpp"

namespace {

namespace cpu = mpt::cpu;
using mpt::SimdLevel;

constexpr long double kSqrt2OverPi = 0.797884560802865355879892119868763737L;
constexpr long double kCubic = 0.044715L;
constexpr double kEps = std::numeric_limits<float>::epsilon();

long double gelu_ref(long double x) {
  return 0.5L * x * (1.0L + std::tanh(kSqrt2OverPi * (x + kCubic * x * x * x)));
}
long double gelu_derivative_ref(long double x) {
  const long double t = std::tanh(kSqrt2OverPi * (x + kCubic * x * x * x));
  return 0.5L * (1.0L + t) + 0.5L * x * (1.0L - t * t) * kSqrt2OverPi * (1.0L + 3.0L * kCubic * x * x);
}

std::vector<SimdLevel> supported_levels() {
  std::vector<SimdLevel> levels;
  for (SimdLevel l : {SimdLevel::scalar, SimdLevel::avx2, SimdLevel::avx512})
    if (l <= mpt::detected_simd_level()) levels.push_back(l);
  return levels;
}

/// Inputs: a dense sweep of [-12, 12], values near 0, large magnitudes and random normals; odd count.
std::vector<float> gelu_inputs() {
  std::vector<float> x;
  for (int i = -12000; i <= 12000; i += 7) x.push_back(static_cast<float>(i) * 1e-3f);
  for (float v : {0.0f, -0.0f, 1e-30f, -1e-30f, 1e-7f, 30.0f, -30.0f, 1e4f, -1e4f}) x.push_back(v);
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  for (int i = 0; i < 1001; ++i) x.push_back(normal(rng));
  if (x.size() % 2 == 0) x.push_back(0.5f);
  return x;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

TEST(CpuVecmath, GeluForwardWithinBoundOfLongDoubleReference) {
  const std::vector<float> x = gelu_inputs();
  const auto n = static_cast<int64_t>(x.size());
  for (SimdLevel level : supported_levels()) {
    std::vector<float> out(x.size());
    cpu::gelu_forward_f32(out.data(), x.data(), n, level);
    double worst = 0, worst_glibc = 0;
    for (size_t i = 0; i < x.size(); ++i) {
      const long double want = gelu_ref(x[i]);
      // Header bound: 4 eps |x| + 2 eps |GELU(x)| (plus the smallest normal for x ~ 0).
      const double bound =
          4 * kEps * std::fabs(x[i]) + 2 * kEps * std::fabs(static_cast<double>(want)) + 1e-38;
      const double err = std::fabs(static_cast<double>(out[i] - want));
      ASSERT_LE(err, bound) << mpt::simd_level_name(level) << " x = " << x[i] << " got " << out[i];
      // In units of eps |x|: for x < -3 GELU(x) is a difference of nearly equal terms, so an error relative
      // to |GELU(x)| says nothing about the kernel; the glibc-tanhf formula of common/gelu.hpp, for
      // comparison.
      const double scale = kEps * std::max(1e-30, static_cast<double>(std::fabs(x[i])));
      worst = std::max(worst, err / scale);
      const double glibc = mpt::common::gelu_tanh(x[i]);
      worst_glibc = std::max(worst_glibc, std::fabs(static_cast<double>(glibc - want)) / scale);
    }
    std::cout << "[ vecmath  ] gelu " << mpt::simd_level_name(level) << ": max error " << worst
              << " eps |x| (glibc tanhf formula: " << worst_glibc << ") over " << n << " inputs\n";
  }
}

TEST(CpuVecmath, GeluBackwardWithinBoundOfLongDoubleReference) {
  const std::vector<float> x = gelu_inputs();
  const auto n = static_cast<int64_t>(x.size());
  std::vector<float> dy(x.size()), acc0(x.size());
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (size_t i = 0; i < x.size(); ++i) {
    dy[i] = u(rng);
    acc0[i] = u(rng);
  }
  for (SimdLevel level : supported_levels()) {
    std::vector<float> acc = acc0;
    cpu::gelu_backward_f32(acc.data(), x.data(), dy.data(), n, level);
    double worst = 0;  // the largest error as a fraction of the bound
    for (size_t i = 0; i < x.size(); ++i) {
      const long double ax = std::fabs(static_cast<long double>(x[i]));
      const long double want = acc0[i] + dy[i] * gelu_derivative_ref(x[i]);
      // The derivative's error: 1 ulp of tanh propagated through (1 - t^2) x (1 + 0.134 x^2), plus the
      // roundings of the sum terms; scaled by |dy| <= 1, plus the rounding of the accumulation.
      const double bound = static_cast<double>(4 * kEps * (1 + ax + 0.2L * ax * ax * ax)) +
                           2 * kEps * std::fabs(static_cast<double>(want));
      const double err = std::fabs(static_cast<double>(acc[i] - want));
      ASSERT_LE(err, bound) << mpt::simd_level_name(level) << " x = " << x[i] << " got " << acc[i];
      worst = std::max(worst, err / bound);
    }
    std::cout << "[ vecmath  ] gelu' " << mpt::simd_level_name(level) << ": max error " << worst
              << " of the bound over " << n << " inputs\n";
  }
}

TEST(CpuVecmath, ExpShiftedSumWithinOneUlpAndExactZeroForMinusInfinity) {
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> u(-80.0f, 5.0f);
  for (SimdLevel level : supported_levels()) {
    for (int64_t n : {0, 1, 7, 16, 17, 129, 1001}) {
      std::vector<float> x(static_cast<size_t>(n));
      for (float& v : x) v = u(rng);
      if (n > 3) x[2] = -std::numeric_limits<float>::infinity();  // a masked score
      const float shift = n > 0 ? x[0] : 0.0f;
      std::vector<float> e = x;
      const float sum = cpu::exp_shifted_sum_f32(e.data(), shift, n, level);
      long double want_sum = 0;
      for (size_t i = 0; i < x.size(); ++i) {
        const float arg = x[i] - shift;  // the argument the kernel rounds to, then exp within 1 ulp
        const long double want = std::exp(static_cast<long double>(arg));
        want_sum += want;
        ASSERT_LE(std::fabs(static_cast<double>(e[i] - want)), 1.0 * kEps * static_cast<double>(want) + 1e-44)
            << mpt::simd_level_name(level) << " n = " << n << " i = " << i << " arg = " << arg;
      }
      EXPECT_LE(std::fabs(static_cast<double>(sum - want_sum)),
                static_cast<double>(n + 1) * kEps * static_cast<double>(want_sum))
          << mpt::simd_level_name(level) << " n = " << n;
      if (n > 3) {
        EXPECT_EQ(e[2], 0.0f);
      }
    }
  }
}

TEST(CpuVecmath, ElementResultDoesNotDependOnWhereTheArrayIsCut) {
  const std::vector<float> x = gelu_inputs();
  const auto n = static_cast<int64_t>(x.size());
  for (SimdLevel level : supported_levels()) {
    std::vector<float> whole(x.size()), pieces(x.size());
    cpu::gelu_forward_f32(whole.data(), x.data(), n, level);
    for (int64_t cut : {int64_t{1}, int64_t{5}, int64_t{13}, int64_t{1000}}) {
      for (int64_t begin = 0; begin < n; begin += cut)
        cpu::gelu_forward_f32(pieces.data() + begin, x.data() + begin, std::min(cut, n - begin), level);
      EXPECT_TRUE(same_bits(whole, pieces)) << mpt::simd_level_name(level) << " cut " << cut;
    }
    std::vector<float> ones(x.size(), 1.0f), acc_whole(x.size(), 0.0f), acc_pieces(x.size(), 0.0f);
    cpu::gelu_backward_f32(acc_whole.data(), x.data(), ones.data(), n, level);
    for (int64_t begin = 0; begin < n; begin += 13)
      cpu::gelu_backward_f32(acc_pieces.data() + begin, x.data() + begin, ones.data() + begin,
                             std::min<int64_t>(13, n - begin), level);
    EXPECT_TRUE(same_bits(acc_whole, acc_pieces)) << mpt::simd_level_name(level);
  }
}

TEST(CpuVecmath, UnsupportedLevelIsRejected) {
  if (mpt::detected_simd_level() == SimdLevel::avx512) GTEST_SKIP() << "every level is supported here";
  float x = 1.0f;
  EXPECT_THROW(cpu::gelu_forward_f32(&x, &x, 1, SimdLevel::avx512), std::exception);
}

TEST(CpuVecmath, ElementwiseGeluSameBitsForAnyThreadCount) {
  const int saved = omp_get_max_threads();
  std::vector<float> x = gelu_inputs();
  while (x.size() < 5000) x.insert(x.end(), x.begin(), x.begin() + 1001);  // several 1024-element chunks
  const auto n = static_cast<int64_t>(x.size());
  std::vector<float> dy(x.size(), 0.75f);
  auto run = [&](int threads) {
    omp_set_num_threads(threads);
    std::vector<float> out(x.size()), dinp(x.size(), 0.5f);
    cpu::gelu_forward(out.data(), x.data(), n);
    cpu::gelu_backward(dinp.data(), x.data(), dy.data(), n);
    out.insert(out.end(), dinp.begin(), dinp.end());
    return out;
  };
  const std::vector<float> one = run(1);
  for (int threads : {2, 3}) EXPECT_TRUE(same_bits(one, run(threads))) << threads << " threads";
  omp_set_num_threads(saved);
}

}  // namespace
