// Batch-size ramp-up and the sample-counted learning-rate schedule: Megatron's ramp rule, samples before a
// step against a step-by-step replay, the flag's parsing and errors, and the schedule ending exactly at the
// last sample of a ramped run.
#include <vector>

#include <gtest/gtest.h>

#include "mptrain/batch_schedule.hpp"
#include "mptrain/error.hpp"
#include "mptrain/optimizer.hpp"

namespace mpt {
namespace {

TEST(BatchSchedule, MegatronRampRule) {
  // 8 -> 16 in one increment over 160 samples: 20 steps of 8, then 16.
  const BatchSchedule one(16, {8, 8, 160});
  EXPECT_EQ(one.batch_at(0), 8);
  EXPECT_EQ(one.batch_at(152), 8);
  EXPECT_EQ(one.batch_at(160), 16);
  EXPECT_EQ(one.samples_before(20), 160);
  EXPECT_EQ(one.samples_before(100), 160 + 80 * 16);
  EXPECT_EQ(one.batch_sizes(), (std::vector<int64_t>{8, 16}));
  // 4 -> 16 in three increments over 100 samples (33.3 samples each): floor(consumed x 3 / 100).
  const BatchSchedule three(16, {4, 4, 100});
  EXPECT_EQ(three.batch_at(33), 4);
  EXPECT_EQ(three.batch_at(34), 8);
  EXPECT_EQ(three.batch_at(66), 8);
  EXPECT_EQ(three.batch_at(67), 12);
  EXPECT_EQ(three.batch_at(99), 12);
  EXPECT_EQ(three.batch_at(100), 16);
  EXPECT_EQ(three.batch_sizes(), (std::vector<int64_t>{4, 8, 12, 16}));
  // No ramp-up: the target from the start.
  const BatchSchedule none(32, {});
  EXPECT_EQ(none.batch_at(0), 32);
  EXPECT_EQ(none.samples_before(7), 7 * 32);
}

TEST(BatchSchedule, SamplesBeforeMatchesAReplay) {
  // The last two jump over ramp levels: a step of 8 (or 3) sequences passes several increments at once.
  for (const BatchRampup& ramp : {BatchRampup{4, 4, 100}, BatchRampup{2, 6, 1000}, BatchRampup{1, 1, 7},
                                  BatchRampup{8, 1, 20}, BatchRampup{3, 29, 5}}) {
    const BatchSchedule s(32, ramp);
    int64_t consumed = 0;
    for (int64_t step = 0; step < 200; ++step) {
      ASSERT_EQ(s.samples_before(step), consumed) << "step " << step;
      const int64_t b = s.batch_at(consumed);
      ASSERT_GE(b, ramp.start);
      ASSERT_LE(b, 32);
      consumed += b;
    }
  }
}

TEST(BatchSchedule, FlagErrors) {
  EXPECT_EQ(parse_batch_rampup("").start, 0);
  const BatchRampup r = parse_batch_rampup("8,8,160");
  EXPECT_EQ(r.start, 8);
  EXPECT_EQ(r.increment, 8);
  EXPECT_EQ(r.samples, 160);
  for (const char* bad :
       {"8,8", "8,8,160,1", "8;8;160", "a,8,160", "0,8,160", "8,-8,160", "8,8,160x", ",8,160"})
    EXPECT_THROW(parse_batch_rampup(bad), InputError) << bad;
  EXPECT_THROW(BatchSchedule(16, {16, 8, 160}), InputError);  // start not below the target
  EXPECT_THROW(BatchSchedule(16, {6, 4, 160}), InputError);   // 10 is not a multiple of 4
  // Every batch of the ramp must be divisible by micro-batch x ranks; the error names the batch.
  const BatchSchedule s(32, {8, 4, 100});  // 8, 12, 16, ..., 32
  EXPECT_NO_THROW(s.check_divisible(2, 2));
  try {
    s.check_divisible(4, 2);
    FAIL() << "12 is not divisible by 8";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("batch 12 "), std::string::npos) << e.what();
  }
}

// 100 steps, global batch 16, ramp 8,8,160 and a warm-up of 80 samples: the schedule counts samples, so the
// warm-up ends with step 10 (10 x 8 samples) and the LR reaches its minimum exactly at the final step.
TEST(BatchSchedule, LearningRateEndsAtTheLastSample) {
  const BatchSchedule s(16, {8, 8, 160});
  LrSchedule lr;
  lr.warmup_samples = 80;
  lr.decay_samples = s.samples_before(100);
  lr.min_lr = 1e-4f;
  const float peak = 1e-3f;
  ASSERT_EQ(lr.decay_samples, 1440);
  std::vector<float> rates;
  for (int64_t step = 0; step < 100; ++step) {
    const int64_t start = s.samples_before(step);
    rates.push_back(lr.at(start, s.batch_at(start), peak));
  }
  EXPECT_FLOAT_EQ(rates[0], peak * 8 / 80);
  EXPECT_EQ(rates[9], peak);  // the step that ends at sample 80
  EXPECT_LT(rates[10], peak);
  EXPECT_GT(rates[98], lr.min_lr);
  EXPECT_EQ(rates[99], lr.min_lr);
  for (size_t k = 10; k < rates.size(); ++k) EXPECT_LE(rates[k], rates[k - 1]);
  // With one sample per step the schedule counts steps: warm-up (step + 1) / warmup as before.
  LrSchedule steps;
  steps.warmup_samples = 4;
  steps.decay_samples = 10;
  EXPECT_FLOAT_EQ(steps.at(0, 1, peak), peak / 4);
  EXPECT_EQ(steps.at(3, 1, peak), peak);
  EXPECT_EQ(steps.at(9, 1, peak), 0.0f);
}

}  // namespace
}  // namespace mpt
