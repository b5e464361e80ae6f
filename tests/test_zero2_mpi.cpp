// ZeRO stage 2 under mpiexec -n 1..4: the gradient shard and the staging pool.
//
// - Without accumulation, stage 2 takes bitwise the steps of stage 1 (weights, master, Adam m and v, loss,
//   norm, noise scale) in fp32, fp16 and bf16, with and without FP32 accumulation, with each bucket's
//   reduce-scatter started as backward finishes it (overlap) or after the whole backward, on steps 1 and 2.
// - With accumulation (K = 4) each micro-batch's reduced slice is added into the shard: the shard equals,
//   bitwise, the sum in micro-batch order of the slices stage 1 reduces for each micro-batch alone, and whole
//   steps stay within rounding of stage 1's (which sums locally first, so the order of the additions
//   differs).
// - Ranks with pools of different sizes, writing and reporting a bucket's tensors in different orders, reduce
//   the same buckets; a collective that reads its buffer only when waited on (DeferredComm) shows that no
//   pool buffer is rewritten before its reduce-scatter has completed.
// - An overflow on one rank skips the step on every rank.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <vector>

#include <gtest/gtest.h>

#include "mptrain/comm_mpi.hpp"
#include "mptrain/engine.hpp"
#include "mptrain/model.hpp"
#include "tiny_gpt.hpp"

