// Tests of the CPU linear layer and causal self-attention (kernels/cpu/matmul.cpp,
// kernels/cpu/attention.cpp).
//
// Double precision is the reference: gradients are checked against central finite differences of a random
// linear functional L = sum_i w_i out_i, and forward results against naive loops written independently here.
// FP32 is checked against those loops; FP16 and BF16 against FP32 run on the same (already rounded) inputs,
// with a tolerance of one unit in the last place of the storage type plus a small absolute term. Buffers sit
// one element past their allocation start, and sizes are odd, so no path relies on alignment or on multiples
// of a vector width. The FP16 overflow rule (|x| >= 65520 -> inf, as on a GPU) is checked on exact GEMMs.
#include <omp.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "cpu/onednn_gemm.hpp"
#include "cpu/ops.hpp"
#include "mptrain/dtype.hpp"
#include "mptrain/error.hpp"

namespace {

using mpt::bf16;
using mpt::half;
namespace cpu = mpt::cpu;

constexpr uint32_t kSeed = 20240613;

/// A buffer whose data() is one element past the start of its allocation (misaligned for SIMD and BLAS).
template <typename T>
class Misaligned {
 public:
  explicit Misaligned(size_t n) : storage_(n + 1) {}
  explicit Misaligned(const std::vector<T>& values) : storage_(values.size() + 1) {
    std::copy(values.begin(), values.end(), data());
  }
  T* data() { return storage_.data() + 1; }
  const T* data() const { return storage_.data() + 1; }
  size_t size() const { return storage_.size() - 1; }
  T& operator[](size_t i) { return data()[i]; }
  const T& operator[](size_t i) const { return data()[i]; }
  std::vector<T> values() const { return std::vector<T>(data(), data() + size()); }

 private:
  std::vector<T> storage_;
};

std::vector<double> random_normal(size_t n, std::mt19937& rng, double stddev = 1.0) {
  std::normal_distribution<double> dist(0.0, stddev);
  std::vector<double> x(n);
  for (double& v : x) v = dist(rng);
  return x;
}

/// x rounded to storage type T (via float, as the trainer stores values).
template <typename T>
std::vector<T> to_storage(const std::vector<double>& x) {
  std::vector<T> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    if constexpr (std::is_same_v<T, double>)
      out[i] = x[i];
    else
      out[i] = mpt::from_float<T>(static_cast<float>(x[i]));
  }
  return out;
}

template <typename T>
std::vector<double> to_double(const T* p, size_t n) {
  std::vector<double> out(n);
  for (size_t i = 0; i < n; ++i) out[i] = static_cast<double>(mpt::to_float(p[i]));
  return out;
}

/// Largest |got - want| and |got - want| / |want| seen by all_close (the relative one over |want| >= 1e-3).
struct ErrorStats {
  double max_abs = 0;
  double max_rel = 0;
};

/// got[i] is within abs_tol + rel_tol * |want[i]| of want[i] for every i (inf matches inf of the same sign).
/// On failure, names the first mismatch and its index and counts the rest.
testing::AssertionResult all_close(std::string_view what, const std::vector<double>& got,
                                   const std::vector<double>& want, double abs_tol, double rel_tol,
                                   ErrorStats* stats = nullptr) {
  if (got.size() != want.size())
    return testing::AssertionFailure() << what << ": size " << got.size() << " != " << want.size();
  size_t bad = 0;
  size_t first = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double err = std::abs(got[i] - want[i]);
    const bool same_inf = std::isinf(got[i]) && got[i] == want[i];
    if (!same_inf && !(err <= abs_tol + rel_tol * std::abs(want[i]))) {
      if (bad++ == 0) first = i;
    }
    if (stats != nullptr && std::isfinite(err)) {
      stats->max_abs = std::max(stats->max_abs, err);
      if (std::abs(want[i]) >= 1e-3) stats->max_rel = std::max(stats->max_rel, err / std::abs(want[i]));
    }
  }
  if (bad == 0) return testing::AssertionSuccess();
  return testing::AssertionFailure() << fmt::format(
             "{}: {} of {} elements differ; first at index {}: got {:.9g}, want {:.9g}, tolerance {:.3g}",
             what, bad, got.size(), first, got[first], want[first],
             abs_tol + rel_tol * std::abs(want[first]));
}

/// Max-norm relative error ||a - b||_inf / ||b||_inf.
double max_norm_relative_error(const std::vector<double>& a, const std::vector<double>& b) {
  double diff = 0;
  double norm = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    diff = std::max(diff, std::abs(a[i] - b[i]));
    norm = std::max(norm, std::abs(b[i]));
  }
  return diff / norm;
}

double weighted_sum(const std::vector<double>& w, const double* x) {
  double sum = 0;
  for (size_t i = 0; i < w.size(); ++i) sum += w[i] * x[i];
  return sum;
}

/// Central differences of f with respect to every element of x (restored afterwards).
template <typename F>
std::vector<double> finite_differences(std::vector<double>& x, double eps, F&& f) {
  std::vector<double> grad(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    const double saved = x[i];
    x[i] = saved + eps;
    const double plus = f();
    x[i] = saved - eps;
    const double minus = f();
    x[i] = saved;
    grad[i] = (plus - minus) / (2 * eps);
  }
  return grad;
}

// ---- independent references (double, naive loops) ------------------------------------------------------

