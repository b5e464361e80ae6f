// The mixed-precision step state that lives in backend memory (device memory on CUDA), and the host/device
// functions that advance it: the loss-scaler state machine, the learning-rate schedule, and the preparation
// of one AdamW step (global norm -> clip factor -> lr -> bias corrections) from Adam's t held in the state.
//
// The same MPT_HD functions run in the host DynamicLossScaler (src/scaler.cpp), in the CPU backend
// (kernels/cpu/amp.cpp) and in one-thread CUDA kernels (kernels/cuda/amp.cu), so the CPU tests of the scaler
// cover the device rule too. The model is PyTorch's _amp_update_scale_ (growth/backoff on an FP32 scale with
// a growth tracker) with Megatron-LM's hysteresis, DeepSpeed's consecutive_hysteresis and a min_scale floor.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/adamw.hpp"
#include "common/fp16.hpp"
#include "common/host_device.hpp"
#include "common/noise_scale.hpp"

namespace mpt::common {

/// The loss scaler's whole mutable state; equal on every rank at every step (mpt::LossScalerState).
struct ScalerState {
  float scale = 65536.0f;
  int64_t growth_tracker = 0;    ///< consecutive clean steps since the last growth or overflow
  int64_t hysteresis_left = 1;   ///< overflows tolerated before the next backoff; 0: each one backs off
  int64_t overflows_at_min = 0;  ///< consecutive overflowing steps that found the scale at min_scale
  int64_t steps = 0;             ///< updates seen (clean + skipped)
  int64_t skipped_steps = 0;     ///< updates with found_inf

