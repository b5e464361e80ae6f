// Mixed-precision engine tests under mpiexec -n 1..4 (DESIGN.md phases 3-7): the sharded (ZeRO-1) step
// against the same step on one rank, agreement on overflow, the replicated loss-scale state machine against a
// one-process replay, the global grad norm and clipping, reduce-scatter vs all-reduce, the minimum-scale stop
// and the memory accounting.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <set>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "comm_test_support.hpp"
#include "mptrain/comm_mpi.hpp"
#include "mptrain/engine.hpp"
#include "mptrain/error.hpp"
#include "mptrain/model.hpp"
#include "step_compare.hpp"

namespace mpt {
namespace {

// A small GPT-like parameter set whose element count, 1777, is prime (so no N divides it).
std::vector<TensorSpec> small_model() {
  return {{"wte", {37, 12}, true},    {"wpe", {7, 12}, true},   {"ln.w", {12}, false},
          {"ln.b", {12}, false},      {"fc.w", {12, 48}, true}, {"fc.b", {48}, false},
          {"proj.w", {48, 12}, true}, {"proj.b", {12}, false},  {"head.bias", {13}, false}};
}

EngineConfig small_config(GradSync sync = GradSync::reduce_scatter, float clip = 0.0f) {
  EngineConfig c;
  c.dtype = DType::f16;
  c.grad_sync = sync;
  c.bucket_bytes = 600 * 2;  // several buckets, the largest tensor (576) alone in one
  c.block_elements = 16;
  c.adamw.lr = 1e-2f;
  c.adamw.weight_decay = 0.1f;
  c.grad_clip = clip;
  return c;
}

using test::initial_values;

/// Writes grads[tensor element] = half(value(tensor, element) * scale) into the engine's full flat buffer.
template <typename F>
void write_grads(MixedPrecisionEngine& e, F&& value, float scale) {
  auto* g = static_cast<half*>(e.grads());
  for (size_t t = 0; t < e.layout().tensors().size(); ++t) {
    const TensorPlacement& p = e.layout().tensors()[t];
    for (size_t i = 0; i < p.spec.num_elements(); ++i) g[p.offset + i] = half(value(t, i) * scale);
  }
}

/// Unpadded values of every tensor, concatenated in registration order, from a full flat buffer.
std::vector<float> unpadded(const MixedPrecisionEngine& e, const void* flat) {
  std::vector<float> out;
  for (const TensorPlacement& p : e.layout().tensors())
    for (size_t i = 0; i < p.spec.num_elements(); ++i)
      out.push_back(to_float(static_cast<const half*>(flat)[p.offset + i]));
  return out;
}

float grad_value(int step, size_t tensor, size_t i) {
  // Deterministic, varied magnitudes and signs.
  return 0.01f * std::sin(0.37f * static_cast<float>(i) + 1.3f * static_cast<float>(tensor) +
                          0.71f * static_cast<float>(step));
}

class EngineMpi : public ::testing::Test {
 protected:
  MpiCommunicator world{MPI_COMM_WORLD};
  MpiCommunicator self{MPI_COMM_SELF};
  std::unique_ptr<Backend> backend = make_cpu_backend();
};

/// Compares this rank's master/m/v shard with the same elements of a one-rank engine, bitwise.
void compare_shard_with_single(const MixedPrecisionEngine& sharded, const MixedPrecisionEngine& single,
                               int rank) {
  const ParamLayout& L = sharded.layout();
  const ParamLayout& S = single.layout();
  const auto single_segments = S.shard_segments(0);
  for (const ShardSegment& s : L.shard_segments(rank)) {
    // Position of the same tensor elements in the one-rank shard.
    size_t single_shard = 0;
    bool found = false;
    for (const ShardSegment& q : single_segments)
      if (q.tensor == s.tensor) {
        single_shard = q.shard_offset + s.tensor_offset - q.tensor_offset;
        found = true;
      }
    ASSERT_TRUE(found);
    for (size_t i = 0; i < s.num_elements; ++i) {
      const size_t a = s.shard_offset + i;
      const size_t b = single_shard + i;
      ASSERT_EQ(std::memcmp(&sharded.master()[a], &single.master()[b], 4), 0)
          << L.tensors()[s.tensor].spec.name << "[" << s.tensor_offset + i << "] master "
          << sharded.master()[a] << " vs " << single.master()[b];
      ASSERT_EQ(std::memcmp(&sharded.adam_m()[a], &single.adam_m()[b], 4), 0) << "adam m";
      ASSERT_EQ(std::memcmp(&sharded.adam_v()[a], &single.adam_v()[b], 4), 0) << "adam v";
    }
  }
}

// Sharded step == the same step computed unsharded on one rank, bitwise, with and without clipping, for the
// same reduced gradients. The norm sums fixed blocks in a fixed order, so it is bitwise the same too.
TEST_F(EngineMpi, ShardedStepEqualsSingleRankBitwise) {
  for (float clip : {0.0f, 1e-3f}) {
    MixedPrecisionEngine sharded(small_model(), small_config(GradSync::reduce_scatter, clip), world,
                                 *backend);
    MixedPrecisionEngine single(small_model(), small_config(GradSync::reduce_scatter, clip), self, *backend);
    const auto init = initial_values(sharded.layout().num_parameters());
    sharded.set_parameters(init);
    single.set_parameters(init);
    for (int step = 0; step < 4; ++step) {
      auto value = [&](size_t t, size_t i) { return grad_value(step, t, i); };
      write_grads(sharded, value, sharded.loss_scale());
      write_grads(single, value, single.loss_scale());
      const StepResult a = sharded.step();
      const StepResult b = single.step();
      ASSERT_FALSE(a.skipped);
      EXPECT_EQ(a.grad_norm, b.grad_norm) << "clip " << clip << " step " << step;
      EXPECT_EQ(a.clip_factor, b.clip_factor);
      if (clip > 0) {
        EXPECT_LT(a.clip_factor, 1.0f);
      }
      EXPECT_EQ(a.lr, b.lr);
      compare_shard_with_single(sharded, single, world.rank());
      const auto pa = unpadded(sharded, sharded.params());
      const auto pb = unpadded(single, single.params());
      ASSERT_EQ(std::memcmp(pa.data(), pb.data(), pa.size() * sizeof(float)), 0) << "fp16 weights differ";
    }
    EXPECT_EQ(sharded.applied_steps(), 4);
  }
}

// The one-rank engine against an independent plain implementation of clip + AdamW (PyTorch's formulas),
// within FP32 rounding: the property above is only worth as much as the single-rank step itself.
TEST_F(EngineMpi, SingleRankStepMatchesPlainAdamW) {
  const float clip = 1e-3f;
  MixedPrecisionEngine single(small_model(), small_config(GradSync::reduce_scatter, clip), self, *backend);
  const size_t P = single.layout().num_parameters();
  auto w = initial_values(P);
  single.set_parameters(w);
  std::vector<double> m(P, 0.0), v(P, 0.0), p(w.begin(), w.end());
  const auto& cfg = single.config();
  for (int step = 0; step < 3; ++step) {
    auto value = [&](size_t t, size_t i) { return grad_value(step, t, i); };
    write_grads(single, value, single.loss_scale());
    const double scale = single.loss_scale();
    // Reference: gradients as stored in fp16, unscaled in double.
    std::vector<double> g;
    std::vector<bool> decay;
    for (size_t t = 0; t < single.layout().tensors().size(); ++t)
      for (size_t i = 0; i < single.layout().tensors()[t].spec.num_elements(); ++i) {
        g.push_back(to_float(half(value(t, i) * static_cast<float>(scale))) / scale);
        decay.push_back(single.layout().tensors()[t].spec.decay);
      }
    double sq = 0;
    for (double x : g) sq += x * x;
    const double norm = std::sqrt(sq);
    const double coef = std::min(1.0, clip / (norm + 1e-6));
    const StepResult r = single.step();
    EXPECT_NEAR(r.grad_norm, norm, 1e-12 * norm);
    const double lr = cfg.adamw.lr, b1 = cfg.adamw.beta1, b2 = cfg.adamw.beta2;
    const int t = step + 1;
    for (size_t k = 0; k < P; ++k) {
      const double gk = g[k] * coef;
      if (decay[k]) p[k] *= 1 - lr * cfg.adamw.weight_decay;
      m[k] = b1 * m[k] + (1 - b1) * gk;
      v[k] = b2 * v[k] + (1 - b2) * gk * gk;
      const double denom = std::sqrt(v[k]) / std::sqrt(1 - std::pow(b2, t)) + cfg.adamw.eps;
      p[k] -= lr / (1 - std::pow(b1, t)) * m[k] / denom;
    }
  }
  const auto segments = single.layout().shard_segments(0);
  size_t flat_index = 0;
  for (size_t t = 0; t < single.layout().tensors().size(); ++t) {
    for (const ShardSegment& s : segments) {
      if (s.tensor != t) continue;
      for (size_t i = 0; i < s.num_elements; ++i, ++flat_index) {
        ASSERT_NEAR(single.master()[s.shard_offset + i], p[flat_index], 1e-6)
            << single.layout().tensors()[t].spec.name << "[" << i << "]";
      }
    }
  }
  EXPECT_EQ(flat_index, P);
}

// Global grad norm with N shards equals the one-rank FP64 norm (relative 1e-12); with scale 65536, true
// gradient norm 2 and clip 1, the first step's Adam m has norm (1 - beta1) x 1 (relative 1e-6).
TEST_F(EngineMpi, GlobalNormAndClipping) {
  MixedPrecisionEngine e(small_model(), small_config(GradSync::reduce_scatter, 1.0f), world, *backend);
  ASSERT_EQ(e.loss_scale(), 65536.0f);
  e.set_parameters(initial_values(e.layout().num_parameters()));
  const double P = static_cast<double>(e.layout().num_parameters());
  // Varied true gradients with norm 2 before fp16 rounding.
  double raw = 0;
  for (size_t t = 0; t < e.layout().tensors().size(); ++t)
    for (size_t i = 0; i < e.layout().tensors()[t].spec.num_elements(); ++i)
      raw += std::pow(grad_value(0, t, i), 2.0);
  const double to_two = 2.0 / std::sqrt(raw);
  auto value = [&](size_t t, size_t i) { return static_cast<float>(grad_value(0, t, i) * to_two); };
  write_grads(e, value, 65536.0f);
  double sq = 0;  // one-rank FP64 norm of what is stored
  for (float g : unpadded(e, e.grads())) sq += static_cast<double>(g) * g;
  const double expected = std::sqrt(sq) / 65536.0;
  ASSERT_NEAR(expected, 2.0, 2.0 * 1e-3);
  (void)P;
  const StepResult r = e.step();
  EXPECT_NEAR(r.grad_norm, expected, 1e-12 * expected);
  double m_sq = 0;
  for (const ShardSegment& s : e.layout().shard_segments(world.rank()))
    for (size_t i = 0; i < s.num_elements; ++i)
      m_sq += std::pow(static_cast<double>(e.adam_m()[s.shard_offset + i]), 2);
  world.all_reduce(std::span<double>(&m_sq, 1), ReduceOp::sum);
  EXPECT_NEAR(std::sqrt(m_sq), (1.0 - 0.9) * 1.0, 1e-6 * 0.1);
}

/// Places `bad` in rank `k`'s slice (on rank k only, before the reduction), in its first real element.
void poison_slice_of(MixedPrecisionEngine& e, int k, int my_rank, float bad) {
  if (my_rank != k) return;
  const auto segments = e.layout().shard_segments(k);
  ASSERT_FALSE(segments.empty());
  static_cast<half*>(e.grads())[segments.front().flat_offset] = half(bad);
}

struct Snapshot {
  std::vector<std::byte> params, master, m, v;
  explicit Snapshot(const MixedPrecisionEngine& e) {
    auto copy = [](const void* p, size_t n) {
      std::vector<std::byte> b(n);
      std::memcpy(b.data(), p, n);
      return b;
    };
    params = copy(e.params(), e.layout().padded_elements() * 2);
    master = copy(e.master(), e.layout().shard_elements() * 4);
    m = copy(e.adam_m(), e.layout().shard_elements() * 4);
    v = copy(e.adam_v(), e.layout().shard_elements() * 4);
  }
  bool operator==(const Snapshot&) const = default;
};

// An inf placed only in rank k's slice (each k in turn), and separately a NaN: every rank skips, every rank's
// scale halves, weights and Adam state unchanged bitwise; the next clean step proceeds normally.
TEST_F(EngineMpi, OverflowInOneSliceSkipsOnEveryRank) {
  for (GradSync mode : {GradSync::reduce_scatter, GradSync::all_reduce}) {
    for (float bad : {INFINITY, NAN}) {
      for (int k = 0; k < world.size(); ++k) {
        MixedPrecisionEngine e(small_model(), small_config(mode), world, *backend);
        e.set_parameters(initial_values(e.layout().num_parameters()));
        // One clean step first, so Adam state is non-trivial.
        e.zero_grads();
        write_grads(
            e, [](size_t t, size_t i) { return grad_value(0, t, i); }, e.loss_scale());
        e.sync_grads();
        ASSERT_FALSE(e.step().skipped);
        const Snapshot before(e);
        const float scale = e.loss_scale();

        e.zero_grads();
        write_grads(
            e, [](size_t t, size_t i) { return grad_value(1, t, i); }, e.loss_scale());
        poison_slice_of(e, k, world.rank(), bad);
        e.sync_grads();
        const StepResult r = e.step();
        EXPECT_TRUE(r.skipped) << "rank " << world.rank() << " poisoned rank " << k;
        EXPECT_EQ(e.loss_scale(), scale * 0.5f);
        EXPECT_EQ(e.applied_steps(), 1);
        EXPECT_EQ(e.scaler().state().skipped_steps, 1);
        EXPECT_TRUE(Snapshot(e) == before) << "state changed on a skipped step";

        e.zero_grads();
        write_grads(
            e, [](size_t t, size_t i) { return grad_value(2, t, i); }, e.loss_scale());
        e.sync_grads();
        const StepResult next = e.step();
        EXPECT_FALSE(next.skipped);
        EXPECT_EQ(e.applied_steps(), 2);
        EXPECT_FALSE(Snapshot(e) == before);
      }
    }
  }
}

// The scaler state on every rank after 200 steps with random overflows on random ranks equals an independent
// replay of the same overflow sequence in one process.
TEST_F(EngineMpi, ScalerStateEqualsOneProcessReplay) {
  EngineConfig cfg = small_config();
  cfg.scaler.growth_interval = 7;
  cfg.scaler.hysteresis = 2;
  cfg.scaler.min_scale = 1.0f;
  cfg.scaler.max_overflows_at_min_scale = 1000;
  MixedPrecisionEngine e(small_model(), cfg, world, *backend);
  e.set_parameters(initial_values(e.layout().num_parameters()));
  DynamicLossScaler replay(cfg.scaler);
  std::mt19937 rng(42);  // same seed on every rank: the same overflow schedule everywhere
  int overflows = 0;
  for (int step = 0; step < 200; ++step) {
    const bool overflow = std::uniform_real_distribution<double>(0, 1)(rng) < 0.3;
    const int culprit = static_cast<int>(rng() % static_cast<unsigned>(world.size()));
    e.zero_grads();
    write_grads(
        e, [&](size_t t, size_t i) { return grad_value(step, t, i) * 1e-3f; }, e.loss_scale());
    if (overflow) poison_slice_of(e, culprit, world.rank(), INFINITY);
    e.sync_grads();
    const StepResult r = e.step();
    replay.update(overflow);
    overflows += overflow;
    ASSERT_EQ(r.skipped, overflow) << "step " << step;
    ASSERT_EQ(e.scaler().state(), replay.state()) << "step " << step;
  }
  EXPECT_GT(overflows, 20);
  EXPECT_EQ(e.applied_steps(), 200 - overflows);
}

// Reduce-scatter and all-reduce give the same weights after 5 steps: bitwise at N = 1 and 2 (a sum of two is
// commutative), within a stated bound at N = 3 and 4 where the fp16 summation order differs.
TEST_F(EngineMpi, ReduceScatterMatchesAllReduce) {
  MixedPrecisionEngine rs(small_model(), small_config(GradSync::reduce_scatter, 1.0f), world, *backend);
  MixedPrecisionEngine ar(small_model(), small_config(GradSync::all_reduce, 1.0f), world, *backend);
  const auto init = initial_values(rs.layout().num_parameters());
  rs.set_parameters(init);
  ar.set_parameters(init);
  const int r = world.rank();
  for (int step = 0; step < 5; ++step) {
    // Same sign on every rank, magnitudes differing by rank: no cancellation, so both orders stay within a
    // few fp16 ulp of the exact mean.
    auto value = [&](size_t t, size_t i) {
      const float base = grad_value(step, t, i);
      return base * (1.0f + 0.25f * static_cast<float>((r * 7 + static_cast<int>(i)) % 5) / 5.0f);
    };
    for (MixedPrecisionEngine* e : {&rs, &ar}) {
      e->zero_grads();
      write_grads(*e, value, e->loss_scale());
      e->sync_grads();
      ASSERT_FALSE(e->step().skipped);
    }
  }
  const auto a = unpadded(rs, rs.params());
  const auto b = unpadded(ar, ar.params());
  if (world.size() <= 2) {
    ASSERT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)), 0);
  } else {
    // Reduced gradients differ by delta <= 2N fp16 ulp relative (2^-10 each); Adam's update m/sqrt(v) moves
    // by at most ~2 delta relative per step, so over 5 steps the masters differ by <= 5 lr 4 delta, and the
    // fp16 weights by that plus one fp16 ulp. Weights themselves move by ~5 lr, 30x more than the bound.
    const double lr = rs.config().adamw.lr;
    const double delta = 2.0 * world.size() * std::ldexp(1.0, -10);
    const double bound = 5 * lr * 4 * delta;
    double max_diff = 0, max_move = 0;
    for (size_t i = 0; i < a.size(); ++i) {
      const double ulp = std::ldexp(1.0, std::ilogb(std::max(std::abs(a[i]), 6.1e-5f)) - 10);
      ASSERT_LE(std::abs(a[i] - b[i]), bound + ulp) << "element " << i;
      max_diff = std::max(max_diff, std::abs(static_cast<double>(a[i]) - b[i]));
      max_move = std::max(max_move, std::abs(static_cast<double>(a[i]) - init[i]));
    }
    EXPECT_GT(max_move, 10 * bound);
  }
}

