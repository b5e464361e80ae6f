// Whole training steps on the CUDA backend + NCCL communicator against the CPU backend + MPI communicator:
// the same model, weights and batches; losses, loss scale and skipped steps over several steps, and the first
// step's gradients and update, must agree within bounds derived from the dtype's unit roundoff (step_bounds).
// Also checks that the first gradient bucket's reduce-scatter starts on the communication stream before
// backward ends (DESIGN.md phase 3 overlap), from CUDA event timestamps. Skips with "no CUDA device" where
// there is none.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdio>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <cuda_runtime.h>
#include <gtest/gtest.h>
#include <mpi.h>

#include "comm_test_support.hpp"
#include "mptrain/comm_mpi.hpp"
#include "mptrain/comm_nccl.hpp"
#include "mptrain/cuda_check.hpp"
#include "mptrain/cuda_ops.hpp"
#include "mptrain/engine.hpp"
#include "mptrain/model.hpp"
#include "mptrain/runtime.hpp"
#include "step_compare.hpp"

namespace {

using namespace mpt;

/// One data-parallel trainer: backend, communicator, engine and model.
struct Trainer {
  std::unique_ptr<Backend> backend;
  std::unique_ptr<Communicator> comm;
  std::unique_ptr<MixedPrecisionEngine> engine;
  std::unique_ptr<GPT> model;

  std::unique_ptr<Communicator> wrapper;  // when set, the engine talks through it

  /// `wrap` (optional) puts a decorator between the engine and the communicator.
  Trainer(bool cuda, const GPTConfig& config, const EngineConfig& engine_config,
          const std::function<std::unique_ptr<Communicator>(Communicator&)>& wrap = {}) {
    if (cuda) {
      const int device = select_local_device(MPI_COMM_WORLD);
      MPT_CUDA_CHECK(cudaSetDevice(device));
      backend = make_cuda_backend(device);
      comm = std::make_unique<NcclCommunicator>(MPI_COMM_WORLD,
                                                static_cast<cudaStream_t>(backend->native_stream()), 60.0);
    } else {
      backend = make_cpu_backend();
      comm = std::make_unique<MpiCommunicator>(MPI_COMM_WORLD);
    }
    if (wrap) wrapper = wrap(*comm);
    engine = std::make_unique<MixedPrecisionEngine>(gpt_tensors(config), engine_config,
                                                    wrapper ? *wrapper : *comm, *backend);
    model = std::make_unique<GPT>(config, engine->layout(), *backend, engine_config.dtype);
    engine->set_parameters(gpt_init(config, 1234));
  }

  /// One optimizer step over `tokens`/`targets` (this rank's micro-batch), overlapping the bucket reduction
  /// with backward through grad_done. Returns the step's numbers and the micro-batch loss.
  StepResult step(const std::vector<int32_t>& tokens, const std::vector<int32_t>& targets, int64_t B,
                  int64_t T, double* loss) {
    engine->zero_grads();
    model->forward_accumulate(engine->params(), tokens.data(), targets.data(), B, T, 1.0f,
                              engine->loss_scale_device());
    const auto done = [&](size_t tensor) { engine->grad_done(tensor); };
    if (engine->config().zero_stage == 2)
      model->backward(
          engine->params(), [&](size_t tensor) { return engine->grad_address(tensor); }, done);
    else
      model->backward(engine->params(), engine->grads(), done);
    engine->sync_grads();
    engine->step_async();
    const StepResult r = engine->result();
    *loss = model->take_loss_sum() / static_cast<double>(B * T);
    return r;
  }
  /// The first step, recorded for test::expect_first_step_agrees (the reduction after the whole backward).
  test::StepRecord record(const std::vector<int32_t>& tokens, const std::vector<int32_t>& targets, int64_t B,
                          int64_t T) {
    return test::record_step(*backend, *engine, *model, tokens, targets, B, T);
  }
};

/// Forwards to the NCCL communicator and records `first_issued` on its comm stream right after the first
/// reduce-scatter of each step was enqueued there (so the event completes when that collective has).
class FirstBucketRecorder final : public test::ForwardingCommunicator {
 public:
  FirstBucketRecorder(NcclCommunicator& inner, cudaEvent_t first_issued)
      : ForwardingCommunicator(inner), nccl_(inner), event_(first_issued) {}
  void arm() { armed_ = true; }
  bool fired() const { return !armed_; }
  std::unique_ptr<CommRequest> iall_reduce(const void* s, void* r, size_t n, DType t, ReduceOp op) override {
    auto request = nccl_.iall_reduce(s, r, n, t, op);
    record();
    return request;
  }
  std::unique_ptr<CommRequest> ireduce_scatter(const void* s, void* r, size_t n, DType t,
                                               ReduceOp op) override {
    auto request = nccl_.ireduce_scatter(s, r, n, t, op);
    record();
    return request;
  }

