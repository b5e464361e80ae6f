// The loss-scaler state machine: PyTorch's _amp_update_scale_ rule, Megatron-LM's hysteresis (not refilled
// by a backoff), DeepSpeed's consecutive_hysteresis, a min_scale floor with a stop when overflows persist
// there, and an exact string form for checkpoints.
//
// The state machine itself is common::scaler_update (kernels/common/amp_state.hpp), shared with the device.
// It runs on replicated state: every rank calls update() with the same agreed found_inf, so every rank
// reaches the same state, and the same NumericsError at the same step, without communicating.
#include "mptrain/scaler.hpp"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <limits>
#include <system_error>
#include <type_traits>
#include <utility>

#include "mptrain/error.hpp"

namespace mpt {

namespace {

// The scale never drops below FP32's smallest normal number, whatever min_scale says (0 is allowed): below it
// 1/scale overflows to inf for the smaller subnormals, and a scale that underflows to 0 would zero every
// gradient, never overflow again and so never recover.
float scale_floor(const LossScalerConfig& config) {
  return std::max(config.min_scale, std::numeric_limits<float>::min());
}

const char* const kScaleKey = "scaler.scale";
const char* const kGrowthTrackerKey = "scaler.growth_tracker";
const char* const kHysteresisLeftKey = "scaler.hysteresis_left";
const char* const kOverflowsAtMinKey = "scaler.overflows_at_min";
const char* const kStepsKey = "scaler.steps";
const char* const kSkippedStepsKey = "scaler.skipped_steps";

// Strict parse: the whole text must be one number in from_chars' plain form (no spaces, no '+', no hex
// prefix), so a truncated or hand-edited checkpoint is rejected instead of silently read as something else.
template <typename T>
T parse_field(const std::map<std::string, std::string>& fields, const char* key) {
  const auto it = fields.find(key);
  MPT_INPUT_CHECK(it != fields.end(), "loss scaler checkpoint: missing key {}", key);
  const std::string& text = it->second;
  T value{};
  const char* const last = text.data() + text.size();
  const auto [end, ec] = std::from_chars(text.data(), last, value);
  MPT_INPUT_CHECK(!text.empty() && ec == std::errc() && end == last,
                  "loss scaler checkpoint: {} is not {}: {:?}", key,
                  std::is_floating_point_v<T> ? "a float" : "an integer", text);
  return value;
}

}  // namespace

void LossScalerConfig::validate() const {
  // Each condition is false for NaN, so a NaN in any float field is rejected too.
  // A subnormal scale would make 1/scale infinite and turn zero gradients into NaN weights.
  MPT_INPUT_CHECK(std::isfinite(init_scale) && init_scale >= std::numeric_limits<float>::min(),
                  "loss scaler: init_scale must be finite and >= {} (the smallest normal float), got {}",
                  std::numeric_limits<float>::min(), init_scale);
  MPT_INPUT_CHECK(std::isfinite(growth_factor) && growth_factor > 1.0f,
                  "loss scaler: growth_factor must be finite and > 1, got {}", growth_factor);
  MPT_INPUT_CHECK(backoff_factor > 0.0f && backoff_factor < 1.0f,
                  "loss scaler: backoff_factor must be in (0, 1), got {}", backoff_factor);
  MPT_INPUT_CHECK(growth_interval >= 1, "loss scaler: growth_interval must be >= 1, got {}", growth_interval);
  MPT_INPUT_CHECK(hysteresis >= 1, "loss scaler: hysteresis must be >= 1, got {}", hysteresis);
  MPT_INPUT_CHECK(std::isfinite(min_scale) && min_scale >= 0.0f,
                  "loss scaler: min_scale must be finite and >= 0, got {}", min_scale);
  // Only a dynamic scale ever moves towards min_scale; a static scale below it is the user's explicit choice.
  MPT_INPUT_CHECK(!(enabled && dynamic) || min_scale <= init_scale,
                  "loss scaler: min_scale must be <= init_scale ({}) for a dynamic scale, got {}", init_scale,
                  min_scale);
  MPT_INPUT_CHECK(max_overflows_at_min_scale >= 1,
                  "loss scaler: max_overflows_at_min_scale must be >= 1, got {}", max_overflows_at_min_scale);
}

DynamicLossScaler::DynamicLossScaler(const LossScalerConfig& config) : config_(config) {
  config_.validate();
  state_.scale = config_.enabled ? config_.init_scale : 1.0f;
  state_.hysteresis_left = config_.hysteresis;
}

common::ScalerRule DynamicLossScaler::rule() const {
  common::ScalerRule r;
  r.enabled = config_.enabled;
  r.dynamic = config_.dynamic;
  r.consecutive_hysteresis = config_.consecutive_hysteresis;
  r.growth_factor = config_.growth_factor;
  r.backoff_factor = config_.backoff_factor;
  r.scale_floor = scale_floor(config_);
  r.growth_interval = config_.growth_interval;
  r.hysteresis = config_.hysteresis;
  r.max_overflows_at_min_scale = config_.max_overflows_at_min_scale;
  return r;
}

bool DynamicLossScaler::update(bool found_inf) {
  // The rule itself is kernels/common/amp_state.hpp's, shared with the device-side update.
  if (common::scaler_update(state_, rule(), found_inf)) throw_min_scale_stop(state_);
  return found_inf;
}

void DynamicLossScaler::throw_min_scale_stop(const LossScalerState& state) const {
  const auto count = state.overflows_at_min;
  if (!config_.enabled) {
    throw NumericsError(
        fmt::format("loss scaling is off (scale 1): {} consecutive steps overflowed (inf/NaN gradients); "
                    "stopping instead of training on garbage",
                    count));
  }
  if (!config_.dynamic) {
    throw NumericsError(fmt::format(
        "static loss scale {}: {} consecutive steps overflowed (inf/NaN gradients); stopping instead of "
        "training on garbage (use a smaller static scale or dynamic scaling)",
        state.scale, count));
  }
  throw NumericsError(fmt::format(
      "loss scale stuck at its minimum {}: {} consecutive steps overflowed (inf/NaN gradients); stopping "
      "instead of training on garbage",
      state.scale, count));
}

std::map<std::string, std::string> DynamicLossScaler::serialize() const {
  // fmt's "{}" for a float is the shortest text that reads back as the same float: the round trip is exact.
  return {
      {kScaleKey, fmt::format("{}", state_.scale)},
      {kGrowthTrackerKey, fmt::format("{}", state_.growth_tracker)},
      {kHysteresisLeftKey, fmt::format("{}", state_.hysteresis_left)},
      {kOverflowsAtMinKey, fmt::format("{}", state_.overflows_at_min)},
      {kStepsKey, fmt::format("{}", state_.steps)},
      {kSkippedStepsKey, fmt::format("{}", state_.skipped_steps)},
  };
}

void DynamicLossScaler::deserialize(const std::map<std::string, std::string>& fields) {
  // Parse everything into a copy first, so that a bad checkpoint leaves this scaler untouched.
  LossScalerState restored;
  restored.scale = parse_field<float>(fields, kScaleKey);
  restored.growth_tracker = parse_field<int64_t>(fields, kGrowthTrackerKey);
  restored.hysteresis_left = parse_field<int64_t>(fields, kHysteresisLeftKey);
  restored.overflows_at_min = parse_field<int64_t>(fields, kOverflowsAtMinKey);
  restored.steps = parse_field<int64_t>(fields, kStepsKey);
  restored.skipped_steps = parse_field<int64_t>(fields, kSkippedStepsKey);

  MPT_INPUT_CHECK(std::isfinite(restored.scale) && restored.scale >= std::numeric_limits<float>::min(),
                  "loss scaler checkpoint: {} must be finite and >= {} (FP32's smallest normal), got {:?}",
                  kScaleKey, std::numeric_limits<float>::min(), fields.at(kScaleKey));
  for (const auto& [key, value] :
       {std::pair{kGrowthTrackerKey, restored.growth_tracker},
        std::pair{kHysteresisLeftKey, restored.hysteresis_left},
        std::pair{kOverflowsAtMinKey, restored.overflows_at_min}, std::pair{kStepsKey, restored.steps},
        std::pair{kSkippedStepsKey, restored.skipped_steps}}) {
    MPT_INPUT_CHECK(value >= 0, "loss scaler checkpoint: {} must be >= 0, got {:?}", key, fields.at(key));
  }
  MPT_INPUT_CHECK(restored.skipped_steps <= restored.steps, "loss scaler checkpoint: {} ({}) exceeds {} ({})",
                  kSkippedStepsKey, restored.skipped_steps, kStepsKey, restored.steps);

  // A static or disabled scale is a function of the config, not of history: resuming an fp16 checkpoint
  // with scaling off, or with a new static scale, takes the scale from the config and keeps the counters.
  if (!(config_.enabled && config_.dynamic)) restored.scale = state_.scale;
  state_ = restored;
}

}  // namespace mpt
