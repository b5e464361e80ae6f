// Comparing two runs of the same training step (tests/test_cuda_step.cpp: CUDA + NCCL against CPU + MPI;
// tests/test_engine_mpi.cpp: a 16-bit dtype against FP32 on the CPU) within bounds derived from the storage
// dtype's unit roundoff, not from trial.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdio>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "mptrain/backend.hpp"
#include "mptrain/dtype.hpp"
#include "mptrain/engine.hpp"
#include "mptrain/error.hpp"
#include "mptrain/model.hpp"

namespace mpt::test {

/// Relative error of one run of a GPT step against exact arithmetic, for storage dtype `dtype`: a
/// probabilistic rounding bound (Higham and Mary, "A new approach to probabilistic rounding error analysis",
/// SIAM J. Sci. Comput. 41(5), 2019, Theorem 2.4): n independent roundings of unit roundoff u give a relative
/// error of at most lambda sqrt(n) u, except with probability 2 exp(-lambda^2 (1 - u)^2 / 2); lambda = 6 puts
/// that below 3e-8 per quantity. u: f32 2^-24, f16 2^-11 (10 stored mantissa bits), bf16 2^-8 (7 bits).
/// Roundings to the dtype along a forward pass: per layer 10 stored activations (ln_1, qkv, attention, its
/// projection, residual, ln_2, fc, GELU, fc projection, residual) and its 12 parameter tensors, outside the
/// layers 4 activations (embedding sum, ln_f, logits, probabilities) and 4 tensors (wte, wpe, ln_f weight and
/// bias): n_forward = 22 L + 8; the backward rounds as many again, n_grad = 2 n_forward. Every GEMM and
/// reduction accumulates in FP32 over at most K = max(4C, T, Vp) terms: lambda sqrt(K) 2^-24 more.
///   L = 2, C = 64, T = 32, Vp = 128 (K = 256): forward 6 sqrt(52) u + 6 * 16 * 2^-24, gradients
///   6 sqrt(104) u + 6 * 16 * 2^-24: f32 8.3e-6 / 9.4e-6, f16 0.0211 / 0.0299, bf16 0.169 / 0.239.
struct StepBounds {
  double forward = 0;   ///< the loss
  double gradient = 0;  ///< the gradient vector, in the 2-norm (and the gradient norm)
};
inline StepBounds step_bounds(DType dtype, const GPTConfig& c, int64_t T) {
  constexpr double lambda = 6;
  const double u = dtype == DType::f32 ? 0x1p-24 : dtype == DType::f16 ? 0x1p-11 : 0x1p-8;
  const double n_forward = static_cast<double>(22 * c.num_layers + 8);
  const double K = static_cast<double>(std::max({4 * c.channels, T, c.padded_vocab_size()}));
  const double accumulation = lambda * std::sqrt(K) * 0x1p-24;
  return {lambda * std::sqrt(n_forward) * u + accumulation,
          lambda * std::sqrt(2 * n_forward) * u + accumulation};
}

/// Two runs, each within its StepBounds of exact: they differ by at most the sum.
inline StepBounds operator+(StepBounds a, StepBounds b) {
  return {a.forward + b.forward, a.gradient + b.gradient};
}

/// What one optimizer step did, for comparison.
struct StepRecord {
  double loss = 0;  ///< mean over the micro-batch
  StepResult result;
  std::vector<std::vector<float>> grads;          ///< per tensor, divided by the loss scale of the step
  std::vector<std::vector<float>> before, after;  ///< FP32 master weights
};

/// This rank's gradients in `engine.grads()` (dtype), per tensor as float, divided by `scale`.
inline std::vector<std::vector<float>> read_grads(Backend& backend, const MixedPrecisionEngine& engine,
                                                  float scale) {
  const ParamLayout& layout = engine.layout();
  const DType dt = engine.config().dtype;
  std::vector<std::byte> raw(layout.padded_elements() * dtype_size(dt));
  backend.copy_to_host(raw.data(), engine.grads(), raw.size());
  std::vector<std::vector<float>> out;
  dispatch_float_dtype(dt, [&]<typename S>() {
    const auto* g = reinterpret_cast<const S*>(raw.data());
    for (const TensorPlacement& t : layout.tensors()) {
      out.emplace_back(t.spec.num_elements());
      for (size_t i = 0; i < out.back().size(); ++i) out.back()[i] = to_float(g[t.offset + i]) / scale;
    }
  });
  return out;
}

/// One optimizer step of a single-rank engine (so that the update follows the gradients recorded here) over
/// its micro-batch, with the whole backward before the reduction, recording the loss, the gradients and the
/// master weights before and after. Throws mpt::Error for an engine of more than one rank.
inline StepRecord record_step(Backend& backend, MixedPrecisionEngine& engine, GPT& model,
                              const std::vector<int32_t>& tokens, const std::vector<int32_t>& targets,
                              int64_t B, int64_t T) {
  if (engine.layout().world_size() != 1) throw Error("record_step needs a single-rank engine");
  StepRecord r;
  r.before = engine.gather_tensors(MixedPrecisionEngine::ShardState::master);
  const float scale = engine.loss_scale();
  engine.zero_grads();
  model.forward_accumulate(engine.params(), tokens.data(), targets.data(), B, T, 1.0f,
                           engine.loss_scale_device());
  model.backward(engine.params(), engine.grads());
  r.grads = read_grads(backend, engine, scale);
  engine.sync_grads();
  engine.step_async();
  r.result = engine.result();
  r.loss = model.take_loss_sum() / static_cast<double>(B * T);
  r.after = engine.gather_tensors(MixedPrecisionEngine::ShardState::master);
  return r;
}

inline double norm2(const std::vector<std::vector<float>>& v) {
  double s = 0;
  for (const auto& t : v)
    for (float x : t) s += static_cast<double>(x) * x;
  return std::sqrt(s);
}

/// Expects two records of the first AdamW step (t = 1) from the same weights to agree within `bound` (the
/// relative difference the two runs may have; operator+ of theirs). The loss and the gradients as a whole
/// (2-norm) are compared relatively. The update only where |g| is well above its rounding error: AdamW's
/// first step moves a weight by lr g / (|g| + eps) (bias-corrected m = g, v = g^2) plus the decay, so by
/// about lr sign(g) whatever |g|, and a gradient whose sign is within rounding would move it 2 lr the other
/// way. The 2-norm bound makes the RMS of the gradient difference at most bound.gradient times the tensor's
/// RMS gradient; where |g| is at least twice that, the signs agree, and the updates differ by less than lr
/// times the relative gradient difference (d/dg of g / (|g| + eps) is eps / (|g| + eps)^2 <= 1 / |g|), plus
/// two FP32 roundings of the weight. At least 5% of the weights must take part (a Gaussian gradient leaves
/// about 34% at bound.gradient = 0.48, the loosest case here: bf16 CUDA against CPU).
inline void expect_first_step_agrees(const StepRecord& a, const StepRecord& b, const StepBounds& bound,
                                     double lr, const std::vector<TensorSpec>& specs) {
  EXPECT_NEAR(a.loss, b.loss, bound.forward * std::abs(b.loss));
  ASSERT_FALSE(a.result.skipped || b.result.skipped) << "the first step overflowed";
  EXPECT_NEAR(a.result.grad_norm, b.result.grad_norm, bound.gradient * b.result.grad_norm);
  ASSERT_EQ(a.grads.size(), b.grads.size());
  std::vector<std::vector<float>> diff = b.grads;
  for (size_t k = 0; k < diff.size(); ++k)
    for (size_t i = 0; i < diff[k].size(); ++i) diff[k][i] -= a.grads[k][i];
  EXPECT_LE(norm2(diff), bound.gradient * norm2(b.grads));
  size_t compared = 0, total = 0;
  for (size_t k = 0; k < b.grads.size(); ++k) {
    double ss = 0;
    for (float g : b.grads[k]) ss += static_cast<double>(g) * g;
    const double error =
        bound.gradient * std::sqrt(ss / static_cast<double>(std::max<size_t>(b.grads[k].size(), 1)));
    for (size_t i = 0; i < b.grads[k].size(); ++i) {
      ++total;
      const double g = std::abs(b.grads[k][i]);
      const double weight_rounding = 0x1p-22 * std::abs(b.before[k][i]);
      if (b.grads[k][i] == 0 && a.grads[k][i] == 0) {  // only the decay: the same on both sides
        ++compared;
        ASSERT_NEAR(a.after[k][i], b.after[k][i], weight_rounding) << specs[k].name << " element " << i;
        continue;
      }
      if (g < 2 * error) continue;
      ++compared;
      ASSERT_NEAR(a.after[k][i], b.after[k][i], lr * error / g + weight_rounding)
          << specs[k].name << " element " << i << ": gradients " << a.grads[k][i] << " and " << b.grads[k][i];
    }
  }
  EXPECT_GE(compared, total / 20) << compared << " of " << total << " weights compared";
  std::printf(
      "step comparison: loss %.3g of bound %.3g, gradients %.3g of bound %.3g, update compared at %zu of "
      "%zu weights\n",
      std::abs(a.loss - b.loss) / std::abs(b.loss), bound.forward, norm2(diff) / norm2(b.grads),
      bound.gradient, compared, total);
}

}  // namespace mpt::test
