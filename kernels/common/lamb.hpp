// LAMB element math (You et al., "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes",
// ICLR 2020, Algorithm 2), shared by the CPU and CUDA optimizer kernels.
//
// Per element, with g the unscaled (clipped) gradient and the step constants of common::AdamWStep:
//   m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2                       (the moments, as AdamW)
//   r  = (m / bc1) / (sqrt(v) / sqrt(bc2) + eps) + wd * w                   (decoupled decay inside r)
// and per tensor, from whole-tensor norms of w (before the update) and r:
//   trust = ||w|| / ||r||   (phi = identity, no clamp; 1 when either norm is 0 or the tensor is excluded)
//   w <- w - lr * trust * r
// Exclusions follow the TF reference implementation's convention: tensors without weight decay (biases and
// LayerNorm parameters, TensorSpec::decay == false) get neither decay nor layer adaptation (trust 1).
//
// The update runs in two passes so that the norms can be whole-tensor norms under ZeRO-1: pass 1 updates the
// moments and sums w^2 and r^2 per fixed segment; pass 2 recomputes r from the same w, m, v with the same
// function (so bitwise the same r) and applies it with the tensor's trust ratio.
#pragma once

#include <cmath>

#include "common/adamw.hpp"
#include "common/host_device.hpp"

namespace mpt::common {

/// Pass 1, the moments: m and v from the stored (scaled) gradient g_stored * s.grad_multiplier.
MPT_HD void lamb_moments(float& m, float& v, float g_stored, const AdamWStep& s) {
  const float g = g_stored * s.grad_multiplier;
  m = s.beta1 * m + (1.0f - s.beta1) * g;
  v = s.beta2 * v + (1.0f - s.beta2) * g * g;
}

/// The update direction r of one element from the weight w (before the update) and the updated moments.
/// `decay` false: no weight-decay term (excluded tensor).
MPT_HD float lamb_direction(float w, float m, float v, bool decay, const AdamWStep& s) {
  const float denom = sqrtf(v) / s.bias_correction2_sqrt + s.eps;
  const float r = (m / s.bias_correction1) / denom;
  return decay ? r + s.weight_decay * w : r;
}

/// The trust ratio of a tensor from the FP64 sums of squares of its weights and of its update direction:
/// sqrt(w_sq) / sqrt(r_sq), rounded once to FP32; 1 when the tensor is not adapted or either sum is 0 (or
/// not a positive finite number).
MPT_HD float lamb_trust(double w_sq, double r_sq, bool adapted) {
  if (!adapted || !(w_sq > 0.0) || !(r_sq > 0.0)) return 1.0f;
  return static_cast<float>(sqrt(w_sq) / sqrt(r_sq));
}

/// Pass 2 for one element: w <- w - lr * trust * r.
MPT_HD void lamb_apply(float& w, float r, float trust, const AdamWStep& s) {
  w -= (s.lr * trust) * r;
}

}  // namespace mpt::common
