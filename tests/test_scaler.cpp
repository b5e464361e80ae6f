// Tests of the loss-scaler state machine (src/scaler.cpp).
//
// Each rule is a table: a config, a sequence of found_inf flags ('x' = overflow, '.' = clean step) and the
// state expected after chosen steps. On top of the tables, the scaler is replayed against two independent
// reference models written here from the upstream formulas (PyTorch's _amp_update_scale_ and Megatron-LM's
// DynamicGradScaler.update) over random flag sequences, so that the tables are not the only witness.
#include "mptrain/scaler.hpp"

#include <gtest/gtest.h>

#include <bit>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <map>
#include <optional>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "common/amp_state.hpp"
#include "mptrain/backend.hpp"
#include "mptrain/error.hpp"

namespace {

using mpt::DynamicLossScaler;
using mpt::LossScalerConfig;
using mpt::LossScalerState;

std::string clean(int64_t n) {
  return std::string(static_cast<size_t>(n), '.');
}
std::string infs(int64_t n) {
  return std::string(static_cast<size_t>(n), 'x');
}

constexpr float kTwoPow127 = 0x1p127f;
constexpr float kTwoPow126 = 0x1p126f;
constexpr int64_t kNeverStop = std::numeric_limits<int64_t>::max();

// Bit equality, so that a scale that differs in the last place (or -0 vs 0) fails loudly.
::testing::AssertionResult same_float(float expected, float actual) {
  if (std::bit_cast<uint32_t>(expected) == std::bit_cast<uint32_t>(actual)) {
    return ::testing::AssertionSuccess();
  }
  return ::testing::AssertionFailure() << "expected " << fmt::format("{} ({:a})", expected, expected)
                                       << ", got " << fmt::format("{} ({:a})", actual, actual);
}

// Every table row carries its own name, which becomes the test's name.
template <typename Row>
std::string row_name(const ::testing::TestParamInfo<Row>& param_info) {
  return param_info.param.name;
}

// ---------------------------------------------------------------------------------------------------------
// The state after chosen steps.

struct Check {
  int64_t after_step;  // 1-based: the state once this many updates have run
  float scale;
  int64_t growth_tracker;
  int64_t hysteresis_left;
  int64_t skipped;
};

struct RuleRow {
  const char* name;
  LossScalerConfig config;
  std::string flags;
  std::vector<Check> checks;  // ascending after_step, each <= flags.size()
};

void PrintTo(const RuleRow& row, std::ostream* os) {
  *os << row.name;
}

class ScalerRule : public ::testing::TestWithParam<RuleRow> {};

TEST_P(ScalerRule, StateAfterEachCheckedStep) {
  const RuleRow& row = GetParam();
  DynamicLossScaler scaler(row.config);
  size_t next_check = 0;
  for (size_t i = 0; i < row.flags.size(); ++i) {
    const bool found_inf = row.flags[i] == 'x';
    ASSERT_EQ(scaler.update(found_inf), found_inf) << "step " << i + 1 << " must be skipped iff found_inf";
    const auto step = static_cast<int64_t>(i + 1);
    ASSERT_EQ(scaler.state().steps, step);
    if (next_check < row.checks.size() && row.checks[next_check].after_step == step) {
      const Check& c = row.checks[next_check++];
      SCOPED_TRACE(fmt::format("after step {}", step));
      EXPECT_TRUE(same_float(c.scale, scaler.scale()));
      EXPECT_EQ(scaler.state().growth_tracker, c.growth_tracker);
      EXPECT_EQ(scaler.state().hysteresis_left, c.hysteresis_left);
      EXPECT_EQ(scaler.state().skipped_steps, c.skipped);
    }
  }
  EXPECT_EQ(next_check, row.checks.size()) << "a check names a step the flag sequence never reaches";
}

INSTANTIATE_TEST_SUITE_P(
    Tables, ScalerRule,
    ::testing::Values(
        // PyTorch defaults: 2^16, growth x2 after exactly 2000 clean steps, backoff x0.5.
        RuleRow{"pytorch_growth_after_exactly_2000_clean_steps",
                {},
                clean(2001),
                {{1, 65536.0f, 1, 1, 0},
                 {1999, 65536.0f, 1999, 1, 0},
                 {2000, 131072.0f, 0, 1, 0},
                 {2001, 131072.0f, 1, 1, 0}}},
        RuleRow{"pytorch_second_growth",
                {},
                clean(4000),
                {{3999, 131072.0f, 1999, 1, 0}, {4000, 262144.0f, 0, 1, 0}}},
        RuleRow{"pytorch_backoff_halves_and_resets_tracker",
                {},
                clean(5) + "xx",
                {{5, 65536.0f, 5, 1, 0}, {6, 32768.0f, 0, 0, 1}, {7, 16384.0f, 0, 0, 2}}},
        RuleRow{"pytorch_overflow_restarts_the_interval",
                {},
                clean(1999) + "x" + clean(2000),
                {{1999, 65536.0f, 1999, 1, 0},
                 {2000, 32768.0f, 0, 0, 1},
                 {3999, 32768.0f, 1999, 0, 1},
                 {4000, 65536.0f, 0, 1, 1}}},
        RuleRow{"pytorch_growth_then_backoff",
                {},
                clean(2000) + "x" + clean(1),
                {{2000, 131072.0f, 0, 1, 0}, {2001, 65536.0f, 0, 0, 1}, {2002, 65536.0f, 1, 0, 1}}},

        // Growth is never applied when the result would leave FP32's finite range; the tracker resets anyway.
        RuleRow{"growth_capped_at_2pow127",
                {.init_scale = kTwoPow127, .growth_interval = 3},
                clean(6) + "x",
                {{1, kTwoPow127, 1, 1, 0},
                 {3, kTwoPow127, 0, 1, 0},
                 {4, kTwoPow127, 1, 1, 0},
                 {6, kTwoPow127, 0, 1, 0},
                 {7, kTwoPow126, 0, 0, 1}}},
        RuleRow{"growth_reaches_2pow127_then_stops",
                {.init_scale = kTwoPow126, .growth_interval = 1},
                clean(3),
                {{1, kTwoPow127, 0, 1, 0}, {2, kTwoPow127, 0, 1, 0}, {3, kTwoPow127, 0, 1, 0}}},
        RuleRow{"growth_capped_at_flt_max",
                {.init_scale = FLT_MAX, .growth_interval = 1},
                clean(2),
                {{1, FLT_MAX, 0, 1, 0}, {2, FLT_MAX, 0, 1, 0}}},
        // 1.5 * 2^127 is still finite, 2.25 * 2^127 is not.
        RuleRow{"growth_factor_1_5_near_the_top",
                {.init_scale = kTwoPow127, .growth_factor = 1.5f, .growth_interval = 1},
                clean(2),
                {{1, 0x1.8p127f, 0, 1, 0}, {2, 0x1.8p127f, 0, 1, 0}}},

        // Megatron-LM hysteresis: the first H-1 overflows do not back off; once spent, every overflow backs
        // off (a backoff does not refill it, nor does a clean step) until a growth refills it.
        RuleRow{"megatron_hysteresis_2",
                {.init_scale = 1024.0f, .growth_interval = 4, .hysteresis = 2},
                "xxx.x....xx",
                {{1, 1024.0f, 0, 1, 1},
                 {2, 512.0f, 0, 0, 2},
                 {3, 256.0f, 0, 0, 3},
                 {4, 256.0f, 1, 0, 3},
                 {5, 128.0f, 0, 0, 4},
                 {6, 128.0f, 1, 0, 4},
                 {8, 128.0f, 3, 0, 4},
                 {9, 256.0f, 0, 2, 4},
                 {10, 256.0f, 0, 1, 5},
                 {11, 128.0f, 0, 0, 6}}},
        RuleRow{"megatron_hysteresis_3",
                {.init_scale = 1024.0f, .growth_interval = 4, .hysteresis = 3},
                "xxxx....xxx",
                {{1, 1024.0f, 0, 2, 1},
                 {2, 1024.0f, 0, 1, 2},
                 {3, 512.0f, 0, 0, 3},
                 {4, 256.0f, 0, 0, 4},
                 {7, 256.0f, 3, 0, 4},
                 {8, 512.0f, 0, 3, 4},
                 {9, 512.0f, 0, 2, 5},
                 {10, 512.0f, 0, 1, 6},
                 {11, 256.0f, 0, 0, 7}}},
        // An overflow in the middle of a hysteresis window still restarts the growth interval.
        RuleRow{"hysteresis_overflow_resets_tracker",
                {.init_scale = 1024.0f, .growth_interval = 3, .hysteresis = 2},
                "..x...",
                {{2, 1024.0f, 2, 2, 0}, {3, 1024.0f, 0, 1, 1}, {5, 1024.0f, 2, 1, 1}, {6, 2048.0f, 0, 2, 1}}},

        // DeepSpeed consecutive_hysteresis: any clean step refills, so isolated overflows never back off.
        RuleRow{
            "consecutive_hysteresis_2",
            {.init_scale = 1024.0f, .growth_interval = 4, .hysteresis = 2, .consecutive_hysteresis = true},
            "x.x.xxx.x",
            {{1, 1024.0f, 0, 1, 1},
             {2, 1024.0f, 1, 2, 1},
             {3, 1024.0f, 0, 1, 2},
             {4, 1024.0f, 1, 2, 2},
             {5, 1024.0f, 0, 1, 3},
             {6, 512.0f, 0, 0, 4},
             {7, 256.0f, 0, 0, 5},
             {8, 256.0f, 1, 2, 5},
             {9, 256.0f, 0, 1, 6}}},

        // min_scale: backoff clamps there, growth still works from there.
        RuleRow{"min_scale_clamps_backoff",
                {.init_scale = 8.0f, .min_scale = 2.0f},
                "xxxx.",
                {{1, 4.0f, 0, 0, 1},
                 {2, 2.0f, 0, 0, 2},
                 {3, 2.0f, 0, 0, 3},
                 {4, 2.0f, 0, 0, 4},
                 {5, 2.0f, 1, 0, 4}}},
        RuleRow{"min_scale_clamp_not_a_power_of_two",
                {.init_scale = 10.0f, .growth_interval = 2, .min_scale = 3.0f},
                "xxx..",
                {{1, 5.0f, 0, 0, 1}, {2, 3.0f, 0, 0, 2}, {3, 3.0f, 0, 0, 3}, {5, 6.0f, 0, 1, 3}}},
        RuleRow{"min_scale_clamps_backoff_0_3",
                {.init_scale = 2.0f, .backoff_factor = 0.3f, .min_scale = 1.0f},
                "x",
                {{1, 1.0f, 0, 0, 1}}},
        // min_scale 0 still never lets the scale go subnormal (1/scale must stay finite).
        RuleRow{"min_scale_zero_floors_at_flt_min",
                {.init_scale = 4 * FLT_MIN, .min_scale = 0.0f, .max_overflows_at_min_scale = kNeverStop},
                "xxx",
                {{1, 2 * FLT_MIN, 0, 0, 1}, {2, FLT_MIN, 0, 0, 2}, {3, FLT_MIN, 0, 0, 3}}},

        // Static: the scale is init_scale forever; overflowing steps are skipped and counted.
        RuleRow{
            "static_scale_never_changes",
            {.dynamic = false, .init_scale = 1024.0f, .growth_interval = 2},
            "x...x" + clean(10),
            {{1, 1024.0f, 0, 1, 1}, {4, 1024.0f, 0, 1, 1}, {5, 1024.0f, 0, 1, 2}, {15, 1024.0f, 0, 1, 2}}},
        RuleRow{"static_ignores_hysteresis",
                {.dynamic = false, .init_scale = 3.0f, .hysteresis = 3},
                "xx.x",
                {{2, 3.0f, 0, 3, 2}, {4, 3.0f, 0, 3, 3}}},

        // Disabled: scale 1 whatever init_scale says; overflowing steps are still skipped.
        RuleRow{"disabled_scale_is_one",
                {.enabled = false, .init_scale = 65536.0f},
                "x..x" + clean(2000),
                {{1, 1.0f, 0, 1, 1}, {4, 1.0f, 0, 1, 2}, {2004, 1.0f, 0, 1, 2}}}),
    row_name<RuleRow>);

TEST(Scaler, DisabledInvScaleIsOne) {
  DynamicLossScaler scaler(LossScalerConfig{.enabled = false, .init_scale = 1024.0f});
  EXPECT_EQ(scaler.scale(), 1.0f);
  EXPECT_EQ(scaler.inv_scale(), 1.0f);
}

TEST(Scaler, StartsFromConfig) {
  const DynamicLossScaler scaler(LossScalerConfig{.init_scale = 512.0f, .hysteresis = 4});
  const LossScalerState expected{.scale = 512.0f, .growth_tracker = 0, .hysteresis_left = 4};
  EXPECT_EQ(scaler.state(), expected);
  EXPECT_EQ(scaler.inv_scale(), 1.0f / 512.0f);
}

// ---------------------------------------------------------------------------------------------------------
// The stop after max_overflows_at_min_scale consecutive overflows at the minimum.

struct StopRow {
  const char* name;
  LossScalerConfig config;
  std::string flags;
  int64_t throws_at;                       // 1-based step that must throw; 0: none may
  int64_t overflows_at_min_after;          // when nothing throws: the count after the last step
  std::vector<std::string> message_parts;  // when it throws: substrings of what()
};

void PrintTo(const StopRow& row, std::ostream* os) {
  *os << row.name;
}

class ScalerStop : public ::testing::TestWithParam<StopRow> {};

TEST_P(ScalerStop, ThrowsExactlyWhenTheCountIsReached) {
  const StopRow& row = GetParam();
  if (row.throws_at != 0) {
    ASSERT_EQ(static_cast<int64_t>(row.flags.size()), row.throws_at) << "table row must end at the throw";
  }
  DynamicLossScaler scaler(row.config);
  for (size_t i = 0; i < row.flags.size(); ++i) {
    const auto step = static_cast<int64_t>(i + 1);
    const bool found_inf = row.flags[i] == 'x';
    if (step != row.throws_at) {
      EXPECT_NO_THROW(scaler.update(found_inf)) << "step " << step;
      continue;
    }
    const LossScalerState before = scaler.state();
    try {
      scaler.update(found_inf);
      ADD_FAILURE() << "step " << step << " did not throw";
    } catch (const mpt::NumericsError& e) {
      const std::string what = e.what();
      EXPECT_EQ(what.find('\n'), std::string::npos) << "one line: " << what;
      for (const auto& part : row.message_parts) {
        EXPECT_NE(what.find(part), std::string::npos) << "'" << part << "' missing from: " << what;
      }
    }
    // The state is updated before the throw.
    EXPECT_EQ(scaler.state().steps, before.steps + 1);
    EXPECT_EQ(scaler.state().skipped_steps, before.skipped_steps + 1);
    EXPECT_EQ(scaler.state().overflows_at_min, row.config.max_overflows_at_min_scale);
    return;
  }
  EXPECT_EQ(scaler.state().overflows_at_min, row.overflows_at_min_after);
}

INSTANTIATE_TEST_SUITE_P(
    Tables, ScalerStop,
    ::testing::Values(
        // 4 -> 2 -> 1 do not count (the scale was above the minimum), then three overflows at 1.
        StopRow{"dynamic_one_step_before",
                {.init_scale = 4.0f, .max_overflows_at_min_scale = 3},
                "xxxx",
                0,
                2,
                {}},
        StopRow{"dynamic_at_the_count",
                {.init_scale = 4.0f, .max_overflows_at_min_scale = 3},
                "xxxxx",
                5,
                0,
                {"minimum 1:", "3 consecutive steps overflowed"}},
        StopRow{"default_limit_nine_is_fine", {.init_scale = 1.0f}, infs(9), 0, 9, {}},
        StopRow{"default_limit_ten_stops",
                {.init_scale = 1.0f},
                infs(10),
                10,
                0,
                {"loss scale stuck at its minimum 1: 10 consecutive steps overflowed (inf/NaN gradients)"}},
        StopRow{"clean_step_resets_the_count",
                {.init_scale = 1.0f, .max_overflows_at_min_scale = 3},
                "xx.xx",
                0,
                2,
                {}},
        StopRow{"clean_step_then_full_count",
                {.init_scale = 1.0f, .max_overflows_at_min_scale = 3},
                "xx.xxx",
                6,
                0,
                {"3 consecutive"}},
        // Growth lifts the scale above the minimum; the overflow there backs it off and does not count.
        StopRow{"overflow_above_min_does_not_count",
                {.init_scale = 1.0f, .growth_interval = 1, .max_overflows_at_min_scale = 2},
                "x.xx",
                0,
                1,
                {}},
        StopRow{"overflow_above_min_then_count",
                {.init_scale = 1.0f, .growth_interval = 1, .max_overflows_at_min_scale = 2},
                "x.xxx",
                5,
                0,
                {"2 consecutive"}},
        // Hysteresis keeps the scale where it is, which is still the minimum.
        StopRow{"hysteresis_at_min_counts",
                {.init_scale = 1.0f, .hysteresis = 2, .max_overflows_at_min_scale = 2},
                "xx",
                2,
                0,
                {"minimum 1:"}},
        StopRow{"limit_one",
                {.init_scale = 2.0f, .max_overflows_at_min_scale = 1},
                "xx",
                2,
                0,
                {"1 consecutive"}},
        StopRow{"custom_min_scale",
                {.init_scale = 16.0f, .min_scale = 4.0f, .max_overflows_at_min_scale = 2},
                "xxxx",
                4,
                0,
                {"minimum 4:", "2 consecutive"}},
        StopRow{"zero_min_scale_stops_at_flt_min",
                {.init_scale = 2 * FLT_MIN, .min_scale = 0.0f, .max_overflows_at_min_scale = 2},
                "xxx",
                3,
                0,
                {fmt::format("minimum {}:", FLT_MIN)}},
        // Static and disabled scalers cannot back off: every overflow counts.
        StopRow{"static_every_overflow_counts",
                {.dynamic = false, .init_scale = 1024.0f, .max_overflows_at_min_scale = 3},
                "xxx",
                3,
                0,
                {"static loss scale 1024:", "3 consecutive"}},
        StopRow{"static_clean_step_resets",
                {.dynamic = false, .init_scale = 1024.0f, .max_overflows_at_min_scale = 3},
                "xx.xx",
                0,
                2,
                {}},
        StopRow{"disabled_every_overflow_counts",
                {.enabled = false, .max_overflows_at_min_scale = 2},
                "x.xx",
                4,
                0,
                {"scale 1", "2 consecutive"}}),
    row_name<StopRow>);

// The one case no flag sequence reaches: a count > 0 while the scale sits above the minimum (a restored
// checkpoint under a lower min_scale). An overflow there resets the count.
TEST(ScalerStopRestored, OverflowAboveMinResetsTheCount) {
  DynamicLossScaler scaler(LossScalerConfig{.init_scale = 4.0f, .max_overflows_at_min_scale = 3});
  auto fields = scaler.serialize();
  fields["scaler.overflows_at_min"] = "2";
  scaler.deserialize(fields);
  EXPECT_NO_THROW(scaler.update(true));
  EXPECT_EQ(scaler.state().overflows_at_min, 0);
  EXPECT_EQ(scaler.scale(), 2.0f);
}

// ---------------------------------------------------------------------------------------------------------
// validate(): each bad field is named with its value.

struct BadConfigRow {
  const char* name;
  std::function<void(LossScalerConfig&)> mutate;
  std::string field;
  std::string value_text;
};

void PrintTo(const BadConfigRow& row, std::ostream* os) {
  *os << row.name;
}

class ScalerValidate : public ::testing::TestWithParam<BadConfigRow> {};

TEST_P(ScalerValidate, RejectsNamingFieldAndValue) {
  const BadConfigRow& row = GetParam();
  LossScalerConfig config;
  row.mutate(config);
  const std::string prefix = "loss scaler: " + row.field + " ";
  try {
    config.validate();
    ADD_FAILURE() << "validate() accepted it";
  } catch (const mpt::InputError& e) {
    const std::string what = e.what();
    EXPECT_EQ(what.rfind(prefix, 0), 0u) << what;
    EXPECT_NE(what.find("got " + row.value_text), std::string::npos) << what;
  }
  EXPECT_THROW(DynamicLossScaler{config}, mpt::InputError);
}

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

INSTANTIATE_TEST_SUITE_P(
    Tables, ScalerValidate,
    ::testing::Values(
        BadConfigRow{"init_scale_zero", [](auto& c) { c.init_scale = 0.0f; }, "init_scale", "0"},
        BadConfigRow{"init_scale_negative", [](auto& c) { c.init_scale = -1.0f; }, "init_scale", "-1"},
        BadConfigRow{"init_scale_inf", [](auto& c) { c.init_scale = kInf; }, "init_scale", "inf"},
        BadConfigRow{"init_scale_nan", [](auto& c) { c.init_scale = kNaN; }, "init_scale", "nan"},
        BadConfigRow{"growth_factor_one", [](auto& c) { c.growth_factor = 1.0f; }, "growth_factor", "1"},
        BadConfigRow{"growth_factor_half", [](auto& c) { c.growth_factor = 0.5f; }, "growth_factor", "0.5"},
        BadConfigRow{"growth_factor_inf", [](auto& c) { c.growth_factor = kInf; }, "growth_factor", "inf"},
        BadConfigRow{"growth_factor_nan", [](auto& c) { c.growth_factor = kNaN; }, "growth_factor", "nan"},
        BadConfigRow{"backoff_factor_above_one", [](auto& c) { c.backoff_factor = 1.5f; }, "backoff_factor",
                     "1.5"},
        BadConfigRow{"backoff_factor_one", [](auto& c) { c.backoff_factor = 1.0f; }, "backoff_factor", "1"},
        BadConfigRow{"backoff_factor_zero", [](auto& c) { c.backoff_factor = 0.0f; }, "backoff_factor", "0"},
        BadConfigRow{"backoff_factor_negative", [](auto& c) { c.backoff_factor = -0.5f; }, "backoff_factor",
                     "-0.5"},
        BadConfigRow{"backoff_factor_nan", [](auto& c) { c.backoff_factor = kNaN; }, "backoff_factor", "nan"},
        BadConfigRow{"growth_interval_zero", [](auto& c) { c.growth_interval = 0; }, "growth_interval", "0"},
        BadConfigRow{"growth_interval_negative", [](auto& c) { c.growth_interval = -3; }, "growth_interval",
                     "-3"},
        BadConfigRow{"hysteresis_zero", [](auto& c) { c.hysteresis = 0; }, "hysteresis", "0"},
        BadConfigRow{"hysteresis_negative", [](auto& c) { c.hysteresis = -1; }, "hysteresis", "-1"},
        BadConfigRow{"min_scale_negative", [](auto& c) { c.min_scale = -1.0f; }, "min_scale", "-1"},
        BadConfigRow{"min_scale_inf", [](auto& c) { c.min_scale = kInf; }, "min_scale", "inf"},
        BadConfigRow{"min_scale_nan", [](auto& c) { c.min_scale = kNaN; }, "min_scale", "nan"},
        BadConfigRow{"min_scale_above_init_scale", [](auto& c) { c.min_scale = 70000.0f; }, "min_scale",
                     "70000"},
        BadConfigRow{"max_overflows_zero", [](auto& c) { c.max_overflows_at_min_scale = 0; },
                     "max_overflows_at_min_scale", "0"},
        BadConfigRow{"max_overflows_negative", [](auto& c) { c.max_overflows_at_min_scale = -2; },
                     "max_overflows_at_min_scale", "-2"},
        // Every field is checked whatever the mode, so a typo surfaces before the mode is switched on.
        BadConfigRow{"disabled_still_checks_backoff",
                     [](auto& c) {
                       c.enabled = false;
                       c.backoff_factor = 2.0f;
                     },
                     "backoff_factor", "2"},
        BadConfigRow{"static_still_checks_init_scale",
                     [](auto& c) {
                       c.dynamic = false;
                       c.init_scale = -4.0f;
                     },
                     "init_scale", "-4"}),
    row_name<BadConfigRow>);

TEST(ScalerValidateGood, AcceptsBoundaryValues) {
  const std::vector<LossScalerConfig> good = {
      {},
      {.min_scale = 65536.0f},                                   // min_scale == init_scale
      {.min_scale = 0.0f},                                       // no floor beyond FLT_MIN
      {.init_scale = FLT_MAX, .growth_factor = FLT_MAX},         // largest finite values
      {.backoff_factor = 0x1.fffffep-1f, .growth_interval = 1},  // just below 1
      {.dynamic = false, .init_scale = 0.5f},                    // static below min_scale: its own choice
      {.enabled = false, .init_scale = 0.25f},
      {.max_overflows_at_min_scale = 1},
  };
  for (const auto& config : good) EXPECT_NO_THROW(config.validate());
}

// ---------------------------------------------------------------------------------------------------------
// serialize()/deserialize().

TEST(ScalerSerialize, KeysAndTextOfTheDefaultState) {
  const DynamicLossScaler scaler;
  const std::map<std::string, std::string> expected = {
      {"scaler.scale", "65536"},        {"scaler.growth_tracker", "0"}, {"scaler.hysteresis_left", "1"},
      {"scaler.overflows_at_min", "0"}, {"scaler.steps", "0"},          {"scaler.skipped_steps", "0"},
  };
  EXPECT_EQ(scaler.serialize(), expected);
}

struct RoundTripRow {
  const char* name;
  LossScalerConfig config;
  std::string flags;
};

void PrintTo(const RoundTripRow& row, std::ostream* os) {
  *os << row.name;
}

class ScalerRoundTrip : public ::testing::TestWithParam<RoundTripRow> {};

// After every step, a fresh scaler restored from the strings holds the identical state (scale bit for bit),
// and both then produce identical states on the rest of the sequence.
TEST_P(ScalerRoundTrip, ExactAtEveryStep) {
  const RoundTripRow& row = GetParam();
  DynamicLossScaler original(row.config);
  for (size_t i = 0; i < row.flags.size(); ++i) {
    original.update(row.flags[i] == 'x');
    DynamicLossScaler restored(row.config);
    restored.deserialize(original.serialize());
    ASSERT_TRUE(same_float(original.scale(), restored.scale())) << "after step " << i + 1;
    ASSERT_EQ(original.state(), restored.state()) << "after step " << i + 1;
    if (i == row.flags.size() / 2) {
      DynamicLossScaler twin = original;
      for (size_t j = i + 1; j < row.flags.size(); ++j) {
        twin.update(row.flags[j] == 'x');
        restored.update(row.flags[j] == 'x');
        ASSERT_EQ(twin.state(), restored.state()) << "continuing at step " << j + 1;
      }
    }
  }
}

std::string random_flags(uint64_t seed, size_t length, double p_inf) {
  std::mt19937_64 rng(seed);
  std::bernoulli_distribution overflow(p_inf);
  std::string flags;
  for (size_t i = 0; i < length; ++i) flags += overflow(rng) ? 'x' : '.';
  return flags;
}

INSTANTIATE_TEST_SUITE_P(
    Tables, ScalerRoundTrip,
    ::testing::Values(
        // 3^k * 65536: exact up to k = 15, then rounded mantissas that need all 9 significant digits.
        RoundTripRow{"growth_factor_3", {.growth_factor = 3.0f, .growth_interval = 1}, clean(60)},
        // 0.3^k * 65536: long mantissas, down to the FLT_MIN floor that min_scale 0 leaves.
        RoundTripRow{"backoff_0_3",
                     {.backoff_factor = 0.3f, .min_scale = 0.0f, .max_overflows_at_min_scale = kNeverStop},
                     infs(90)},
        RoundTripRow{"mixed_hysteresis",
                     {.growth_factor = 1.5f,
                      .backoff_factor = 0.3f,
                      .growth_interval = 3,
                      .hysteresis = 2,
                      .min_scale = 0.0f,
                      .max_overflows_at_min_scale = kNeverStop},
                     random_flags(7, 400, 0.3)},
        RoundTripRow{"static", {.dynamic = false, .init_scale = 0.1f}, "x..x.x"},
        RoundTripRow{"disabled", {.enabled = false}, ".x.xx."}),
    row_name<RoundTripRow>);

TEST(ScalerSerialize, ScaleTextIsShortest) {
  DynamicLossScaler scaler(LossScalerConfig{.backoff_factor = 0.3f});
  scaler.update(true);
  EXPECT_EQ(scaler.serialize().at("scaler.scale"), fmt::format("{}", 65536.0f * 0.3f));
  EXPECT_EQ(scaler.serialize().at("scaler.scale"), "19660.8");
}

TEST(ScalerSerialize, IgnoresUnrelatedKeys) {
  DynamicLossScaler source;
  source.update(true);
  auto fields = source.serialize();
  fields["model.n_layer"] = "12";
  fields["scaler_note"] = "not ours";
  DynamicLossScaler restored;
  restored.deserialize(fields);
  EXPECT_EQ(restored.state(), source.state());
}

// A static or disabled scale comes from the config; only the counters come from the checkpoint.
TEST(ScalerSerialize, StaticAndDisabledKeepTheirScale) {
  DynamicLossScaler dynamic;
  for (const char flag : std::string("x..x.")) dynamic.update(flag == 'x');
  ASSERT_EQ(dynamic.scale(), 16384.0f);

  DynamicLossScaler fixed(LossScalerConfig{.dynamic = false, .init_scale = 1024.0f});
  fixed.deserialize(dynamic.serialize());
  EXPECT_EQ(fixed.scale(), 1024.0f);
  EXPECT_EQ(fixed.state().steps, 5);
  EXPECT_EQ(fixed.state().skipped_steps, 2);

  DynamicLossScaler off(LossScalerConfig{.enabled = false});
  off.deserialize(dynamic.serialize());
  EXPECT_EQ(off.scale(), 1.0f);
  EXPECT_EQ(off.state().steps, 5);
}

// Resuming with a shorter growth_interval than the tracker already counted grows on the next clean step
// instead of never again.
TEST(ScalerSerialize, TrackerBeyondANewShorterIntervalGrowsNext) {
  DynamicLossScaler long_interval;
  for (int i = 0; i < 500; ++i) long_interval.update(false);
  DynamicLossScaler short_interval(LossScalerConfig{.growth_interval = 100});
  short_interval.deserialize(long_interval.serialize());
  EXPECT_EQ(short_interval.state().growth_tracker, 500);
  short_interval.update(false);
  EXPECT_EQ(short_interval.scale(), 131072.0f);
  EXPECT_EQ(short_interval.state().growth_tracker, 0);
}

struct BadFieldRow {
  const char* name;
  std::string key;
  std::optional<std::string> text;  // nullopt: the key is missing
};

void PrintTo(const BadFieldRow& row, std::ostream* os) {
  *os << row.name;
}

class ScalerDeserialize : public ::testing::TestWithParam<BadFieldRow> {};

TEST_P(ScalerDeserialize, RejectsNamingKeyAndTextAndKeepsState) {
  const BadFieldRow& row = GetParam();
  DynamicLossScaler source;
  for (const char flag : std::string("..x.x..")) source.update(flag == 'x');
  auto fields = source.serialize();
  if (row.text) {
    fields[row.key] = *row.text;
  } else {
    fields.erase(row.key);
  }

  DynamicLossScaler target(LossScalerConfig{.init_scale = 8.0f});
  target.update(false);
  const LossScalerState before = target.state();
  try {
    target.deserialize(fields);
    ADD_FAILURE() << "deserialize() accepted it";
  } catch (const mpt::InputError& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find(row.key), std::string::npos) << what;
    if (row.text) {
      // The message shows the text escaped (a newline as \n), keeping the error on one line.
      const std::string quoted = fmt::format("{:?}", *row.text);
      EXPECT_NE(what.find(quoted.substr(1, quoted.size() - 2)), std::string::npos) << what;
    }
    EXPECT_EQ(what.find('\n'), std::string::npos) << what;
  }
  EXPECT_EQ(target.state(), before) << "a rejected checkpoint must leave the scaler untouched";
}