namespace mpt {
namespace {

using test::RunTrace;
using test::tiny_gpt;

EngineConfig engine_config(DType dtype, int stage, bool main_grad) {
  EngineConfig ec;
  ec.dtype = dtype;
  ec.bucket_bytes = 1500 * dtype_size(dtype);  // several buckets; wte (128 x 16) has one of its own
  ec.block_elements = 16;
  ec.adamw.lr = 1e-2f;
  ec.grad_clip = 1.0f;
  ec.fp32_grad_accumulation = main_grad;
  ec.zero_stage = stage;
  return ec;
}

std::vector<int32_t> tokens_of(int step, int rank, int64_t k, size_t n, uint32_t salt) {
  std::mt19937 rng(static_cast<uint32_t>(1000 * step + 10 * rank + k) + salt);
  std::vector<int32_t> t(n);
  for (auto& x : t) x = static_cast<int32_t>(rng() % 37);
  return t;
}

/// One micro-batch's forward and backward; `overlap` reports each tensor to the engine as backward finishes
/// it. Stage 2 writes through grad_address().
void micro_batch(MixedPrecisionEngine& engine, GPT& model, int step, int rank, int64_t k, int64_t K,
                 bool overlap) {
  const int64_t B = 2, T = model.config().max_seq_len;
  const auto tokens = tokens_of(step, rank, k, static_cast<size_t>(B * T), 0);
  const auto targets = tokens_of(step, rank, k, static_cast<size_t>(B * T), 77);
  model.forward_accumulate(engine.params(), tokens.data(), targets.data(), B, T, 1.0f / static_cast<float>(K),
                           engine.loss_scale_device());
  const bool report = overlap && (engine.config().zero_stage == 2 || k + 1 == K);
  const std::function<void(size_t)> done = [&](size_t t) { engine.grad_done(t); };
  if (engine.config().zero_stage == 2)
    model.backward(
        engine.params(), [&](size_t t) { return engine.grad_address(t); },
        report ? done : std::function<void(size_t)>());
  else
    model.backward(engine.params(), engine.grads(), report ? done : std::function<void(size_t)>());
  engine.accumulate_micro_batch();
}

/// Two optimizer steps of K micro-batches of 2 sequences per rank; the trace holds every number a step
/// leaves: loss sum, StepResult's numbers, weights, master, Adam m and v.
RunTrace train(Communicator& comm, Backend& backend, const EngineConfig& ec, int64_t K, bool overlap) {
  const GPTConfig c = tiny_gpt();
  MixedPrecisionEngine engine(gpt_tensors(c), ec, comm, backend);
  engine.set_parameters(gpt_init(c, 7));
  engine.set_batch({2 * K * comm.size(), comm.size() > 1 ? 2.0 * static_cast<double>(K) : 0.0, 1.0});
  GPT model(c, engine.layout(), backend, ec.dtype);
  RunTrace trace;
  for (int step = 0; step < 2; ++step) {
    engine.zero_grads();
    for (int64_t k = 0; k < K; ++k) micro_batch(engine, model, step, comm.rank(), k, K, overlap);
    engine.sync_grads();
    const StepResult r = engine.step();
    EXPECT_FALSE(r.skipped);
    const double loss = model.take_loss_sum();
    trace.add(&loss, sizeof loss);
    for (const double x :
         {r.grad_norm, static_cast<double>(r.clip_factor), static_cast<double>(r.lr),
          static_cast<double>(r.loss_scale), r.noise_scale, r.grad_sq_estimate, r.trace_estimate})
      trace.add(&x, sizeof x);
    trace.add(engine.params(), engine.layout().padded_elements() * dtype_size(ec.dtype));
    const size_t shard_bytes = engine.layout().shard_elements() * sizeof(float);
    trace.add(engine.master(), shard_bytes);
    trace.add(engine.adam_m(), shard_bytes);
    trace.add(engine.adam_v(), shard_bytes);
  }
  return trace;
}

size_t first_difference(const RunTrace& a, const RunTrace& b) {
  size_t i = 0;
  while (i < a.bytes.size() && i < b.bytes.size() && a.bytes[i] == b.bytes[i]) ++i;
  return i;
}

TEST(Zero2Mpi, StepsEqualStageOneBitwiseWithoutAccumulation) {
  MpiCommunicator world(MPI_COMM_WORLD);
  const auto backend = make_cpu_backend();
  for (DType dtype : {DType::f32, DType::f16, DType::bf16})
    for (bool main_grad : {false, true})
      for (bool overlap : {true, false}) {
        SCOPED_TRACE(fmt::format("{}{}, overlap {}, {} rank(s)", dtype_name(dtype),
                                 main_grad ? " + FP32 accumulation" : "", overlap, world.size()));
        const RunTrace one = train(world, *backend, engine_config(dtype, 1, main_grad), 1, overlap);
        EngineConfig ec = engine_config(dtype, 2, main_grad);
        // Without overlap every bucket is written before any is reduced: a buffer per bucket.
        if (!overlap) ec.staging_buffers = 64;
        const RunTrace two = train(world, *backend, ec, 1, overlap);
        ASSERT_EQ(one.bytes.size(), two.bytes.size());
        EXPECT_EQ(first_difference(one, two), one.bytes.size()) << "first differing byte";
      }
}

/// This rank's reduced slices after one step's micro-batches, bucket by bucket in shard order, as float.
std::vector<float> reduced_shard(Backend& backend, const MixedPrecisionEngine& engine) {
  const ParamLayout& layout = engine.layout();
  const DType gdt = engine.grad_dtype();
  const bool stage2 = engine.config().zero_stage == 2;
  std::vector<std::byte> raw((stage2 ? layout.shard_elements() : layout.padded_elements()) * dtype_size(gdt));
  backend.copy_to_host(raw.data(), engine.reduced_grads(), raw.size());
  std::vector<float> out;
  dispatch_float_dtype(gdt, [&]<typename S>() {
    const auto* g = reinterpret_cast<const S*>(raw.data());
    for (size_t b = 0; b < layout.buckets().size(); ++b) {
      const size_t at = stage2 ? layout.buckets()[b].shard_offset : layout.slice_offset(b, engine.rank());
      for (size_t i = 0; i < layout.buckets()[b].slice_elements; ++i) out.push_back(to_float(g[at + i]));
    }
  });
  return out;
}

TEST(Zero2Mpi, AccumulationAddsEveryMicroBatchsReducedSliceInOrder) {
  MpiCommunicator world(MPI_COMM_WORLD);
  const auto backend = make_cpu_backend();
  const GPTConfig c = tiny_gpt();
  const int64_t K = 4;
  for (DType dtype : {DType::f32, DType::f16, DType::bf16})
    for (bool main_grad : {false, true})
      for (bool overlap : {true, false}) {
        SCOPED_TRACE(fmt::format("{}{}, overlap {}, {} rank(s)", dtype_name(dtype),
                                 main_grad ? " + FP32 accumulation" : "", overlap, world.size()));
        EngineConfig ec2 = engine_config(dtype, 2, main_grad);
        if (!overlap) ec2.staging_buffers = 64;
        MixedPrecisionEngine two(gpt_tensors(c), ec2, world, *backend);
        MixedPrecisionEngine one(gpt_tensors(c), engine_config(dtype, 1, main_grad), world, *backend);
        two.set_parameters(gpt_init(c, 7));
        one.set_parameters(gpt_init(c, 7));
        GPT model_two(c, two.layout(), *backend, dtype), model_one(c, one.layout(), *backend, dtype);
        two.zero_grads();
        for (int64_t k = 0; k < K; ++k) micro_batch(two, model_two, 0, world.rank(), k, K, overlap);
        two.sync_grads();
        // Replay: stage 1 reduces each micro-batch alone; the slices summed in micro-batch order in the
        // gradient dtype (float adds rounded once, as Backend::accumulate).
        std::vector<float> expected;
        for (int64_t k = 0; k < K; ++k) {
          one.zero_grads();
          micro_batch(one, model_one, 0, world.rank(), k, K, overlap);
          one.sync_grads();
          const std::vector<float> slice = reduced_shard(*backend, one);
          one.check_grads();  // ends stage 1's step of buckets (no update follows)
          if (k == 0) {
            expected = slice;
            continue;
          }
          dispatch_float_dtype(two.grad_dtype(), [&]<typename S>() {
            for (size_t i = 0; i < slice.size(); ++i)
              expected[i] = to_float(from_float<S>(expected[i] + slice[i]));
          });
        }
        const std::vector<float> got = reduced_shard(*backend, two);
        ASSERT_EQ(got.size(), expected.size());
        ASSERT_EQ(std::memcmp(got.data(), expected.data(), got.size() * sizeof(float)), 0);
        // Not the first or the last micro-batch alone.
        EXPECT_NE(got, reduced_shard(*backend, one));
      }
}

TEST(Zero2Mpi, AccumulatedStepsStayWithinRoundingOfStageOne) {
  MpiCommunicator world(MPI_COMM_WORLD);
  const auto backend = make_cpu_backend();
  const GPTConfig c = tiny_gpt();
  for (DType dtype : {DType::f32, DType::bf16})
    for (bool overlap : {true, false}) {
      SCOPED_TRACE(fmt::format("{}, overlap {}, {} rank(s)", dtype_name(dtype), overlap, world.size()));
      std::vector<std::vector<float>> master[2];
      for (int stage : {1, 2}) {
        EngineConfig ec = engine_config(dtype, stage, false);
        ec.grad_clip = 0.0f;
        if (!overlap) ec.staging_buffers = 64;
        MixedPrecisionEngine engine(gpt_tensors(c), ec, world, *backend);
        engine.set_parameters(gpt_init(c, 7));
        GPT model(c, engine.layout(), *backend, dtype);
        for (int step = 0; step < 2; ++step) {
          engine.zero_grads();
          for (int64_t k = 0; k < 4; ++k) micro_batch(engine, model, step, world.rank(), k, 4, overlap);
          engine.sync_grads();
          EXPECT_FALSE(engine.step().skipped);
        }
        master[stage - 1] = engine.gather_tensors(MixedPrecisionEngine::ShardState::master);
      }
      // AdamW moves every weight by about lr per step whatever the gradient's size, so two runs whose
      // gradients differ by rounding differ by a small part of 2 lr per weight, except where a gradient is
      // within its rounding of zero and its sign flips (at most 2% of the weights here). Losing a micro-batch
      // changes the sign of far more of them.
      size_t far = 0, total = 0;
      for (size_t t = 0; t < master[0].size(); ++t)
        for (size_t e = 0; e < master[0][t].size(); ++e, ++total)
          if (std::abs(master[0][t][e] - master[1][t][e]) > 0.5 * 1e-2) ++far;
      EXPECT_LE(far, total / 50) << far << " of " << total << " weights apart";
    }
}

/// A Communicator whose reduce-scatters run only when waited on (they read the send buffer then), so an
/// engine that rewrote a staging buffer before waiting would reduce the wrong values.
class DeferredComm final : public Communicator {
 public:
  explicit DeferredComm(Communicator& inner) : inner_(inner) {}
  int rank() const override { return inner_.rank(); }
  int size() const override { return inner_.size(); }
  std::string name() const override { return "deferred"; }
  void all_reduce(const void* s, void* r, size_t n, DType d, ReduceOp op) override {
    inner_.all_reduce(s, r, n, d, op);
  }
  void reduce_scatter(const void* s, void* r, size_t n, DType d, ReduceOp op) override {
    inner_.reduce_scatter(s, r, n, d, op);
  }
  void all_gather(const void* s, void* r, size_t n, DType d) override { inner_.all_gather(s, r, n, d); }
  void broadcast(void* b, size_t n, DType d, int root) override { inner_.broadcast(b, n, d, root); }
  void barrier() override { inner_.barrier(); }
  void set_timeout_seconds(double s) override { inner_.set_timeout_seconds(s); }
  std::unique_ptr<CommRequest> iall_reduce(const void* s, void* r, size_t n, DType d, ReduceOp op) override {
    return inner_.iall_reduce(s, r, n, d, op);
  }
  std::unique_ptr<CommRequest> iall_gather(const void* s, void* r, size_t n, DType d) override {
    return inner_.iall_gather(s, r, n, d);
  }
  std::unique_ptr<CommRequest> ireduce_scatter(const void* s, void* r, size_t n, DType d,
                                               ReduceOp op) override {
    ++issued;
    struct Deferred final : CommRequest {
      std::function<void()> run;
      bool done = false;
      void wait() override {
        if (!done) run();
        done = true;
      }
      bool test() override { return done; }
      ~Deferred() override { wait(); }
    };
    auto request = std::make_unique<Deferred>();
    request->run = [this, s, r, n, d, op] { inner_.reduce_scatter(s, r, n, d, op); };
    return request;
  }
  int issued = 0;

