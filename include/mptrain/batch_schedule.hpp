// Batch-size ramp-up (GPT-3 appendix B; Megatron-LM's --rampup-batch-size): the global batch grows from
// `start` by `increment` sequences until it reaches the target global batch, spread evenly over the first
// `samples` samples, and stays there. The batch of a step is a function of the samples consumed before it,
// and those of the step number alone, so a resume on any number of ranks continues at the right batch size
// and data position.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace mpt {

/// --batch-rampup START,INCREMENT,SAMPLES. start == 0: no ramp-up.
struct BatchRampup {
  int64_t start = 0;      ///< first global batch (sequences)
  int64_t increment = 0;  ///< sequences added at each increase
  int64_t samples = 0;    ///< samples over which the batch reaches the target
  bool enabled() const { return start > 0; }
};

/// Parses "START,INCREMENT,SAMPLES" (three integers >= 1; "" gives no ramp-up). Throws mpt::InputError
/// naming --batch-rampup and the expected form otherwise.
BatchRampup parse_batch_rampup(const std::string& text);

class BatchSchedule {
 public:
  /// The schedule to `global_batch` (>= 1) with `ramp`. Throws mpt::InputError naming --batch-rampup when
  /// start >= global_batch or (global_batch - start) is not a multiple of the increment.
  BatchSchedule(int64_t global_batch, const BatchRampup& ramp);

  /// The global batch of the step that starts after `consumed` samples (Megatron's rule): while consumed <
  /// ramp samples, start + increment x floor(consumed / (samples / number of increments)); the target after.
  int64_t batch_at(int64_t consumed) const;
  /// Samples consumed by steps 0 .. step-1 (skipped steps included: they read their data too).
  int64_t samples_before(int64_t step) const;
  /// Every batch size the schedule uses, increasing (one entry without ramp-up).
  std::vector<int64_t> batch_sizes() const;
  /// Throws mpt::InputError naming the first batch size that micro_batch x world_size does not divide.
  void check_divisible(int64_t micro_batch, int world_size) const;

  int64_t global_batch() const { return global_batch_; }
  const BatchRampup& ramp() const { return ramp_; }

 private:
  int64_t global_batch_;
  BatchRampup ramp_;
  int64_t increments_ = 0;  // (global_batch - start) / increment
};

}  // namespace mpt
