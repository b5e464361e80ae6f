// Batch-size ramp-up (include/mptrain/batch_schedule.hpp).
#include "mptrain/batch_schedule.hpp"

#include <algorithm>
#include <charconv>

#include "mptrain/error.hpp"

namespace mpt {

BatchRampup parse_batch_rampup(const std::string& text) {
  BatchRampup r;
  if (text.empty()) return r;
  int64_t values[3] = {0, 0, 0};
  const char* p = text.data();
  const char* const end = text.data() + text.size();
  for (int k = 0; k < 3; ++k) {
    const auto [next, ec] = std::from_chars(p, end, values[k]);
    const bool separator_ok = k < 2 ? (next != end && *next == ',') : next == end;
    MPT_INPUT_CHECK(ec == std::errc() && next != p && separator_ok && values[k] >= 1,
                    "--batch-rampup '{}': expected START,INCREMENT,SAMPLES, three integers >= 1", text);
    p = next + (k < 2 ? 1 : 0);
  }
  r.start = values[0];
  r.increment = values[1];
  r.samples = values[2];
  return r;
}

BatchSchedule::BatchSchedule(int64_t global_batch, const BatchRampup& ramp)
    : global_batch_(global_batch), ramp_(ramp) {
  MPT_INPUT_CHECK(global_batch >= 1, "--global-batch must be >= 1, got {}", global_batch);
  if (!ramp.enabled()) return;
  MPT_INPUT_CHECK(ramp.increment >= 1 && ramp.samples >= 1,
                  "--batch-rampup: increment and samples must be >= 1, got {} and {}", ramp.increment,
                  ramp.samples);
  MPT_INPUT_CHECK(ramp.start < global_batch, "--batch-rampup: start {} must be below --global-batch {}",
                  ramp.start, global_batch);
  MPT_INPUT_CHECK((global_batch - ramp.start) % ramp.increment == 0,
                  "--batch-rampup: --global-batch {} minus start {} is not a multiple of the increment {}",
                  global_batch, ramp.start, ramp.increment);
  increments_ = (global_batch - ramp.start) / ramp.increment;
  MPT_INPUT_CHECK(increments_ <= (int64_t{1} << 20), "--batch-rampup: {} increments (more than 2^20)",
                  increments_);
  int64_t product = 0;
  MPT_INPUT_CHECK(!__builtin_mul_overflow(ramp.samples, increments_, &product),
                  "--batch-rampup: {} samples x {} increments overflows 64 bits", ramp.samples, increments_);
}

int64_t BatchSchedule::batch_at(int64_t consumed) const {
  if (!ramp_.enabled() || consumed >= ramp_.samples) return global_batch_;
  // floor(consumed / (samples / increments)) in exact integer arithmetic (consumed < samples, so the product
  // stays below samples x increments, checked at construction).
  const int64_t done = consumed * increments_ / ramp_.samples;
  return std::min(ramp_.start + ramp_.increment * done, global_batch_);
}

int64_t BatchSchedule::samples_before(int64_t step) const {
  MPT_CHECK(step >= 0, "samples_before: negative step {}", step);
  int64_t consumed = 0, s = 0;
  // The ramp level by level: level k (batch start + k x increment) lasts while consumed x n / samples
  // floors to k, that is while consumed < ceil((k + 1) x samples / n).
  for (int64_t k = 0; ramp_.enabled() && k < increments_ && s < step; ++k) {
    const int64_t batch = ramp_.start + k * ramp_.increment;
    const int64_t level_end = ((k + 1) * ramp_.samples + increments_ - 1) / increments_;
    if (consumed >= level_end) continue;  // a step of the level before jumped past this one
    const int64_t take = std::min((level_end - consumed + batch - 1) / batch, step - s);
    consumed += take * batch;
    s += take;
  }
  int64_t rest = 0;
  MPT_INPUT_CHECK(!__builtin_mul_overflow(step - s, global_batch_, &rest) &&
                      !__builtin_add_overflow(consumed, rest, &rest),
                  "--steps {} x --global-batch {}: the sample count overflows 64 bits", step, global_batch_);
  return rest;
}

std::vector<int64_t> BatchSchedule::batch_sizes() const {
  std::vector<int64_t> sizes;
  if (ramp_.enabled())
    for (int64_t b = ramp_.start; b < global_batch_; b += ramp_.increment) sizes.push_back(b);
  sizes.push_back(global_batch_);
  return sizes;
}

void BatchSchedule::check_divisible(int64_t micro_batch, int world_size) const {
  const int64_t per_step = micro_batch * world_size;
  for (const int64_t b : batch_sizes())
    MPT_INPUT_CHECK(b % per_step == 0, "{} {} is not divisible by --micro-batch {} x {} ranks = {}",
                    b == global_batch_ ? "--global-batch" : "--batch-rampup: the batch", b, micro_batch,
                    world_size, per_step);
}

}  // namespace mpt
