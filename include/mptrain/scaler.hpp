// Dynamic loss scaling as a replicated state machine (PyTorch torch.amp.GradScaler rules, with the
// Megatron-LM / DeepSpeed hysteresis and min_scale options).
//
// Every rank holds its own DynamicLossScaler and feeds it the same, already agreed found_inf (all-reduced
// with MAX), so every rank's state stays identical without any broadcast. Growth happens after
// `growth_interval` consecutive clean steps; an overflow backs the scale off (after `hysteresis` overflows)
// and resets the growth tracker. The scale is kept in FP32 and is never grown past FP32's finite range.
#pragma once

#include <cstdint>
#include <map>
#include <string>

#include "common/amp_state.hpp"

namespace mpt {

/// Loss-scaler options. Defaults are torch.amp.GradScaler's, plus min_scale 1 (Megatron's and DeepSpeed's
/// default) and a stop after 10 consecutive overflows at that minimum.
struct LossScalerConfig {
  bool enabled = true;             ///< false: scale fixed at 1, never changes (fp32/bf16 training)
  bool dynamic = true;             ///< false: static scale `init_scale`, overflowing steps are still skipped
  float init_scale = 65536.0f;     ///< 2^16
  float growth_factor = 2.0f;      ///< > 1
  float backoff_factor = 0.5f;     ///< in (0, 1)
  int64_t growth_interval = 2000;  ///< consecutive clean steps before growth, >= 1
  int64_t hysteresis = 1;          ///< overflows tolerated before a backoff (Megatron's `hysteresis`), >= 1
  bool consecutive_hysteresis = false;  ///< refill hysteresis on every clean step (DeepSpeed), not at growth
  float min_scale = 1.0f;  ///< backoff floor, >= 0; FLT_MIN is a floor too (1/scale stays finite)
  int64_t max_overflows_at_min_scale = 10;  ///< consecutive overflows at min_scale before NumericsError, >= 1

  /// Throws mpt::InputError naming the first bad field.
  void validate() const;
};

/// The whole mutable state; equal on every rank at every step. The struct lives in kernels/common/ because
/// the device keeps the same state (common::AmpState::scaler) and advances it with the same function.
using LossScalerState = common::ScalerState;

class DynamicLossScaler {
 public:
  /// Validates `config` (throws mpt::InputError) and starts from scale = init_scale (1 when disabled).
  explicit DynamicLossScaler(const LossScalerConfig& config = {});

  /// Current loss scale (multiply the loss by it before backward).
  float scale() const { return state_.scale; }
  /// 1 / scale in FP32, the factor that unscales gradients.
  float inv_scale() const { return 1.0f / state_.scale; }
  const LossScalerState& state() const { return state_; }
  const LossScalerConfig& config() const { return config_; }

  /// Advances the state machine by one optimizer step. `found_inf` must be the value agreed by all ranks.
  /// Returns true when the step must be skipped (found_inf). Throws mpt::NumericsError, naming the scale and
  /// the count, once `max_overflows_at_min_scale` consecutive overflows happened with the scale at min_scale
  /// (or, for a static scale, at that scale). The state is updated before throwing.
  bool update(bool found_inf);

  /// The config in the flat form common::scaler_update reads (for the device-side update).
  common::ScalerRule rule() const;
  /// Replaces the state with one advanced elsewhere by common::scaler_update on the same rule (the engine's
  /// host mirror of the device state). No validation: the state must come from this scaler's rule.
  void restore(const LossScalerState& state) { state_ = state; }
  /// Throws the mpt::NumericsError that update() throws when the minimum-scale rule fires, for `state` (the
  /// state after the firing update), naming the scale and the count.
  [[noreturn]] void throw_min_scale_stop(const LossScalerState& state) const;

  /// The state as strings (exact: floats in shortest round-trip form), keys prefixed "scaler.", for the
  /// checkpoint's metadata.
  std::map<std::string, std::string> serialize() const;
  /// Restores a state written by serialize(). Throws mpt::InputError for a missing or malformed key, a scale
  /// that is not a finite normal float, a negative counter or skipped_steps > steps (state left unchanged).
  /// A static or disabled scaler keeps the scale its config gives and restores only the counters.
  void deserialize(const std::map<std::string, std::string>& fields);

 private:
  LossScalerConfig config_;
  LossScalerState state_;
};

}  // namespace mpt