// Repeated overflow at min_scale ends with the same clear error on every rank and no hang.
TEST_F(EngineMpi, RepeatedOverflowAtMinScaleStopsEveryRank) {
  EngineConfig cfg = small_config();
  cfg.scaler.init_scale = 65536.0f;
  cfg.scaler.min_scale = 16384.0f;
  cfg.scaler.max_overflows_at_min_scale = 3;
  MixedPrecisionEngine e(small_model(), cfg, world, *backend);
  e.set_parameters(initial_values(e.layout().num_parameters()));
  std::string message;
  int steps = 0;
  for (; steps < 50 && message.empty(); ++steps) {
    e.zero_grads();
    write_grads(
        e, [&](size_t t, size_t i) { return grad_value(steps, t, i); }, e.loss_scale());
    poison_slice_of(e, steps % world.size(), world.rank(), INFINITY);
    e.sync_grads();
    try {
      e.step();
    } catch (const NumericsError& err) {
      message = err.what();
    }
  }
  // 65536 -> 32768 -> 16384 (the minimum), then three overflows at the minimum: the 5th step stops.
  EXPECT_EQ(steps, 5);
  EXPECT_NE(message.find("minimum"), std::string::npos) << message;
  // The same message everywhere: compare lengths and bytes with rank 0's.
  std::vector<int64_t> length = {static_cast<int64_t>(message.size())};
  world.broadcast(std::span<int64_t>(length), 0);
  ASSERT_EQ(length[0], static_cast<int64_t>(message.size()));
  std::vector<uint8_t> root_text(message.begin(), message.end());
  world.broadcast(std::span<uint8_t>(root_text), 0);
  EXPECT_EQ(std::string(root_text.begin(), root_text.end()), message);
  world.barrier();
}

