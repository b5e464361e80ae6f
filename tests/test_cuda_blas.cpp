// cuBLASLt linear layer and causal attention (kernels/cuda/matmul.cu, attention.cu) against the CPU backend
// on the same inputs, for f32, f16 and bf16 at odd sizes and misaligned pointers; the cuDNN SDPA path
// (attention_cudnn.cu) against the unfused one and an FP64 log-sum-exp, skipping where cuDNN refuses.
// Gradients start from non-zero values so that accumulation (beta = 1) is checked, and outputs start from
// garbage so that overwriting is. Every test skips with "no CUDA device" where there is none (CI, the build
// machines).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include <gtest/gtest.h>

#include "cuda/attention_cudnn.cuh"
#include "cuda_test_support.hpp"
#include "mptrain/backend.hpp"
#include "mptrain/cuda_blas.hpp"
#include "mptrain/cuda_check.hpp"
#include "mptrain/cuda_ops.hpp"
#include "mptrain/error.hpp"

namespace mpt {
namespace {

using test::DeviceArray;

template <typename T>
std::vector<T> random_vector(size_t n, float lo, float hi, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<T> v(n);
  for (T& x : v) x = from_float<T>(dist(rng));
  return v;
}

struct Tolerance {
  double abs, rel;
};

/// Matmul outputs: one rounding to the storage type on each side plus FP32 summation-order differences, so a
/// rounding may land one unit in the last place apart.
template <typename T>
Tolerance matmul_tolerance() {
  if constexpr (std::is_same_v<T, float>)
    return {1e-4, 1e-4};
  else if constexpr (std::is_same_v<T, half>)
    return {2e-3, 4e-3};
  else
    return {1e-2, 1.6e-2};
}

/// Attention outputs and gradients: as for matmul, plus the GPU's rounding of the probabilities and of the
/// score gradients to the storage type before the GEMMs that read them (the CPU keeps both in FP32).
template <typename T>
Tolerance attention_tolerance() {
  if constexpr (std::is_same_v<T, float>)
    return {1e-4, 1e-4};
  else if constexpr (std::is_same_v<T, half>)
    return {4e-3, 4e-3};
  else
    return {3e-2, 3e-2};
}

/// Probabilities in [0, 1]: one rounding apart at most.
template <typename T>
Tolerance probability_tolerance() {
  if constexpr (std::is_same_v<T, float>)
    return {1e-6, 1e-5};
  else if constexpr (std::is_same_v<T, half>)
    return {1e-3, 2e-3};
  else
    return {8e-3, 8e-3};
}

/// Every element within abs + rel * |want|; reports the first mismatch with its index and the count.
template <typename T>
void expect_close(const std::vector<T>& got, const std::vector<T>& want, Tolerance tol,
                  const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  size_t bad = 0, first = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double g = to_float(got[i]), w = to_float(want[i]);
    if (!(std::fabs(g - w) <= tol.abs + tol.rel * std::fabs(w))) {
      if (bad == 0) first = i;
      ++bad;
    }
  }
  if (bad > 0)
    ADD_FAILURE() << what << ": " << bad << " of " << got.size() << " elements differ; first at index "
                  << first << ": got " << to_float(got[first]) << ", want " << to_float(want[first])
                  << " (tolerance " << tol.abs << " + " << tol.rel << " * |want|)";
}

struct MatmulShape {
  int64_t rows, IC, OC;
};
const MatmulShape kMatmulShapes[] = {{37, 72, 61}, {64, 128, 96}, {1, 5, 3}, {130, 33, 257}, {9, 0, 7}};

template <typename T>
class CudaBlas : public ::testing::Test {};
using FloatTypes = ::testing::Types<float, half, bf16>;
TYPED_TEST_SUITE(CudaBlas, FloatTypes);

TYPED_TEST(CudaBlas, MatmulForwardMatchesCpu) {
  MPT_REQUIRE_GPU();
  using T = TypeParam;
  const DType dtype = dtype_of<T>();
  auto cpu = make_cpu_backend();
  cuda::BlasContext ctx;
  uint32_t seed = 1;
  for (const auto& s : kMatmulShapes) {
    for (bool with_bias : {false, true}) {
      for (size_t offset : {0, 1}) {
        const std::string what = "rows " + std::to_string(s.rows) + " IC " + std::to_string(s.IC) + " OC " +
                                 std::to_string(s.OC) + (with_bias ? " bias" : "") + " offset " +
                                 std::to_string(offset);
        const auto inp = random_vector<T>(s.rows * s.IC, -1, 1, seed++);
        const auto weight = random_vector<T>(s.OC * s.IC, -1, 1, seed++);
        // Two bias vectors: the second call must use its own pointer, not the cached plan's first one.
        const auto bias1 = random_vector<T>(s.OC, -1, 1, seed++);
        const auto bias2 = random_vector<T>(s.OC, -1, 1, seed++);
        DeviceArray<T> d_inp(inp, offset), d_w(weight, offset), d_b1(bias1, offset), d_b2(bias2, offset);
        DeviceArray<T> d_out(std::vector<T>(s.rows * s.OC, from_float<T>(1234.0f)), offset);
        for (const auto* b : {&bias1, &bias2}) {
          const T* d_bias = !with_bias ? nullptr : (b == &bias1 ? d_b1.ptr : d_b2.ptr);
          cuda::matmul_forward(ctx, d_out.ptr, d_inp.ptr, d_w.ptr, d_bias, s.rows, s.IC, s.OC, dtype,
                               nullptr);
          MPT_CUDA_CHECK(cudaDeviceSynchronize());
          std::vector<T> want(s.rows * s.OC);
          cpu->matmul_forward(want.data(), inp.data(), weight.data(), with_bias ? b->data() : nullptr, s.rows,
                              s.IC, s.OC, dtype);
          expect_close(d_out.to_host(), want, matmul_tolerance<T>(), "out, " + what);
        }
      }
    }
  }
}

TYPED_TEST(CudaBlas, MatmulBackwardAccumulatesLikeCpu) {
  MPT_REQUIRE_GPU();
  using T = TypeParam;
  const DType dtype = dtype_of<T>();
  auto cpu = make_cpu_backend();
  cuda::BlasContext ctx;
  uint32_t seed = 100;
  for (const auto& s : kMatmulShapes) {
    for (bool with_dinp : {false, true}) {
      for (bool with_dbias : {false, true}) {
        const size_t offset = with_dbias ? 1 : 0;
        const std::string what = "rows " + std::to_string(s.rows) + " IC " + std::to_string(s.IC) + " OC " +
                                 std::to_string(s.OC) + (with_dinp ? " dinp" : "") +
                                 (with_dbias ? " dbias" : "");
        const auto inp = random_vector<T>(s.rows * s.IC, -1, 1, seed++);
        const auto weight = random_vector<T>(s.OC * s.IC, -1, 1, seed++);
        const auto dout = random_vector<T>(s.rows * s.OC, -1, 1, seed++);
        auto dinp = random_vector<T>(s.rows * s.IC, -1, 1, seed++);
        auto dweight = random_vector<T>(s.OC * s.IC, -1, 1, seed++);
        auto dbias = random_vector<T>(s.OC, -1, 1, seed++);
        DeviceArray<T> d_inp(inp, offset), d_w(weight, offset), d_dout(dout, offset);
        DeviceArray<T> d_dinp(dinp, offset), d_dw(dweight, offset), d_db(dbias, offset);
        cuda::matmul_backward(ctx, with_dinp ? d_dinp.ptr : nullptr, d_dw.ptr,
                              with_dbias ? d_db.ptr : nullptr, d_dout.ptr, d_inp.ptr, d_w.ptr, s.rows, s.IC,
                              s.OC, dtype, nullptr);
        MPT_CUDA_CHECK(cudaDeviceSynchronize());
        cpu->matmul_backward(with_dinp ? dinp.data() : nullptr, dweight.data(),
                             with_dbias ? dbias.data() : nullptr, dout.data(), inp.data(), weight.data(),
                             s.rows, s.IC, s.OC, dtype);
        expect_close(d_dw.to_host(), dweight, matmul_tolerance<T>(), "dweight, " + what);
        // Gradients not requested stay untouched, bit for bit.
        expect_close(d_dinp.to_host(), dinp, with_dinp ? matmul_tolerance<T>() : Tolerance{0, 0},
                     "dinp, " + what);
        expect_close(d_db.to_host(), dbias, with_dbias ? matmul_tolerance<T>() : Tolerance{0, 0},
                     "dbias, " + what);
      }
    }
  }
}

struct AttentionShape {
  int64_t B, T, C, NH;
};
const AttentionShape kAttentionShapes[] = {{2, 37, 48, 3}, {1, 70, 128, 2}, {3, 1, 8, 1}, {2, 33, 40, 5}};

TYPED_TEST(CudaBlas, UnfusedAttentionMatchesCpu) {
  MPT_REQUIRE_GPU();
  using T = TypeParam;
  const DType dtype = dtype_of<T>();
  auto cpu = make_cpu_backend();
  cuda::BlasContext ctx;
  uint32_t seed = 200;
  for (const auto& s : kAttentionShapes) {
    const std::string what = "B " + std::to_string(s.B) + " T " + std::to_string(s.T) + " C " +
                             std::to_string(s.C) + " NH " + std::to_string(s.NH);
    ASSERT_TRUE(cuda::attention_supported(ctx, cuda::AttentionImpl::unfused, s.B, s.T, s.C, s.NH, dtype));
    const size_t n_qkv = s.B * s.T * 3 * s.C, n_out = s.B * s.T * s.C, n_att = s.B * s.NH * s.T * s.T;
    ASSERT_EQ(cuda::attention_saved_bytes(cuda::AttentionImpl::unfused, s.B, s.T, s.NH, dtype),
              n_att * sizeof(T));
    const auto qkv = random_vector<T>(n_qkv, -2, 2, seed++);
    const auto dout = random_vector<T>(n_out, -1, 1, seed++);
    auto dqkv = random_vector<T>(n_qkv, -1, 1, seed++);
    DeviceArray<T> d_qkv(qkv, 0), d_dout(dout, 0), d_dqkv(dqkv, 0);
    DeviceArray<T> d_out(std::vector<T>(n_out, from_float<T>(1234.0f)), 0);
    DeviceArray<T> d_att(std::vector<T>(n_att, from_float<T>(1234.0f)), 0);

    cuda::attention_forward(ctx, cuda::AttentionImpl::unfused, d_out.ptr, d_att.ptr, d_qkv.ptr, s.B, s.T, s.C,
                            s.NH, dtype, nullptr);
    cuda::attention_backward(ctx, cuda::AttentionImpl::unfused, d_dqkv.ptr, d_dout.ptr, d_qkv.ptr, d_att.ptr,
                             d_out.ptr, s.B, s.T, s.C, s.NH, dtype, nullptr);
    MPT_CUDA_CHECK(cudaDeviceSynchronize());

    std::vector<T> out(n_out), att(n_att);
    cpu->attention_forward(out.data(), att.data(), qkv.data(), s.B, s.T, s.C, s.NH, dtype);
    // Backward on each side from its own forward's probabilities, as in training.
    const auto gpu_att = d_att.to_host();
    cpu->attention_backward(dqkv.data(), dout.data(), qkv.data(), att.data(), out.data(), s.B, s.T, s.C, s.NH,
                            dtype);
    expect_close(d_out.to_host(), out, attention_tolerance<T>(), "out, " + what);
    expect_close(gpu_att, att, probability_tolerance<T>(), "att, " + what);
    // Above the diagonal the probabilities are exactly zero.
    size_t nonzero = 0;
    for (int64_t r = 0; r < s.B * s.NH * s.T; ++r)
      for (int64_t j = r % s.T + 1; j < s.T; ++j) nonzero += to_float(gpu_att[r * s.T + j]) != 0.0f;
    EXPECT_EQ(nonzero, 0u) << what;
    expect_close(d_dqkv.to_host(), dqkv, attention_tolerance<T>(), "dqkv, " + what);
  }
}

/// cuDNN SDPA against the unfused path: each side rounds the probabilities (flash attention feeds them to its
/// second GEMM in the storage type, as the unfused path stores them), but in different orders, and cuDNN
/// rounds dq/dk/dv once more before they are added into dqkv. Twice the GPU-vs-CPU tolerance.
template <typename T>
Tolerance cudnn_tolerance() {
  const Tolerance t = attention_tolerance<T>();
  return {2 * t.abs, 2 * t.rel};
}

/// What cuDNN's forward saves in `att`: per (b, h, t) the natural-log log-sum-exp of the scaled causal
/// scores, log(sum_{j <= t} exp(q_t . k_j / sqrt(hs))), in double from the stored inputs.
template <typename T>
std::vector<float> reference_log_sum_exp(const std::vector<T>& qkv, int64_t B, int64_t T_, int64_t C,
                                         int64_t NH) {
  const int64_t hs = C / NH;
  const double scale = 1.0 / std::sqrt(static_cast<double>(hs));
  std::vector<float> lse(static_cast<size_t>(B * NH * T_));
  std::vector<double> scores(static_cast<size_t>(T_));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < NH; ++h)
      for (int64_t t = 0; t < T_; ++t) {
        const T* q = qkv.data() + (b * T_ + t) * 3 * C + h * hs;
        double max_score = -INFINITY;
        for (int64_t j = 0; j <= t; ++j) {
          const T* k = qkv.data() + (b * T_ + j) * 3 * C + C + h * hs;
          double dot = 0;
          for (int64_t d = 0; d < hs; ++d) dot += double{to_float(q[d])} * double{to_float(k[d])};
          scores[j] = dot * scale;
          max_score = std::max(max_score, scores[j]);
        }
        double sum = 0;
        for (int64_t j = 0; j <= t; ++j) sum += std::exp(scores[j] - max_score);
        lse[(b * NH + h) * T_ + t] = static_cast<float>(max_score + std::log(sum));
      }
  return lse;
}

