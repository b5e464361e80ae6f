// Optimizer names, AdamW/LAMB hyper-parameter validation and the warm-up + cosine learning-rate schedule.
#include "mptrain/optimizer.hpp"

#include <cmath>

#include "common/amp_state.hpp"
#include "mptrain/error.hpp"

namespace mpt {

const char* optimizer_name(OptimizerKind kind) {
  return kind == OptimizerKind::lamb ? "lamb" : "adamw";
}

OptimizerKind parse_optimizer(const std::string& text, const char* flag) {
  if (text == "adamw") return OptimizerKind::adamw;
  if (text == "lamb") return OptimizerKind::lamb;
  throw InputError(fmt::format("{}: '{}' is not one of adamw, lamb", flag, text));
}

void AdamWConfig::validate() const {
  MPT_INPUT_CHECK(std::isfinite(lr) && lr > 0.0f, "adamw: lr must be finite and > 0, got {}", lr);
  MPT_INPUT_CHECK(beta1 >= 0.0f && beta1 < 1.0f, "adamw: beta1 must be in [0, 1), got {}", beta1);
  MPT_INPUT_CHECK(beta2 >= 0.0f && beta2 < 1.0f, "adamw: beta2 must be in [0, 1), got {}", beta2);
  MPT_INPUT_CHECK(std::isfinite(eps) && eps > 0.0f, "adamw: eps must be finite and > 0, got {}", eps);
  MPT_INPUT_CHECK(std::isfinite(weight_decay) && weight_decay >= 0.0f,
                  "adamw: weight_decay must be finite and >= 0, got {}", weight_decay);
}

void LrSchedule::validate(float peak_lr) const {
  MPT_INPUT_CHECK(warmup_samples >= 0, "lr schedule: warmup_samples must be >= 0, got {}", warmup_samples);
  MPT_INPUT_CHECK(decay_samples >= 0, "lr schedule: decay_samples must be >= 0, got {}", decay_samples);
  MPT_INPUT_CHECK(decay_samples == 0 || decay_samples > warmup_samples,
                  "lr schedule: the warm-up ({} samples) must end before the decay ({} samples)",
                  warmup_samples, decay_samples);
  MPT_INPUT_CHECK(std::isfinite(min_lr) && min_lr >= 0.0f && min_lr <= peak_lr,
                  "lr schedule: min_lr must be in [0, lr={}], got {}", peak_lr, min_lr);
}

float LrSchedule::at(int64_t start, int64_t batch, float peak_lr) const {
  return common::lr_at(start, batch, peak_lr, warmup_samples, decay_samples,
                       min_lr);  // shared with the device
}

}  // namespace mpt
