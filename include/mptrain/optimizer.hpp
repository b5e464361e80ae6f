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

/// The learning-rate schedule, counted in samples (sequences) so that it ends exactly at the last sample
/// whatever the batch size does (common::lr_at): linear warm-up over `warmup_samples`, then cosine from lr
/// down to min_lr, reached by the step whose batch ends at `decay_samples`; min_lr after. decay_samples = 0
/// means constant after warm-up. Skipped steps do not advance it. With one sample per step it counts steps.
struct LrSchedule {
  int64_t warmup_samples = 0;
  int64_t decay_samples = 0;
  float min_lr = 0.0f;

  /// Throws mpt::InputError naming the first bad field.
  void validate(float peak_lr) const;
  /// Learning rate of the step that trains on samples (start, start + batch].
  float at(int64_t start, int64_t batch, float peak_lr) const;
};

}  // namespace mpt