/// Runs the cuDNN path and the unfused path on the same inputs (backward from non-zero dqkv, so accumulation
/// is checked; outputs from garbage, so overwriting is) and compares out and dqkv, and the saved statistics
/// with an FP64 log-sum-exp. Shapes cuDNN refuses are collected in *refused ("shape: reason") instead.
template <typename T>
void expect_cudnn_matches_unfused(const std::vector<AttentionShape>& shapes, uint32_t seed,
                                  std::string* refused) {
  const DType dtype = dtype_of<T>();
  cuda::BlasContext ctx;
  for (const auto& s : shapes) {
    const std::string what = "B " + std::to_string(s.B) + " T " + std::to_string(s.T) + " C " +
                             std::to_string(s.C) + " NH " + std::to_string(s.NH);
    std::string why_not;
    if (!cuda::attention_supported(ctx, cuda::AttentionImpl::cudnn, s.B, s.T, s.C, s.NH, dtype, &why_not)) {
      EXPECT_FALSE(why_not.empty()) << what;
      *refused += (refused->empty() ? "" : "; ") + what + ": " + why_not;
      continue;
    }
    const size_t n_qkv = s.B * s.T * 3 * s.C, n_out = s.B * s.T * s.C, n_rows = s.B * s.NH * s.T;
    const size_t n_att = n_rows * s.T;
    ASSERT_EQ(cuda::attention_saved_bytes(cuda::AttentionImpl::cudnn, s.B, s.T, s.NH, dtype),
              n_rows * sizeof(float));
    const auto qkv = random_vector<T>(n_qkv, -2, 2, seed++);
    const auto dout = random_vector<T>(n_out, -1, 1, seed++);
    const auto dqkv = random_vector<T>(n_qkv, -1, 1, seed++);
    DeviceArray<T> d_qkv(qkv, 0), d_dout(dout, 0);
    DeviceArray<T> d_dqkv_ref(dqkv, 0), d_dqkv(dqkv, 0);
    DeviceArray<T> d_out_ref(std::vector<T>(n_out, from_float<T>(1234.0f)), 0);
    DeviceArray<T> d_out(std::vector<T>(n_out, from_float<T>(1234.0f)), 0);
    DeviceArray<T> d_att(std::vector<T>(n_att), 0);
    DeviceArray<float> d_stats(std::vector<float>(n_rows, 1234.0f), 0);

    cuda::attention_forward(ctx, cuda::AttentionImpl::unfused, d_out_ref.ptr, d_att.ptr, d_qkv.ptr, s.B, s.T,
                            s.C, s.NH, dtype, nullptr);
    cuda::attention_backward(ctx, cuda::AttentionImpl::unfused, d_dqkv_ref.ptr, d_dout.ptr, d_qkv.ptr,
                             d_att.ptr, d_out_ref.ptr, s.B, s.T, s.C, s.NH, dtype, nullptr);
    cuda::attention_forward(ctx, cuda::AttentionImpl::cudnn, d_out.ptr, d_stats.ptr, d_qkv.ptr, s.B, s.T, s.C,
                            s.NH, dtype, nullptr);
    // Backward from cuDNN's own forward output and statistics, as in training.
    cuda::attention_backward(ctx, cuda::AttentionImpl::cudnn, d_dqkv.ptr, d_dout.ptr, d_qkv.ptr, d_stats.ptr,
                             d_out.ptr, s.B, s.T, s.C, s.NH, dtype, nullptr);
    MPT_CUDA_CHECK(cudaDeviceSynchronize());

    expect_close(d_out.to_host(), d_out_ref.to_host(), cudnn_tolerance<T>(), "out, " + what);
    expect_close(d_stats.to_host(), reference_log_sum_exp(qkv, s.B, s.T, s.C, s.NH), Tolerance{2e-3, 1e-3},
                 "softmax statistics, " + what);
    expect_close(d_dqkv.to_host(), d_dqkv_ref.to_host(), cudnn_tolerance<T>(), "dqkv, " + what);
  }
}