// Config validation: the scaler's options matter only in fp16; a subnormal initial scale (1/scale = inf) and
// an absurd block size are input errors.
TEST_F(EngineMpi, ConfigValidation) {
  EngineConfig bf = small_config();
  bf.dtype = DType::bf16;
  bf.scaler.min_scale = 1e6f;  // above init_scale: invalid for fp16, irrelevant for bf16
  MixedPrecisionEngine e(small_model(), bf, world, *backend);
  EXPECT_EQ(e.loss_scale(), 1.0f);
  EngineConfig fp16 = small_config();
  fp16.scaler.min_scale = 1e6f;
  EXPECT_THROW(MixedPrecisionEngine(small_model(), fp16, world, *backend), InputError);
  EngineConfig tiny_scale = small_config();
  tiny_scale.scaler.init_scale = 1e-40f;
  tiny_scale.scaler.min_scale = 0.0f;
  EXPECT_THROW(MixedPrecisionEngine(small_model(), tiny_scale, world, *backend), InputError);
  EngineConfig huge_block = small_config();
  huge_block.block_elements = size_t{1} << 63;
  EXPECT_THROW(MixedPrecisionEngine(small_model(), huge_block, world, *backend), InputError);
}

// FP32 gradient accumulation (main_grad): three fp16 micro-batches summed in FP32 and reduced in FP32 give,
// bitwise, the step of an fp32 engine handed the FP32 sum directly (the loss scale is a power of two, so
// unscaling is exact); and the FP32 buffer costs 4P more bytes.
TEST_F(EngineMpi, Fp32GradientAccumulationSumsMicroBatchesInFp32) {
  EngineConfig on = small_config(GradSync::reduce_scatter, 1e-3f);
  on.fp32_grad_accumulation = true;
  EngineConfig f32 = small_config(GradSync::reduce_scatter, 1e-3f);
  f32.dtype = DType::f32;
  f32.bucket_bytes = on.bucket_bytes * 2;  // the same buckets (in elements), so the same shards
  MixedPrecisionEngine a(small_model(), on, world, *backend);
  MixedPrecisionEngine b(small_model(), f32, world, *backend);
  ASSERT_EQ(a.grad_dtype(), DType::f32);
  const auto init = initial_values(a.layout().num_parameters());
  a.set_parameters(init);
  b.set_parameters(init);
  const float scale = a.loss_scale();
  for (int step = 0; step < 2; ++step) {
    a.zero_grads();
    b.zero_grads();
    std::vector<float> sum(a.layout().padded_elements(), 0.0f);
    for (int k = 0; k < 3; ++k) {
      auto value = [&](size_t t, size_t i) { return grad_value(step * 3 + k, t, i) / 3.0f; };
      write_grads(a, value, scale);  // fp16 micro-batch gradients, scaled
      for (size_t t = 0; t < a.layout().tensors().size(); ++t) {
        const TensorPlacement& p = a.layout().tensors()[t];
        for (size_t i = 0; i < p.spec.num_elements(); ++i)
          sum[p.offset + i] += to_float(half(value(t, i) * scale)) / scale;  // exact: scale is 2^16
      }
      a.accumulate_micro_batch();
    }
    std::memcpy(b.grads(), sum.data(), sum.size() * sizeof(float));
    a.sync_grads();
    b.sync_grads();
    const StepResult ra = a.step(), rb = b.step();
    ASSERT_FALSE(ra.skipped);
    EXPECT_EQ(ra.grad_norm, rb.grad_norm);
    EXPECT_EQ(std::memcmp(a.master(), b.master(), a.layout().shard_elements() * sizeof(float)), 0);
    EXPECT_EQ(std::memcmp(a.adam_v(), b.adam_v(), a.layout().shard_elements() * sizeof(float)), 0);
  }
  const MemoryReport m = a.memory();
  EXPECT_EQ(m.grads_bytes, a.layout().padded_elements() * (4 + 2));
}

