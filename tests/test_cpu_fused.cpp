// Tests of the CPU backend's fused ops (kernels/cpu/layernorm.cpp residual_layernorm_forward, kernels/cpu/
// matmul.cpp matmul_gelu_forward and matmul_backward_gelu):
//  - bitwise equal to the unfused op sequences they replace, for float, half, bf16 and double storage, at odd
//    sizes (rows = 3 x 13, C = 1, 37 and 301, OC = 4C, and the transposed c_proj shape), on 1, 2 and 3
//    threads (and equal to the 1-thread result, so independent of the thread count, where the GEMMs are: see
//    kShapes), with the aliasing the model uses (dpre over inp);
//  - double storage against long double formulas written here, and float against that double reference
//    within FP32 rounding;
//  - FP16 overflow: a value that rounds to |x| >= 65520 is inf, before the GELU product in the backward.
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include <gtest/gtest.h>

#include "common/gelu.hpp"
#include "cpu/ops.hpp"
#include "mptrain/dtype.hpp"

namespace {

using mpt::bf16;
using mpt::half;
namespace cpu = mpt::cpu;

constexpr uint64_t kSeed = 20261206;
constexpr int64_t kRows = 3 * 13;  // B = 3, T = 13: not a multiple of any chunk or tile

size_t sz(int64_t n) {
  return static_cast<size_t>(n);
}

std::vector<double> uniform(int64_t n, std::mt19937_64& rng, double lo = -1.0, double hi = 1.0) {
  std::uniform_real_distribution<double> d(lo, hi);
  std::vector<double> v(sz(n));
  for (double& x : v) x = d(rng);
  return v;
}

template <typename T>
std::vector<T> rounded(const std::vector<double>& x) {
  std::vector<T> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    if constexpr (std::is_same_v<T, double>)
      out[i] = x[i];
    else if constexpr (std::is_same_v<T, float>)
      out[i] = static_cast<float>(x[i]);
    else
      out[i] = T(static_cast<float>(x[i]));
  }
  return out;
}

template <typename T>
::testing::AssertionResult same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  if (a.size() != b.size()) return ::testing::AssertionFailure() << "sizes differ";
  for (size_t i = 0; i < a.size(); ++i)
    if (std::memcmp(&a[i], &b[i], sizeof(T)) != 0)
      return ::testing::AssertionFailure() << "first difference at index " << i << " of " << a.size();
  return ::testing::AssertionSuccess();
}

/// Restores the OpenMP thread count on scope exit.
class ThreadCountGuard {
 public:
  ThreadCountGuard() : saved_(omp_get_max_threads()) {}
  ~ThreadCountGuard() { omp_set_num_threads(saved_); }
  ThreadCountGuard(const ThreadCountGuard&) = delete;
  ThreadCountGuard& operator=(const ThreadCountGuard&) = delete;

 private:
  int saved_;
};

constexpr int kThreadCounts[] = {1, 2, 3};

template <typename T>
class CpuFused : public ::testing::Test {};
using AllTypes = ::testing::Types<float, half, bf16, double>;
TYPED_TEST_SUITE(CpuFused, AllTypes);