template <typename T>
class CudnnSdpa : public ::testing::Test {};
using CudnnTypes = ::testing::Types<half, bf16>;  // f32 is refused: see CudaBlas.CudnnAttentionRefusals
TYPED_TEST_SUITE(CudnnSdpa, CudnnTypes);

// Head sizes 64 and 32 at each sequence length; one test per length so that a length cuDNN refuses (its
// backward has refused T = 1 on cuDNN 9.19) skips alone.
TYPED_TEST(CudnnSdpa, MatchesUnfusedAtT37) {
  MPT_REQUIRE_GPU();
  std::string refused;
  expect_cudnn_matches_unfused<TypeParam>({{2, 37, 128, 2}, {2, 37, 96, 3}}, 300, &refused);
  if (!refused.empty()) GTEST_SKIP() << "cuDNN SDPA not supported: " << refused;
}

TYPED_TEST(CudnnSdpa, MatchesUnfusedAtT128) {
  MPT_REQUIRE_GPU();
  std::string refused;
  expect_cudnn_matches_unfused<TypeParam>({{1, 128, 192, 3}, {2, 128, 64, 2}}, 400, &refused);
  if (!refused.empty()) GTEST_SKIP() << "cuDNN SDPA not supported: " << refused;
}

TYPED_TEST(CudnnSdpa, MatchesUnfusedAtT1) {
  MPT_REQUIRE_GPU();
  std::string refused;
  expect_cudnn_matches_unfused<TypeParam>({{3, 1, 64, 1}, {2, 1, 32, 1}}, 500, &refused);
  if (!refused.empty()) GTEST_SKIP() << "cuDNN SDPA not supported: " << refused;
}