// Memory accounting: the buffers actually allocated equal 4P + 12P/N plus the padding, in fp16 mode.
TEST_F(EngineMpi, MemoryAccountingMatchesAllocations) {
  const size_t before = backend->bytes_in_use();
  MixedPrecisionEngine e(small_model(), small_config(), world, *backend);
  const size_t allocated = backend->bytes_in_use() - before;
  const MemoryReport m = e.memory();
  // Every allocation is counted: the ZeRO-1 state plus the scratch (block sums and the step state).
  EXPECT_EQ(m.state_bytes() + m.scratch_bytes, allocated);
  // Per rank: one double per norm block and one per bucket (the noise scale's local squares), gathered.
  EXPECT_EQ(m.scratch_bytes, ((e.layout().blocks_per_rank() + e.layout().buckets().size()) *
                              (1 + static_cast<size_t>(world.size()))) *
                                     sizeof(double) +
                                 sizeof(common::AmpState));
  const double P = static_cast<double>(e.layout().num_parameters());
  const double padded = static_cast<double>(e.layout().padded_elements());
  const int N = world.size();
  const double padding = 4.0 * (padded - P) + 12.0 * (padded - P) / N;
  EXPECT_DOUBLE_EQ(static_cast<double>(m.state_bytes()), 4.0 * P + 12.0 * P / N + padding);
  EXPECT_DOUBLE_EQ(m.padding_bytes(2), padding);
  // Padding is under N x block elements per bucket.
  EXPECT_LT(padded - P, static_cast<double>(e.layout().buckets().size() * N * 16));
  EXPECT_EQ(m.params_bytes, e.layout().padded_elements() * 2);
  EXPECT_EQ(m.master_bytes, e.layout().shard_elements() * 4);
}

