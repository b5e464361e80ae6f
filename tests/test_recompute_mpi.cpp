// Activation recomputation in data-parallel training under mpiexec -n 1..4: whole optimizer steps (gradient
// accumulation, each bucket's collective started by backward as it finishes the bucket) with
// --recompute selective and block give bitwise the weights, master shard and losses of keeping every
// activation, in fp32, fp16 and bf16. The memory model predicts the bytes a step allocates, and picks the
// largest micro-batch that fits a budget.
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include <gtest/gtest.h>

#include "mptrain/comm_mpi.hpp"
#include "mptrain/engine.hpp"
#include "mptrain/memory_model.hpp"
#include "mptrain/model.hpp"
#include "tiny_gpt.hpp"

namespace mpt {
namespace {

using test::RunTrace;
using test::tiny_gpt;

/// Two optimizer steps of K = 2 micro-batches of 2 sequences per rank (rank-dependent tokens), the last
/// micro-batch's backward reporting each tensor to the engine (the buckets' reduce-scatters overlap it).
RunTrace train(Communicator& comm, Backend& backend, DType dtype, Recompute mode) {
  const GPTConfig c = tiny_gpt();
  EngineConfig ec;
  ec.dtype = dtype;
  ec.bucket_bytes = 1500 * dtype_size(dtype);  // several buckets
  ec.block_elements = 16;
  ec.adamw.lr = 1e-2f;
  ec.grad_clip = 1.0f;
  MixedPrecisionEngine engine(gpt_tensors(c), ec, comm, backend);
  engine.set_parameters(gpt_init(c, 7));
  GPT model(c, engine.layout(), backend, dtype, mode);
  EXPECT_GT(engine.layout().buckets().size(), 2u);
  const int64_t B = 2, T = c.max_seq_len, K = 2;
  RunTrace trace;
  for (int step = 0; step < 2; ++step) {
    engine.zero_grads();
    for (int64_t k = 0; k < K; ++k) {
      std::mt19937 rng(static_cast<uint32_t>(1000 * step + 10 * comm.rank() + k));
      std::vector<int32_t> tokens(static_cast<size_t>(B * T)), targets(tokens.size());
      for (auto& x : tokens) x = static_cast<int32_t>(rng() % 37);
      for (auto& x : targets) x = static_cast<int32_t>(rng() % 37);
      model.forward_accumulate(engine.params(), tokens.data(), targets.data(), B, T, 1.0f / K,
                               engine.loss_scale_device());
      if (k + 1 == K)
        model.backward(engine.params(), engine.grads(), [&](size_t t) { engine.grad_done(t); });
      else
        model.backward(engine.params(), engine.grads());
      engine.accumulate_micro_batch();
    }
    const StepResult r = engine.step();
    EXPECT_FALSE(r.skipped);
    const double loss = model.take_loss_sum();
    trace.add(&loss, sizeof loss);
    trace.add(&r.grad_norm, sizeof r.grad_norm);
    trace.add(engine.params(), engine.layout().padded_elements() * dtype_size(dtype));
    trace.add(engine.master(), engine.layout().shard_elements() * sizeof(float));
  }
  return trace;
}

TEST(RecomputeMpi, StepsBitwiseEqualToKeepingEveryActivation) {
  MpiCommunicator world(MPI_COMM_WORLD);
  const auto backend = make_cpu_backend();
  for (DType dtype : {DType::f32, DType::f16, DType::bf16}) {
    const RunTrace reference = train(world, *backend, dtype, Recompute::none);
    for (Recompute mode : {Recompute::selective, Recompute::block}) {
      SCOPED_TRACE(fmt::format("{} --recompute {} on {} rank(s)", dtype_name(dtype), recompute_name(mode),
                               world.size()));
      const RunTrace trace = train(world, *backend, dtype, mode);
      ASSERT_EQ(trace.bytes.size(), reference.bytes.size());
      size_t first = 0;
      while (first < trace.bytes.size() && trace.bytes[first] == reference.bytes[first]) ++first;
      EXPECT_EQ(first, trace.bytes.size()) << "first differing byte " << first;
    }
  }
}

TEST(MemoryModelMpi, PredictsTheBytesAllocatedByAStep) {
  MpiCommunicator world(MPI_COMM_WORLD);
  const GPTConfig c = tiny_gpt();
  for (DType dtype : {DType::f32, DType::f16, DType::bf16})
    for (bool main_grad : {false, true})
      for (Recompute mode : {Recompute::none, Recompute::selective, Recompute::block})
        for (OptimizerKind optimizer : {OptimizerKind::adamw, OptimizerKind::lamb})
          for (int stage : {1, 2}) {
            SCOPED_TRACE(
                fmt::format("{}{} --recompute {} --optimizer {} --zero-stage {} on {} rank(s)",
                            dtype_name(dtype), main_grad ? " + FP32 accumulation" : "", recompute_name(mode),
                            optimizer == OptimizerKind::lamb ? "lamb" : "adamw", stage, world.size()));
            const auto backend = make_cpu_backend();
            EngineConfig ec;
            ec.dtype = dtype;
            ec.optimizer = optimizer;
            ec.bucket_bytes = 1500 * dtype_size(dtype);
            ec.block_elements = 16;
            ec.fp32_grad_accumulation = main_grad;
            ec.zero_stage = stage;
            const int64_t B = 3, T = c.max_seq_len;
            const MemoryEstimate e = estimate_memory(c, ec, world.size(), mode, B, T, *backend);
            EXPECT_EQ(backend->bytes_in_use(), 0u);  // estimating allocates nothing
            MixedPrecisionEngine engine(gpt_tensors(c), ec, world, *backend);
            engine.set_parameters(gpt_init(c, 7));
            GPT model(c, engine.layout(), *backend, dtype, mode);
            const MemoryReport predicted =
                MixedPrecisionEngine::predict_memory(gpt_tensors(c), ec, world.size());
            const MemoryReport actual = engine.memory();
            EXPECT_EQ(predicted.params_bytes, actual.params_bytes);
            EXPECT_EQ(predicted.grads_bytes, actual.grads_bytes);
            EXPECT_EQ(predicted.master_bytes, actual.master_bytes);
            EXPECT_EQ(predicted.scratch_bytes, actual.scratch_bytes);
            EXPECT_EQ(predicted.staging_bytes, actual.staging_bytes);
            std::vector<int32_t> tokens(static_cast<size_t>(B * T), 5);
            engine.zero_grads();
            model.forward_accumulate(engine.params(), tokens.data(), tokens.data(), B, T, 1.0f,
                                     engine.loss_scale_device());
            if (stage == 2)
              model.backward(
                  engine.params(), [&](size_t t) { return engine.grad_address(t); },
                  [&](size_t t) { engine.grad_done(t); });
            else
              model.backward(engine.params(), engine.grads());
            engine.accumulate_micro_batch();
            engine.step();
            EXPECT_EQ(e.allocated(), backend->bytes_in_use());
            // Within 5% as the start-up lines compare them (here they are equal).
            EXPECT_LE(
                std::abs(static_cast<double>(e.allocated()) / static_cast<double>(backend->bytes_in_use()) -
                         1.0),
                0.05);
            EXPECT_GE(e.workspace, dtype == DType::f32 ? 0u : 1u);
            EXPECT_LE(backend->workspace_bytes_in_use(), 2 * e.workspace);  // grow-only vector: up to 2x
          }
}

TEST(MemoryModel, LargestMicroBatchFitsAndTheNextDoesNot) {
  const GPTConfig c = tiny_gpt();
  const auto backend = make_cpu_backend();
  EngineConfig ec;
  ec.dtype = DType::f16;
  const auto estimate = [&](int64_t B) {
    return estimate_memory(c, ec, 2, Recompute::block, B, c.max_seq_len, *backend);
  };
  const size_t budget = estimate(37).total() + 1;
  EXPECT_EQ(largest_micro_batch(estimate, budget, 1000), 37);
  EXPECT_EQ(largest_micro_batch(estimate, budget, 20), 20);
  EXPECT_EQ(largest_micro_batch(estimate, budget, 1000, 60), 30);  // the largest divisor of 60 that fits
  EXPECT_EQ(largest_micro_batch(estimate, estimate(1).total() - 1, 1000), 0);
  // Recomputation lets a larger micro-batch fit the same budget.
  const auto keep_all = [&](int64_t B) {
    return estimate_memory(c, ec, 2, Recompute::none, B, c.max_seq_len, *backend);
  };
  EXPECT_LT(largest_micro_batch(keep_all, budget, 1000), 37);
}

}  // namespace
}  // namespace mpt