TYPED_TEST(CpuFused, ResidualLayerNormIsTheTwoOpsBitwise) {
  using T = TypeParam;
  using F = cpu::opmath_t<T>;
  ThreadCountGuard guard;
  for (const int64_t C : {int64_t{1}, int64_t{37}, int64_t{301}}) {
    std::mt19937_64 rng(kSeed + static_cast<uint64_t>(C));
    const std::vector<T> a = rounded<T>(uniform(kRows * C, rng, -3.0, 3.0));
    const std::vector<T> b = rounded<T>(uniform(kRows * C, rng, -1.0, 2.0));
    const std::vector<T> weight = rounded<T>(uniform(C, rng, 0.5, 1.5));
    const std::vector<T> bias = rounded<T>(uniform(C, rng, -0.5, 0.5));
    std::vector<T> residual_ref(sz(kRows * C)), out_ref(sz(kRows * C));
    std::vector<F> mean_ref(sz(kRows)), rstd_ref(sz(kRows));
    omp_set_num_threads(1);
    cpu::residual_forward(residual_ref.data(), a.data(), b.data(), kRows * C);
    cpu::layernorm_forward(out_ref.data(), mean_ref.data(), rstd_ref.data(), residual_ref.data(),
                           weight.data(), bias.data(), kRows, C);
    for (const int threads : kThreadCounts) {
      omp_set_num_threads(threads);
      const std::string where = "C " + std::to_string(C) + ", " + std::to_string(threads) + " threads";
      std::vector<T> residual(sz(kRows * C)), out(sz(kRows * C));
      std::vector<F> mean(sz(kRows)), rstd(sz(kRows));
      cpu::residual_layernorm_forward(residual.data(), out.data(), mean.data(), rstd.data(), a.data(),
                                      b.data(), weight.data(), bias.data(), kRows, C);
      EXPECT_TRUE(same_bits(residual, residual_ref)) << "residual, " << where;
      EXPECT_TRUE(same_bits(out, out_ref)) << "out, " << where;
      EXPECT_TRUE(same_bits(mean, mean_ref)) << "mean, " << where;
      EXPECT_TRUE(same_bits(rstd, rstd_ref)) << "rstd, " << where;
      // The residual may overwrite its first input.
      std::vector<T> in_place = a;
      cpu::residual_layernorm_forward(in_place.data(), out.data(), mean.data(), rstd.data(), in_place.data(),
                                      b.data(), weight.data(), bias.data(), kRows, C);
      EXPECT_TRUE(same_bits(in_place, residual_ref)) << "residual over a, " << where;
      EXPECT_TRUE(same_bits(out, out_ref)) << "out with residual over a, " << where;
    }
  }
}

/// The MLP's two shapes: c_fc (IC = C, OC = 4C) and c_proj (IC = 4C, OC = C), for odd C. The fused ops are
/// compared with the unfused ones on the same thread count, and with the 1-thread unfused result: every GEMM
/// (K = 1204 included, where OpenBLAS's own threaded driver rounded differently) runs as fixed blocks of
/// single-threaded calls, so the results do not depend on the thread count.
struct Shape {
  int64_t IC, OC;
};
constexpr Shape kShapes[] = {{1, 4}, {37, 148}, {148, 37}, {301, 1204}};

TYPED_TEST(CpuFused, MatmulGeluForwardIsMatmulThenGeluBitwise) {
  using T = TypeParam;
  ThreadCountGuard guard;
  std::vector<float> workspace;
  for (const Shape s : kShapes) {
    std::mt19937_64 rng(kSeed + 100 + static_cast<uint64_t>(s.IC));
    const std::vector<T> inp = rounded<T>(uniform(kRows * s.IC, rng, -2.0, 2.0));
    const std::vector<T> weight = rounded<T>(uniform(s.OC * s.IC, rng, -0.3, 0.3));
    const std::vector<T> bias = rounded<T>(uniform(s.OC, rng, -1.0, 1.0));
    for (const bool with_bias : {true, false}) {
      const T* b = with_bias ? bias.data() : nullptr;
      const auto unfused = [&](int threads) {
        omp_set_num_threads(threads);
        std::vector<T> pre(sz(kRows * s.OC)), out(sz(kRows * s.OC));
        cpu::matmul_forward(pre.data(), inp.data(), weight.data(), b, kRows, s.IC, s.OC, workspace);
        cpu::gelu_forward(out.data(), pre.data(), kRows * s.OC);
        return std::make_pair(pre, out);
      };
      const auto one_thread = unfused(1);
      for (const int threads : kThreadCounts) {
        const auto& ref = one_thread;
        omp_set_num_threads(threads);
        const std::string where = "IC " + std::to_string(s.IC) + ", bias " + std::to_string(with_bias) +
                                  ", " + std::to_string(threads) + " threads";
        std::vector<T> pre(sz(kRows * s.OC)), out(sz(kRows * s.OC));
        cpu::matmul_gelu_forward(pre.data(), out.data(), inp.data(), weight.data(), b, kRows, s.IC, s.OC,
                                 workspace);
        EXPECT_TRUE(same_bits(pre, ref.first)) << "pre, " << where;
        EXPECT_TRUE(same_bits(out, ref.second)) << "out, " << where;
      }
    }
  }
}