  bool operator==(const ScalerState&) const = default;
};

/// The scaler's options in the flat form the state machine reads (built from mpt::LossScalerConfig by
/// DynamicLossScaler::rule()).
struct ScalerRule {
  bool enabled = true;                  ///< false: scale 1 forever
  bool dynamic = true;                  ///< false: static scale
  bool consecutive_hysteresis = false;  ///< refill hysteresis on every clean step (DeepSpeed)
  float growth_factor = 2.0f;
  float backoff_factor = 0.5f;
  float scale_floor = 1.0f;  ///< max(min_scale, FLT_MIN): the backoff never goes below it
  int64_t growth_interval = 2000;
  int64_t hysteresis = 1;
  int64_t max_overflows_at_min_scale = 10;
};

/// True when x is neither inf nor NaN (bit test: the same on host and device, no library call).
MPT_HD bool is_finite_float(float x) {
  return (float_bits(x) & 0x7f800000u) != 0x7f800000u;
}

/// Advances the scaler by one optimizer step with the agreed `found_inf`. Returns true when the minimum-scale
/// rule fired: `max_overflows_at_min_scale` consecutive overflows with the scale at its floor (for a static
/// or disabled scaler, every overflow counts as one at the minimum). The state is updated either way; the
/// caller turns a true into mpt::NumericsError (host) or a flag in AmpState (device).
MPT_HD bool scaler_update(ScalerState& s, const ScalerRule& r, bool found_inf) {
  const bool dynamic = r.enabled && r.dynamic;
  const float scale_before = s.scale;
  s.steps += 1;
  if (!found_inf) {
    s.overflows_at_min = 0;
    if (!dynamic) return false;
    s.growth_tracker += 1;
    if (r.consecutive_hysteresis) s.hysteresis_left = r.hysteresis;
    // >= rather than PyTorch's ==: a checkpoint restored under a smaller growth_interval must still grow.
    if (s.growth_tracker >= r.growth_interval) {
      s.growth_tracker = 0;
      s.hysteresis_left = r.hysteresis;
      const float grown = s.scale * r.growth_factor;
      // Past FLT_MAX the product is inf; keep the old scale, but restart the interval as PyTorch does.
      if (is_finite_float(grown)) s.scale = grown;
    }
    return false;
  }
  s.skipped_steps += 1;
  // A fixed scale cannot back off, so for static and disabled scalers every overflow counts as one at the
  // minimum: a long run of inf/NaN steps there means the model itself has diverged.
  const bool at_min = !dynamic || scale_before <= r.scale_floor;
  s.overflows_at_min = at_min ? s.overflows_at_min + 1 : 0;
  if (dynamic) {
    s.growth_tracker = 0;
    // Megatron-LM: a backoff does not refill hysteresis, so once it is spent every overflow backs off until a
    // growth (or, with consecutive_hysteresis, a clean step) refills it. Clamped at 0 rather than counting
    // below, so the field keeps its meaning "overflows still tolerated"; the behaviour is the same.
    s.hysteresis_left = s.hysteresis_left > 1 ? s.hysteresis_left - 1 : 0;
    if (s.hysteresis_left == 0) {
      const float backed = s.scale * r.backoff_factor;
      s.scale = backed > r.scale_floor ? backed : r.scale_floor;
    }
  }
  return s.overflows_at_min >= r.max_overflows_at_min_scale;
}

/// Warm-up + cosine learning-rate schedule counted in samples (mpt::LrSchedule::at): the lr of the step that
/// trains on samples (start, start + batch], with start = samples of the steps applied before it. Warm-up:
/// peak x min(start + batch, warmup) / warmup while start < warmup; then cosine from peak to min_lr over
/// (warmup, decay], reaching min_lr exactly with the step whose batch ends at `decay`; min_lr after.
/// decay = 0: constant after warm-up. With batch 1 the units are steps. FP64 inside, rounded to FP32 once.
MPT_HD float lr_at(int64_t start, int64_t batch, float peak_lr, int64_t warmup, int64_t decay, float min_lr) {
  const int64_t end = start + batch;
  if (start < warmup)
    return static_cast<float>(static_cast<double>(peak_lr) *
                              static_cast<double>(end < warmup ? end : warmup) / static_cast<double>(warmup));
  if (decay == 0) return peak_lr;
  if (end >= decay) return min_lr;
  const double progress = static_cast<double>(end - warmup) / static_cast<double>(decay - warmup);
  const double cosine = 0.5 * (1.0 + cos(3.141592653589793 * progress));
  return static_cast<float>(min_lr + (static_cast<double>(peak_lr) - min_lr) * cosine);
}

/// The optimizer's options in flat form (mpt::AdamWConfig + mpt::LrSchedule + the clip threshold).
struct OptimizerRule {
  float peak_lr = 1e-3f;
  float beta1 = 0.9f;
  float beta2 = 0.999f;
  float eps = 1e-8f;
  float weight_decay = 0.0f;
  float grad_clip = 0.0f;  ///< max global norm of the unscaled gradients; 0: no clipping
  float min_lr = 0.0f;
  int64_t warmup_samples = 0;  ///< schedule length of the warm-up, in samples (lr_at)
  int64_t decay_samples = 0;   ///< where the cosine ends, in samples; 0: constant after warm-up
  int64_t step_samples = 1;    ///< the batch of the step being prepared (set per step)
};

/// Index of the found_inf and stop-request flags in AmpState::flags (MAX all-reduced together).
inline constexpr int kFoundInf = 0;
inline constexpr int kStopRequested = 1;

/// Everything the optimizer side of a step reads and writes, in backend memory (one per engine). Trivially
/// copyable: the host reads it back with one copy (MixedPrecisionEngine::result()).
///
/// Per step: grad_check zeroes flags[kFoundInf] and sets it on a non-finite local gradient, and writes
/// flags[kStopRequested] from the host's request; the engine MAX-all-reduces both flags; amp_prepare fills
/// used_scale, grad_norm, clip_factor, lr and step; adamw and cast_master read flags and step; amp_update
/// advances `scaler`, and `applied_steps` and `applied_samples` when the step was not skipped, and sets
/// min_scale_stop.
struct AmpState {
  float flags[2] = {0.0f, 0.0f};  ///< [kFoundInf] any rank found inf/NaN; [kStopRequested] any rank asked
  float used_scale = 1.0f;        ///< loss scale the last step's gradients carried
  float clip_factor = 1.0f;       ///< multiplier applied to the unscaled gradients (1: no clipping/skipped)
  float lr = 0.0f;                ///< learning rate of the last step (0 when skipped)
  int32_t min_scale_stop = 0;     ///< 1 when the last scaler update hit max_overflows_at_min_scale
  double grad_norm = 0.0;         ///< global L2 norm of the unscaled gradients (NaN when skipped)
  double grad_sq = 0.0;           ///< its square, unrounded: |G_big|^2 of the noise scale (NaN when skipped)
  int64_t applied_steps = 0;      ///< Adam's t after the last step
  int64_t applied_samples = 0;    ///< the LR-schedule position: samples of the applied steps
  int64_t step_samples = 0;       ///< the batch of the last prepared step (added to applied_samples)
  ScalerState scaler;             ///< loss scale (read by the cross-entropy op) and its counters
  AdamWStep step;                 ///< constants of the last step's AdamW (valid when not skipped)
  NoiseScaleState noise;          ///< the gradient noise scale's moving averages (noise_prepare)
};

/// Fills used_scale, grad_norm, clip_factor, lr and the AdamW constants from the agreed flags and the global
/// FP64 sum of squares of the stored (scaled) gradients. Norm = sqrt(sum) / scale; clip coefficient
/// grad_clip / (norm + 1e-6) clamped to 1 (torch.nn.utils.clip_grad_norm_); lr from the schedule at
/// applied_samples for a batch of rule.step_samples (kept in step_samples); bias corrections for t =
/// applied_steps + 1. On an overflowing step: norm NaN, clip 1, lr 0.
MPT_HD void amp_prepare(AmpState& a, double sum_of_squares, const OptimizerRule& o) {
  a.used_scale = a.scaler.scale;
  a.clip_factor = 1.0f;
  if (a.flags[kFoundInf] != 0.0f) {
    a.grad_norm = static_cast<double>(bits_float(0x7fc00000u));  // quiet NaN
    a.grad_sq = a.grad_norm;
    a.lr = 0.0f;
    return;
  }
  const double scale = static_cast<double>(a.used_scale);
  a.grad_sq = sum_of_squares / (scale * scale);
  a.grad_norm = sqrt(sum_of_squares) / scale;
  if (o.grad_clip > 0.0f) {
    const double coefficient = static_cast<double>(o.grad_clip) / (a.grad_norm + 1e-6);
    if (coefficient < 1.0) a.clip_factor = static_cast<float>(coefficient);
  }
  a.step_samples = o.step_samples;
  a.lr = lr_at(a.applied_samples, o.step_samples, o.peak_lr, o.warmup_samples, o.decay_samples, o.min_lr);
  a.step = make_adamw_step(a.lr, o.beta1, o.beta2, o.eps, o.weight_decay, a.applied_steps + 1,
                           static_cast<float>(a.clip_factor / scale));
}

/// What the small batches of one step's noise-scale estimate are (mpt::NoiseBatch in flat form).
struct NoiseRule {
  double small_samples = 0.0;      ///< B_small; 0: no estimate this step
  double big_samples = 0.0;        ///< B_big
  double small_batches = 1.0;      ///< how many small-batch squared norms the summed input holds
  double small_grad_factor = 1.0;  ///< stored small gradient x factor / loss scale = the true gradient
  double decay = 0.95;             ///< EMA factor
};

/// After amp_prepare: the noise-scale estimate of this step from `small_sq_sum`, the sum of the squared
/// norms of rule.small_batches stored (scaled) small-batch gradients, and grad_sq (|G_big|^2): |G_small|^2 =
/// small_sq_sum x (small_grad_factor / used_scale)^2 / small_batches. Skipped on an overflowing step (the
/// agreed found_inf) and when the rule has no small batch.
MPT_HD void noise_prepare(AmpState& a, double small_sq_sum, const NoiseRule& r) {
  if (a.flags[kFoundInf] != 0.0f || r.small_samples <= 0.0 || r.small_batches <= 0.0) return;
  const double unscale = r.small_grad_factor / static_cast<double>(a.used_scale);
  const double small_sq = small_sq_sum * unscale * unscale / r.small_batches;
  noise_scale_update(a.noise, small_sq, a.grad_sq, r.small_samples, r.big_samples, r.decay);
}

/// The end of a step: the scaler update with the agreed found_inf, Adam's t advanced when the step was
/// applied, and min_scale_stop set when the minimum-scale rule fired.
MPT_HD void amp_update(AmpState& a, const ScalerRule& r) {
  const bool found_inf = a.flags[kFoundInf] != 0.0f;
  a.min_scale_stop = scaler_update(a.scaler, r, found_inf) ? 1 : 0;
  if (!found_inf) {
    a.applied_steps += 1;
    a.applied_samples += a.step_samples;
  }
}

}  // namespace mpt::common
