// GELU with the tanh approximation, shared by the CPU and CUDA elementwise kernels.
//
// Source: Hendrycks & Gimpel, "Gaussian Error Linear Units (GELUs)", arXiv:1606.08415, section 2:
//   GELU(x) ~= 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))),
// which is what GPT-2 uses and what torch.nn.GELU(approximate="tanh") computes. The derivative is written in
// the same factored form as PyTorch's CPU kernel (aten/src/ATen/native/cpu/Activation.cpp,
// GeluBackwardKernel, tanh branch): d/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2), t
// = tanh(inner). Templated on the compute type: float for the FP32/FP16/BF16 paths, double for
// finite-difference tests.
#pragma once

#include <cmath>
#include <type_traits>

#include "common/host_device.hpp"

namespace mpt::common {

namespace detail {
/// The tanh argument sqrt(2/pi) (x + 0.044715 x^3). Constants are function-local so device code can use them.
template <typename F>
MPT_HD F gelu_inner(F x, F x_sq) {
  constexpr F kSqrt2OverPi = F(0.7978845608028654);
  constexpr F kCubic = F(0.044715);
  return kSqrt2OverPi * (x + kCubic * x_sq * x);
}
/// The derivative of gelu_inner with respect to x.
template <typename F>
MPT_HD F gelu_inner_derivative(F x_sq) {
  constexpr F kSqrt2OverPi = F(0.7978845608028654);
  constexpr F kCubic = F(0.044715);
  return kSqrt2OverPi * (F(1) + F(3) * kCubic * x_sq);
}
/// tanh in the compute type F: tanhf for float (device-safe, no promotion to double), tanh for double.
template <typename F>
MPT_HD F gelu_tanh_of(F u) {
  static_assert(std::is_same_v<F, float> || std::is_same_v<F, double>, "GELU computes in float or double");
  if constexpr (std::is_same_v<F, float>)
    return tanhf(u);
  else
    return tanh(u);
}
}  // namespace detail

/// GELU(x), tanh approximation (torch.nn.GELU(approximate="tanh")).
template <typename F>
MPT_HD F gelu_tanh(F x) {
  return F(0.5) * x * (F(1) + detail::gelu_tanh_of(detail::gelu_inner(x, x * x)));
}

/// dGELU/dx at x for the tanh approximation (multiply by the incoming gradient to get dinp).
template <typename F>
MPT_HD F gelu_tanh_derivative(F x) {
  const F x_sq = x * x;
  const F t = detail::gelu_tanh_of(detail::gelu_inner(x, x_sq));
  const F left_derivative = F(0.5) * (F(1) + t);
  const F right_derivative = (F(1) - t * t) * detail::gelu_inner_derivative(x_sq);
  return left_derivative + F(0.5) * x * right_derivative;
}

}  // namespace mpt::common
