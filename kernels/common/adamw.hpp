// AdamW element update (Loshchilov & Hutter, "Decoupled Weight Decay Regularization"), in the exact form of
// PyTorch's torch.optim.AdamW (single-tensor path), shared by the CPU and CUDA optimizer kernels.
#pragma once

#include <cmath>

#include "common/host_device.hpp"

namespace mpt::common {

/// Step constants computed once per optimizer step (on the host, or on the device from the AmpState).
struct AdamWStep {
  float lr = 1e-3f;
  float beta1 = 0.9f;
  float beta2 = 0.999f;
  float eps = 1e-8f;
  float weight_decay = 0.0f;           ///< applied only to decay tensors
  float bias_correction1 = 1.0f;       ///< 1 - beta1^t
  float bias_correction2_sqrt = 1.0f;  ///< sqrt(1 - beta2^t)
  float grad_multiplier =
      1.0f;  ///< clip_factor / loss_scale: turns the stored scaled gradient into the true one
};

/// Fills the bias corrections for step t (1-based, t >= 1), in FP64 rounded once to FP32.
MPT_HD AdamWStep make_adamw_step(float lr, float beta1, float beta2, float eps, float weight_decay,
                                 long long t, float grad_multiplier) {
  AdamWStep s;
  s.lr = lr;
  s.beta1 = beta1;
  s.beta2 = beta2;
  s.eps = eps;
  s.weight_decay = weight_decay;
  s.bias_correction1 = static_cast<float>(1.0 - pow(static_cast<double>(beta1), static_cast<double>(t)));
  s.bias_correction2_sqrt =
      static_cast<float>(sqrt(1.0 - pow(static_cast<double>(beta2), static_cast<double>(t))));
  s.grad_multiplier = grad_multiplier;
  return s;
}

/// One AdamW update of one FP32 master weight from its stored (scaled) gradient value `g_stored`.
/// p <- p * (1 - lr * wd);  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2;
/// p <- p - (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps), with g = g_stored * grad_multiplier.
MPT_HD void adamw_update(float& p, float& m, float& v, float g_stored, bool decay, const AdamWStep& s) {
  const float g = g_stored * s.grad_multiplier;
  if (decay) p *= 1.0f - s.lr * s.weight_decay;
  m = s.beta1 * m + (1.0f - s.beta1) * g;
  v = s.beta2 * v + (1.0f - s.beta2) * g * g;
  const float denom = sqrtf(v) / s.bias_correction2_sqrt + s.eps;
  p -= (s.lr / s.bias_correction1) * (m / denom);
}

}  // namespace mpt::common
