// Run-time dispatch of the vectorised FP32 math (kernels/cpu/vecmath.hpp) and its scalar level.
//
// The level comes from detected_simd_level() (the bulk converters' cpuid check, src/convert.cpp); the AVX2
// level also needs FMA, which the AVX2 loops are compiled with, and falls back to scalar without it. The
// scalar level calls SLEEF's scalar u10 exp in the same formula, so every level has the same accuracy bound.
#include "cpu/vecmath.hpp"

#include <sleef.h>

#include <algorithm>

#include "mptrain/error.hpp"

#if MPTRAIN_VECMATH_X86
namespace mpt::cpu::vecmath_detail {
void gelu_forward_avx512(float* out, const float* inp, int64_t n);
void gelu_backward_avx512(float* acc, const float* inp, const float* dout, int64_t n);
float exp_shifted_sum_avx512(float* x, float shift, int64_t n);
void gelu_forward_avx2(float* out, const float* inp, int64_t n);
void gelu_backward_avx2(float* acc, const float* inp, const float* dout, int64_t n);
float exp_shifted_sum_avx2(float* x, float shift, int64_t n);
}  // namespace mpt::cpu::vecmath_detail
#endif

namespace mpt::cpu {

namespace {

constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kCubic = 0.044715f;

/// The level the loops run at: `level` checked against the CPU, AVX2 demoted to scalar without FMA.
SimdLevel effective_level(SimdLevel level) {
  const SimdLevel detected = detected_simd_level();
  MPT_CHECK(level <= detected, "vecmath: SIMD level {} is not supported by this CPU (best supported: {})",
            simd_level_name(level), simd_level_name(detected));
#if MPTRAIN_VECMATH_X86
  static const bool has_fma = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("fma") != 0;
  }();
  if (level == SimdLevel::avx2 && !has_fma) return SimdLevel::scalar;
  return level;
#else
  (void)level;
  return SimdLevel::scalar;
#endif
}

/// s = 1 / (1 + exp(-2u)) = 0.5 (1 + tanh(u)) and e = exp(-2u), as the vector loops (vecmath_isa.hpp).
struct Sigmoid {
  float s, e;
};
Sigmoid gelu_sigmoid(float x, float x_sq) {
  const float inner = kSqrt2OverPi * (x + kCubic * x_sq * x);
  const float e = Sleef_expf_u10(std::min(-2.0f * inner, 88.0f));
  return {1.0f / (1.0f + e), e};
}

float gelu_scalar(float x) {
  return x * gelu_sigmoid(x, x * x).s;
}

float gelu_derivative_scalar(float x) {
  const float x_sq = x * x;
  const auto [s, e] = gelu_sigmoid(x, x_sq);
  const float inner_derivative = kSqrt2OverPi * (1.0f + 3.0f * kCubic * x_sq);
  return s + (x + x) * (e * s * s) * inner_derivative;
}

}  // namespace

void gelu_forward_f32(float* out, const float* inp, int64_t n, SimdLevel level) {
  switch (effective_level(level)) {
#if MPTRAIN_VECMATH_X86
    case SimdLevel::avx512:
      return vecmath_detail::gelu_forward_avx512(out, inp, n);
    case SimdLevel::avx2:
      return vecmath_detail::gelu_forward_avx2(out, inp, n);
#endif
    default:
      for (int64_t i = 0; i < n; ++i) out[i] = gelu_scalar(inp[i]);
  }
}

void gelu_backward_f32(float* acc, const float* inp, const float* dout, int64_t n, SimdLevel level) {
  switch (effective_level(level)) {
#if MPTRAIN_VECMATH_X86
    case SimdLevel::avx512:
      return vecmath_detail::gelu_backward_avx512(acc, inp, dout, n);
    case SimdLevel::avx2:
      return vecmath_detail::gelu_backward_avx2(acc, inp, dout, n);
#endif
    default:
      for (int64_t i = 0; i < n; ++i) acc[i] += dout[i] * gelu_derivative_scalar(inp[i]);
  }
}

float exp_shifted_sum_f32(float* x, float shift, int64_t n, SimdLevel level) {
  switch (effective_level(level)) {
#if MPTRAIN_VECMATH_X86
    case SimdLevel::avx512:
      return vecmath_detail::exp_shifted_sum_avx512(x, shift, n);
    case SimdLevel::avx2:
      return vecmath_detail::exp_shifted_sum_avx2(x, shift, n);
#endif
    default: {
      float sum = 0.0f;
      for (int64_t i = 0; i < n; ++i) {
        x[i] = Sleef_expf_u10(x[i] - shift);
        sum += x[i];
      }
      return sum;
    }
  }
}

}  // namespace mpt::cpu
