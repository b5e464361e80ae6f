// The vector loops of kernels/cpu/vecmath.cpp, written once over an instruction-set descriptor `Isa` and
// included by one source file per instruction set (vecmath_avx2.cpp, vecmath_avx512.cpp), each compiled with
// its own -m flags. Everything here has internal linkage and uses no std:: templates, so no function compiled
// for AVX-512 can be merged by the linker into code that runs on a CPU without it.
//
// Isa provides: V (vector type), kLanes, load/store (unaligned), set1, add, sub, mul, tanh, exp (SLEEF u10)
// and hsum (horizontal sum in a fixed lane order).
#pragma once

#include <cstdint>

namespace {

// The constants and the order of operations of kernels/common/gelu.hpp.
constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kCubic = 0.044715f;

template <typename Isa>
inline typename Isa::V gelu_vec(typename Isa::V x) {
  const auto x_sq = Isa::mul(x, x);
  const auto inner =
      Isa::mul(Isa::set1(kSqrt2OverPi), Isa::add(x, Isa::mul(Isa::mul(Isa::set1(kCubic), x_sq), x)));
  const auto t = Isa::tanh(inner);
  return Isa::mul(Isa::mul(Isa::set1(0.5f), x), Isa::add(Isa::set1(1.0f), t));
}

template <typename Isa>
inline typename Isa::V gelu_derivative_vec(typename Isa::V x) {
  const auto one = Isa::set1(1.0f);
  const auto half = Isa::set1(0.5f);
  const auto x_sq = Isa::mul(x, x);
  const auto inner =
      Isa::mul(Isa::set1(kSqrt2OverPi), Isa::add(x, Isa::mul(Isa::mul(Isa::set1(kCubic), x_sq), x)));
  const auto t = Isa::tanh(inner);
  const auto inner_derivative =
      Isa::mul(Isa::set1(kSqrt2OverPi), Isa::add(one, Isa::mul(Isa::set1(3.0f * kCubic), x_sq)));
  const auto left = Isa::mul(half, Isa::add(one, t));
  const auto right = Isa::mul(Isa::sub(one, Isa::mul(t, t)), inner_derivative);
  return Isa::add(left, Isa::mul(Isa::mul(half, x), right));
}

/// Copies `count` < kLanes floats into a kLanes buffer padded with `pad`.
template <typename Isa>
inline void pad_copy(float* dst, const float* src, int64_t count, float pad) {
  for (int64_t i = 0; i < Isa::kLanes; ++i) dst[i] = i < count ? src[i] : pad;
}

template <typename Isa>
void gelu_forward_loop(float* out, const float* inp, int64_t n) {
  int64_t i = 0;
  for (; i + Isa::kLanes <= n; i += Isa::kLanes) Isa::store(out + i, gelu_vec<Isa>(Isa::load(inp + i)));
  if (i < n) {
    float x[Isa::kLanes];
    pad_copy<Isa>(x, inp + i, n - i, 0.0f);
    Isa::store(x, gelu_vec<Isa>(Isa::load(x)));
    for (int64_t j = 0; i + j < n; ++j) out[i + j] = x[j];
  }
}

template <typename Isa>
void gelu_backward_loop(float* acc, const float* inp, const float* dout, int64_t n) {
  int64_t i = 0;
  for (; i + Isa::kLanes <= n; i += Isa::kLanes) {
    const auto d = Isa::mul(Isa::load(dout + i), gelu_derivative_vec<Isa>(Isa::load(inp + i)));
    Isa::store(acc + i, Isa::add(Isa::load(acc + i), d));
  }
  if (i < n) {
    float x[Isa::kLanes], dy[Isa::kLanes], a[Isa::kLanes];
    pad_copy<Isa>(x, inp + i, n - i, 0.0f);
    pad_copy<Isa>(dy, dout + i, n - i, 0.0f);
    pad_copy<Isa>(a, acc + i, n - i, 0.0f);
    const auto d = Isa::mul(Isa::load(dy), gelu_derivative_vec<Isa>(Isa::load(x)));
    Isa::store(a, Isa::add(Isa::load(a), d));
    for (int64_t j = 0; i + j < n; ++j) acc[i + j] = a[j];
  }
}

template <typename Isa>
float exp_shifted_sum_loop(float* x, float shift, int64_t n) {
  const auto s = Isa::set1(shift);
  auto sum = Isa::set1(0.0f);
  int64_t i = 0;
  for (; i + Isa::kLanes <= n; i += Isa::kLanes) {
    const auto e = Isa::exp(Isa::sub(Isa::load(x + i), s));
    Isa::store(x + i, e);
    sum = Isa::add(sum, e);
  }
  if (i < n) {
    // Padding lanes hold -inf, whose exponential is 0: they add nothing to the lane sums.
    float t[Isa::kLanes];
    pad_copy<Isa>(t, x + i, n - i, -__builtin_inff());
    const auto e = Isa::exp(Isa::sub(Isa::load(t), s));
    Isa::store(t, e);
    sum = Isa::add(sum, e);
    for (int64_t j = 0; i + j < n; ++j) x[i + j] = t[j];
  }
  return Isa::hsum(sum);
}

}  // namespace