TYPED_TEST(CpuFused, MatmulBackwardGeluIsTheZeroedSequenceBitwise) {
  using T = TypeParam;
  ThreadCountGuard guard;
  std::vector<float> workspace;
  for (const Shape s : kShapes) {
    // The c_proj backward: inp = GELU(pre) [rows, IC], dout [rows, OC].
    std::mt19937_64 rng(kSeed + 200 + static_cast<uint64_t>(s.IC));
    const std::vector<T> pre = rounded<T>(uniform(kRows * s.IC, rng, -4.0, 4.0));
    std::vector<T> inp(pre.size());
    cpu::gelu_forward(inp.data(), pre.data(), kRows * s.IC);
    const std::vector<T> weight = rounded<T>(uniform(s.OC * s.IC, rng, -0.3, 0.3));
    const std::vector<T> dout = rounded<T>(uniform(kRows * s.OC, rng, -8.0, 8.0));
    const std::vector<T> dweight0 = rounded<T>(uniform(s.OC * s.IC, rng));
    const std::vector<T> dbias0 = rounded<T>(uniform(s.OC, rng));

    struct Grads {
      std::vector<T> dpre, dweight, dbias;
    };
    const auto unfused = [&](int threads) {
      omp_set_num_threads(threads);
      Grads r{std::vector<T>(sz(kRows * s.IC)), dweight0, dbias0};
      std::vector<T> g(sz(kRows * s.IC));  // zeroed, as the model did
      cpu::matmul_backward(g.data(), r.dweight.data(), r.dbias.data(), dout.data(), inp.data(), weight.data(),
                           kRows, s.IC, s.OC, workspace);
      cpu::gelu_backward(r.dpre.data(), pre.data(), g.data(), kRows * s.IC);
      return r;
    };
    const Grads one_thread = unfused(1);
    for (const int threads : kThreadCounts) {
      const Grads& ref = one_thread;
      const std::vector<T>&dpre_ref = ref.dpre, &dweight_ref = ref.dweight, &dbias_ref = ref.dbias;
      omp_set_num_threads(threads);
      const std::string where = "IC " + std::to_string(s.IC) + ", " + std::to_string(threads) + " threads";
      // dpre starts as garbage: it is overwritten, not accumulated.
      std::vector<T> dpre = rounded<T>(uniform(kRows * s.IC, rng));
      std::vector<T> dweight = dweight0, dbias = dbias0;
      cpu::matmul_backward_gelu(dpre.data(), dweight.data(), dbias.data(), dout.data(), inp.data(),
                                weight.data(), pre.data(), kRows, s.IC, s.OC, workspace);
      EXPECT_TRUE(same_bits(dpre, dpre_ref)) << "dpre, " << where;
      EXPECT_TRUE(same_bits(dweight, dweight_ref)) << "dweight, " << where;
      EXPECT_TRUE(same_bits(dbias, dbias_ref)) << "dbias, " << where;
      // dpre over inp (the recompute modes write dfch into the dead fch_gelu buffer).
      std::vector<T> aliased = inp;
      dweight = dweight0;
      dbias = dbias0;
      cpu::matmul_backward_gelu(aliased.data(), dweight.data(), dbias.data(), dout.data(), aliased.data(),
                                weight.data(), pre.data(), kRows, s.IC, s.OC, workspace);
      EXPECT_TRUE(same_bits(aliased, dpre_ref)) << "dpre over inp, " << where;
      EXPECT_TRUE(same_bits(dweight, dweight_ref)) << "dweight with dpre over inp, " << where;
    }
  }
}