void naive_linear_forward(std::vector<double>& out, const std::vector<double>& inp,
                          const std::vector<double>& w, const double* bias, size_t rows, size_t IC,
                          size_t OC) {
  out.assign(rows * OC, 0.0);
  for (size_t r = 0; r < rows; ++r)
    for (size_t o = 0; o < OC; ++o) {
      double sum = bias != nullptr ? bias[o] : 0.0;
      for (size_t i = 0; i < IC; ++i) sum += inp[r * IC + i] * w[o * IC + i];
      out[r * OC + o] = sum;
    }
}

/// dinp += dout @ w, dweight += dout^T @ inp, dbias += column sums of dout.
void naive_linear_backward(std::vector<double>& dinp, std::vector<double>& dweight,
                           std::vector<double>& dbias, const std::vector<double>& dout,
                           const std::vector<double>& inp, const std::vector<double>& w, size_t rows,
                           size_t IC, size_t OC) {
  for (size_t r = 0; r < rows; ++r)
    for (size_t i = 0; i < IC; ++i)
      for (size_t o = 0; o < OC; ++o) dinp[r * IC + i] += dout[r * OC + o] * w[o * IC + i];
  for (size_t o = 0; o < OC; ++o)
    for (size_t i = 0; i < IC; ++i)
      for (size_t r = 0; r < rows; ++r) dweight[o * IC + i] += dout[r * OC + o] * inp[r * IC + i];
  for (size_t o = 0; o < OC; ++o)
    for (size_t r = 0; r < rows; ++r) dbias[o] += dout[r * OC + o];
}

void naive_attention_forward(std::vector<double>& out, const std::vector<double>& qkv, size_t B, size_t T,
                             size_t C, size_t NH) {
  const size_t hs = C / NH;
  out.assign(B * T * C, 0.0);
  for (size_t b = 0; b < B; ++b)
    for (size_t h = 0; h < NH; ++h)
      for (size_t t = 0; t < T; ++t) {
        const double* q = &qkv[(b * T + t) * 3 * C + h * hs];
        std::vector<double> weights(t + 1);
        double total = 0;
        for (size_t s = 0; s <= t; ++s) {
          const double* k = &qkv[(b * T + s) * 3 * C + C + h * hs];
          double score = 0;
          for (size_t i = 0; i < hs; ++i) score += q[i] * k[i];
          weights[s] = std::exp(score / std::sqrt(static_cast<double>(hs)));
          total += weights[s];
        }
        for (size_t s = 0; s <= t; ++s) {
          const double* v = &qkv[(b * T + s) * 3 * C + 2 * C + h * hs];
          for (size_t i = 0; i < hs; ++i) out[(b * T + t) * C + h * hs + i] += weights[s] / total * v[i];
        }
      }
}

/// att[B,NH,T,T]: exactly zero above the diagonal, each row summing to 1 within `tol`.
template <typename T>
void expect_causal_probabilities(const T* att, size_t B, size_t NH, size_t T_, double tol) {
  for (size_t row = 0; row < B * NH * T_; ++row) {
    const size_t t = row % T_;
    double sum = 0;
    for (size_t s = 0; s < T_; ++s) {
      const double a = mpt::to_float(att[row * T_ + s]);
      if (s > t) {
        ASSERT_EQ(a, 0.0) << "att row " << row << " column " << s << " is above the diagonal";
      } else {
        ASSERT_GE(a, 0.0) << "att row " << row << " column " << s;
      }
      sum += a;
    }
    ASSERT_NEAR(sum, 1.0, tol) << "att row " << row;
  }
}

// ---- double: finite differences, accumulation, naive references ----------------------------------------

TEST(MatmulDouble, GradientsMatchFiniteDifferences) {
  constexpr size_t rows = 14, IC = 12, OC = 36;
  std::mt19937 rng(kSeed);
  std::vector<double> inp = random_normal(rows * IC, rng);
  std::vector<double> weight = random_normal(OC * IC, rng);
  std::vector<double> bias = random_normal(OC, rng);
  const std::vector<double> w = random_normal(rows * OC, rng);
  std::vector<float> workspace;
  std::vector<double> out(rows * OC);
  const auto loss = [&] {
    cpu::matmul_forward<double>(out.data(), inp.data(), weight.data(), bias.data(), rows, IC, OC, workspace);
    return weighted_sum(w, out.data());
  };

  std::vector<double> dinp(rows * IC), dweight(OC * IC), dbias(OC);
  cpu::matmul_backward<double>(dinp.data(), dweight.data(), dbias.data(), w.data(), inp.data(), weight.data(),
                               rows, IC, OC, workspace);
  constexpr double eps = 1e-4;  // L is linear in each argument: the differences are exact up to rounding
  EXPECT_LT(max_norm_relative_error(dinp, finite_differences(inp, eps, loss)), 1e-6);
  EXPECT_LT(max_norm_relative_error(dweight, finite_differences(weight, eps, loss)), 1e-6);
  EXPECT_LT(max_norm_relative_error(dbias, finite_differences(bias, eps, loss)), 1e-6);
}