/// A Communicator that forwards to another and records the receive buffer of every non-blocking gradient
/// collective (iall_reduce / ireduce_scatter) as it is issued.
class RecordingComm final : public test::ForwardingCommunicator {
 public:
  explicit RecordingComm(Communicator& inner) : ForwardingCommunicator(inner) {}
  std::vector<const void*> started;  // recv pointers of iall_reduce / ireduce_scatter, in issue order

  std::string name() const override { return "recording(" + ForwardingCommunicator::name() + ")"; }
  std::unique_ptr<CommRequest> iall_reduce(const void* send, void* recv, size_t count, DType dtype,
                                           ReduceOp op) override {
    started.push_back(recv);
    return ForwardingCommunicator::iall_reduce(send, recv, count, dtype, op);
  }
  std::unique_ptr<CommRequest> ireduce_scatter(const void* send, void* recv, size_t recv_count, DType dtype,
                                               ReduceOp op) override {
    started.push_back(recv);
    return ForwardingCommunicator::ireduce_scatter(send, recv, recv_count, dtype, op);
  }
};

// grad_done(): reporting tensors in backward order (reverse registration) starts each bucket's collective at
// the exact report that completes it, never earlier, each once; the step that follows equals a step after a
// plain sync_grads() bitwise; a second report of a tensor is an error; with main_grad nothing starts early.
TEST_F(EngineMpi, GradDoneStartsEachBucketWhenItsLastTensorIsReported) {
  for (GradSync mode : {GradSync::reduce_scatter, GradSync::all_reduce}) {
    RecordingComm recording(world);
    MixedPrecisionEngine e(small_model(), small_config(mode, 1e-3f), recording, *backend);
    MixedPrecisionEngine plain(small_model(), small_config(mode, 1e-3f), world, *backend);
    const ParamLayout& L = e.layout();
    ASSERT_GE(L.buckets().size(), 3u) << "the test needs several buckets";
    const auto init = initial_values(L.num_parameters());
    e.set_parameters(init);
    plain.set_parameters(init);
    // Where each bucket's collective writes (its recv pointer), to map recorded calls back to buckets.
    auto* grads = static_cast<std::byte*>(e.grads());
    std::vector<const void*> bucket_recv;
    for (size_t b = 0; b < L.buckets().size(); ++b)
      bucket_recv.push_back(
          grads +
          (mode == GradSync::reduce_scatter ? L.slice_offset(b, world.rank()) : L.buckets()[b].offset) * 2);
    for (int step = 0; step < 2; ++step) {
      auto value = [&](size_t t, size_t i) { return grad_value(step, t, i); };
      e.zero_grads();
      plain.zero_grads();
      write_grads(e, value, e.loss_scale());
      write_grads(plain, value, plain.loss_scale());
      recording.started.clear();
      std::set<size_t> reported;
      for (size_t t = L.tensors().size(); t-- > 0;) {
        e.grad_done(t);
        reported.insert(t);
        // Expected: exactly the buckets all of whose tensors are reported, each started once.
        std::vector<const void*> expected;
        for (size_t b = 0; b < L.buckets().size(); ++b) {
          bool complete = true;
          for (size_t k = 0; k < L.tensors().size(); ++k)
            if (L.tensors()[k].bucket == b && !reported.count(k)) complete = false;
          if (complete) expected.push_back(bucket_recv[b]);
        }
        std::vector<const void*> got = recording.started;
        std::sort(got.begin(), got.end());
        std::sort(expected.begin(), expected.end());
        ASSERT_EQ(got, expected) << "after reporting tensor " << L.tensors()[t].spec.name << " (step " << step
                                 << ")";
      }
      EXPECT_EQ(recording.started.size(), L.buckets().size());
      EXPECT_THROW(e.grad_done(0), Error);  // reported twice
      e.sync_grads();                       // waits; starts nothing new
      EXPECT_EQ(recording.started.size(), L.buckets().size());
      plain.sync_grads();
      const StepResult a = e.step(), b = plain.step();
      ASSERT_FALSE(a.skipped);
      EXPECT_EQ(a.grad_norm, b.grad_norm);
      EXPECT_EQ(std::memcmp(e.master(), plain.master(), L.shard_elements() * sizeof(float)), 0);
      EXPECT_EQ(std::memcmp(e.params(), plain.params(), L.padded_elements() * 2), 0);
    }
  }
  // main_grad: the reduced FP32 buffer is final only after accumulate_micro_batch, so nothing starts early.
  EngineConfig on = small_config();
  on.fp32_grad_accumulation = true;
  RecordingComm recording(world);
  MixedPrecisionEngine e(small_model(), on, recording, *backend);
  e.zero_grads();
  for (size_t t = e.layout().tensors().size(); t-- > 0;) e.grad_done(t);
  EXPECT_TRUE(recording.started.empty());
  e.accumulate_micro_batch();
  e.sync_grads();
  EXPECT_EQ(recording.started.size(), e.layout().buckets().size());
}