 private:
  void record() {
    if (!armed_) return;
    MPT_CUDA_CHECK(cudaEventRecord(event_, nccl_.comm_stream()));
    armed_ = false;
  }
  NcclCommunicator& nccl_;
  cudaEvent_t event_;
  bool armed_ = false;
};

bool have_device() {
  return cuda::device_count() > 0;
}

class CudaStep : public testing::TestWithParam<DType> {};

/// Four steps of `optimizer` on CUDA + NCCL and on CPU + MPI from the same weights and batches: losses, the
/// scaler, the norm and the master weights agree within a dtype-aware tolerance.
void compare_with_cpu(DType dtype, OptimizerKind optimizer) {
  const GPTConfig config{
      .vocab_size = 61, .max_seq_len = 32, .num_layers = 2, .num_heads = 4, .channels = 64};
  EngineConfig ec;
  ec.dtype = dtype;
  ec.bucket_bytes = 16 << 10;  // several buckets
  ec.grad_clip = 1.0f;
  ec.adamw.lr = 1e-3f;
  ec.optimizer = optimizer;
  Trainer gpu(true, config, ec);
  Trainer cpu(false, config, ec);
  const int64_t B = 3, T = 32;
  std::mt19937 rng(7 + static_cast<unsigned>(gpu.comm->rank()));
  std::uniform_int_distribution<int32_t> token(0, static_cast<int32_t>(config.vocab_size) - 1);
  // Each backend is within step_bounds of exact arithmetic, so the two are within twice that.
  const test::StepBounds one = test::step_bounds(dtype, config, T), bound = one + one;
  for (int s = 0; s < 4; ++s) {
    SCOPED_TRACE("step " + std::to_string(s));
    std::vector<int32_t> tokens(static_cast<size_t>(B * T)), targets(tokens.size());
    for (auto& t : tokens) t = token(rng);
    for (auto& t : targets) t = token(rng);
    if (s == 0) {  // from the same weights: the gradients and the update, element by element
      const test::StepRecord rg = gpu.record(tokens, targets, B, T), rc = cpu.record(tokens, targets, B, T);
      test::expect_first_step_agrees(rg, rc, bound, ec.adamw.lr, gpt_tensors(config));
      EXPECT_EQ(rg.result.loss_scale, rc.result.loss_scale);
      continue;
    }
    // The later steps start from weights that differ where the first update flipped with the sign of a
    // gradient within its rounding error; such gradients are near zero, so the loss, first order in the
    // weights, moves by far less than the forward bound.
    double loss_gpu = 0, loss_cpu = 0;
    const StepResult rg = gpu.step(tokens, targets, B, T, &loss_gpu);
    const StepResult rc = cpu.step(tokens, targets, B, T, &loss_cpu);
    EXPECT_NEAR(loss_gpu, loss_cpu, bound.forward * std::abs(loss_cpu));
    EXPECT_EQ(rg.skipped, rc.skipped);
    EXPECT_EQ(rg.loss_scale, rc.loss_scale);
    EXPECT_EQ(rg.applied_steps, rc.applied_steps);
  }
}

TEST_P(CudaStep, MatchesCpuStepByStep) {
  if (!have_device()) GTEST_SKIP() << "no CUDA device";
  compare_with_cpu(GetParam(), OptimizerKind::adamw);
}

// LAMB's device kernels (pass 1 with its segment sums, the per-tensor trust ratios, pass 2) against the
// CPU's.
TEST_P(CudaStep, LambMatchesCpuStepByStep) {
  if (!have_device()) GTEST_SKIP() << "no CUDA device";
  compare_with_cpu(GetParam(), OptimizerKind::lamb);
}

INSTANTIATE_TEST_SUITE_P(Dtypes, CudaStep, testing::Values(DType::f32, DType::f16, DType::bf16),
                         [](const auto& param_info) { return std::string(dtype_name(param_info.param)); });

/// ZeRO stage 2 on the device: a pool of two staging buffers (the tied wte's and one that every other bucket
/// takes in turn, each reuse ordered after the previous reduce-scatter's event) gives bitwise stage 1's
/// steps: losses, results, weights and master weights.
TEST_P(CudaStep, ZeroStage2EqualsStage1Bitwise) {
  if (!have_device()) GTEST_SKIP() << "no CUDA device";
  const GPTConfig config{
      .vocab_size = 61, .max_seq_len = 32, .num_layers = 2, .num_heads = 4, .channels = 64};
  EngineConfig ec;
  ec.dtype = GetParam();
  ec.bucket_bytes = 16 << 10;  // several buckets
  ec.grad_clip = 1.0f;
  ec.adamw.lr = 1e-3f;
  Trainer one(true, config, ec);
  ec.zero_stage = 2;
  ec.staging_buffers = 2;
  Trainer two(true, config, ec);
  ASSERT_GT(two.engine->layout().buckets().size(), 4u);
  const int64_t B = 3, T = 32;
  std::mt19937 rng(11 + static_cast<unsigned>(one.comm->rank()));
  std::uniform_int_distribution<int32_t> token(0, static_cast<int32_t>(config.vocab_size) - 1);
  for (int s = 0; s < 3; ++s) {
    std::vector<int32_t> tokens(static_cast<size_t>(B * T)), targets(tokens.size());
    for (auto& t : tokens) t = token(rng);
    for (auto& t : targets) t = token(rng);
    double loss_one = 0, loss_two = 0;
    const StepResult r1 = one.step(tokens, targets, B, T, &loss_one);
    const StepResult r2 = two.step(tokens, targets, B, T, &loss_two);
    EXPECT_EQ(loss_one, loss_two);
    EXPECT_EQ(r1.skipped, r2.skipped);
    EXPECT_EQ(r1.grad_norm, r2.grad_norm);
    EXPECT_EQ(r1.loss_scale, r2.loss_scale);
  }
  const size_t bytes = one.engine->layout().padded_elements() * dtype_size(ec.dtype);
  std::vector<std::byte> p1(bytes), p2(bytes);
  one.backend->copy_to_host(p1.data(), one.engine->params(), bytes);
  two.backend->copy_to_host(p2.data(), two.engine->params(), bytes);
  EXPECT_TRUE(p1 == p2);
  EXPECT_EQ(one.engine->gather_tensors(MixedPrecisionEngine::ShardState::master),
            two.engine->gather_tensors(MixedPrecisionEngine::ShardState::master));
}

/// An injected inf in one gradient skips the step on the device: weights unchanged, scale halved, Adam's t
/// not advanced — read back only after the step, as the trainer does at log intervals.
TEST(CudaStepScaler, InjectedInfSkipsOnDevice) {
  if (!have_device()) GTEST_SKIP() << "no CUDA device";
  const GPTConfig config{
      .vocab_size = 61, .max_seq_len = 16, .num_layers = 1, .num_heads = 2, .channels = 32};
  EngineConfig ec;
  ec.dtype = DType::f16;
  Trainer gpu(true, config, ec);
  const int64_t B = 2, T = 16;
  std::vector<int32_t> tokens(static_cast<size_t>(B * T), 5), targets(tokens.size(), 7);
  const auto before = gpu.engine->gather_tensors(MixedPrecisionEngine::ShardState::master);
  const float scale_before = gpu.engine->loss_scale();
  gpu.engine->zero_grads();
  gpu.model->forward_accumulate(gpu.engine->params(), tokens.data(), targets.data(), B, T, 1.0f,
                                gpu.engine->loss_scale_device());
  gpu.model->backward(gpu.engine->params(), gpu.engine->grads());
  const mpt::half inf = mpt::half::from_bits(0x7c00);
  gpu.backend->copy_from_host(gpu.engine->grads(), &inf, sizeof(inf));  // first gradient element: wte[0][0]
  gpu.engine->sync_grads();
  gpu.engine->step_async();
  const StepResult r = gpu.engine->result();
  EXPECT_TRUE(r.skipped);
  EXPECT_EQ(r.applied_steps, 0);
  EXPECT_EQ(gpu.engine->loss_scale(), scale_before * 0.5f);
  EXPECT_EQ(gpu.engine->gather_tensors(MixedPrecisionEngine::ShardState::master), before);
}

/// DESIGN.md phase 3: the first bucket's reduce-scatter runs on the communication stream while backward is
/// still running on the compute stream. An event recorded on the comm stream right after the first bucket's
/// collective was issued must complete before the event recorded on the compute stream after backward.
TEST(CudaStepOverlap, FirstBucketBeforeBackwardEnds) {
  if (!have_device()) GTEST_SKIP() << "no CUDA device";
  const GPTConfig config{
      .vocab_size = 256, .max_seq_len = 256, .num_layers = 6, .num_heads = 4, .channels = 256};
  EngineConfig ec;
  ec.dtype = DType::f16;
  ec.bucket_bytes = 256 << 10;  // many buckets: the first covers only the last layers' tensors
  cudaEvent_t backward_start{}, first_bucket_done{}, backward_end{};
  MPT_CUDA_CHECK(cudaEventCreate(&backward_start));
  MPT_CUDA_CHECK(cudaEventCreate(&first_bucket_done));
  MPT_CUDA_CHECK(cudaEventCreate(&backward_end));
  FirstBucketRecorder* recorder = nullptr;
  Trainer gpu(true, config, ec, [&](Communicator& inner) {
    auto r = std::make_unique<FirstBucketRecorder>(dynamic_cast<NcclCommunicator&>(inner), first_bucket_done);
    recorder = r.get();
    return r;
  });
  ASSERT_GE(gpu.engine->layout().buckets().size(), 3u);
  const auto compute = static_cast<cudaStream_t>(gpu.backend->native_stream());
  const int64_t B = 8, T = 256;
  std::vector<int32_t> tokens(static_cast<size_t>(B * T), 3), targets(tokens.size(), 4);
  for (int iteration = 0; iteration < 2; ++iteration) {  // the first warms up cuBLASLt and NCCL
    gpu.engine->zero_grads();
    gpu.model->forward_accumulate(gpu.engine->params(), tokens.data(), targets.data(), B, T, 1.0f,
                                  gpu.engine->loss_scale_device());
    MPT_CUDA_CHECK(cudaEventRecord(backward_start, compute));
    recorder->arm();
    gpu.model->backward(gpu.engine->params(), gpu.engine->grads(),
                        [&](size_t tensor) { gpu.engine->grad_done(tensor); });
    MPT_CUDA_CHECK(cudaEventRecord(backward_end, compute));
    ASSERT_TRUE(recorder->fired()) << "no bucket collective was issued during backward";
    gpu.engine->sync_grads();
    gpu.engine->step_async();
    gpu.engine->result();
  }
  float first_ms = 0, backward_ms = 0;
  MPT_CUDA_CHECK(cudaEventElapsedTime(&first_ms, backward_start, first_bucket_done));
  MPT_CUDA_CHECK(cudaEventElapsedTime(&backward_ms, backward_start, backward_end));
  std::printf("backward %.3f ms; first bucket's reduce-scatter done at %.3f ms\n", backward_ms, first_ms);
  EXPECT_LT(first_ms, backward_ms);
  MPT_CUDA_CHECK(cudaEventDestroy(backward_start));
  MPT_CUDA_CHECK(cudaEventDestroy(first_bucket_done));
  MPT_CUDA_CHECK(cudaEventDestroy(backward_end));
}

}  // namespace