 private:
  Communicator& inner_;
};

/// A synthetic model of `count` tensors of rank- and tensor-dependent sizes-fixed values; each rank writes a
/// bucket's tensors and reports them in its own order, with its own pool size.
TEST(Zero2Mpi, RanksWithOtherPoolsAndOrdersReduceByTheFixedLayout) {
  MpiCommunicator world(MPI_COMM_WORLD);
  const auto backend = make_cpu_backend();
  std::vector<TensorSpec> specs;
  for (int t = 0; t < 23; ++t) specs.push_back({fmt::format("t{}", t), {3 + (t * 7) % 11, 5}, true});
  for (bool deferred : {false, true})
    for (int pool : {1, 2}) {
      SCOPED_TRACE(fmt::format("pool {} (+ rank), {} collectives, {} rank(s)", pool,
                               deferred ? "deferred" : "MPI", world.size()));
      DeferredComm lazy(world);
      Communicator& comm = deferred ? static_cast<Communicator&>(lazy) : world;
      EngineConfig ec;
      ec.dtype = DType::f16;
      ec.bucket_bytes = 120 * 2;  // 23 tensors of 15-65 elements: ~10 buckets
      ec.block_elements = 4;
      ec.zero_stage = 2;
      ec.staging_buffers = pool + world.rank() % 2;  // pool sizes differ by rank
      MixedPrecisionEngine two(specs, ec, comm, *backend);
      ec.zero_stage = 1;
      MixedPrecisionEngine one(specs, ec, world, *backend);
      const ParamLayout& layout = two.layout();
      ASSERT_GE(layout.buckets().size(), 6u);
      // Values exactly representable and rank-dependent: the reduction's exact result is known either way.
      const auto value = [&](size_t t, size_t i) {
        return static_cast<float>((static_cast<int>(t * 31 + i * 7) % 19) - 9 + world.rank()) / 8.0f;
      };
      two.zero_grads();
      one.zero_grads();
      auto* flat = static_cast<half*>(one.grads());
      std::mt19937 rng(static_cast<uint32_t>(world.rank() + 1));
      for (size_t b = 0; b < layout.buckets().size(); ++b) {
        std::vector<size_t> members;
        for (size_t t = 0; t < specs.size(); ++t)
          if (layout.tensors()[t].bucket == b) members.push_back(t);
        std::shuffle(members.begin(), members.end(), rng);  // the write order of this rank
        for (const size_t t : members) {
          std::vector<half> g(specs[t].num_elements());
          for (size_t i = 0; i < g.size(); ++i) g[i] = half(value(t, i));
          backend->copy_from_host(two.grad_address(t), g.data(), g.size() * sizeof(half));
          std::copy(g.begin(), g.end(), flat + layout.tensors()[t].offset);
        }
        std::shuffle(members.begin(), members.end(), rng);  // the report order of this rank
        for (const size_t t : members) two.grad_done(t);
      }
      if (deferred) {
        EXPECT_EQ(lazy.issued, static_cast<int>(layout.buckets().size()));
      }
      two.sync_grads();
      one.sync_grads();
      const std::vector<float> got = reduced_shard(*backend, two), want = reduced_shard(*backend, one);
      ASSERT_EQ(got.size(), want.size());
      EXPECT_EQ(std::memcmp(got.data(), want.data(), got.size() * sizeof(float)), 0);
    }
}

TEST(Zero2Mpi, PoolTooSmallForTheBucketsBeingWrittenIsAnError) {
  MpiCommunicator world(MPI_COMM_WORLD);
  const auto backend = make_cpu_backend();
  std::vector<TensorSpec> specs;
  for (int t = 0; t < 6; ++t) specs.push_back({fmt::format("t{}", t), {40}, true});
  EngineConfig ec;
  ec.bucket_bytes = 40 * 2;  // one tensor per bucket
  ec.block_elements = 4;
  ec.zero_stage = 2;
  ec.staging_buffers = 2;
  MixedPrecisionEngine e(specs, ec, world, *backend);
  e.zero_grads();
  e.grad_address(0);
  e.grad_address(1);
  EXPECT_THROW(e.grad_address(2), Error);  // two buckets open, none in flight
  EngineConfig bad = ec;
  bad.grad_sync = GradSync::all_reduce;
  EXPECT_THROW(MixedPrecisionEngine(specs, bad, world, *backend), InputError);
}

TEST(Zero2Mpi, OverflowOnOneRankSkipsOnEveryRank) {
  MpiCommunicator world(MPI_COMM_WORLD);
  const auto backend = make_cpu_backend();
  const GPTConfig c = tiny_gpt();
  for (int64_t K : {1, 3}) {
    SCOPED_TRACE(fmt::format("K = {}, {} rank(s)", K, world.size()));
    MixedPrecisionEngine engine(gpt_tensors(c), engine_config(DType::f16, 2, false), world, *backend);
    engine.set_parameters(gpt_init(c, 7));
    GPT model(c, engine.layout(), *backend, DType::f16);
    const auto before = engine.gather_tensors(MixedPrecisionEngine::ShardState::master);
    const float scale = engine.loss_scale();
    engine.zero_grads();
    const int64_t B = 2, T = c.max_seq_len;
    const int bad_rank = world.size() - 1;
    for (int64_t k = 0; k < K; ++k) {
      const auto tokens = tokens_of(0, world.rank(), k, static_cast<size_t>(B * T), 0);
      model.forward_accumulate(engine.params(), tokens.data(), tokens.data(), B, T,
                               1.0f / static_cast<float>(K), engine.loss_scale_device());
      // The last rank's first micro-batch gets +inf in one element of h.1's MLP weight, inside backward.
      const size_t victim = engine.layout().find("h.1.mlp.c_fc.weight");
      model.backward(
          engine.params(), [&](size_t t) { return engine.grad_address(t); },
          [&](size_t t) {
            if (t == victim && k == 0 && world.rank() == bad_rank) {
              const half inf(std::numeric_limits<float>::infinity());
              backend->copy_from_host(engine.grad_address(t), &inf, sizeof inf);
            }
            engine.grad_done(t);
          });
      engine.accumulate_micro_batch();
    }
    const StepResult r = engine.step();
    EXPECT_TRUE(r.skipped);
    EXPECT_LT(engine.loss_scale(), scale);
    EXPECT_EQ(engine.gather_tensors(MixedPrecisionEngine::ShardState::master), before);
    EXPECT_EQ(r.applied_steps, 0);
  }
}

TEST(Zero2Mpi, MemoryFollowsTheFormula) {
  MpiCommunicator world(MPI_COMM_WORLD);
  const auto backend = make_cpu_backend();
  const GPTConfig c = tiny_gpt();
  for (bool main_grad : {false, true}) {
    const EngineConfig ec1 = engine_config(DType::f16, 1, main_grad),
                       ec2 = engine_config(DType::f16, 2, main_grad);
    MixedPrecisionEngine one(gpt_tensors(c), ec1, world, *backend);
    MixedPrecisionEngine two(gpt_tensors(c), ec2, world, *backend);
    const MemoryReport m1 = one.memory(), m2 = two.memory();
    const MemoryReport p2 = MixedPrecisionEngine::predict_memory(gpt_tensors(c), ec2, world.size());
    EXPECT_EQ(p2.grads_bytes, m2.grads_bytes);
    EXPECT_EQ(p2.staging_bytes, m2.staging_bytes);
    EXPECT_EQ(p2.state_bytes(), m2.state_bytes());
    const size_t padded = one.layout().padded_elements(), shard = one.layout().shard_elements();
    const size_t gsize = main_grad ? 4 : 2;
    EXPECT_EQ(m2.grads_bytes, shard * gsize);
    // Stage 2 drops the full gradients (and main_grad's micro-batch buffer) for the shard and the pool.
    EXPECT_EQ(m1.state_bytes() - m2.state_bytes() + m2.staging_bytes,
              padded * gsize + (main_grad ? padded * 2 : 0) - shard * gsize);
    EXPECT_GT(m2.staging_bytes, 0u);
    EXPECT_EQ(m1.staging_bytes, 0u);
    // Padding only: the formula 2P + 14P/N (plus the FP32 shard's extra) is met within the padding.
    EXPECT_GE(m2.padding_bytes(2), 0.0);
    EXPECT_LT(m2.padding_bytes(2), 0.5 * static_cast<double>(m2.num_parameters));
  }
}

}  // namespace
}  // namespace mpt