TEST(MatmulDouble, BackwardAccumulates) {
  constexpr size_t rows = 14, IC = 12, OC = 36;
  std::mt19937 rng(kSeed + 1);
  const std::vector<double> inp = random_normal(rows * IC, rng);
  const std::vector<double> weight = random_normal(OC * IC, rng);
  const std::vector<double> dout = random_normal(rows * OC, rng);
  std::vector<float> workspace;
  std::vector<double> dinp1(rows * IC), dweight1(OC * IC), dbias1(OC);
  cpu::matmul_backward<double>(dinp1.data(), dweight1.data(), dbias1.data(), dout.data(), inp.data(),
                               weight.data(), rows, IC, OC, workspace);

  // Starting from g0 and calling twice gives g0 + 2 * gradient.
  const std::vector<double> dinp0 = random_normal(rows * IC, rng);
  const std::vector<double> dweight0 = random_normal(OC * IC, rng);
  const std::vector<double> dbias0 = random_normal(OC, rng);
  std::vector<double> dinp = dinp0, dweight = dweight0, dbias = dbias0;
  for (int call = 0; call < 2; ++call)
    cpu::matmul_backward<double>(dinp.data(), dweight.data(), dbias.data(), dout.data(), inp.data(),
                                 weight.data(), rows, IC, OC, workspace);
  const auto expected = [](const std::vector<double>& g0, const std::vector<double>& g1) {
    std::vector<double> e(g0.size());
    for (size_t i = 0; i < e.size(); ++i) e[i] = g0[i] + 2 * g1[i];
    return e;
  };
  EXPECT_TRUE(all_close("dinp", dinp, expected(dinp0, dinp1), 1e-12, 1e-12));
  EXPECT_TRUE(all_close("dweight", dweight, expected(dweight0, dweight1), 1e-12, 1e-12));
  EXPECT_TRUE(all_close("dbias", dbias, expected(dbias0, dbias1), 1e-12, 1e-12));
}

TEST(MatmulDouble, MatchesNaiveLoopsMisalignedOddSizes) {
  constexpr size_t rows = 37, IC = 29, OC = 53;
  std::mt19937 rng(kSeed + 2);
  const std::vector<double> inp = random_normal(rows * IC, rng);
  const std::vector<double> weight = random_normal(OC * IC, rng);
  const std::vector<double> bias = random_normal(OC, rng);
  const std::vector<double> dout = random_normal(rows * OC, rng);
  const std::vector<double> dinp0 = random_normal(rows * IC, rng);
  const std::vector<double> dweight0 = random_normal(OC * IC, rng);
  const std::vector<double> dbias0 = random_normal(OC, rng);

  Misaligned<double> m_inp(inp), m_weight(weight), m_bias(bias), m_dout(dout), m_out(rows * OC);
  Misaligned<double> m_dinp(dinp0), m_dweight(dweight0), m_dbias(dbias0);
  std::vector<float> workspace;
  cpu::matmul_forward<double>(m_out.data(), m_inp.data(), m_weight.data(), m_bias.data(), rows, IC, OC,
                              workspace);
  cpu::matmul_backward<double>(m_dinp.data(), m_dweight.data(), m_dbias.data(), m_dout.data(), m_inp.data(),
                               m_weight.data(), rows, IC, OC, workspace);

  std::vector<double> out;
  naive_linear_forward(out, inp, weight, bias.data(), rows, IC, OC);
  std::vector<double> dinp = dinp0, dweight = dweight0, dbias = dbias0;
  naive_linear_backward(dinp, dweight, dbias, dout, inp, weight, rows, IC, OC);
  EXPECT_TRUE(all_close("out", m_out.values(), out, 1e-12, 1e-12));
  EXPECT_TRUE(all_close("dinp", m_dinp.values(), dinp, 1e-12, 1e-12));
  EXPECT_TRUE(all_close("dweight", m_dweight.values(), dweight, 1e-12, 1e-12));
  EXPECT_TRUE(all_close("dbias", m_dbias.values(), dbias, 1e-12, 1e-12));
}

TEST(MatmulDouble, NullBiasAndNullDinp) {
  constexpr size_t rows = 9, IC = 7, OC = 11;
  std::mt19937 rng(kSeed + 3);
  const std::vector<double> inp = random_normal(rows * IC, rng);
  const std::vector<double> weight = random_normal(OC * IC, rng);
  const std::vector<double> dout = random_normal(rows * OC, rng);
  std::vector<float> workspace;
  std::vector<double> out(rows * OC), want;
  cpu::matmul_forward<double>(out.data(), inp.data(), weight.data(), nullptr, rows, IC, OC, workspace);
  naive_linear_forward(want, inp, weight, nullptr, rows, IC, OC);
  EXPECT_TRUE(all_close("out", out, want, 1e-12, 1e-12));

  std::vector<double> dweight(OC * IC);
  cpu::matmul_backward<double>(nullptr, dweight.data(), nullptr, dout.data(), inp.data(), weight.data(), rows,
                               IC, OC, workspace);
  std::vector<double> dinp_want(rows * IC), dweight_want(OC * IC), dbias_want(OC);
  naive_linear_backward(dinp_want, dweight_want, dbias_want, dout, inp, weight, rows, IC, OC);
  EXPECT_TRUE(all_close("dweight", dweight, dweight_want, 1e-12, 1e-12));
}

TEST(Matmul, RejectsSizesBeyondBlasInt) {
  std::vector<float> workspace;
  const int64_t too_big = int64_t{std::numeric_limits<int>::max()} + 1;
  const auto message_of = [&](auto&& call) -> std::string {
    try {
      call();
    } catch (const mpt::Error& e) {
      return e.what();
    }
    return "no exception";
  };
  EXPECT_NE(message_of([&] {
              cpu::matmul_forward<float>(nullptr, nullptr, nullptr, nullptr, too_big, 4, 4, workspace);
            }).find("rows"),
            std::string::npos);
  EXPECT_NE(message_of([&] {
              cpu::matmul_backward<float>(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 4, too_big, 4,
                                          workspace);
            }).find("IC"),
            std::string::npos);
  EXPECT_NE(message_of([&] {
              cpu::matmul_forward<half>(nullptr, nullptr, nullptr, nullptr, 4, 4, too_big, workspace);
            }).find("OC"),
            std::string::npos);
}