INSTANTIATE_TEST_SUITE_P(
    Tables, ScalerDeserialize,
    ::testing::Values(
        BadFieldRow{"missing_scale", "scaler.scale", std::nullopt},
        BadFieldRow{"missing_growth_tracker", "scaler.growth_tracker", std::nullopt},
        BadFieldRow{"missing_hysteresis_left", "scaler.hysteresis_left", std::nullopt},
        BadFieldRow{"missing_overflows_at_min", "scaler.overflows_at_min", std::nullopt},
        BadFieldRow{"missing_steps", "scaler.steps", std::nullopt},
        BadFieldRow{"missing_skipped_steps", "scaler.skipped_steps", std::nullopt},
        BadFieldRow{"scale_empty", "scaler.scale", ""}, BadFieldRow{"scale_word", "scaler.scale", "abc"},
        BadFieldRow{"scale_trailing_junk", "scaler.scale", "1.5x"},
        BadFieldRow{"scale_leading_space", "scaler.scale", " 1.5"},
        BadFieldRow{"scale_trailing_space", "scaler.scale", "1.5 "},
        BadFieldRow{"scale_plus_sign", "scaler.scale", "+1.5"},
        BadFieldRow{"scale_comma", "scaler.scale", "1,5"},
        BadFieldRow{"scale_hex_prefix", "scaler.scale", "0x1p3"},
        BadFieldRow{"scale_inf", "scaler.scale", "inf"}, BadFieldRow{"scale_nan", "scaler.scale", "nan"},
        BadFieldRow{"scale_negative", "scaler.scale", "-2"}, BadFieldRow{"scale_zero", "scaler.scale", "0"},
        BadFieldRow{"scale_beyond_float", "scaler.scale", "1e39"},
        BadFieldRow{"scale_subnormal", "scaler.scale", "1e-45"},
        BadFieldRow{"tracker_fraction", "scaler.growth_tracker", "1.5"},
        BadFieldRow{"tracker_negative", "scaler.growth_tracker", "-1"},
        BadFieldRow{"tracker_empty", "scaler.growth_tracker", ""},
        BadFieldRow{"tracker_trailing_junk", "scaler.growth_tracker", "12a"},
        BadFieldRow{"tracker_beyond_int64", "scaler.growth_tracker", "99999999999999999999"},
        BadFieldRow{"tracker_plus_sign", "scaler.growth_tracker", "+3"},
        BadFieldRow{"tracker_trailing_newline", "scaler.growth_tracker", "3\n"},
        BadFieldRow{"hysteresis_negative", "scaler.hysteresis_left", "-1"},
        BadFieldRow{"overflows_word", "scaler.overflows_at_min", "x"},
        BadFieldRow{"steps_negative", "scaler.steps", "-5"},
        BadFieldRow{"skipped_exceeds_steps", "scaler.skipped_steps", "8"}),
    row_name<BadFieldRow>);

