// LAMB under ZeRO-1, run under mpiexec -n 1..4: the sharded step bitwise equal to the one-rank step (whole-
// tensor trust ratios from fixed norm segments), hand-computed cases (a tensor spread over three ranks, one
// of which holds only its zeros; a weight-decay case that needs the bias correction; an all-zero bias), an
// independent double-precision implementation, the skip on found_inf, and resume on another rank count.
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include <gtest/gtest.h>

#include "comm_test_support.hpp"
#include "mptrain/comm_mpi.hpp"
#include "mptrain/engine.hpp"

namespace mpt {
namespace {

using Kind = MixedPrecisionEngine::ShardState;

// 1777 elements (a prime, so no N divides it); blocks of 16 make several tensors share blocks and the large
// ones span many blocks and ranks.
std::vector<TensorSpec> small_model() {
  return {{"wte", {37, 12}, true},    {"wpe", {7, 12}, true},   {"ln.w", {12}, false},
          {"ln.b", {12}, false},      {"fc.w", {12, 48}, true}, {"fc.b", {48}, false},
          {"proj.w", {48, 12}, true}, {"proj.b", {12}, false},  {"head.bias", {13}, false}};
}

EngineConfig lamb_config(DType dtype, float clip, size_t block = 16) {
  EngineConfig c;
  c.dtype = dtype;
  c.optimizer = OptimizerKind::lamb;
  c.bucket_bytes = 600 * dtype_size(dtype);  // several buckets, the largest tensor (576) alone in one
  c.block_elements = block;
  c.adamw.lr = 1e-2f;
  c.adamw.eps = 1e-6f;
  c.adamw.weight_decay = 0.01f;
  c.grad_clip = clip;
  return c;
}

using test::initial_values;

float grad_value(int step, size_t tensor, size_t i) {
  return 0.01f * std::sin(0.37f * static_cast<float>(i) + 1.3f * static_cast<float>(tensor) +
                          0.71f * static_cast<float>(step));
}

/// grads[tensor element] = value(tensor, element) * scale, stored in the engine's dtype, every element of
/// the full flat buffer (every rank the same: as if already reduced).
template <typename F>
void write_grads(MixedPrecisionEngine& e, F&& value, float scale) {
  dispatch_float_dtype(e.config().dtype, [&]<typename S>() {
    auto* g = static_cast<S*>(e.grads());
    for (size_t t = 0; t < e.layout().tensors().size(); ++t) {
      const TensorPlacement& p = e.layout().tensors()[t];
      for (size_t i = 0; i < p.spec.num_elements(); ++i) g[p.offset + i] = from_float<S>(value(t, i) * scale);
    }
  });
}

/// Every tensor's FP32 state concatenated in registration order.
std::vector<float> flat(const std::vector<std::vector<float>>& tensors) {
  std::vector<float> out;
  for (const auto& t : tensors) out.insert(out.end(), t.begin(), t.end());
  return out;
}

class LambMpi : public ::testing::Test {
 protected:
  MpiCommunicator world{MPI_COMM_WORLD};
  MpiCommunicator self{MPI_COMM_SELF};
  std::unique_ptr<Backend> backend = make_cpu_backend();
};

void expect_bitwise(const std::vector<float>& a, const std::vector<float>& b, const char* what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  for (size_t i = 0; i < a.size(); ++i)
    ASSERT_EQ(std::memcmp(&a[i], &b[i], sizeof(float)), 0)
        << what << " differs at element " << i << ": " << a[i] << " vs " << b[i];
}

// N ranks against one rank, bitwise, after 5 steps: fp16 with clipping and fp32 without, two block sizes
// (16: tensors share blocks; 7: blocks and tensors straddle each other at odd offsets).
TEST_F(LambMpi, ShardedStepEqualsSingleRankBitwise) {
  for (DType dtype : {DType::f16, DType::f32})
    for (size_t block : {size_t{16}, size_t{7}}) {
      const float clip = dtype == DType::f16 ? 1e-3f : 0.0f;
      MixedPrecisionEngine sharded(small_model(), lamb_config(dtype, clip, block), world, *backend);
      MixedPrecisionEngine single(small_model(), lamb_config(dtype, clip, block), self, *backend);
      const auto init = initial_values(sharded.layout().num_parameters());
      sharded.set_parameters(init);
      single.set_parameters(init);
      for (int step = 0; step < 5; ++step) {
        auto value = [&](size_t t, size_t i) { return grad_value(step, t, i); };
        write_grads(sharded, value, sharded.loss_scale());
        write_grads(single, value, single.loss_scale());
        const StepResult a = sharded.step();
        const StepResult b = single.step();
        ASSERT_FALSE(a.skipped);
        EXPECT_EQ(a.grad_norm, b.grad_norm);
        if (clip > 0) {
          EXPECT_LT(a.clip_factor, 1.0f);
        }
      }
      for (Kind kind : {Kind::master, Kind::adam_m, Kind::adam_v})
        expect_bitwise(flat(sharded.gather_tensors(kind)), flat(single.gather_tensors(kind)),
                       kind == Kind::master ? "master" : "moments");
      // The weights moved, and not merely by AdamW's rule: compare with an AdamW engine.
      EngineConfig adam_cfg = lamb_config(dtype, clip, block);
      adam_cfg.optimizer = OptimizerKind::adamw;
      MixedPrecisionEngine adam(small_model(), adam_cfg, self, *backend);
      adam.set_parameters(init);
      for (int step = 0; step < 5; ++step) {
        write_grads(
            adam, [&](size_t t, size_t i) { return grad_value(step, t, i); }, adam.loss_scale());
        adam.step();
      }
      const auto w = flat(single.gather_tensors(Kind::master));
      const auto wa = flat(adam.gather_tensors(Kind::master));
      double moved = 0, differs = 0;
      for (size_t i = 0; i < w.size(); ++i) {
        moved = std::max(moved, std::abs(static_cast<double>(w[i]) - init[i]));
        differs = std::max(differs, std::abs(static_cast<double>(w[i]) - wa[i]));
      }
      EXPECT_GT(moved, 1e-3);
      EXPECT_GT(differs, 1e-4);
    }
}

// Tensor A = [10,0,0,0,1] and B = [2,2,1], block 1: in flat order B then A, 8 elements, so at N = 4 the
// slices are [B0 B1] [B2 A0] [A1 A2] [A3 A4]: A spans ranks 1-3 and rank 2 holds only zeros of A. Gradients
// all ones, t = 1, weight decay 0: m^ = 1 and v^ = 1, so r = 1 / (1 + eps) everywhere and every element of A
// moves by lr * ||A|| / sqrt(5) (trust 4.494), every element of B by lr * 3 / sqrt(3) (trust 1.732).
TEST_F(LambMpi, HandComputedTrustOfATensorSpreadOverThreeRanks) {
  EngineConfig c;
  c.dtype = DType::f32;
  c.optimizer = OptimizerKind::lamb;
  c.block_elements = 1;
  c.adamw.lr = 0.1f;
  c.adamw.beta1 = 0.9f;
  c.adamw.beta2 = 0.999f;
  c.adamw.eps = 1e-6f;
  c.adamw.weight_decay = 0.0f;
  MixedPrecisionEngine e({{"A", {5}, true}, {"B", {3}, true}}, c, world, *backend);
  if (world.size() == 4) {
    const auto slices = [&](int r) {
      std::vector<size_t> tensors;
      for (const ShardSegment& s : e.layout().shard_segments(r)) tensors.push_back(s.tensor);
      return tensors;
    };
    EXPECT_EQ(slices(1), (std::vector<size_t>{1, 0}));
    EXPECT_EQ(slices(2), (std::vector<size_t>{0}));
    EXPECT_EQ(slices(3), (std::vector<size_t>{0}));
  }
  const std::vector<float> init = {10, 0, 0, 0, 1, 2, 2, 1};
  e.set_parameters(init);
  write_grads(
      e, [](size_t, size_t) { return 1.0f; }, 1.0f);
  ASSERT_FALSE(e.step().skipped);
  const auto w = flat(e.gather_tensors(Kind::master));
  const double trust_a = std::sqrt(101.0) / std::sqrt(5.0);
  const double trust_b = 3.0 / std::sqrt(3.0);
  EXPECT_NEAR(trust_a, 4.494, 5e-4);
  EXPECT_NEAR(trust_b, 1.732, 5e-4);
  const double r = 1.0 / (1.0 + 1e-6);
  for (size_t i = 0; i < 5; ++i)
    EXPECT_NEAR(init[i] - w[i], 0.1 * trust_a * r, 5e-6) << "A[" << i << "] on " << world.size() << " ranks";
  for (size_t i = 5; i < 8; ++i) EXPECT_NEAR(init[i] - w[i], 0.1 * trust_b * r, 5e-6) << "B[" << i - 5 << "]";
}

// w = [3,4], g = [1,-1], betas (0.9, 0.999), eps 1e-6, weight decay 0.1, lr 0.01, t = 1: m^ = g, v^ = g^2, so
// r = g / (|g| + eps) + 0.1 w = [1.3, -0.6], trust = 5 / ||r|| = 3.492, dw = -0.01 trust r = [-0.0454,
// +0.0210]. Without the bias correction r would be about [3.46, -2.76] and dw about [-0.028, +0.022].
TEST_F(LambMpi, HandComputedWeightDecayCaseNeedsTheBiasCorrection) {
  EngineConfig c;
  c.dtype = DType::f32;
  c.optimizer = OptimizerKind::lamb;
  c.block_elements = 1;
  c.adamw.lr = 0.01f;
  c.adamw.beta1 = 0.9f;
  c.adamw.beta2 = 0.999f;
  c.adamw.eps = 1e-6f;
  c.adamw.weight_decay = 0.1f;
  MixedPrecisionEngine e({{"w", {2}, true}}, c, world, *backend);
  e.set_parameters(std::vector<float>{3.0f, 4.0f});
  write_grads(
      e, [](size_t, size_t i) { return i == 0 ? 1.0f : -1.0f; }, 1.0f);
  ASSERT_FALSE(e.step().skipped);
  const auto w = flat(e.gather_tensors(Kind::master));
  EXPECT_NEAR(w[0] - 3.0, -0.0454, 5e-5);
  EXPECT_NEAR(w[1] - 4.0, +0.0210, 5e-5);
  // The exact double value of the same formula.
  const double r0 = 1.0 / (1.0 + 1e-6) + 0.3, r1 = -1.0 / (1.0 + 1e-6) + 0.4;
  const double trust = 5.0 / std::hypot(r0, r1);
  EXPECT_NEAR(w[0] - 3.0, -0.01 * trust * r0, 1e-6);
  EXPECT_NEAR(w[1] - 4.0, -0.01 * trust * r1, 1e-6);
}

// An all-zero bias (no decay, trust 1) and an all-zero decayed weight (||w|| = 0: trust 1) both move on their
// first step, by lr * r. A decayed weight with zero gradient has r = wd * w and trust ||w|| / ||wd w|| =
// 1/wd, so it shrinks by the factor 1 - lr.
TEST_F(LambMpi, AllZeroTensorsMoveOnTheFirstStep) {
  EngineConfig c;
  c.dtype = DType::f32;
  c.optimizer = OptimizerKind::lamb;
  c.block_elements = 2;
  c.adamw.lr = 0.01f;
  c.adamw.eps = 1e-6f;
  c.adamw.weight_decay = 0.1f;
  MixedPrecisionEngine e({{"w", {3}, true}, {"bias", {3}, false}, {"zero", {4}, true}, {"still", {2}, true}},
                         c, world, *backend);
  std::vector<float> init = {0.5f, -0.5f, 1.0f, 0, 0, 0, 0, 0, 0, 0, 3.0f, 4.0f};
  e.set_parameters(init);
  // Gradients: 1, 2, 3, ... except the last tensor's, which are 0.
  write_grads(
      e, [](size_t t, size_t i) { return t == 3 ? 0.0f : static_cast<float>(i + 1); }, 1.0f);
  ASSERT_FALSE(e.step().skipped);
  const auto w = flat(e.gather_tensors(Kind::master));
  const double r = 1.0 / (1.0 + 1e-6);  // m^ / (sqrt(v^) + eps) for any non-zero g at t = 1
  for (size_t i = 3; i < 10; ++i) EXPECT_NEAR(w[i], -0.01 * r, 1e-7) << "element " << i;
  // "still": r = wd * w, trust = ||w|| / (wd ||w||) = 10, so w <- w - lr * 10 * 0.1 w = 0.99 w.
  EXPECT_NEAR(w[10], 3.0 * 0.99, 1e-6);
  EXPECT_NEAR(w[11], 4.0 * 0.99, 1e-6);
}

// The one-rank engine against a plain double implementation of clip + LAMB (the formulas of kernels/common/
// lamb.hpp written out independently), within FP32 rounding, over 4 steps.
TEST_F(LambMpi, MatchesPlainDoubleImplementation) {
  const float clip = 1e-3f;
  MixedPrecisionEngine e(small_model(), lamb_config(DType::f32, clip), world, *backend);
  const auto& tensors = e.layout().tensors();
  const size_t P = e.layout().num_parameters();
  const auto init = initial_values(P);
  e.set_parameters(init);
  std::vector<double> p(init.begin(), init.end()), m(P, 0.0), v(P, 0.0);
  const AdamWConfig& h = e.config().adamw;
  for (int step = 0; step < 4; ++step) {
    auto value = [&](size_t t, size_t i) { return grad_value(step, t, i); };
    write_grads(e, value, 1.0f);
    std::vector<double> g;
    for (size_t t = 0; t < tensors.size(); ++t)
      for (size_t i = 0; i < tensors[t].spec.num_elements(); ++i) g.push_back(value(t, i));
    double sq = 0;
    for (double x : g) sq += x * x;
    const double coef = std::min(1.0, clip / (std::sqrt(sq) + 1e-6));
    const StepResult res = e.step();
    ASSERT_FALSE(res.skipped);
    const int t = step + 1;
    const double bc1 = 1 - std::pow(h.beta1, t), bc2 = 1 - std::pow(h.beta2, t);
    size_t base = 0;
    for (const TensorPlacement& tp : tensors) {
      const size_t n = tp.spec.num_elements();
      std::vector<double> r(n);
      double w_sq = 0, r_sq = 0;
      for (size_t i = 0; i < n; ++i) {
        const size_t k = base + i;
        const double gk = g[k] * coef;
        m[k] = h.beta1 * m[k] + (1 - h.beta1) * gk;
        v[k] = h.beta2 * v[k] + (1 - h.beta2) * gk * gk;
        r[i] = (m[k] / bc1) / (std::sqrt(v[k] / bc2) + h.eps) + (tp.spec.decay ? h.weight_decay * p[k] : 0.0);
        w_sq += p[k] * p[k];
        r_sq += r[i] * r[i];
      }
      const double trust = tp.spec.decay && w_sq > 0 && r_sq > 0 ? std::sqrt(w_sq / r_sq) : 1.0;
      for (size_t i = 0; i < n; ++i) p[base + i] -= h.lr * trust * r[i];
      base += n;
    }
  }
  const auto w = flat(e.gather_tensors(Kind::master));
  double max_move = 0;
  for (size_t k = 0; k < P; ++k) {
    ASSERT_NEAR(w[k], p[k], 2e-6 + 1e-5 * std::abs(p[k])) << "element " << k;
    max_move = std::max(max_move, std::abs(p[k] - init[k]));
  }
  EXPECT_GT(max_move, 1e-3);
}

// An inf in one rank's slice: every rank skips, master and moments unchanged bitwise; the next step applies.
TEST_F(LambMpi, SkipsOnFoundInf) {
  MixedPrecisionEngine e(small_model(), lamb_config(DType::f16, 0.0f), world, *backend);
  e.set_parameters(initial_values(e.layout().num_parameters()));
  write_grads(
      e, [](size_t t, size_t i) { return grad_value(0, t, i); }, e.loss_scale());
  ASSERT_FALSE(e.step().skipped);
  const auto before = flat(e.gather_tensors(Kind::master));
  const auto m_before = flat(e.gather_tensors(Kind::adam_m));
  for (int k = 0; k < world.size(); ++k) {
    e.zero_grads();
    write_grads(
        e, [](size_t t, size_t i) { return grad_value(1, t, i); }, e.loss_scale());
    if (world.rank() == k)
      static_cast<half*>(e.grads())[e.layout().shard_segments(k).front().flat_offset] = half(INFINITY);
    EXPECT_TRUE(e.step().skipped);
    expect_bitwise(flat(e.gather_tensors(Kind::master)), before, "master after a skipped step");
    expect_bitwise(flat(e.gather_tensors(Kind::adam_m)), m_before, "m after a skipped step");
  }
  write_grads(
      e, [](size_t t, size_t i) { return grad_value(1, t, i); }, e.loss_scale());
  EXPECT_FALSE(e.step().skipped);
  EXPECT_EQ(e.applied_steps(), 2);
}

// Resume on another rank count: 3 steps on N ranks, the state handed (as a checkpoint does) to a one-rank
// engine and to a fresh N-rank one; 2 more steps on each equal 5 uninterrupted one-rank steps bitwise.
TEST_F(LambMpi, ResumeOnAnotherRankCountIsBitwise) {
  const EngineConfig c = lamb_config(DType::f16, 1e-3f);
  MixedPrecisionEngine first(small_model(), c, world, *backend);
  MixedPrecisionEngine straight(small_model(), c, self, *backend);
  const auto init = initial_values(first.layout().num_parameters());
  first.set_parameters(init);
  straight.set_parameters(init);
  auto run = [&](MixedPrecisionEngine& e, int from, int to) {
    for (int step = from; step < to; ++step) {
      write_grads(
          e, [&](size_t t, size_t i) { return grad_value(step, t, i); }, e.loss_scale());
      ASSERT_FALSE(e.step().skipped);
    }
  };
  run(first, 0, 3);
  run(straight, 0, 5);
  const auto master = first.gather_tensors(Kind::master);
  const auto m = first.gather_tensors(Kind::adam_m);
  const auto v = first.gather_tensors(Kind::adam_v);
  MixedPrecisionEngine on_one(small_model(), c, self, *backend);
  MixedPrecisionEngine on_n(small_model(), c, world, *backend);
  for (MixedPrecisionEngine* e : {&on_one, &on_n}) {
    e->load_state(master, m, v, first.applied_steps(), first.scaler().serialize());
    run(*e, 3, 5);
    expect_bitwise(flat(e->gather_tensors(Kind::master)), flat(straight.gather_tensors(Kind::master)),
                   "master after resume");
    expect_bitwise(flat(e->gather_tensors(Kind::adam_v)), flat(straight.gather_tensors(Kind::adam_v)),
                   "v after resume");
  }
}

}  // namespace
}  // namespace mpt