// Needs no GPU: the graph descriptions the cuDNN path builds pass the frontend's SDPA validation for Hopper
// (sm 90) in both dtypes at the shapes above and GPT-2 small's (NH 12, hs 64, T 1024). Plans and numbers need
// a device (CudnnSdpa.*).
TEST(CudnnSdpaOffline, GraphsValidateForHopper) {
  if (!cuda::cudnn_attention_built())
    GTEST_SKIP() << "cuDNN SDPA not supported: "
                 << cuda::cudnn_attention_validate_offline(1, 16, 1, 64, DType::f16, 90);
  const AttentionShape shapes[] = {
      {2, 37, 128, 2}, {2, 37, 96, 3}, {1, 128, 192, 3}, {2, 128, 64, 2}, {8, 1024, 768, 12}};
  for (const DType dtype : {DType::f16, DType::bf16})
    for (const auto& s : shapes)
      EXPECT_EQ(cuda::cudnn_attention_validate_offline(s.B, s.T, s.NH, s.C / s.NH, dtype, 90), "")
          << "B " << s.B << " T " << s.T << " C " << s.C << " NH " << s.NH << " "
          << std::string(dtype_name(dtype));
  // The validation looks at the shape: a head size over cuDNN's limit is refused, with a reason.
  EXPECT_NE(cuda::cudnn_attention_validate_offline(2, 37, 1, 512 + 8, DType::f16, 90), "");
}

