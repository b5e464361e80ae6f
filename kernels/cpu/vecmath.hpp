// Vectorised FP32 transcendental loops of the CPU backend (internal): tanh-GELU forward and backward and the
// softmax exponential, on SLEEF (the vector math library PyTorch's CPU kernels use) with run-time dispatch
// AVX-512 / AVX2 / scalar, the same levels and cpuid check as the bulk converters (src/convert.cpp).
//
// The GELU's tanh is evaluated as a logistic sigmoid, 0.5 (1 + tanh(u)) = 1 / (1 + exp(-2u)) (an identity,
// so the same function as torch.nn.GELU(approximate="tanh")): one SLEEF u10 exp and an IEEE division cost
// about half of SLEEF's u10 tanh (vecmath_isa.hpp has the formulas).
//
// Accuracy: SLEEF's *_u10 functions are within 1.0 ulp of the correctly rounded exp (SLEEF's documentation
// of the u10 variants); the GELU arithmetic around it adds a few float roundings, so GELU and its derivative
// are within 4 eps * |x| + 2 eps * |GELU(x)| of the exact tanh-GELU (tests/test_cpu_vecmath.cpp checks this
// against a long double reference; measured on Zen 4: GELU within 1.01 eps |x|, GELU' within 0.14 of its
// bound). Every element of one level is computed by the same instruction sequence whatever its position
// (tails go through the vector code on a padded copy), so the results do not depend on how a caller splits
// the array, hence not on the thread count. Different levels may differ in the last bit.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "mptrain/dtype.hpp"

namespace mpt::cpu {

/// out[i] = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) for x = inp[i], i < n (kernels/common/gelu.hpp's
/// formula). out may alias inp. `level` must be <= detected_simd_level(); throws mpt::Error otherwise.
void gelu_forward_f32(float* out, const float* inp, int64_t n, SimdLevel level = detected_simd_level());

/// acc[i] += dout[i] * GELU'(inp[i]) for i < n (the factored derivative of kernels/common/gelu.hpp).
void gelu_backward_f32(float* acc, const float* inp, const float* dout, int64_t n,
                       SimdLevel level = detected_simd_level());

/// x[i] = exp(x[i] - shift) for i < n, and returns their sum, added lane-wise in a fixed order (so the same
/// for the same inputs on every run). The softmax's exponential: shift is the row maximum. x[i] = -inf gives
/// 0. Returns 0 for n == 0.
float exp_shifted_sum_f32(float* x, float shift, int64_t n, SimdLevel level = detected_simd_level());

/// exp_shifted_sum_f32 for float; for double, x[i] = std::exp(x[i] - shift) summed in index order (the
/// FP64 reference path). The softmax's and the cross-entropy's exponential.
template <typename F>
inline F exp_shifted_sum(F* x, F shift, int64_t n) {
  if constexpr (std::is_same_v<F, float>) {
    return exp_shifted_sum_f32(x, shift, n);
  } else {
    F sum = 0;
    for (int64_t i = 0; i < n; ++i) {
      x[i] = std::exp(x[i] - shift);
      sum += x[i];
    }
    return sum;
  }
}

}  // namespace mpt::cpu