// ---- against a long double reference -----------------------------------------------------------------

long double gelu_ld(long double x) {
  const long double k = std::sqrt(2.0L / 3.14159265358979323846264338327950288L);
  return 0.5L * x * (1.0L + std::tanh(k * (x + 0.044715L * x * x * x)));
}
long double gelu_derivative_ld(long double x) {
  const long double k = std::sqrt(2.0L / 3.14159265358979323846264338327950288L);
  const long double t = std::tanh(k * (x + 0.044715L * x * x * x));
  return 0.5L * (1.0L + t) + 0.5L * x * (1.0L - t * t) * k * (1.0L + 3.0L * 0.044715L * x * x);
}

/// |got - want| <= tol * (1 + |want|) for every element; reports the first failure.
template <typename G>
void expect_near_all(const std::vector<G>& got, const std::vector<long double>& want, double tol,
                     const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (size_t i = 0; i < got.size(); ++i) {
    const auto g = static_cast<long double>(got[i]);
    if (!(std::abs(g - want[i]) <= tol * (1.0L + std::abs(want[i])))) {
      ADD_FAILURE() << what << ": index " << i << " got " << static_cast<double>(g) << ", want "
                    << static_cast<double>(want[i]) << " (tolerance " << tol << " relative)";
      return;
    }
  }
}