// ---------------------------------------------------------------------------------------------------------
// Independent replays against the upstream formulas.

// PyTorch's _amp_update_scale_ (aten/src/ATen/native/cuda/AmpKernels.cu), transcribed: FP32 scale, no
// hysteresis, no floor.
struct TorchReference {
  float scale;
  int64_t growth_tracker = 0;

  void update(bool found_inf, float growth_factor, float backoff_factor, int64_t growth_interval) {
    if (found_inf) {
      scale = scale * backoff_factor;
      growth_tracker = 0;
      return;
    }
    const int64_t successful = growth_tracker + 1;
    if (successful == growth_interval) {
      const float new_scale = scale * growth_factor;
      if (std::isfinite(new_scale)) scale = new_scale;
      growth_tracker = 0;
    } else {
      growth_tracker = successful;
    }
  }
};

TEST(ScalerCrossCheck, MatchesPyTorchOn10000RandomSequences) {
  const std::vector<float> init_scales = {65536.0f, 12345.678f, 0x1p100f, 3.0e38f};
  const std::vector<float> growth_factors = {2.0f, 3.0f, 1.5f};
  const std::vector<float> backoff_factors = {0.5f, 0.25f, 0.3f, 0.9f};
  std::mt19937_64 rng(20240611);
  auto pick = [&rng](const std::vector<float>& values) {
    return values[std::uniform_int_distribution<size_t>(0, values.size() - 1)(rng)];
  };
  int64_t growths = 0;
  int64_t capped_growths = 0;
  for (int sequence = 0; sequence < 10000; ++sequence) {
    const LossScalerConfig config{.init_scale = pick(init_scales),
                                  .growth_factor = pick(growth_factors),
                                  .backoff_factor = pick(backoff_factors),
                                  .growth_interval = std::uniform_int_distribution<int64_t>(1, 8)(rng),
                                  .min_scale = 0.0f,
                                  .max_overflows_at_min_scale = kNeverStop};
    const auto length = std::uniform_int_distribution<size_t>(1, 64)(rng);
    const double p_inf = std::uniform_real_distribution<double>(0.0, 0.6)(rng);
    std::bernoulli_distribution overflow(p_inf);

    DynamicLossScaler scaler(config);
    TorchReference reference{config.init_scale};
    int64_t skipped = 0;
    for (size_t step = 1; step <= length; ++step) {
      const bool found_inf = overflow(rng);
      const float reference_before = reference.scale;
      reference.update(found_inf, config.growth_factor, config.backoff_factor, config.growth_interval);
      // The generator stays above FP32's smallest normal, where mptrain's floor would part from PyTorch.
      ASSERT_GE(reference.scale, FLT_MIN) << "test generator left the comparable range";
      skipped += found_inf;
      if (!found_inf && reference.growth_tracker == 0) {
        ++(reference.scale == reference_before ? capped_growths : growths);
      }

      ASSERT_EQ(scaler.update(found_inf), found_inf);
      const auto where =
          fmt::format("sequence {} step {} (init {}, growth {}, backoff {}, interval {})", sequence, step,
                      config.init_scale, config.growth_factor, config.backoff_factor, config.growth_interval);
      ASSERT_TRUE(same_float(reference.scale, scaler.scale())) << where;
      ASSERT_EQ(reference.growth_tracker, scaler.state().growth_tracker) << where;
      ASSERT_EQ(scaler.state().steps, static_cast<int64_t>(step)) << where;
      ASSERT_EQ(scaler.state().skipped_steps, skipped) << where;
    }
  }
  // The random sequences really exercised growth, including growth refused at the top of the range.
  EXPECT_GT(growths, 1000);
  EXPECT_GT(capped_growths, 100);
}