TEST(AttentionDouble, GradientMatchesFiniteDifferences) {
  constexpr size_t B = 2, T = 7, C = 12, NH = 3;
  std::mt19937 rng(kSeed + 4);
  std::vector<double> qkv = random_normal(B * T * 3 * C, rng);
  const std::vector<double> w = random_normal(B * T * C, rng);
  std::vector<double> out(B * T * C), att(B * NH * T * T);
  const auto loss = [&] {
    cpu::attention_forward<double>(out.data(), att.data(), qkv.data(), B, T, C, NH);
    return weighted_sum(w, out.data());
  };
  loss();
  std::vector<double> dqkv(qkv.size());
  std::vector<double> workspace;
  cpu::attention_backward<double>(dqkv.data(), w.data(), qkv.data(), att.data(), B, T, C, NH, workspace);
  const std::vector<double> fd = finite_differences(qkv, 1e-5, loss);
  EXPECT_LT(max_norm_relative_error(dqkv, fd), 1e-6);
}

TEST(AttentionDouble, ForwardMatchesNaiveAndSavesCausalProbabilities) {
  constexpr size_t B = 2, T = 7, C = 12, NH = 3;
  std::mt19937 rng(kSeed + 5);
  const std::vector<double> qkv = random_normal(B * T * 3 * C, rng, 2.0);
  Misaligned<double> m_qkv(qkv), out(B * T * C), att(B * NH * T * T);
  cpu::attention_forward<double>(out.data(), att.data(), m_qkv.data(), B, T, C, NH);
  std::vector<double> want;
  naive_attention_forward(want, qkv, B, T, C, NH);
  EXPECT_TRUE(all_close("out", out.values(), want, 1e-12, 1e-12));
  expect_causal_probabilities(att.data(), B, NH, T, 1e-12);
}

TEST(AttentionDouble, BackwardAccumulates) {
  constexpr size_t B = 2, T = 7, C = 12, NH = 3;
  std::mt19937 rng(kSeed + 6);
  const std::vector<double> qkv = random_normal(B * T * 3 * C, rng);
  const std::vector<double> dout = random_normal(B * T * C, rng);
  std::vector<double> out(B * T * C), att(B * NH * T * T);
  cpu::attention_forward<double>(out.data(), att.data(), qkv.data(), B, T, C, NH);
  std::vector<double> workspace;
  std::vector<double> dqkv1(qkv.size());
  cpu::attention_backward<double>(dqkv1.data(), dout.data(), qkv.data(), att.data(), B, T, C, NH, workspace);
  const std::vector<double> dqkv0 = random_normal(qkv.size(), rng);
  std::vector<double> dqkv = dqkv0;
  for (int call = 0; call < 2; ++call)
    cpu::attention_backward<double>(dqkv.data(), dout.data(), qkv.data(), att.data(), B, T, C, NH, workspace);
  std::vector<double> want(qkv.size());
  for (size_t i = 0; i < want.size(); ++i) want[i] = dqkv0[i] + 2 * dqkv1[i];
  EXPECT_TRUE(all_close("dqkv", dqkv, want, 1e-12, 1e-12));
}

// ---- float against the double loops -------------------------------------------------------------------

TEST(MatmulFloat, MatchesNaiveLoops) {
  constexpr size_t rows = 257, IC = 67, OC = 201;
  std::mt19937 rng(kSeed + 7);
  const auto inp = to_storage<float>(random_normal(rows * IC, rng));
  const auto weight = to_storage<float>(random_normal(OC * IC, rng));
  const auto bias = to_storage<float>(random_normal(OC, rng));
  const auto dout = to_storage<float>(random_normal(rows * OC, rng));
  const auto dinp0 = to_storage<float>(random_normal(rows * IC, rng));
  const auto dweight0 = to_storage<float>(random_normal(OC * IC, rng));
  const auto dbias0 = to_storage<float>(random_normal(OC, rng));
  Misaligned<float> m_inp(inp), m_weight(weight), m_bias(bias), m_dout(dout), m_out(rows * OC);
  Misaligned<float> m_dinp(dinp0), m_dweight(dweight0), m_dbias(dbias0);
  std::vector<float> workspace;
  cpu::matmul_forward<float>(m_out.data(), m_inp.data(), m_weight.data(), m_bias.data(), rows, IC, OC,
                             workspace);
  cpu::matmul_backward<float>(m_dinp.data(), m_dweight.data(), m_dbias.data(), m_dout.data(), m_inp.data(),
                              m_weight.data(), rows, IC, OC, workspace);

  const auto d = [](const std::vector<float>& x) { return to_double(x.data(), x.size()); };
  std::vector<double> out, dinp = d(dinp0), dweight = d(dweight0), dbias = d(dbias0);
  naive_linear_forward(out, d(inp), d(weight), d(bias).data(), rows, IC, OC);
  naive_linear_backward(dinp, dweight, dbias, d(dout), d(inp), d(weight), rows, IC, OC);
  // FP32 accumulation of a few hundred O(1) terms: a few 1e-6 absolute.
  EXPECT_TRUE(all_close("out", d(m_out.values()), out, 2e-5, 1e-5));
  EXPECT_TRUE(all_close("dinp", d(m_dinp.values()), dinp, 2e-5, 1e-5));
  EXPECT_TRUE(all_close("dweight", d(m_dweight.values()), dweight, 2e-5, 1e-5));
  EXPECT_TRUE(all_close("dbias", d(m_dbias.values()), dbias, 2e-5, 1e-5));
}

