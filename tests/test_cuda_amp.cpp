// CUDA mixed-precision kernels (kernels/cuda/amp.cu, adamw.cu, lamb.cu, noise.cu) against the CPU backend on
// the same inputs, with odd sizes. Every test skips with "no CUDA device" where there is none (CI, the build
// machines).
#include <bit>
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include <gtest/gtest.h>

#include "common/amp_state.hpp"
#include "cuda_test_support.hpp"
#include "mptrain/backend.hpp"
#include "mptrain/cuda_check.hpp"
#include "mptrain/cuda_ops.hpp"

namespace mpt {
namespace {

using test::DeviceArray;

template <typename T>
class CudaAmp : public ::testing::Test {};
using FloatTypes = ::testing::Types<float, half, bf16>;
TYPED_TEST_SUITE(CudaAmp, FloatTypes);

TYPED_TEST(CudaAmp, GradCheckMatchesCpu) {
  MPT_REQUIRE_GPU();
  using T = TypeParam;
  auto cpu = make_cpu_backend();
  const size_t block = 37, n = block * 53 + 11;  // odd sizes; the last 11 elements are outside every range
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0.0f, 100.0f);
  std::vector<T> g(n);
  for (T& x : g) x = from_float<T>(normal(rng));
  const std::vector<ElementRange> ranges = {{block * 3, block * 20}, {block * 30, block * 17}};
  std::vector<size_t> starts;
  for (const auto& r : ranges)
    for (size_t b = 0; b < r.num_elements; b += block) starts.push_back(r.offset + b);
  for (bool poison : {false, true}) {
    if (poison) g[block * 31 + 5] = from_float<T>(INFINITY);
    std::vector<double> expected(starts.size());
    common::AmpState cpu_state;
    cpu_state.flags[common::kFoundInf] = 5.0f;  // stale: grad_check must overwrite it
    cpu->grad_check(g.data(), dtype_of<T>(), cpu->register_table<ElementRange>(ranges), block,
                    expected.data(), &cpu_state, poison);
    const bool cpu_inf = cpu_state.flags[common::kFoundInf] != 0.0f;
    EXPECT_EQ(cpu_state.flags[common::kStopRequested], poison ? 1.0f : 0.0f);
    DeviceArray<T> d_g(g);
    DeviceArray<size_t> d_starts(starts);
    DeviceArray<double> d_sums(std::vector<double>(starts.size(), -1.0));
    DeviceArray<float> d_found(std::vector<float>{7.0f});  // the launcher must clear stale values
    cuda::grad_check(d_sums.ptr, d_found.ptr, d_g.ptr, d_starts.ptr, starts.size(), block, nullptr);
    MPT_CUDA_CHECK(cudaDeviceSynchronize());
    EXPECT_EQ(d_found.to_host()[0] != 0.0f, cpu_inf);
    EXPECT_EQ(cpu_inf, poison);
    if (!poison) {
      const auto sums = d_sums.to_host();
      for (size_t k = 0; k < sums.size(); ++k)
        ASSERT_NEAR(sums[k], expected[k], 1e-12 * expected[k]) << "block " << k;
    }
  }
}

// AdamW with the per-step constants read from the device AmpState (the engine's path) against the CPU backend
// on the same state, its bitwise skip on an agreed overflow, and the cast of the master weights with the
// state's found_inf (skipped with the step) and without a flag (always cast).
TYPED_TEST(CudaAmp, AdamWFromDeviceStateAndCastMatchCpu) {
  MPT_REQUIRE_GPU();
  using T = TypeParam;
  auto cpu = make_cpu_backend();
  const size_t shard = 1001, flat = 2003;
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> p(shard), m(shard), v(shard);
  for (size_t i = 0; i < shard; ++i) {
    p[i] = normal(rng);
    m[i] = 0.01f * normal(rng);
    v[i] = 1e-4f * std::abs(normal(rng));
  }
  std::vector<T> g(flat), params(flat, from_float<T>(0.0f));
  for (T& x : g) x = from_float<T>(1000.0f * normal(rng));
  const std::vector<AdamWSegment> segments = {
      {0, 5, 400, true}, {400, 1200, 1, false}, {401, 1500, 500, true}};
  const float scale = 1024.0f, clip = 0.5f;
  for (float found : {0.0f, 1.0f}) {
    common::AmpState state;
    state.flags[common::kFoundInf] = found;
    state.step = common::make_adamw_step(3e-4f, 0.9f, 0.95f, 1e-8f, 0.1f, 7, clip / scale);
    DeviceArray<float> dp(p), dm(m), dv(v);
    DeviceArray<T> dg(g), d_flagged(params), d_unflagged(params);
    DeviceArray<AdamWSegment> dseg(segments);
    DeviceArray<common::AmpState> dstate(std::vector<common::AmpState>{state});
    // max_segment_elements only sizes the grid: 500 is the largest segment, and any bound above works.
    cuda::adamw(dp.ptr, dm.ptr, dv.ptr, dg.ptr, dseg.ptr, segments.size(), 500, dstate.ptr, nullptr);
    cuda::cast_master(d_flagged.ptr, dp.ptr, dseg.ptr, segments.size(), 500,
                      &dstate.ptr->flags[common::kFoundInf], nullptr);
    cuda::cast_master(d_unflagged.ptr, dp.ptr, dseg.ptr, segments.size(), shard, nullptr, nullptr);
    MPT_CUDA_CHECK(cudaDeviceSynchronize());
    auto hp = p, hm = m, hv = v;
    cpu->adamw(hp.data(), hm.data(), hv.data(), g.data(), dtype_of<T>(),
               cpu->register_table<AdamWSegment>(segments), &state);
    const auto gp = dp.to_host(), gm = dm.to_host(), gv = dv.to_host();
    for (size_t i = 0; i < shard; ++i) {
      if (found != 0.0f) {
        ASSERT_EQ(std::bit_cast<uint32_t>(gp[i]), std::bit_cast<uint32_t>(p[i]))
            << "skipped step moved " << i;
        ASSERT_EQ(std::bit_cast<uint32_t>(gv[i]), std::bit_cast<uint32_t>(v[i]))
            << "skipped step moved v " << i;
      }
      ASSERT_NEAR(gp[i], hp[i], 1e-6f * (1.0f + std::abs(hp[i]))) << "master " << i << " found " << found;
      ASSERT_NEAR(gm[i], hm[i], 1e-6f * (1.0f + std::abs(hm[i]))) << "m " << i;
      ASSERT_NEAR(gv[i], hv[i], 1e-6f * (1.0f + std::abs(hv[i]))) << "v " << i;
    }
    auto cast = params;
    for (const auto& sg : segments)
      for (size_t i = 0; i < sg.num_elements; ++i)
        cast[sg.flat_offset + i] = from_float<T>(gp[sg.shard_offset + i]);
    const auto flagged = d_flagged.to_host(), unflagged = d_unflagged.to_host();
    for (size_t i = 0; i < flat; ++i) {
      ASSERT_EQ(to_float(unflagged[i]), to_float(cast[i])) << "cast without a flag, element " << i;
      ASSERT_EQ(to_float(flagged[i]), to_float(found != 0.0f ? params[i] : cast[i]))
          << "cast with the state's flag, element " << i << " found " << found;
    }
  }
}

/// Runs one device kernel on a copy of `state` and returns the result.
template <typename F>
common::AmpState on_device(const common::AmpState& state, F&& launch) {
  DeviceArray<common::AmpState> d(std::vector<common::AmpState>{state});
  launch(d.ptr);
  MPT_CUDA_CHECK(cudaDeviceSynchronize());
  return d.to_host()[0];
}

// The loss-scaler update kernel against the CPU backend's, step by step over random found_inf sequences with
// hysteresis, a min_scale floor and the stop rule (dynamic, static and disabled scalers): the same function
// compiled for the device must give the same bits.
TEST(CudaAmpState, ScalerUpdateMatchesCpuOnRandomSequences) {
  MPT_REQUIRE_GPU();
  auto cpu = make_cpu_backend();
  std::mt19937_64 rng(31);
  int stops = 0;
  for (int sequence = 0; sequence < 60; ++sequence) {
    common::ScalerRule rule;
    rule.enabled = sequence % 10 != 0;
    rule.dynamic = sequence % 7 != 0;
    rule.consecutive_hysteresis = sequence % 3 == 0;
    rule.growth_factor = sequence % 2 ? 2.0f : 1.5f;
    rule.backoff_factor = sequence % 4 ? 0.5f : 0.3f;
    rule.scale_floor = sequence % 5 ? 1.0f : 256.0f;
    rule.growth_interval = 1 + sequence % 5;
    rule.hysteresis = 1 + sequence % 3;
    rule.max_overflows_at_min_scale = 3;
    common::AmpState cpu_state;
    cpu_state.scaler.scale = rule.enabled ? 4096.0f : 1.0f;
    cpu_state.scaler.hysteresis_left = rule.hysteresis;
    common::AmpState gpu_state = cpu_state;
    std::bernoulli_distribution overflow(0.15 + 0.1 * (sequence % 6));
    for (int step = 0; step < 40; ++step) {
      const float found = overflow(rng) ? 1.0f : 0.0f;
      cpu_state.flags[common::kFoundInf] = found;
      gpu_state.flags[common::kFoundInf] = found;
      cpu->amp_update(&cpu_state, rule);
      gpu_state = on_device(gpu_state, [&](common::AmpState* d) { cuda::amp_update(d, rule, nullptr); });
      ASSERT_EQ(std::memcmp(&gpu_state.scaler, &cpu_state.scaler, sizeof(common::ScalerState)), 0)
          << "sequence " << sequence << " step " << step << ": scale " << gpu_state.scaler.scale << " vs "
          << cpu_state.scaler.scale;
      ASSERT_EQ(gpu_state.applied_steps, cpu_state.applied_steps);
      ASSERT_EQ(gpu_state.min_scale_stop, cpu_state.min_scale_stop);
      stops += cpu_state.min_scale_stop;
    }
  }
  EXPECT_GT(stops, 0) << "the sequences never reached the minimum-scale rule";
}

// The preparation kernel (global norm over gathered block sums in the fixed order, clip, lr, AdamW constants)
// against the CPU backend: the norm within FP64 rounding of a different summation tree, the rest equal.
TEST(CudaAmpState, PrepareMatchesCpu) {
  MPT_REQUIRE_GPU();
  auto cpu = make_cpu_backend();
  std::mt19937 rng(17);
  std::uniform_real_distribution<double> uniform(0.0, 1e6);
  const size_t count = 1237;
  std::vector<double> gathered(count + 50);
  for (double& x : gathered) x = uniform(rng);
  std::vector<size_t> order(count);
  for (size_t i = 0; i < count; ++i) order[i] = (i * 7919) % gathered.size();
  common::OptimizerRule rule;
  rule.peak_lr = 3e-3f;
  rule.warmup_samples = 5;
  rule.decay_samples = 40;
  rule.min_lr = 1e-4f;
  rule.weight_decay = 0.1f;
  rule.grad_clip = 1.0f;
  DeviceArray<double> d_gathered(gathered);
  DeviceArray<size_t> d_order(order);
  for (int64_t applied : {int64_t{0}, int64_t{4}, int64_t{17}, int64_t{60}}) {
    for (float found : {0.0f, 1.0f}) {
      common::AmpState state;
      state.scaler.scale = 1024.0f;
      state.applied_steps = applied;
      state.applied_samples = applied;
      state.flags[common::kFoundInf] = found;
      common::AmpState cpu_state = state;
      cpu->amp_prepare(&cpu_state, gathered.data(), cpu->register_table<size_t>(order), rule);
      const common::AmpState gpu_state = on_device(state, [&](common::AmpState* d) {
        cuda::amp_prepare(d, d_gathered.ptr, d_order.ptr, count, rule, nullptr);
      });
      SCOPED_TRACE(::testing::Message() << "applied " << applied << " found " << found);
      EXPECT_EQ(gpu_state.used_scale, 1024.0f);
      if (found != 0.0f) {
        EXPECT_TRUE(std::isnan(gpu_state.grad_norm));
        EXPECT_EQ(gpu_state.lr, 0.0f);
        EXPECT_EQ(gpu_state.clip_factor, 1.0f);
        continue;
      }
      EXPECT_NEAR(gpu_state.grad_norm, cpu_state.grad_norm, 1e-13 * cpu_state.grad_norm);
      EXPECT_LT(cpu_state.clip_factor, 1.0f);  // the sums are large: clipping is active
      EXPECT_NEAR(gpu_state.clip_factor, cpu_state.clip_factor, 1e-6f * cpu_state.clip_factor);
      EXPECT_NEAR(gpu_state.lr, cpu_state.lr, 1e-6f * cpu_state.lr);
      EXPECT_NEAR(gpu_state.step.bias_correction1, cpu_state.step.bias_correction1, 1e-6f);
      EXPECT_NEAR(gpu_state.step.bias_correction2_sqrt, cpu_state.step.bias_correction2_sqrt, 1e-6f);
      EXPECT_NEAR(gpu_state.step.grad_multiplier, cpu_state.step.grad_multiplier,
                  1e-6f * cpu_state.step.grad_multiplier);
    }
  }
}

// The flag write and the loss sum kernels against the CPU.
TEST(CudaAmpState, FlagAndLossSum) {
  MPT_REQUIRE_GPU();
  auto cpu = make_cpu_backend();
  DeviceArray<float> flag(std::vector<float>{0.0f});
  cuda::write_flag(flag.ptr, 1.0f, nullptr);
  MPT_CUDA_CHECK(cudaDeviceSynchronize());
  EXPECT_EQ(flag.to_host()[0], 1.0f);
  std::mt19937 rng(2);
  std::uniform_real_distribution<float> uniform(0.0f, 11.0f);
  std::vector<float> losses(4099);
  for (float& x : losses) x = uniform(rng);
  double expected = 0.5;
  cpu->sum_losses(&expected, losses.data(), static_cast<int64_t>(losses.size()));
  DeviceArray<float> d_losses(losses);
  DeviceArray<double> acc(std::vector<double>{0.5});
  cuda::sum_losses(acc.ptr, d_losses.ptr, static_cast<int64_t>(losses.size()), nullptr);
  MPT_CUDA_CHECK(cudaDeviceSynchronize());
  EXPECT_NEAR(acc.to_host()[0], expected, 1e-12 * expected);
}

// The noise scale's sum of squares (fixed pieces, two passes on the device) against the CPU's, on an odd
// length at an odd offset.
TYPED_TEST(CudaAmp, SumSquaresMatchesCpu) {
  MPT_REQUIRE_GPU();
  using T = TypeParam;
  auto cpu = make_cpu_backend();
  const size_t offset = 13, n = 100003;
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  std::vector<T> g(offset + n);
  for (T& x : g) x = from_float<T>(normal(rng));
  double expected = 0.0;
  cpu->sum_squares(g.data(), dtype_of<T>(), offset, n, &expected);
  DeviceArray<T> d_g(g);
  DeviceArray<double> d_out(std::vector<double>{-1.0});
  DeviceArray<double> d_partials(std::vector<double>(cuda::kSumSquaresBlocks, 0.0));
  cuda::sum_squares(d_out.ptr, d_g.ptr + offset, n, d_partials.ptr, nullptr);
  MPT_CUDA_CHECK(cudaDeviceSynchronize());
  EXPECT_NEAR(d_out.to_host()[0], expected, 1e-12 * expected);
}

// The noise-scale preparation kernel against the CPU: the same averages within FP64 rounding of another
// summation tree, and nothing on a skipped step.
TEST(CudaAmpState, NoisePrepareMatchesCpu) {
  MPT_REQUIRE_GPU();
  auto cpu = make_cpu_backend();
  std::vector<double> gathered = {3.0, 7.5, 1.25, 9.0, 2.0, 4.0, 0.5};
  const std::vector<size_t> indices = {6, 1, 3, 0};
  common::NoiseRule rule;
  rule.small_samples = 4;
  rule.big_samples = 16;
  rule.small_batches = 4;
  rule.small_grad_factor = 1;
  rule.decay = 0.9;
  DeviceArray<double> d_gathered(gathered);
  DeviceArray<size_t> d_indices(indices);
  for (float found : {0.0f, 1.0f}) {
    common::AmpState state;
    state.used_scale = 2.0f;
    state.grad_sq = 0.5;
    state.noise = {0.25, 1.5, 0.19};
    state.flags[common::kFoundInf] = found;
    common::AmpState cpu_state = state;
    cpu->noise_prepare(&cpu_state, gathered.data(), cpu->register_table<size_t>(indices), rule);
    const common::AmpState gpu_state = on_device(state, [&](common::AmpState* d) {
      cuda::noise_prepare(d, d_gathered.ptr, d_indices.ptr, indices.size(), rule, nullptr);
    });
    if (found != 0.0f) {
      EXPECT_EQ(gpu_state.noise, state.noise);
      continue;
    }
    EXPECT_NE(cpu_state.noise, state.noise);
    EXPECT_NEAR(gpu_state.noise.grad_sq_ema, cpu_state.noise.grad_sq_ema, 1e-12);
    EXPECT_NEAR(gpu_state.noise.trace_ema, cpu_state.noise.trace_ema,
                1e-12 * std::abs(cpu_state.noise.trace_ema));
    EXPECT_EQ(gpu_state.noise.weight, cpu_state.noise.weight);
  }
}

// LAMB's three kernels against the CPU backend's ops on random state: the segment sums (FP64, another tree),
// the moments, the trust ratios and the updated weights, with segments of every kind (decay and not, a
// segment shorter than a block, a tensor over several segments).
TYPED_TEST(CudaAmp, LambMatchesCpu) {
  MPT_REQUIRE_GPU();
  using T = TypeParam;
  auto cpu = make_cpu_backend();
  // Two tensors over a 300-element shard: tensor 0 in three segments (100, 100, 37), tensor 1 (no decay) in
  // one of 50; the gradients sit at other flat offsets.
  const std::vector<LambSegment> segments = {
      {0, 1000, 100, 0, 1}, {100, 1100, 100, 0, 1}, {200, 1200, 37, 0, 1}, {237, 2000, 50, 1, 0}};
  const std::vector<size_t> order = {0, 1, 2, 3}, tensor_begin = {0, 3, 4};
  std::mt19937 rng(11);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> master(300), m(300), v(300);
  for (size_t i = 0; i < 300; ++i) {
    master[i] = normal(rng);
    m[i] = 0.1f * normal(rng);
    v[i] = 0.01f * std::abs(normal(rng));
  }
  std::vector<T> g(2100);
  for (T& x : g) x = from_float<T>(1024.0f * normal(rng));
  common::AmpState state;
  state.step = common::make_adamw_step(1e-2f, 0.9f, 0.999f, 1e-6f, 0.01f, 3, 1.0f / 1024.0f);
  // CPU.
  std::vector<float> cm = m, cv = v, cmaster = master, ctrust(2);
  std::vector<double> csums(8);
  const auto seg_table = cpu->register_table<LambSegment>(segments);
  cpu->lamb_moments(cmaster.data(), cm.data(), cv.data(), g.data(), dtype_of<T>(), seg_table, csums.data(),
                    &state);
  cpu->lamb_trust(ctrust.data(), csums.data(), cpu->register_table<size_t>(order),
                  cpu->register_table<size_t>(tensor_begin), &state);
  cpu->lamb_apply(cmaster.data(), cm.data(), cv.data(), seg_table, ctrust.data(), &state);
  // CUDA.
  DeviceArray<float> d_master(master), d_m(m), d_v(v), d_trust(std::vector<float>(2, 0.0f));
  DeviceArray<T> d_g(g);
  DeviceArray<LambSegment> d_segments(segments);
  DeviceArray<size_t> d_order(order), d_begin(tensor_begin);
  DeviceArray<double> d_sums(std::vector<double>(8, -1.0));
  DeviceArray<common::AmpState> d_state(std::vector<common::AmpState>{state});
  cuda::lamb_moments(d_master.ptr, d_m.ptr, d_v.ptr, d_g.ptr, d_segments.ptr, segments.size(), d_sums.ptr,
                     d_state.ptr, nullptr);
  cuda::lamb_trust(d_trust.ptr, d_sums.ptr, d_order.ptr, d_begin.ptr, 2, d_state.ptr, nullptr);
  cuda::lamb_apply(d_master.ptr, d_m.ptr, d_v.ptr, d_segments.ptr, segments.size(), d_trust.ptr, d_state.ptr,
                   nullptr);
  MPT_CUDA_CHECK(cudaDeviceSynchronize());
  const auto sums = d_sums.to_host();
  for (size_t k = 0; k < sums.size(); ++k) EXPECT_NEAR(sums[k], csums[k], 1e-6 * csums[k]) << "sum " << k;
  const auto trust = d_trust.to_host();
  for (size_t t = 0; t < 2; ++t) EXPECT_NEAR(trust[t], ctrust[t], 1e-5f * ctrust[t]) << "tensor " << t;
  const auto gm = d_m.to_host(), gv = d_v.to_host(), gmaster = d_master.to_host();
  for (size_t i = 0; i < 287; ++i) {
    ASSERT_NEAR(gm[i], cm[i], 1e-6f * std::abs(cm[i]) + 1e-12f) << "m " << i;
    ASSERT_NEAR(gv[i], cv[i], 1e-6f * std::abs(cv[i]) + 1e-12f) << "v " << i;
    ASSERT_NEAR(gmaster[i], cmaster[i], 1e-5f * std::abs(cmaster[i] - master[i]) + 3e-7f) << "master " << i;
  }
  for (size_t i = 287; i < 300; ++i) EXPECT_EQ(gmaster[i], master[i]) << "outside every segment";
}

}  // namespace
}  // namespace mpt