// step_async() + result() is step(): the same numbers and state; the host mirrors lag until result(); the
// device scale pointer holds the current scale; the stop request of one rank reaches every rank.
TEST_F(EngineMpi, StepAsyncThenResultEqualsStep) {
  MixedPrecisionEngine a(small_model(), small_config(GradSync::reduce_scatter, 1e-3f), world, *backend);
  MixedPrecisionEngine b(small_model(), small_config(GradSync::reduce_scatter, 1e-3f), world, *backend);
  const auto init = initial_values(a.layout().num_parameters());
  a.set_parameters(init);
  b.set_parameters(init);
  for (int step = 0; step < 4; ++step) {
    auto value = [&](size_t t, size_t i) { return grad_value(step, t, i); };
    for (MixedPrecisionEngine* e : {&a, &b}) {
      e->zero_grads();
      write_grads(*e, value, e->loss_scale());
      if (step == 2) poison_slice_of(*e, world.size() - 1, world.rank(), INFINITY);
      e->sync_grads();
    }
    const bool stop = step == 3 && world.rank() == world.size() - 1;
    const int64_t applied_before = a.applied_steps();
    a.step_async(stop);
    EXPECT_EQ(a.applied_steps(), applied_before) << "the mirror moves only at result()";
    const StepResult ra = a.result();
    const StepResult rb = b.step(stop);
    EXPECT_EQ(ra.skipped, step == 2);
    EXPECT_EQ(ra.skipped, rb.skipped);
    EXPECT_EQ(ra.stop_requested, step == 3) << "rank " << world.rank();
    EXPECT_EQ(ra.stop_requested, rb.stop_requested);
    EXPECT_EQ(std::isnan(ra.grad_norm), ra.skipped);
    if (!ra.skipped) {
      EXPECT_EQ(ra.grad_norm, rb.grad_norm);
    }
    EXPECT_EQ(ra.lr, rb.lr);
    EXPECT_EQ(ra.clip_factor, rb.clip_factor);
    EXPECT_EQ(ra.loss_scale, rb.loss_scale);
    EXPECT_EQ(ra.applied_steps, a.applied_steps());
    EXPECT_EQ(a.scaler().state(), b.scaler().state());
    EXPECT_EQ(*a.loss_scale_device(), a.loss_scale());  // CPU backend: backend memory is host memory
    EXPECT_EQ(std::memcmp(a.master(), b.master(), a.layout().shard_elements() * sizeof(float)), 0);
  }
  EXPECT_EQ(a.applied_steps(), 3);
  EXPECT_EQ(a.loss_scale(), 32768.0f);
}

