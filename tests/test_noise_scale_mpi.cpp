// The gradient noise scale (McCandlish et al. 2018, appendix A.1) under mpiexec -n 1..4: the estimators on
// known per-rank gradients, a negative single-step estimate averaged rather than crashed on, independence of
// the loss scale, the one-rank micro-batch form, "n/a" without a small batch, the skip on found_inf, and the
// averages surviving a checkpoint round trip.
#include <cmath>
#include <vector>

#include <gtest/gtest.h>

#include "common/noise_scale.hpp"
#include "mptrain/comm_mpi.hpp"
#include "mptrain/engine.hpp"

namespace mpt {
namespace {

EngineConfig config(DType dtype) {
  EngineConfig c;
  c.dtype = dtype;
  c.block_elements = 2;
  c.bucket_bytes = 64;  // more than one bucket for the 2+3 element model below in fp32
  c.adamw.lr = 1e-3f;
  c.noise_scale_ema = 0.5;
  return c;
}

std::vector<TensorSpec> model() {
  return {{"a", {2}, true}, {"b", {3}, false}};
}

class NoiseScaleMpi : public ::testing::Test {
 protected:
  MpiCommunicator world{MPI_COMM_WORLD};
  std::unique_ptr<Backend> backend = make_cpu_backend();

  /// One step with this rank's local gradient `g` (unscaled, registration order), reduced over the ranks.
  StepResult step(MixedPrecisionEngine& e, const std::vector<float>& g, const StepBatch& batch) {
    e.zero_grads();
    dispatch_float_dtype(e.config().dtype, [&]<typename S>() {
      auto* grads = static_cast<S*>(e.grads());
      size_t k = 0;
      for (const TensorPlacement& p : e.layout().tensors())
        for (size_t i = 0; i < p.spec.num_elements(); ++i)
          grads[p.offset + i] = from_float<S>(g[k++] * e.loss_scale());
    });
    e.sync_grads();
    e.set_batch(batch);
    return e.step();
  }
};

/// Tolerance for a statistic computed from FP32 gradients reduced with a pre-multiplied 1/N (exact only for N
/// a power of two).
double tol(double x) {
  return 1e-6 * std::max(1.0, std::abs(x));
}

// The estimators as written in the paper, in double, for per-rank mean gradients over B_small samples each.
struct Expected {
  double grad_sq, trace;
};
Expected estimate(const std::vector<std::vector<double>>& per_rank, double b_small) {
  const double n = static_cast<double>(per_rank.size()), b_big = b_small * n;
  double small = 0;
  std::vector<double> mean(per_rank[0].size(), 0.0);
  for (const auto& g : per_rank)
    for (size_t i = 0; i < g.size(); ++i) {
      small += g[i] * g[i] / n;
      mean[i] += g[i] / n;
    }
  double big = 0;
  for (double x : mean) big += x * x;
  return {(b_big * big - b_small * small) / (b_big - b_small), (small - big) / (1 / b_small - 1 / b_big)};
}

// 2 ranks, 4 sequences each, per-rank mean gradients g0 = [3,1], g1 = [1,1]: |G|^2 = 4, S = 8, B_simple = 2.
// On other rank counts the same check against the formulas with rank-dependent gradients.
TEST_F(NoiseScaleMpi, EstimatorsOnKnownGradients) {
  if (world.size() == 1) {
    // One rank and no accumulation: B_small = B_big, nothing to estimate ("n/a"), and no NaN in the state.
    MixedPrecisionEngine e(model(), config(DType::f32), world, *backend);
    const StepResult r = step(e, {1, 2, 3, 4, 5}, {});
    EXPECT_TRUE(std::isnan(r.noise_scale));
    EXPECT_EQ(e.noise_state(), common::NoiseScaleState{});
    return;
  }
  MixedPrecisionEngine e(model(), config(DType::f32), world, *backend);
  const int r = world.rank(), n = world.size();
  std::vector<std::vector<double>> all;
  for (int k = 0; k < n; ++k)
    all.push_back(n == 2 ? (k == 0 ? std::vector<double>{3, 1, 0, 0, 0} : std::vector<double>{1, 1, 0, 0, 0})
                         : std::vector<double>{1.0 + k, 0.5 * k, -1.0, k % 2 ? 2.0 : 0.0, 0.25});
  std::vector<float> mine(all[static_cast<size_t>(r)].begin(), all[static_cast<size_t>(r)].end());
  const StepResult res = step(e, mine, {4 * n, 4.0, 1.0});
  ASSERT_FALSE(res.skipped);
  const Expected x = estimate(all, 4.0);
  if (n == 2) {
    EXPECT_DOUBLE_EQ(x.grad_sq, 4.0);
    EXPECT_DOUBLE_EQ(x.trace, 8.0);
  }
  // One estimate so far: the bias-corrected averages are that estimate.
  EXPECT_NEAR(res.grad_sq_estimate, x.grad_sq, tol(x.grad_sq));
  EXPECT_NEAR(res.trace_estimate, x.trace, tol(x.trace));
  EXPECT_NEAR(res.noise_scale, x.trace / x.grad_sq, tol(x.trace / x.grad_sq));
  if (n == 2) {
    EXPECT_EQ(res.grad_sq_estimate, 4.0);
    EXPECT_EQ(res.trace_estimate, 8.0);
    EXPECT_EQ(res.noise_scale, 2.0);
  }
}

// g0 = [1,0], g1 = [-1,0] (and their like for N > 2): the mean is 0, so the single-step |G|^2 is negative.
// The statistic is "n/a" then (no crash, no division by zero) and the next step's estimate is averaged with
// it.
TEST_F(NoiseScaleMpi, NegativeEstimateIsAveraged) {
  if (world.size() == 1) GTEST_SKIP() << "needs several ranks for a small batch";
  MixedPrecisionEngine e(model(), config(DType::f32), world, *backend);
  const int r = world.rank(), n = world.size();
  // Odd N: the last rank sends 0 so the mean stays 0.
  std::vector<std::vector<double>> first, second;
  for (int k = 0; k < n; ++k) {
    const double s = (n % 2 && k == n - 1) ? 0.0 : (k % 2 ? -1.0 : 1.0);
    first.push_back({s, 0, 0, 0, 0});
    second.push_back({3.0 - (k == 0 ? 0.0 : 2.0), 1, 0, 0, 0});
  }
  auto as_float = [&](const std::vector<double>& v) { return std::vector<float>(v.begin(), v.end()); };
  const StepResult a = step(e, as_float(first[static_cast<size_t>(r)]), {4 * n, 4.0, 1.0});
  const Expected x1 = estimate(first, 4.0);
  ASSERT_LT(x1.grad_sq, 0.0);
  EXPECT_TRUE(std::isnan(a.noise_scale));
  EXPECT_NEAR(a.grad_sq_estimate, x1.grad_sq, tol(x1.grad_sq));
  const StepResult b = step(e, as_float(second[static_cast<size_t>(r)]), {4 * n, 4.0, 1.0});
  const Expected x2 = estimate(second, 4.0);
  // EMA with factor 0.5 from zero: weight 0.75, averages 0.25 x1 + 0.5 x2.
  const double g = 0.25 * x1.grad_sq + 0.5 * x2.grad_sq, t = 0.25 * x1.trace + 0.5 * x2.trace;
  EXPECT_NEAR(b.grad_sq_estimate, g / 0.75, tol(g));
  EXPECT_NEAR(b.trace_estimate, t / 0.75, tol(t));
  ASSERT_GT(g, 0.0);
  EXPECT_NEAR(b.noise_scale, t / g, tol(t / g));
}

// The same gradients under loss scale 65536 and under 32768 (fp16, powers of two: unscaling is exact) give
// the same statistic bitwise; an overflowing step leaves the averages unchanged.
TEST_F(NoiseScaleMpi, LossScaleHalvingDoesNotMoveTheStatistic) {
  if (world.size() == 1) GTEST_SKIP() << "needs several ranks for a small batch";
  EngineConfig high = config(DType::f16), low = config(DType::f16);
  low.scaler.init_scale = 32768.0f;
  MixedPrecisionEngine a(model(), high, world, *backend), b(model(), low, world, *backend);
  const int n = world.size();
  const auto r = static_cast<float>(world.rank());
  // Powers-of-two fractions: exact in fp16 under either scale, and far from its overflow.
  const std::vector<float> g = {(0.5f + 0.25f * r) / 64, -0.125f / 64, 0.0625f * r / 64, 1.0f / 64,
                                -0.5f / 64};
  const StepResult ra = step(a, g, {2 * n, 2.0, 1.0});
  const StepResult rb = step(b, g, {2 * n, 2.0, 1.0});
  EXPECT_EQ(ra.loss_scale, 65536.0f);
  EXPECT_EQ(rb.loss_scale, 32768.0f);
  EXPECT_EQ(ra.grad_sq_estimate, rb.grad_sq_estimate);
  EXPECT_EQ(ra.trace_estimate, rb.trace_estimate);
  EXPECT_EQ(a.noise_state(), b.noise_state());
  // An inf on the last rank: skipped everywhere, averages unchanged.
  const common::NoiseScaleState before = a.noise_state();
  std::vector<float> bad = g;
  if (world.rank() == n - 1) bad[0] = INFINITY;
  const StepResult skipped = step(a, bad, {2 * n, 2.0, 1.0});
  EXPECT_TRUE(skipped.skipped);
  EXPECT_EQ(a.noise_state(), before);
}

// One rank with K = 2 micro-batches of 4 sequences: the first micro-batch (stored with the factor 1/K) is the
// small batch. Micro-batch mean gradients [2,0] then [2,2]: |G_small|^2 = 4, G_big = [2,1], |G_big|^2 = 5, so
// |G|^2 = (8 x 5 - 4 x 4) / 4 = 6 and S = (4 - 5) / (1/4 - 1/8) = -8.
TEST_F(NoiseScaleMpi, OneRankUsesTheFirstMicroBatch) {
  MpiCommunicator self{MPI_COMM_SELF};
  MixedPrecisionEngine e(model(), config(DType::f32), self, *backend);
  e.zero_grads();
  auto* g = static_cast<float*>(e.grads());
  const auto& t = e.layout().tensors();
  g[t[0].offset] = 2.0f / 2;  // micro-batch 1, loss factor 1/K
  e.accumulate_micro_batch();
  e.sample_micro_batch();
  g[t[0].offset] += 2.0f / 2;  // micro-batch 2
  g[t[0].offset + 1] += 2.0f / 2;
  e.accumulate_micro_batch();
  e.sync_grads();
  e.set_batch({8, 4.0, 2.0});
  const StepResult r = e.step();
  EXPECT_EQ(r.grad_sq_estimate, 6.0);
  EXPECT_EQ(r.trace_estimate, -8.0);
  EXPECT_TRUE(std::isnan(r.noise_scale)) << "a negative EMA(S) gives no noise scale";
}

// The averages go into checkpoint metadata as exact hexadecimal floats and come back bitwise.
TEST_F(NoiseScaleMpi, AveragesSurviveTheCheckpointMetadata) {
  common::NoiseScaleState s;
  common::noise_scale_update(s, 6.0, 5.0, 4.0, 8.0, 0.9);
  common::noise_scale_update(s, 1.0 / 3.0, 0.1, 4.0, 8.0, 0.9);
  MixedPrecisionEngine e(model(), config(DType::f32), world, *backend);
  auto fields = e.noise_metadata();
  EXPECT_EQ(fields.at("noise_weight"), "0x0p+0");
  // Round trip through a second engine's load_state.
  MixedPrecisionEngine source(model(), config(DType::f32), world, *backend);
  using Kind = MixedPrecisionEngine::ShardState;
  std::map<std::string, std::string> meta = source.scaler().serialize();
  meta["noise_grad_sq_ema"] = fmt::format("{:a}", s.grad_sq_ema);
  meta["noise_trace_ema"] = fmt::format("{:a}", s.trace_ema);
  meta["noise_weight"] = fmt::format("{:a}", s.weight);
  e.load_state(source.gather_tensors(Kind::master), source.gather_tensors(Kind::adam_m),
               source.gather_tensors(Kind::adam_v), 3, meta);
  EXPECT_EQ(e.noise_state(), s);
  EXPECT_EQ(e.noise_metadata().at("noise_trace_ema"), meta["noise_trace_ema"]);
  meta["noise_weight"] = "abc";
  EXPECT_THROW(e.load_state(source.gather_tensors(Kind::master), source.gather_tensors(Kind::adam_m),
                            source.gather_tensors(Kind::adam_v), 3, meta),
               InputError);
}

}  // namespace
}  // namespace mpt
