// The gradient noise scale (McCandlish, Kaplan, Amodei et al., "An Empirical Model of Large-Batch Training",
// 2018, appendix A.1), shared by the host and the device step state.
//
// With |G_small|^2 the squared norm of a gradient averaged over B_small samples (averaged over several such
// gradients) and |G_big|^2 that of the gradient averaged over B_big samples, the unbiased estimators are
//   |G|^2 = (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
//   S     = (|G_small|^2 - |G_big|^2) / (1 / B_small - 1 / B_big)          (S estimates tr(Sigma))
// and the simple noise scale is B_simple = S / |G|^2. Single-step estimates are noisy (|G|^2 may even come
// out negative), so each is averaged with an exponential moving average and the reported value is the ratio
// of the averages, EMA(S) / EMA(|G|^2), not an average of ratios.
#pragma once

#include "common/fp16.hpp"
#include "common/host_device.hpp"

namespace mpt::common {

/// A quiet NaN ("not available"), the same bits on host and device.
MPT_HD double noise_not_available() {
  return static_cast<double>(bits_float(0x7fc00000u));
}

/// The moving averages, part of the replicated step state (AmpState) and of checkpoints.
struct NoiseScaleState {
  double grad_sq_ema = 0.0;  ///< EMA of the |G|^2 estimates (not bias-corrected)
  double trace_ema = 0.0;    ///< EMA of the S estimates (not bias-corrected)
  double weight = 0.0;       ///< 1 - decay^n after n estimates: divides both EMAs to remove their bias

  bool operator==(const NoiseScaleState&) const = default;
};

/// Folds one step's estimates into the averages: `small_sq` = |G_small|^2 and `big_sq` = |G_big|^2 (unscaled
/// gradients), B_small = `b_small` and B_big = `b_big` samples, EMA factor `decay` in [0, 1). Does nothing
/// (the statistic is not available) unless 0 < b_small < b_big and both squares are finite.
MPT_HD void noise_scale_update(NoiseScaleState& s, double small_sq, double big_sq, double b_small,
                               double b_big, double decay) {
  if (!(b_small > 0.0 && b_big > b_small)) return;
  const double finite_limit = 1.7976931348623157e308;
  if (!(small_sq >= -finite_limit && small_sq <= finite_limit && big_sq >= -finite_limit &&
        big_sq <= finite_limit))
    return;
  const double grad_sq = (b_big * big_sq - b_small * small_sq) / (b_big - b_small);
  const double trace = (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big);
  s.grad_sq_ema = decay * s.grad_sq_ema + (1.0 - decay) * grad_sq;
  s.trace_ema = decay * s.trace_ema + (1.0 - decay) * trace;
  s.weight = decay * s.weight + (1.0 - decay);
}

/// Bias-corrected EMA of |G|^2; NaN before the first estimate.
MPT_HD double noise_grad_sq(const NoiseScaleState& s) {
  return s.weight > 0.0 ? s.grad_sq_ema / s.weight : noise_not_available();
}

/// Bias-corrected EMA of S = tr(Sigma); NaN before the first estimate.
MPT_HD double noise_trace(const NoiseScaleState& s) {
  return s.weight > 0.0 ? s.trace_ema / s.weight : noise_not_available();
}

/// B_noise = EMA(S) / EMA(|G|^2) (the bias corrections cancel); NaN while it is not available: before the
/// first estimate, or while either average is not positive (both quantities are positive by definition;
/// early averages of their noisy estimates need not be).
MPT_HD double noise_scale(const NoiseScaleState& s) {
  return s.weight > 0.0 && s.grad_sq_ema > 0.0 && s.trace_ema > 0.0 ? s.trace_ema / s.grad_sq_ema
                                                                    : noise_not_available();
}

}  // namespace mpt::common