// load_state restores the backend-memory state too: the next step continues Adam's t and the scaler.
TEST_F(EngineMpi, LoadStateRestoresTheDeviceState) {
  MixedPrecisionEngine a(small_model(), small_config(), world, *backend);
  a.set_parameters(initial_values(a.layout().num_parameters()));
  DynamicLossScaler restored(a.config().scaler);
  restored.update(true);  // scale halves
  MixedPrecisionEngine b(small_model(), small_config(), world, *backend);
  b.load_state(a.gather_tensors(MixedPrecisionEngine::ShardState::master),
               a.gather_tensors(MixedPrecisionEngine::ShardState::adam_m),
               a.gather_tensors(MixedPrecisionEngine::ShardState::adam_v), 7, restored.serialize());
  EXPECT_EQ(*b.loss_scale_device(), 32768.0f);
  b.zero_grads();
  write_grads(
      b, [](size_t t, size_t i) { return grad_value(0, t, i); }, b.loss_scale());
  b.sync_grads();
  const StepResult r = b.step();
  EXPECT_FALSE(r.skipped);
  EXPECT_EQ(r.loss_scale, 32768.0f);
  EXPECT_EQ(r.applied_steps, 8);
  EXPECT_EQ(b.scaler().state().steps, 2);
}

// The four phase calls the trainer makes are step_async(): the same weights, Adam state and scaler state.
TEST_F(EngineMpi, PhaseCallsEqualStep) {
  MixedPrecisionEngine a(small_model(), small_config(GradSync::reduce_scatter, 1e-3f), world, *backend);
  MixedPrecisionEngine b(small_model(), small_config(GradSync::reduce_scatter, 1e-3f), world, *backend);
  const auto init = initial_values(a.layout().num_parameters());
  a.set_parameters(init);
  b.set_parameters(init);
  for (int step = 0; step < 3; ++step) {
    auto value = [&](size_t t, size_t i) { return grad_value(step, t, i); };
    for (MixedPrecisionEngine* e : {&a, &b}) {
      e->zero_grads();
      write_grads(*e, value, e->loss_scale());
      if (step == 1) poison_slice_of(*e, 0, world.rank(), INFINITY);
      e->sync_grads();
    }
    a.check_grads();
    a.agree();
    a.update();
    a.gather_params();
    const StepResult ra = a.result();
    const StepResult rb = b.step();
    EXPECT_EQ(ra.skipped, step == 1);
    EXPECT_EQ(ra.skipped, rb.skipped);
    EXPECT_EQ(ra.lr, rb.lr);
    EXPECT_EQ(a.scaler().state(), b.scaler().state());
    const size_t shard = a.layout().shard_elements() * sizeof(float);
    EXPECT_EQ(std::memcmp(a.master(), b.master(), shard), 0);
    EXPECT_EQ(std::memcmp(a.adam_v(), b.adam_v(), shard), 0);
    EXPECT_EQ(
        std::memcmp(a.params(), b.params(), a.layout().padded_elements() * dtype_size(a.config().dtype)), 0);
  }
}