/// The three fused ops in storage T against long double formulas at odd sizes (C = 37, 4C = 148).
template <typename T>
void check_against_long_double(double tol) {
  const int64_t C = 37, H = 4 * C;
  std::mt19937_64 rng(kSeed + 300);
  const std::vector<double> a = uniform(kRows * C, rng, -3.0, 3.0), b = uniform(kRows * C, rng);
  const std::vector<double> lnw = uniform(C, rng, 0.5, 1.5), lnb = uniform(C, rng, -0.5, 0.5);
  const std::vector<double> w = uniform(H * C, rng, -0.3, 0.3), bias = uniform(H, rng);
  const std::vector<double> dout = uniform(kRows * C, rng, -2.0, 2.0), w2 = uniform(C * H, rng, -0.3, 0.3);
  // Inputs rounded to T once; the reference reads the rounded values.
  const std::vector<T> ta = rounded<T>(a), tb = rounded<T>(b), tlnw = rounded<T>(lnw), tlnb = rounded<T>(lnb);
  const std::vector<T> tw = rounded<T>(w), tbias = rounded<T>(bias), tdout = rounded<T>(dout),
                       tw2 = rounded<T>(w2);
  const auto ld = [](T x) { return static_cast<long double>(x); };

  // residual + LayerNorm
  std::vector<T> residual(sz(kRows * C)), ln(sz(kRows * C));
  std::vector<T> mean(sz(kRows)), rstd(sz(kRows));
  cpu::residual_layernorm_forward(residual.data(), ln.data(), mean.data(), rstd.data(), ta.data(), tb.data(),
                                  tlnw.data(), tlnb.data(), kRows, C);
  std::vector<long double> want_res(sz(kRows * C)), want_ln(sz(kRows * C));
  for (int64_t r = 0; r < kRows; ++r) {
    long double m = 0, v = 0;
    for (int64_t c = 0; c < C; ++c)
      m += want_res[sz(r * C + c)] = ld(ta[sz(r * C + c)]) + ld(tb[sz(r * C + c)]);
    m /= C;
    for (int64_t c = 0; c < C; ++c) v += (want_res[sz(r * C + c)] - m) * (want_res[sz(r * C + c)] - m);
    const long double s = 1.0L / std::sqrt(v / C + 1e-5L);
    for (int64_t c = 0; c < C; ++c)
      want_ln[sz(r * C + c)] = (want_res[sz(r * C + c)] - m) * s * ld(tlnw[sz(c)]) + ld(tlnb[sz(c)]);
  }
  expect_near_all(residual, want_res, tol, "residual_layernorm_forward residual");
  expect_near_all(ln, want_ln, tol, "residual_layernorm_forward out");

  // c_fc + GELU from the stored LayerNorm output
  std::vector<float> workspace;
  std::vector<T> pre(sz(kRows * H)), act(sz(kRows * H));
  cpu::matmul_gelu_forward(pre.data(), act.data(), ln.data(), tw.data(), tbias.data(), kRows, C, H,
                           workspace);
  std::vector<long double> want_pre(sz(kRows * H)), want_act(sz(kRows * H));
  for (int64_t r = 0; r < kRows; ++r)
    for (int64_t j = 0; j < H; ++j) {
      long double sum = ld(tbias[sz(j)]);
      for (int64_t k = 0; k < C; ++k) sum += ld(ln[sz(r * C + k)]) * ld(tw[sz(j * C + k)]);
      want_pre[sz(r * H + j)] = sum;
      want_act[sz(r * H + j)] = gelu_ld(ld(pre[sz(r * H + j)]));  // GELU of the stored pre
    }
  expect_near_all(pre, want_pre, tol, "matmul_gelu_forward pre");
  expect_near_all(act, want_act, tol, "matmul_gelu_forward out");

  // c_proj backward through GELU: dpre = GELU'(pre) * (dout @ w2), dw2 = dout^T @ act, db = column sums.
  std::vector<T> dpre(sz(kRows * H)), dw2(sz(C * H)), db(sz(C));
  cpu::matmul_backward_gelu(dpre.data(), dw2.data(), db.data(), tdout.data(), act.data(), tw2.data(),
                            pre.data(), kRows, H, C, workspace);
  std::vector<long double> want_dpre(sz(kRows * H)), want_dw2(sz(C * H)), want_db(sz(C));
  for (int64_t r = 0; r < kRows; ++r)
    for (int64_t j = 0; j < H; ++j) {
      long double g = 0;
      for (int64_t o = 0; o < C; ++o) g += ld(tdout[sz(r * C + o)]) * ld(tw2[sz(o * H + j)]);
      want_dpre[sz(r * H + j)] = g * gelu_derivative_ld(ld(pre[sz(r * H + j)]));
    }
  for (int64_t o = 0; o < C; ++o) {
    for (int64_t j = 0; j < H; ++j) {
      long double g = 0;
      for (int64_t r = 0; r < kRows; ++r) g += ld(tdout[sz(r * C + o)]) * ld(act[sz(r * H + j)]);
      want_dw2[sz(o * H + j)] = g;
    }
    long double g = 0;
    for (int64_t r = 0; r < kRows; ++r) g += ld(tdout[sz(r * C + o)]);
    want_db[sz(o)] = g;
  }
  expect_near_all(dpre, want_dpre, tol, "matmul_backward_gelu dpre");
  expect_near_all(dw2, want_dw2, tol, "matmul_backward_gelu dweight");
  expect_near_all(db, want_db, tol, "matmul_backward_gelu dbias");
}

TEST(CpuFusedReference, DoubleMatchesLongDouble) {
  check_against_long_double<double>(1e-12);
}

TEST(CpuFusedReference, FloatMatchesLongDoubleWithinFp32Rounding) {
  // Sums of up to 148 products of magnitude <= ~3 and the SLEEF GELU (a few ulp): well inside 2^-16 relative.
  check_against_long_double<float>(1.5e-5);
}

// ---- FP16 overflow ------------------------------------------------------------------------------------