// ---- FP16 / BF16 against FP32 on the same rounded inputs ----------------------------------------------

template <typename T>
class LowPrecision : public testing::Test {
 public:
  /// One unit in the last place relative to the value (2^-10 for FP16, 2^-7 for BF16): the result is the FP32
  /// result rounded once (half an ulp), plus FP32 differences far below that.
  static constexpr double kRel = std::is_same_v<T, half> ? 0x1p-10 : 0x1p-7;
  static constexpr double kAbs = 1e-5;
  static constexpr const char* kName = std::is_same_v<T, half> ? "fp16" : "bf16";
};
using LowPrecisionTypes = testing::Types<half, bf16>;
TYPED_TEST_SUITE(LowPrecision, LowPrecisionTypes);

/// Storage values of T, and the same values exactly in float.
template <typename T>
struct Rounded {
  Misaligned<T> stored;
  Misaligned<float> exact;
  explicit Rounded(const std::vector<double>& x) : stored(to_storage<T>(x)), exact(x.size()) {
    for (size_t i = 0; i < x.size(); ++i) exact[i] = mpt::to_float(stored[i]);
  }
};

TYPED_TEST(LowPrecision, MatmulMatchesFloat) {
  using T = TypeParam;
  for (const auto [rows, IC, OC] : {std::array<size_t, 3>{37, 29, 53}, std::array<size_t, 3>{257, 67, 201}}) {
    SCOPED_TRACE(fmt::format("rows={} IC={} OC={}", rows, IC, OC));
    std::mt19937 rng(kSeed + 8);
    Rounded<T> inp(random_normal(rows * IC, rng)), weight(random_normal(OC * IC, rng));
    Rounded<T> bias(random_normal(OC, rng)), dout(random_normal(rows * OC, rng));
    Rounded<T> dinp(random_normal(rows * IC, rng)), dweight(random_normal(OC * IC, rng));
    Rounded<T> dbias(random_normal(OC, rng));
    Misaligned<T> out(rows * OC);
    Misaligned<float> out32(rows * OC);
    std::vector<float> workspace;

    cpu::matmul_forward<T>(out.data(), inp.stored.data(), weight.stored.data(), bias.stored.data(), rows, IC,
                           OC, workspace);
    cpu::matmul_forward<float>(out32.data(), inp.exact.data(), weight.exact.data(), bias.exact.data(), rows,
                               IC, OC, workspace);
    cpu::matmul_backward<T>(dinp.stored.data(), dweight.stored.data(), dbias.stored.data(),
                            dout.stored.data(), inp.stored.data(), weight.stored.data(), rows, IC, OC,
                            workspace);
    cpu::matmul_backward<float>(dinp.exact.data(), dweight.exact.data(), dbias.exact.data(),
                                dout.exact.data(), inp.exact.data(), weight.exact.data(), rows, IC, OC,
                                workspace);

    ErrorStats stats;
    const auto check = [&](const char* what, const Misaligned<T>& got, const Misaligned<float>& want) {
      EXPECT_TRUE(all_close(what, to_double(got.data(), got.size()), to_double(want.data(), want.size()),
                            TestFixture::kAbs, TestFixture::kRel, &stats));
    };
    check("out", out, out32);
    check("dinp", dinp.stored, dinp.exact);
    check("dweight", dweight.stored, dweight.exact);
    check("dbias", dbias.stored, dbias.exact);
    std::printf("[ stats    ] matmul %s rows=%zu IC=%zu OC=%zu: max abs err %.3g, max rel err %.3g\n",
                TestFixture::kName, rows, IC, OC, stats.max_abs, stats.max_rel);
  }
}

TYPED_TEST(LowPrecision, MatmulNullBiasAndNullDinp) {
  using T = TypeParam;
  constexpr size_t rows = 9, IC = 7, OC = 11;
  std::mt19937 rng(kSeed + 9);
  Rounded<T> inp(random_normal(rows * IC, rng)), weight(random_normal(OC * IC, rng));
  Rounded<T> dout(random_normal(rows * OC, rng)), dweight(random_normal(OC * IC, rng));
  Misaligned<T> out(rows * OC);
  Misaligned<float> out32(rows * OC);
  std::vector<float> workspace;
  cpu::matmul_forward<T>(out.data(), inp.stored.data(), weight.stored.data(), nullptr, rows, IC, OC,
                         workspace);
  cpu::matmul_forward<float>(out32.data(), inp.exact.data(), weight.exact.data(), nullptr, rows, IC, OC,
                             workspace);
  cpu::matmul_backward<T>(nullptr, dweight.stored.data(), nullptr, dout.stored.data(), inp.stored.data(),
                          weight.stored.data(), rows, IC, OC, workspace);
  cpu::matmul_backward<float>(nullptr, dweight.exact.data(), nullptr, dout.exact.data(), inp.exact.data(),
                              weight.exact.data(), rows, IC, OC, workspace);
  EXPECT_TRUE(all_close("out", to_double(out.data(), out.size()), to_double(out32.data(), out32.size()),
                        TestFixture::kAbs, TestFixture::kRel));
  EXPECT_TRUE(all_close("dweight", to_double(dweight.stored.data(), dweight.stored.size()),
                        to_double(dweight.exact.data(), dweight.exact.size()), TestFixture::kAbs,
                        TestFixture::kRel));
}

