// Optimizer settings: AdamW hyper-parameters and the learning-rate schedule (linear warm-up, then cosine
// decay to a minimum, as in GPT-2/GPT-3 training and llm.c).
#pragma once

#include <cstdint>
#include <string>

namespace mpt {

/// The update rule of phase 6.
enum class OptimizerKind : uint8_t {
  adamw,  ///< torch.optim.AdamW
  lamb,   ///< LAMB (You et al. 2019, Algorithm 2) with whole-tensor trust ratios (kernels/common/lamb.hpp)
};

/// "adamw" / "lamb".
const char* optimizer_name(OptimizerKind kind);
/// Parses "adamw" or "lamb"; throws mpt::InputError naming `flag` otherwise.
OptimizerKind parse_optimizer(const std::string& text, const char* flag);

/// torch.optim.AdamW hyper-parameters (its defaults, except weight_decay 0.1 as in GPT-3 training).
struct AdamWConfig {
  float lr = 1e-3f;  ///< peak learning rate
  float beta1 = 0.9f;
  float beta2 = 0.999f;
  float eps = 1e-8f;
  float weight_decay = 0.1f;  ///< decoupled; only tensors marked `decay`

  /// Throws mpt::InputError naming the first bad field.
  void validate() const;
};

/// lr(step) for step = number of optimizer steps already applied (skipped steps do not count):
/// warm-up: lr * (step + 1) / warmup_steps for step < warmup_steps; then cosine from lr down to min_lr over
/// [warmup_steps, decay_steps); min_lr from decay_steps on. decay_steps = 0 means constant after warm-up.
struct LrSchedule {
  int64_t warmup_steps = 0;
  int64_t decay_steps = 0;
  float min_lr = 0.0f;

  /// Throws mpt::InputError naming the first bad field.
  void validate(float peak_lr) const;
  /// Learning rate of the step that follows `step` applied steps.
  float at(int64_t step, float peak_lr) const;
};

}  // namespace mpt