TEST(CpuFusedHalf, ForwardOverflowsToInfAtTheHalfRoundingThreshold) {
  std::vector<float> workspace;
  // pre = 32768 + 32752 + bias: 65520 rounds to inf in FP16, 65519 to 65504.
  const std::vector<half> inp = {half(32768.0f), half(32752.0f)};
  const std::vector<half> weight = {half(1.0f), half(1.0f)};
  for (const float bias_value : {0.0f, -1.0f}) {
    const std::vector<half> bias = {half(bias_value)};
    std::vector<half> pre(1), out(1);
    cpu::matmul_gelu_forward(pre.data(), out.data(), inp.data(), weight.data(), bias.data(), 1, 2, 1,
                             workspace);
    if (bias_value == 0.0f) {
      EXPECT_TRUE(std::isinf(mpt::to_float(pre[0])) && mpt::to_float(pre[0]) > 0) << mpt::to_float(pre[0]);
      EXPECT_TRUE(std::isinf(mpt::to_float(out[0])) && mpt::to_float(out[0]) > 0) << mpt::to_float(out[0]);
    } else {
      EXPECT_EQ(mpt::to_float(pre[0]), 65504.0f);
      EXPECT_EQ(mpt::to_float(out[0]), 65504.0f);  // GELU(x) = x to FP16 precision this far out
    }
  }
  // The residual of residual_layernorm_forward rounds the same way.
  const std::vector<half> a = {half(32768.0f), half(32768.0f)}, b = {half(32752.0f), half(32736.0f)};
  const std::vector<half> lnw = {half(1.0f)}, lnb = {half(0.0f)};
  std::vector<half> residual(2), ln(2);
  std::vector<float> mean(2), rstd(2);
  cpu::residual_layernorm_forward(residual.data(), ln.data(), mean.data(), rstd.data(), a.data(), b.data(),
                                  lnw.data(), lnb.data(), 2, 1);
  EXPECT_TRUE(std::isinf(mpt::to_float(residual[0]))) << mpt::to_float(residual[0]);
  EXPECT_EQ(mpt::to_float(residual[1]), 65504.0f);
}

TEST(CpuFusedHalf, BackwardRoundsTheInputGradientBeforeTheGeluProduct) {
  std::vector<float> workspace;
  // dout @ weight = 65520 in FP32, inf once rounded to FP16; GELU'(0) = 0.5 would bring the unrounded
  // product back into range (32760), so an inf result shows the rounding happens first, as unfused.
  const std::vector<half> dout = {half(32768.0f), half(32752.0f)};  // [rows 1, OC 2]
  const std::vector<half> weight = {half(1.0f), half(1.0f)};        // [OC 2, IC 1]
  const std::vector<half> pre = {half(0.0f)};
  const std::vector<half> inp = {half(0.0f)};  // GELU(0)
  std::vector<half> dpre = {half(7.0f)}, dweight(2), dbias(2);
  cpu::matmul_backward_gelu(dpre.data(), dweight.data(), dbias.data(), dout.data(), inp.data(), weight.data(),
                            pre.data(), 1, 1, 2, workspace);
  EXPECT_TRUE(std::isinf(mpt::to_float(dpre[0])) && mpt::to_float(dpre[0]) > 0) << mpt::to_float(dpre[0]);
  EXPECT_EQ(mpt::to_float(dbias[0]), 32768.0f);
  EXPECT_EQ(mpt::to_float(dbias[1]), 32752.0f);
  // 32736 + 32736 = 65472 stays finite (an FP16 value): 0.5 * 65472 = 32736.
  const std::vector<half> dout2 = {half(32736.0f), half(32736.0f)};
  cpu::matmul_backward_gelu(dpre.data(), dweight.data(), dbias.data(), dout2.data(), inp.data(),
                            weight.data(), pre.data(), 1, 1, 2, workspace);
  EXPECT_EQ(mpt::to_float(dpre[0]), 32736.0f);
}

}  // namespace