TYPED_TEST(LowPrecision, AttentionMatchesFloat) {
  using T = TypeParam;
  constexpr size_t B = 2, T_ = 33, C = 48, NH = 3;
  std::mt19937 rng(kSeed + 10);
  Rounded<T> qkv(random_normal(B * T_ * 3 * C, rng)), dout(random_normal(B * T_ * C, rng));
  Rounded<T> dqkv(random_normal(B * T_ * 3 * C, rng));
  Misaligned<T> out(B * T_ * C), att(B * NH * T_ * T_);
  Misaligned<float> out32(B * T_ * C), att32(B * NH * T_ * T_);
  cpu::attention_forward<T>(out.data(), att.data(), qkv.stored.data(), B, T_, C, NH);
  cpu::attention_forward<float>(out32.data(), att32.data(), qkv.exact.data(), B, T_, C, NH);

  ErrorStats stats;
  EXPECT_TRUE(all_close("out", to_double(out.data(), out.size()), to_double(out32.data(), out32.size()),
                        TestFixture::kAbs, TestFixture::kRel, &stats));
  EXPECT_TRUE(all_close("att", to_double(att.data(), att.size()), to_double(att32.data(), att32.size()),
                        TestFixture::kAbs, TestFixture::kRel, &stats));
  // Each stored probability carries half an ulp of rounding; a row of T of them sums to 1 within T/2 ulps.
  expect_causal_probabilities(att.data(), B, NH, T_, T_ * TestFixture::kRel);

  // The backward pass of both runs reads the same (stored, rounded) probabilities.
  Misaligned<float> att_exact(att32.size());
  for (size_t i = 0; i < att.size(); ++i) att_exact[i] = mpt::to_float(att[i]);
  std::vector<float> workspace;
  cpu::attention_backward<T>(dqkv.stored.data(), dout.stored.data(), qkv.stored.data(), att.data(), B, T_, C,
                             NH, workspace);
  cpu::attention_backward<float>(dqkv.exact.data(), dout.exact.data(), qkv.exact.data(), att_exact.data(), B,
                                 T_, C, NH, workspace);
  EXPECT_TRUE(all_close("dqkv", to_double(dqkv.stored.data(), dqkv.stored.size()),
                        to_double(dqkv.exact.data(), dqkv.exact.size()), TestFixture::kAbs, TestFixture::kRel,
                        &stats));
  std::printf("[ stats    ] attention %s: max abs err %.3g, max rel err %.3g\n", TestFixture::kName,
              stats.max_abs, stats.max_rel);
}

// ---- FP16 overflow: results with |x| >= 65520 become inf, exactly as on a GPU ---------------------------

TEST(MatmulHalf, ForwardOverflowsToInfAtTheHalfRoundingThreshold) {
  // out = 125 * w0 + w1 - w2: every product and partial sum is an integer below 2^24, exact in FP32.
  constexpr size_t rows = 1, IC = 3, OC = 6;
  const std::vector<double> inp = {125, 1, -1};
  const std::vector<double> weight = {
      560,  3,  3,  // 70000  -> inf
      520,  3,  3,  // 65000  -> 64992 (nearest half; spacing 32 in [32768, 65536))
      524,  4,  0,  // 65504  -> 65504, the largest finite half
      524,  19, 0,  // 65519  -> 65504 (below the threshold 65520)
      524,  20, 0,  // 65520  -> inf (the halfway point rounds to even, i.e. up to 2^16)
      -560, 3,  3,  // -70000 -> -inf
  };
  const double inf = std::numeric_limits<double>::infinity();
  const std::vector<double> want = {inf, 64992, 65504, 65504, inf, -inf};
  Misaligned<half> m_inp(to_storage<half>(inp)), m_weight(to_storage<half>(weight)), out(rows * OC);
  std::vector<float> workspace;
  cpu::matmul_forward<half>(out.data(), m_inp.data(), m_weight.data(), nullptr, rows, IC, OC, workspace);
  EXPECT_TRUE(all_close("out", to_double(out.data(), out.size()), want, 0, 0));

  // BF16 has FP32's range: the same GEMM stays finite.
  Misaligned<bf16> b_inp(to_storage<bf16>(inp)), b_weight(to_storage<bf16>(weight)), b_out(rows * OC);
  cpu::matmul_forward<bf16>(b_out.data(), b_inp.data(), b_weight.data(), nullptr, rows, IC, OC, workspace);
  for (size_t i = 0; i < OC; ++i) EXPECT_FALSE(mpt::is_nonfinite(b_out[i])) << "bf16 out[" << i << "]";
}

TEST(MatmulHalf, AccumulatedGradientRoundsOnceAndOverflows) {
  // dinp = round(dinp + dout @ weight) with rows = IC = OC = 1.
  std::vector<float> workspace;
  const auto accumulate = [&](double dinp0, double w) {
    Misaligned<half> dinp(to_storage<half>({dinp0})), dweight(1), dout(to_storage<half>({1.0}));
    Misaligned<half> inp(to_storage<half>({1.0})), weight(to_storage<half>({w}));
    cpu::matmul_backward<half>(dinp.data(), dweight.data(), nullptr, dout.data(), inp.data(), weight.data(),
                               1, 1, 1, workspace);
    EXPECT_EQ(mpt::to_float(dweight[0]), 1.0f);
    return static_cast<double>(mpt::to_float(dinp[0]));
  };
  EXPECT_EQ(accumulate(60000, 5504), 65504.0);                                   // exact: still finite
  EXPECT_EQ(accumulate(60000, 10000), std::numeric_limits<double>::infinity());  // 70000
}

// ---- attention at the GEMM tiles' edges: T not a multiple of the 64-row tile, head sizes 1 and 24 -------