TYPED_TEST(CudaBlas, CudnnAttentionRefusals) {
  MPT_REQUIRE_GPU();
  using T = TypeParam;
  const DType dtype = dtype_of<T>();
  cuda::BlasContext ctx;
  EXPECT_EQ(cuda::attention_saved_bytes(cuda::AttentionImpl::cudnn, 2, 16, 3, dtype),
            static_cast<size_t>(2 * 3 * 16) * sizeof(float));
  std::string why_not;
  // Head sizes cuDNN SDPA does not run (not a multiple of 8; over 128), whatever the dtype, with a reason.
  EXPECT_FALSE(cuda::attention_supported(ctx, cuda::AttentionImpl::cudnn, 1, 16, 36, 3, dtype, &why_not));
  EXPECT_FALSE(why_not.empty());
  why_not.clear();
  EXPECT_FALSE(cuda::attention_supported(ctx, cuda::AttentionImpl::cudnn, 1, 16, 256, 1, dtype, &why_not));
  EXPECT_FALSE(why_not.empty());
  const int64_t B = 1, T_ = 16, C = 64, NH = 1;
  DeviceArray<T> d_qkv(std::vector<T>(B * T_ * 3 * C), 0), d_out(std::vector<T>(B * T_ * C), 0);
  DeviceArray<float> d_stats(std::vector<float>(B * NH * T_), 0);
  why_not.clear();
  const bool supported =
      cuda::attention_supported(ctx, cuda::AttentionImpl::cudnn, B, T_, C, NH, dtype, &why_not);
  if (!supported) {
    // Refused paths throw rather than leave the outputs unwritten.
    EXPECT_FALSE(why_not.empty());
    EXPECT_THROW(cuda::attention_forward(ctx, cuda::AttentionImpl::cudnn, d_out.ptr, d_stats.ptr, d_qkv.ptr,
                                         B, T_, C, NH, dtype, nullptr),
                 Error);
  }
  if constexpr (std::is_same_v<T, float>) {
    EXPECT_FALSE(supported) << "cuDNN SDPA claims f32 support";
  } else if (supported) {
    // cuDNN needs 16-byte aligned tensors: a pointer one element off is refused, not passed on.
    DeviceArray<T> d_qkv_off(std::vector<T>(B * T_ * 3 * C), 1);
    EXPECT_THROW(cuda::attention_forward(ctx, cuda::AttentionImpl::cudnn, d_out.ptr, d_stats.ptr,
                                         d_qkv_off.ptr, B, T_, C, NH, dtype, nullptr),
                 Error);
  }
}

TEST(CudaBlasErrors, BadArgumentsThrow) {
  MPT_REQUIRE_GPU();
  cuda::BlasContext ctx;
  DeviceArray<float> d(std::vector<float>(64), 0);
  EXPECT_THROW(cuda::matmul_forward(ctx, d.ptr, d.ptr, d.ptr, nullptr, 2, 2, 2, DType::f64, nullptr), Error);
  EXPECT_THROW(cuda::matmul_forward(ctx, d.ptr, nullptr, d.ptr, nullptr, 2, 2, 2, DType::f32, nullptr),
               Error);
  EXPECT_THROW(cuda::matmul_forward(ctx, d.ptr, d.ptr, d.ptr, nullptr, -1, 2, 2, DType::f32, nullptr), Error);
  EXPECT_THROW(cuda::attention_forward(ctx, cuda::AttentionImpl::unfused, d.ptr, d.ptr, d.ptr, 1, 2, 6, 4,
                                       DType::f32, nullptr),
               Error);  // C not a multiple of NH
}

}  // namespace
}  // namespace mpt