// A table belongs to the backend it was registered with: another backend's op refuses it; the handle moves
// and keeps its elements.
TEST_F(EngineMpi, TablesBelongToTheirBackend) {
  const std::vector<ElementRange> ranges = {{0, 4}, {8, 4}};
  Table<ElementRange> table = backend->register_table<ElementRange>(ranges);
  EXPECT_EQ(table.owner(), backend.get());
  EXPECT_NE(table.id(), 0u);
  const Table<ElementRange> moved = std::move(table);
  EXPECT_EQ(table.owner(), nullptr);  // NOLINT(bugprone-use-after-move): a moved-from handle holds nothing
  ASSERT_EQ(moved.size(), 2u);
  EXPECT_EQ(moved.host()[1].offset, 8u);
  std::vector<float> grads(12, 1.0f);
  std::vector<double> sums(2);
  common::AmpState state;
  backend->grad_check(grads.data(), DType::f32, moved, 4, sums.data(), &state, false);
  EXPECT_EQ(sums[0], 4.0);
  EXPECT_EQ(sums[1], 4.0);
  const std::unique_ptr<Backend> other = make_cpu_backend();
  EXPECT_THROW(other->grad_check(grads.data(), DType::f32, moved, 4, sums.data(), &state, false), Error);
  EXPECT_THROW(
      backend->grad_check(grads.data(), DType::f32, Table<ElementRange>(), 4, sums.data(), &state, false),
      Error);
}

// The rounding bounds that tests/test_cuda_step.cpp compares two backends with, checked where they can be on
// a CPU: a 16-bit step against the FP32 step, both on the CPU backend, from the same weights and batch. FP32
// stands in for exact arithmetic (its own bound is added), so the 16-bit run must be within its bound.
class StepRoundingBound : public testing::TestWithParam<DType> {};

TEST_P(StepRoundingBound, SixteenBitStepAgainstFp32) {
  const GPTConfig config{
      .vocab_size = 61, .max_seq_len = 32, .num_layers = 2, .num_heads = 4, .channels = 64};
  const int64_t B = 3, T = 32;
  // One rank per engine (the update then follows this rank's gradients); every rank checks its own batch.
  int world_rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
  MpiCommunicator comm(MPI_COMM_SELF);
  std::mt19937 rng(7 + static_cast<unsigned>(world_rank));
  std::uniform_int_distribution<int32_t> token(0, static_cast<int32_t>(config.vocab_size) - 1);
  std::vector<int32_t> tokens(static_cast<size_t>(B * T)), targets(tokens.size());
  for (auto& t : tokens) t = token(rng);
  for (auto& t : targets) t = token(rng);
  std::vector<test::StepRecord> records;
  for (DType dt : {GetParam(), DType::f32}) {
    EngineConfig ec;
    ec.dtype = dt;
    ec.bucket_bytes = 16 << 10;
    ec.grad_clip = 1.0f;
    ec.adamw.lr = 1e-3f;
    auto backend = make_cpu_backend();
    MixedPrecisionEngine engine(gpt_tensors(config), ec, comm, *backend);
    GPT model(config, engine.layout(), *backend, dt);
    engine.set_parameters(gpt_init(config, 1234));
    records.push_back(test::record_step(*backend, engine, model, tokens, targets, B, T));
  }
  const test::StepBounds bound =
      test::step_bounds(GetParam(), config, T) + test::step_bounds(DType::f32, config, T);
  test::expect_first_step_agrees(records[0], records[1], bound, 1e-3, gpt_tensors(config));
}

INSTANTIATE_TEST_SUITE_P(Dtypes, StepRoundingBound, testing::Values(DType::f16, DType::bf16),
                         [](const auto& p) { return std::string(dtype_name(p.param)); });

}  // namespace
}  // namespace mpt