/// Gradient of naive_attention_forward: dqkv += d(sum dout . out)/dqkv, in double, loop by loop.
void naive_attention_backward(std::vector<double>& dqkv, const std::vector<double>& dout,
                              const std::vector<double>& qkv, size_t B, size_t T, size_t C, size_t NH) {
  const size_t hs = C / NH;
  const double scale = 1.0 / std::sqrt(static_cast<double>(hs));
  for (size_t b = 0; b < B; ++b)
    for (size_t h = 0; h < NH; ++h)
      for (size_t t = 0; t < T; ++t) {
        const size_t qo = (b * T + t) * 3 * C + h * hs;
        std::vector<double> p(t + 1), dp(t + 1);
        double total = 0, max_score = -1e300;
        for (size_t s = 0; s <= t; ++s) {
          double score = 0;
          for (size_t i = 0; i < hs; ++i) score += qkv[qo + i] * qkv[(b * T + s) * 3 * C + C + h * hs + i];
          p[s] = score * scale;
          max_score = std::max(max_score, p[s]);
        }
        for (size_t s = 0; s <= t; ++s) total += (p[s] = std::exp(p[s] - max_score));
        double p_dp = 0;
        for (size_t s = 0; s <= t; ++s) {
          p[s] /= total;
          dp[s] = 0;
          for (size_t i = 0; i < hs; ++i)
            dp[s] += dout[(b * T + t) * C + h * hs + i] * qkv[(b * T + s) * 3 * C + 2 * C + h * hs + i];
          p_dp += p[s] * dp[s];
        }
        for (size_t s = 0; s <= t; ++s) {
          const double ds = p[s] * (dp[s] - p_dp) * scale;
          const size_t ko = (b * T + s) * 3 * C + C + h * hs, vo = ko + C;
          for (size_t i = 0; i < hs; ++i) {
            dqkv[qo + i] += ds * qkv[ko + i];
            dqkv[ko + i] += ds * qkv[qo + i];
            dqkv[vo + i] += p[s] * dout[(b * T + t) * C + h * hs + i];
          }
        }
      }
}

struct AttentionShape {
  size_t B, T, C, NH;
};
// Head size 1 and 24; T below one tile, one past a tile, and over two tiles with a partial last one.
constexpr AttentionShape kTileEdgeShapes[] = {{2, 67, 3, 3}, {1, 130, 48, 2}, {3, 65, 24, 1}, {1, 5, 48, 2}};

TEST(AttentionDouble, MatchesNaiveForwardAndBackwardAtTileEdges) {
  for (const AttentionShape& s : kTileEdgeShapes) {
    std::mt19937 rng(kSeed + 20 + static_cast<unsigned>(s.T));
    const std::vector<double> qkv = random_normal(s.B * s.T * 3 * s.C, rng, 1.5);
    const std::vector<double> dout = random_normal(s.B * s.T * s.C, rng);
    const std::vector<double> dqkv0 = random_normal(qkv.size(), rng);
    std::vector<double> out(s.B * s.T * s.C), att(s.B * s.NH * s.T * s.T), dqkv = dqkv0, workspace;
    cpu::attention_forward<double>(out.data(), att.data(), qkv.data(), s.B, s.T, s.C, s.NH);
    cpu::attention_backward<double>(dqkv.data(), dout.data(), qkv.data(), att.data(), s.B, s.T, s.C, s.NH,
                                    workspace);
    std::vector<double> want_out, want_dqkv = dqkv0;
    naive_attention_forward(want_out, qkv, s.B, s.T, s.C, s.NH);
    naive_attention_backward(want_dqkv, dout, qkv, s.B, s.T, s.C, s.NH);
    const std::string at = fmt::format(" T={} hs={}", s.T, s.C / s.NH);
    EXPECT_TRUE(all_close("out" + at, out, want_out, 1e-12, 1e-12));
    EXPECT_TRUE(all_close("dqkv" + at, dqkv, want_dqkv, 1e-12, 1e-12));
    expect_causal_probabilities(att.data(), s.B, s.NH, s.T, 1e-12);
  }
}

TEST(AttentionFloat, MatchesNaiveDoubleWithinFp32RoundingAtTileEdges) {
  for (const AttentionShape& s : kTileEdgeShapes) {
    std::mt19937 rng(kSeed + 40 + static_cast<unsigned>(s.T));
    const auto qkv = to_storage<float>(random_normal(s.B * s.T * 3 * s.C, rng, 1.5));
    const auto dout = to_storage<float>(random_normal(s.B * s.T * s.C, rng));
    const auto dqkv0 = to_storage<float>(random_normal(qkv.size(), rng));
    Misaligned<float> m_qkv(qkv), m_dout(dout), out(s.B * s.T * s.C), att(s.B * s.NH * s.T * s.T);
    Misaligned<float> dqkv(dqkv0);
    std::vector<float> workspace;
    cpu::attention_forward<float>(out.data(), att.data(), m_qkv.data(), s.B, s.T, s.C, s.NH);
    cpu::attention_backward<float>(dqkv.data(), m_dout.data(), m_qkv.data(), att.data(), s.B, s.T, s.C, s.NH,
                                   workspace);
    const auto d = [](const std::vector<float>& x) { return to_double(x.data(), x.size()); };
    std::vector<double> want_out, want_dqkv = d(dqkv0);
    naive_attention_forward(want_out, d(qkv), s.B, s.T, s.C, s.NH);
    naive_attention_backward(want_dqkv, d(dout), d(qkv), s.B, s.T, s.C, s.NH);
    const std::string at = fmt::format(" T={} hs={}", s.T, s.C / s.NH);
    // FP32 sums of up to T products of O(1) terms and an FP32 exp: a few 1e-6, relative and absolute.
    EXPECT_TRUE(all_close("out" + at, d(out.values()), want_out, 2e-5, 2e-5));
    EXPECT_TRUE(all_close("dqkv" + at, d(dqkv.values()), want_dqkv, 5e-5, 2e-5));
    expect_causal_probabilities(att.data(), s.B, s.NH, s.T, 1e-5);
  }
}

