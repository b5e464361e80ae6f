// The vector loops of kernels/cpu/vecmath.cpp, written once over an instruction-set descriptor `Isa` and
// included by one source file per instruction set (vecmath_avx2.cpp, vecmath_avx512.cpp), each compiled with
// its own -m flags. Everything here has internal linkage and uses no std:: templates, so no function compiled
// for AVX-512 can be merged by the linker into code that runs on a CPU without it.
//
// Isa provides: V (vector type), kLanes, load/store (unaligned), set1, add, sub, mul, div (IEEE), min,
// exp (SLEEF u10) and hsum (horizontal sum in a fixed lane order).
#pragma once

#include <cstdint>

namespace {

// The constants of kernels/common/gelu.hpp. The tanh is written as a logistic sigmoid,
// 0.5 (1 + tanh(u)) = 1 / (1 + exp(-2u)) = s, so one SLEEF exp and one IEEE division replace SLEEF's tanh
// (several times the instructions: it works in double-float arithmetic), and 1 + tanh(u) is never formed as
// a difference of nearly equal terms. GELU(x) = x s; GELU'(x) = s + 2 x s (1 - s) u'(x), with 1 - s = e s
// for e = exp(-2u), so nothing cancels there either.
constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kCubic = 0.044715f;
// exp(88) < FLT_MAX: clamping -2u there keeps e s finite (e = inf would make e s = inf * 0) where s is
// already below the smallest normal float, so the clamp changes no result by more than 2^-126 |x|.
constexpr float kMaxExpArgument = 88.0f;

/// The tanh argument u = sqrt(2/pi) (x + 0.044715 x^3), in the order of kernels/common/gelu.hpp.
template <typename Isa>
inline typename Isa::V gelu_inner_vec(typename Isa::V x, typename Isa::V x_sq) {
  return Isa::mul(Isa::set1(kSqrt2OverPi), Isa::add(x, Isa::mul(Isa::mul(Isa::set1(kCubic), x_sq), x)));
}

template <typename Isa>
inline typename Isa::V gelu_vec(typename Isa::V x) {
  const auto inner = gelu_inner_vec<Isa>(x, Isa::mul(x, x));
  const auto e = Isa::exp(Isa::min(Isa::mul(Isa::set1(-2.0f), inner), Isa::set1(kMaxExpArgument)));
  const auto s = Isa::div(Isa::set1(1.0f), Isa::add(Isa::set1(1.0f), e));
  return Isa::mul(x, s);
}

template <typename Isa>
inline typename Isa::V gelu_derivative_vec(typename Isa::V x) {
  const auto one = Isa::set1(1.0f);
  const auto x_sq = Isa::mul(x, x);
  const auto inner = gelu_inner_vec<Isa>(x, x_sq);
  const auto e = Isa::exp(Isa::min(Isa::mul(Isa::set1(-2.0f), inner), Isa::set1(kMaxExpArgument)));
  const auto s = Isa::div(one, Isa::add(one, e));
  const auto s_one_minus_s = Isa::mul(Isa::mul(e, s), s);
  const auto inner_derivative =
      Isa::mul(Isa::set1(kSqrt2OverPi), Isa::add(one, Isa::mul(Isa::set1(3.0f * kCubic), x_sq)));
  return Isa::add(s, Isa::mul(Isa::mul(Isa::add(x, x), s_one_minus_s), inner_derivative));
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