// Megatron-LM's DynamicGradScaler.update (megatron/core/optimizer/grad_scaler.py), transcribed: its
// hysteresis tracker may go below zero, which must behave like mptrain's clamped hysteresis_left.
struct MegatronReference {
  float scale;
  float min_scale;
  int64_t growth_tracker = 0;
  int64_t hysteresis_tracker;

  void update(bool found_inf, float growth_factor, float backoff_factor, int64_t growth_interval,
              int64_t hysteresis) {
    if (found_inf) {
      growth_tracker = 0;
      hysteresis_tracker -= 1;
      if (hysteresis_tracker <= 0) scale = std::max(scale * backoff_factor, min_scale);
    } else {
      growth_tracker += 1;
      if (growth_tracker == growth_interval) {
        growth_tracker = 0;
        hysteresis_tracker = hysteresis;
        scale = scale * growth_factor;
      }
    }
  }
};

TEST(ScalerCrossCheck, MatchesMegatronHysteresisOn10000RandomSequences) {
  std::mt19937_64 rng(777);
  for (int sequence = 0; sequence < 10000; ++sequence) {
    const LossScalerConfig config{.init_scale = 1024.0f,
                                  .growth_interval = std::uniform_int_distribution<int64_t>(1, 6)(rng),
                                  .hysteresis = std::uniform_int_distribution<int64_t>(1, 4)(rng),
                                  .min_scale = std::bernoulli_distribution(0.5)(rng) ? 1.0f : 3.0f,
                                  .max_overflows_at_min_scale = kNeverStop};
    const auto length = std::uniform_int_distribution<size_t>(1, 64)(rng);
    std::bernoulli_distribution overflow(std::uniform_real_distribution<double>(0.0, 0.7)(rng));

    DynamicLossScaler scaler(config);
    MegatronReference reference{config.init_scale, config.min_scale, 0, config.hysteresis};
    for (size_t step = 1; step <= length; ++step) {
      const bool found_inf = overflow(rng);
      reference.update(found_inf, config.growth_factor, config.backoff_factor, config.growth_interval,
                       config.hysteresis);
      scaler.update(found_inf);
      const auto where = fmt::format("sequence {} step {} (interval {}, hysteresis {}, min {})", sequence,
                                     step, config.growth_interval, config.hysteresis, config.min_scale);
      ASSERT_TRUE(same_float(reference.scale, scaler.scale())) << where;
      ASSERT_EQ(reference.growth_tracker, scaler.state().growth_tracker) << where;
      ASSERT_EQ(std::max<int64_t>(reference.hysteresis_tracker, 0), scaler.state().hysteresis_left) << where;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// The shared state machine (common::scaler_update, used by DynamicLossScaler and by the device kernel)
// against the host implementation it replaced, transcribed here as it stood: random flag sequences over
// dynamic, static and disabled scalers with hysteresis (plain and consecutive), min_scale floors and the stop
// rule. Checked through DynamicLossScaler (host) and through the CPU backend's amp_update on a
// common::AmpState (the engine's path, which also advances Adam's t on applied steps).

struct OldHostScaler {
  LossScalerConfig config;
  LossScalerState state;

  explicit OldHostScaler(const LossScalerConfig& c) : config(c) {
    state.scale = config.enabled ? config.init_scale : 1.0f;
    state.hysteresis_left = config.hysteresis;
  }
  // Returns true when the old update() threw NumericsError (after updating the state).
  bool update(bool found_inf) {
    const bool dynamic = config.enabled && config.dynamic;
    const float floor = std::max(config.min_scale, std::numeric_limits<float>::min());
    const float scale_before = state.scale;
    state.steps += 1;
    if (!found_inf) {
      state.overflows_at_min = 0;
      if (!dynamic) return false;
      state.growth_tracker += 1;
      if (config.consecutive_hysteresis) state.hysteresis_left = config.hysteresis;
      if (state.growth_tracker >= config.growth_interval) {
        state.growth_tracker = 0;
        state.hysteresis_left = config.hysteresis;
        const float grown = state.scale * config.growth_factor;
        if (std::isfinite(grown)) state.scale = grown;
      }
      return false;
    }
    state.skipped_steps += 1;
    const bool at_min = !dynamic || scale_before <= floor;
    state.overflows_at_min = at_min ? state.overflows_at_min + 1 : 0;
    if (dynamic) {
      state.growth_tracker = 0;
      state.hysteresis_left = std::max<int64_t>(state.hysteresis_left - 1, 0);
      if (state.hysteresis_left == 0) state.scale = std::max(state.scale * config.backoff_factor, floor);
    }
    return state.overflows_at_min >= config.max_overflows_at_min_scale;
  }
};

TEST(ScalerCrossCheck, SharedRuleMatchesTheOldHostUpdateOn5000RandomSequences) {
  std::mt19937_64 rng(4242);
  auto backend = mpt::make_cpu_backend();
  int64_t stops = 0, backoffs_to_floor = 0, growths = 0;
  for (int sequence = 0; sequence < 5000; ++sequence) {
    LossScalerConfig config;
    config.enabled = std::bernoulli_distribution(0.9)(rng);
    config.dynamic = std::bernoulli_distribution(0.85)(rng);
    config.init_scale = std::bernoulli_distribution(0.5)(rng) ? 1024.0f : 3.0e38f;
    config.growth_factor = std::bernoulli_distribution(0.5)(rng) ? 2.0f : 1.7f;
    config.backoff_factor = std::bernoulli_distribution(0.5)(rng) ? 0.5f : 0.3f;
    config.growth_interval = std::uniform_int_distribution<int64_t>(1, 6)(rng);
    config.hysteresis = std::uniform_int_distribution<int64_t>(1, 4)(rng);
    config.consecutive_hysteresis = std::bernoulli_distribution(0.3)(rng);
    const int floor_kind = std::uniform_int_distribution<int>(0, 2)(rng);
    config.min_scale = floor_kind == 0 ? 0.0f : floor_kind == 1 ? 1.0f : 64.0f;
    config.max_overflows_at_min_scale = std::uniform_int_distribution<int64_t>(1, 5)(rng);
    const auto length = std::uniform_int_distribution<size_t>(1, 80)(rng);
    std::bernoulli_distribution overflow(std::uniform_real_distribution<double>(0.0, 0.9)(rng));

    OldHostScaler old(config);
    DynamicLossScaler scaler(config);
    mpt::common::AmpState amp;
    amp.scaler = scaler.state();
    const mpt::common::ScalerRule rule = scaler.rule();
    int64_t applied = 0;
    for (size_t step = 1; step <= length; ++step) {
      const bool found_inf = overflow(rng);
      const float before = old.state.scale;
      const bool old_stop = old.update(found_inf);
      bool new_stop = false;
      try {
        scaler.update(found_inf);
      } catch (const mpt::NumericsError&) {
        new_stop = true;
      }
      amp.flags[mpt::common::kFoundInf] = found_inf ? 1.0f : 0.0f;
      backend->amp_update(&amp, rule);
      applied += found_inf ? 0 : 1;
      const auto where = fmt::format("sequence {} step {}", sequence, step);
      ASSERT_EQ(old.state, scaler.state()) << where;
      ASSERT_TRUE(same_float(old.state.scale, scaler.scale())) << where;
      ASSERT_EQ(old.state, amp.scaler) << where;
      ASSERT_EQ(new_stop, old_stop) << where;
      ASSERT_EQ(amp.min_scale_stop != 0, old_stop) << where;
      ASSERT_EQ(amp.applied_steps, applied) << where;
      stops += old_stop;
      if (found_inf && old.state.scale < before && old.state.scale == std::max(config.min_scale, FLT_MIN))
        ++backoffs_to_floor;
      if (!found_inf && old.state.scale > before) ++growths;
    }
  }
  // The sequences reached every part of the rule.
  EXPECT_GT(stops, 100);
  EXPECT_GT(backoffs_to_floor, 100);
  EXPECT_GT(growths, 1000);
}

// The stop error thrown from a replayed state (the engine's result()) is the one update() throws.
TEST(ScalerStopMessage, ThrowFromStateEqualsUpdate) {
  LossScalerConfig config;
  config.init_scale = 4.0f;
  config.min_scale = 2.0f;
  config.max_overflows_at_min_scale = 2;
  DynamicLossScaler scaler(config);
  std::string thrown;
  for (int i = 0; i < 10 && thrown.empty(); ++i) {
    try {
      scaler.update(true);
    } catch (const mpt::NumericsError& e) {
      thrown = e.what();
    }
  }
  ASSERT_FALSE(thrown.empty());
  try {
    scaler.throw_min_scale_stop(scaler.state());
    FAIL() << "no throw";
  } catch (const mpt::NumericsError& e) {
    EXPECT_EQ(std::string(e.what()), thrown);
  }
}

}  // namespace