template <typename T>
void check_attention_thread_independent() {
  constexpr size_t B = 2, T_ = 130, C = 72, NH = 3;  // hs 24, three row tiles, 6 (batch, head) pairs
  std::mt19937 rng(kSeed + 60);
  const auto qkv = to_storage<T>(random_normal(B * T_ * 3 * C, rng));
  const auto dout = to_storage<T>(random_normal(B * T_ * C, rng));
  const auto run = [&](int threads) {
    omp_set_num_threads(threads);
    std::vector<T> out(B * T_ * C), att(B * NH * T_ * T_), dqkv(qkv.size());
    std::vector<mpt::cpu::opmath_t<T>> workspace;
    cpu::attention_forward<T>(out.data(), att.data(), qkv.data(), B, T_, C, NH);
    cpu::attention_backward<T>(dqkv.data(), dout.data(), qkv.data(), att.data(), B, T_, C, NH, workspace);
    std::vector<T> all = out;
    all.insert(all.end(), att.begin(), att.end());
    all.insert(all.end(), dqkv.begin(), dqkv.end());
    return all;
  };
  const int saved = omp_get_max_threads();
  const std::vector<T> one = run(1);
  for (int threads : {2, 3}) {
    const std::vector<T> many = run(threads);
    EXPECT_EQ(std::memcmp(one.data(), many.data(), one.size() * sizeof(T)), 0)
        << sizeof(T) << "-byte attention results differ on " << threads << " threads";
  }
  omp_set_num_threads(saved);
}

TEST(AttentionDeterminism, SameBitsForAnyThreadCount) {
  check_attention_thread_independent<float>();
  check_attention_thread_independent<half>();
  check_attention_thread_independent<bf16>();
}

/// The linear layer forward and backward (FP32 weights as storage T) at odd sizes on 1, 2 and 3 threads:
/// bitwise the same. For bf16 on a CPU with AVX512_BF16/AMX this is oneDNN's native matmul. The inner
/// dimensions include K = 330, 400 and 1204 (forward IC, input-gradient OC, weight-gradient rows), where
/// OpenBLAS's own threaded SGEMM rounded differently from its single-threaded one on Zen 4, and a weight
/// gradient with a long inner dimension and a small output (2048 rows into 48 x 64), where a library could
/// split K over the threads (one block of C: checks that the library's own threading stays off); and
/// 1024+-row GEMMs with a long K and a narrow output. FP32 runs on oneDNN's f32 matmul where the CPU has
/// AVX-512. Up to 16 threads (more than this machine's cores: the libraries split work by the thread count,
/// not the cores).
template <typename T>
void check_matmul_thread_independent(size_t rows, size_t IC, size_t OC) {
  std::mt19937 rng(kSeed + 70 + static_cast<unsigned>(IC));
  const auto inp = to_storage<T>(random_normal(rows * IC, rng));
  const auto weight = to_storage<T>(random_normal(OC * IC, rng));
  const auto bias = to_storage<T>(random_normal(OC, rng));
  const auto dout = to_storage<T>(random_normal(rows * OC, rng));
  const auto run = [&](int threads) {
    omp_set_num_threads(threads);
    std::vector<T> out(rows * OC), dinp(rows * IC), dweight(OC * IC), dbias(OC);
    std::vector<float> workspace;
    cpu::matmul_forward<T>(out.data(), inp.data(), weight.data(), bias.data(), rows, IC, OC, workspace);
    cpu::matmul_backward<T>(dinp.data(), dweight.data(), dbias.data(), dout.data(), inp.data(), weight.data(),
                            rows, IC, OC, workspace);
    for (const auto* part : {&dinp, &dweight, &dbias}) out.insert(out.end(), part->begin(), part->end());
    return out;
  };
  const int saved = omp_get_max_threads();
  const std::vector<T> one = run(1);
  for (int threads : {2, 3, 8, 16}) {
    const std::vector<T> many = run(threads);
    EXPECT_EQ(std::memcmp(one.data(), many.data(), one.size() * sizeof(T)), 0)
        << sizeof(T) << "-byte matmul results differ on " << threads << " threads at rows " << rows << ", IC "
        << IC << ", OC " << OC;
  }
  omp_set_num_threads(saved);
}

TEST(MatmulDeterminism, SameBitsForAnyThreadCount) {
  std::printf("[ info     ] bf16 GEMM: %s\n",
              mpt::cpu::onednn_native_bf16() ? "oneDNN native" : "FP32 copies + OpenBLAS SGEMM");
  struct Shape {
    size_t rows, IC, OC;
  };
  for (const Shape s : {Shape{257, 67, 201}, Shape{130, 330, 400}, Shape{1204, 37, 1204}, Shape{2048, 64, 48},
                        Shape{1024, 1030, 37}, Shape{1031, 40, 1100}}) {
    check_matmul_thread_independent<float>(s.rows, s.IC, s.OC);
    check_matmul_thread_independent<half>(s.rows, s.IC, s.OC);
    check_matmul_thread_independent<bf16>(s.rows, s.IC, s.OC);
  }
}

}  // namespace
