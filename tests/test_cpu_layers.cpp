// Tests of the CPU layer ops: embedding, LayerNorm, GELU, residual/accumulate and fused cross-entropy
// (kernels/cpu/{embedding,layernorm,elementwise,crossentropy}.cpp, kernels/common/gelu.hpp).
//
//  - Forward results in double against direct formulas evaluated independently here (long double).
//  - Backward results in double against central differences of a random linear functional
//    L = sum_i w_i out_i (so dout = w), and the check that backward adds into a nonzero gradient buffer.
//  - FP16 and BF16 against FP32 on the same rounded inputs, with a dtype-aware tolerance; the largest errors
//    are printed ("[ mixed    ]" lines).
//  - Bitwise determinism of the two reductions (embedding and LayerNorm backward) across thread counts.
// Sizes are small and odd (B=2, T=7, C=12, V=37, Vp=40); buffers of 16-bit types start one element past an
// allocation boundary so the SIMD converters see misaligned pointers.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iostream>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "common/gelu.hpp"
#include "cpu/ops.hpp"
#include "mptrain/dtype.hpp"
#include "mptrain/error.hpp"

namespace {

using mpt::bf16;
using mpt::half;
namespace cpu = mpt::cpu;

constexpr uint64_t kSeed = 20240612;
constexpr int64_t kB = 2;
constexpr int64_t kT = 7;
constexpr int64_t kC = 12;
constexpr int64_t kV = 37;
constexpr int64_t kVp = 40;
constexpr int64_t kRows = kB * kT;
/// Finite-difference step and the accepted max-norm relative error of a gradient.
constexpr double kStep = 1e-6;
constexpr double kFdTolerance = 1e-6;
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

size_t sz(int64_t n) {
  return static_cast<size_t>(n);
}

std::vector<double> uniform(int64_t n, std::mt19937_64& rng, double lo = -1.0, double hi = 1.0) {
  std::uniform_real_distribution<double> dist(lo, hi);
  std::vector<double> v(sz(n));
  for (double& x : v) x = dist(rng);
  return v;
}

std::vector<int32_t> random_tokens(int64_t n, int64_t V, std::mt19937_64& rng) {
  std::uniform_int_distribution<int32_t> dist(0, static_cast<int32_t>(V - 1));
  std::vector<int32_t> v(sz(n));
  for (int32_t& x : v) x = dist(rng);
  return v;
}

double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
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

/// Central differences of loss() with respect to each element of `param` (perturbed in place, restored).
template <typename Loss>
std::vector<double> numeric_gradient(std::vector<double>& param, Loss&& loss) {
  // Hundreds of tiny forward calls: one thread, so a loaded machine cannot stall every OpenMP barrier.
  ThreadCountGuard guard;
  omp_set_num_threads(1);
  std::vector<double> g(param.size());
  for (size_t i = 0; i < param.size(); ++i) {
    const double saved = param[i];
    param[i] = saved + kStep;
    const double up = loss();
    param[i] = saved - kStep;
    const double down = loss();
    param[i] = saved;
    g[i] = (up - down) / (2 * kStep);
  }
  return g;
}

/// max_i |analytic_i - numeric_i| / max_i |numeric_i|.
double max_norm_relative_error(const std::vector<double>& analytic, const std::vector<double>& numeric) {
  EXPECT_EQ(analytic.size(), numeric.size());
  double diff = 0;
  double scale = 0;
  for (size_t i = 0; i < numeric.size(); ++i) {
    diff = std::max(diff, std::abs(analytic[i] - numeric[i]));
    scale = std::max(scale, std::abs(numeric[i]));
  }
  return scale > 0 ? diff / scale : diff;
}

/// Checks an analytic gradient against central differences (max-norm relative error) and prints the error.
void expect_gradient(const std::string& what, const std::vector<double>& analytic,
                     const std::vector<double>& numeric) {
  const double error = max_norm_relative_error(analytic, numeric);
  EXPECT_LT(error, kFdTolerance) << what;
  std::cout << fmt::format("[ fd       ] {:<28} max-norm relative error {:.2e}\n", what, error);
}

/// A gradient run from the nonzero buffer `start` must end at start + (the run from zero).
void expect_accumulated(const char* what, const std::vector<double>& start,
                        const std::vector<double>& from_start, const std::vector<double>& from_zero) {
  for (size_t i = 0; i < start.size(); ++i) {
    const double want = start[i] + from_zero[i];
    if (std::abs(from_start[i] - want) > 1e-13 * (1 + std::abs(want))) {
      ADD_FAILURE() << what << " does not accumulate: index " << i << " start " << start[i] << " gradient "
                    << from_zero[i] << " result " << from_start[i];
      return;
    }
  }
}

/// tanh-GELU evaluated independently of kernels/common/gelu.hpp.
long double gelu_reference(long double x) {
  const long double pi = 3.141592653589793238462643383279502884L;
  return 0.5L * x * (1.0L + std::tanh(std::sqrt(2.0L / pi) * (x + 0.044715L * x * x * x)));
}

// ---- forward results and finite-difference gradients, in double
// --------------------------------------------

TEST(CpuLayersDouble, EmbeddingForwardAndGradients) {
  std::mt19937_64 rng(kSeed);
  std::vector<double> wte = uniform(kV * kC, rng);
  std::vector<double> wpe = uniform(kT * kC, rng);
  std::vector<int32_t> tokens = random_tokens(kRows, kV, rng);
  // One token at several positions of both sequences, one at the same t in both, one at the last row.
  tokens[5] = tokens[0];
  tokens[sz(kT + 2)] = tokens[0];
  tokens[sz(kT + 3)] = tokens[3];
  tokens[sz(kRows - 1)] = static_cast<int32_t>(kV - 1);
  const std::vector<double> w = uniform(kRows * kC, rng);

  std::vector<double> out(sz(kRows * kC), kNaN);  // forward overwrites
  cpu::embedding_forward(out.data(), tokens.data(), wte.data(), wpe.data(), kB, kT, kC);
  for (int64_t bt = 0; bt < kRows; ++bt) {
    for (int64_t c = 0; c < kC; ++c) {
      ASSERT_EQ(out[sz(bt * kC + c)], wte[sz(tokens[sz(bt)] * kC + c)] + wpe[sz((bt % kT) * kC + c)])
          << "bt " << bt << " c " << c;
    }
  }

  auto loss = [&] {
    std::vector<double> o(sz(kRows * kC));
    cpu::embedding_forward(o.data(), tokens.data(), wte.data(), wpe.data(), kB, kT, kC);
    return dot(w, o);
  };
  std::vector<double> dwte(wte.size(), 0.0);
  std::vector<double> dwpe(wpe.size(), 0.0);
  cpu::embedding_backward(dwte.data(), dwpe.data(), w.data(), tokens.data(), kB, kT, kC);
  expect_gradient("embedding_backward dwte", dwte, numeric_gradient(wte, loss));
  expect_gradient("embedding_backward dwpe", dwpe, numeric_gradient(wpe, loss));

  const std::vector<double> dwte0 = uniform(kV * kC, rng);
  const std::vector<double> dwpe0 = uniform(kT * kC, rng);
  std::vector<double> dwte1 = dwte0;
  std::vector<double> dwpe1 = dwpe0;
  cpu::embedding_backward(dwte1.data(), dwpe1.data(), w.data(), tokens.data(), kB, kT, kC);
  expect_accumulated("embedding_backward dwte", dwte0, dwte1, dwte);
  expect_accumulated("embedding_backward dwpe", dwpe0, dwpe1, dwpe);
}

TEST(CpuLayersDouble, LayerNormForwardAndGradients) {
  std::mt19937_64 rng(kSeed + 1);
  std::vector<double> inp = uniform(kRows * kC, rng, -2.0, 2.0);
  for (int64_t r = 0; r < kRows; ++r) {  // rows with a large mean test the centring
    for (int64_t c = 0; c < kC; ++c) inp[sz(r * kC + c)] += static_cast<double>(r) - 5.0;
  }
  std::vector<double> weight = uniform(kC, rng, 0.5, 1.5);
  std::vector<double> bias = uniform(kC, rng, -0.5, 0.5);
  const std::vector<double> w = uniform(kRows * kC, rng);

  std::vector<double> out(sz(kRows * kC), kNaN);
  std::vector<double> mean(sz(kRows), kNaN);
  std::vector<double> rstd(sz(kRows), kNaN);
  cpu::layernorm_forward(out.data(), mean.data(), rstd.data(), inp.data(), weight.data(), bias.data(), kRows,
                         kC);
  for (int64_t r = 0; r < kRows; ++r) {
    long double m = 0;
    for (int64_t c = 0; c < kC; ++c) m += inp[sz(r * kC + c)];
    m /= kC;
    long double var = 0;
    for (int64_t c = 0; c < kC; ++c) var += (inp[sz(r * kC + c)] - m) * (inp[sz(r * kC + c)] - m);
    var /= kC;
    const long double s = 1.0L / std::sqrt(var + 1e-5L);
    EXPECT_NEAR(mean[sz(r)], static_cast<double>(m), 1e-14) << "row " << r;
    EXPECT_NEAR(rstd[sz(r)], static_cast<double>(s), 1e-14 * static_cast<double>(s)) << "row " << r;
    for (int64_t c = 0; c < kC; ++c) {
      const long double want = (inp[sz(r * kC + c)] - m) * s * weight[sz(c)] + bias[sz(c)];
      EXPECT_NEAR(out[sz(r * kC + c)], static_cast<double>(want), 1e-13) << "row " << r << " c " << c;
    }
  }

  auto loss = [&] {
    std::vector<double> o(sz(kRows * kC));
    std::vector<double> m(sz(kRows));
    std::vector<double> s(sz(kRows));
    cpu::layernorm_forward(o.data(), m.data(), s.data(), inp.data(), weight.data(), bias.data(), kRows, kC);
    return dot(w, o);
  };
  std::vector<double> dinp(inp.size(), 0.0);
  std::vector<double> dweight(sz(kC), 0.0);
  std::vector<double> dbias(sz(kC), 0.0);
  cpu::layernorm_backward(dinp.data(), dweight.data(), dbias.data(), w.data(), inp.data(), weight.data(),
                          mean.data(), rstd.data(), kRows, kC);
  expect_gradient("layernorm_backward dinp", dinp, numeric_gradient(inp, loss));
  expect_gradient("layernorm_backward dweight", dweight, numeric_gradient(weight, loss));
  expect_gradient("layernorm_backward dbias", dbias, numeric_gradient(bias, loss));

  const std::vector<double> dinp0 = uniform(kRows * kC, rng);
  const std::vector<double> dweight0 = uniform(kC, rng);
  const std::vector<double> dbias0 = uniform(kC, rng);
  std::vector<double> dinp1 = dinp0;
  std::vector<double> dweight1 = dweight0;
  std::vector<double> dbias1 = dbias0;
  cpu::layernorm_backward(dinp1.data(), dweight1.data(), dbias1.data(), w.data(), inp.data(), weight.data(),
                          mean.data(), rstd.data(), kRows, kC);
  expect_accumulated("layernorm_backward dinp", dinp0, dinp1, dinp);
  expect_accumulated("layernorm_backward dweight", dweight0, dweight1, dweight);
  expect_accumulated("layernorm_backward dbias", dbias0, dbias1, dbias);
}

TEST(CpuLayersDouble, GeluForwardAndGradient) {
  std::mt19937_64 rng(kSeed + 2);
  const int64_t n = kRows * kC;
  std::vector<double> inp = uniform(n, rng, -5.0, 5.0);
  inp[0] = 0.0;
  inp[1] = 1e-4;
  inp[2] = -1.0;
  inp[3] = 1.0;
  inp[4] = 8.0;
  inp[5] = -8.0;
  const std::vector<double> w = uniform(n, rng);

  std::vector<double> out(sz(n), kNaN);
  cpu::gelu_forward(out.data(), inp.data(), n);
  for (int64_t i = 0; i < n; ++i) {
    const auto want = static_cast<double>(gelu_reference(inp[sz(i)]));
    EXPECT_NEAR(out[sz(i)], want, 1e-15 + 1e-14 * std::abs(want)) << "x = " << inp[sz(i)];
    // The float path of the shared element math agrees to float precision.
    const auto x = static_cast<float>(inp[sz(i)]);
    const auto want_f = static_cast<double>(gelu_reference(x));
    EXPECT_NEAR(mpt::common::gelu_tanh(x), want_f, 1e-7 + 1e-6 * std::abs(want_f)) << "x = " << x;
    EXPECT_NEAR(mpt::common::gelu_tanh_derivative(x),
                mpt::common::gelu_tanh_derivative(static_cast<double>(x)), 1e-6)
        << "x = " << x;
  }

  auto loss = [&] {
    std::vector<double> o(sz(n));
    cpu::gelu_forward(o.data(), inp.data(), n);
    return dot(w, o);
  };
  std::vector<double> dinp(sz(n), 0.0);
  cpu::gelu_backward(dinp.data(), inp.data(), w.data(), n);
  expect_gradient("gelu_backward dinp", dinp, numeric_gradient(inp, loss));

  const std::vector<double> dinp0 = uniform(n, rng);
  std::vector<double> dinp1 = dinp0;
  cpu::gelu_backward(dinp1.data(), inp.data(), w.data(), n);
  expect_accumulated("gelu_backward dinp", dinp0, dinp1, dinp);

  // In place: out may alias inp.
  std::vector<double> in_place = inp;
  cpu::gelu_forward(in_place.data(), in_place.data(), n);
  EXPECT_EQ(in_place, out);
}

TEST(CpuLayersDouble, ResidualForwardAndAccumulate) {
  std::mt19937_64 rng(kSeed + 3);
  const int64_t n = kRows * kC;
  std::vector<double> a = uniform(n, rng);
  std::vector<double> b = uniform(n, rng);
  const std::vector<double> w = uniform(n, rng);

  std::vector<double> out(sz(n), kNaN);
  cpu::residual_forward(out.data(), a.data(), b.data(), n);
  for (int64_t i = 0; i < n; ++i) ASSERT_EQ(out[sz(i)], a[sz(i)] + b[sz(i)]) << "index " << i;

  // The residual's backward is accumulate(dout) into both branches' gradients.
  auto loss = [&] {
    std::vector<double> o(sz(n));
    cpu::residual_forward(o.data(), a.data(), b.data(), n);
    return dot(w, o);
  };
  std::vector<double> da(sz(n), 0.0);
  std::vector<double> db(sz(n), 0.0);
  cpu::accumulate(da.data(), w.data(), n);
  cpu::accumulate(db.data(), w.data(), n);
  expect_gradient("accumulate da", da, numeric_gradient(a, loss));
  expect_gradient("accumulate db", db, numeric_gradient(b, loss));

  const std::vector<double> da0 = uniform(n, rng);
  std::vector<double> da1 = da0;
  cpu::accumulate(da1.data(), w.data(), n);
  expect_accumulated("accumulate", da0, da1, da);
}

/// Logits [kRows, kVp] with garbage in the padding columns (the op must never read them).
std::vector<double> random_logits(std::mt19937_64& rng) {
  std::vector<double> logits = uniform(kRows * kVp, rng, -4.0, 4.0);
  for (int64_t r = 0; r < kRows; ++r) {
    for (int64_t j = kV; j < kVp; ++j) logits[sz(r * kVp + j)] = 1e30;
  }
  return logits;
}

TEST(CpuLayersDouble, CrossEntropyLossAndGradient) {
  std::mt19937_64 rng(kSeed + 4);
  std::vector<double> logits = random_logits(rng);
  std::vector<int32_t> targets = random_tokens(kRows, kV, rng);
  targets[0] = 0;
  targets[1] = static_cast<int32_t>(kV - 1);
  const double dloss = 0.75;  // d(final loss)/d(mean loss)

  std::vector<double> losses(sz(kRows), kNaN);
  std::vector<double> dlogits(sz(kRows * kVp), kNaN);
  cpu::crossentropy_forward_backward(dlogits.data(), losses.data(), logits.data(), targets.data(), kRows, kV,
                                     kVp, dloss / kRows);
  for (int64_t r = 0; r < kRows; ++r) {
    long double sum = 0;  // direct log-softmax, no max shift
    for (int64_t j = 0; j < kV; ++j) sum += std::exp(static_cast<long double>(logits[sz(r * kVp + j)]));
    const long double want = std::log(sum) - logits[sz(r * kVp + targets[sz(r)])];
    EXPECT_NEAR(losses[sz(r)], static_cast<double>(want), 1e-14) << "row " << r;
    for (int64_t j = kV; j < kVp; ++j)
      EXPECT_EQ(dlogits[sz(r * kVp + j)], 0.0) << "row " << r << " col " << j;
  }

  // dlogits = d(dloss * mean loss)/dlogits, padding columns included (there the loss does not move).
  auto loss = [&] {
    std::vector<double> l(sz(kRows));
    cpu::crossentropy_forward_backward<double>(nullptr, l.data(), logits.data(), targets.data(), kRows, kV,
                                               kVp, 0.0);
    double mean = 0;
    for (double x : l) mean += x;
    return dloss * mean / kRows;
  };
  expect_gradient("crossentropy dlogits", dlogits, numeric_gradient(logits, loss));

  // Without dlogits: the same losses, nothing else written.
  std::vector<double> losses_only(sz(kRows), kNaN);
  cpu::crossentropy_forward_backward<double>(nullptr, losses_only.data(), logits.data(), targets.data(),
                                             kRows, kV, kVp, dloss);
  EXPECT_EQ(losses_only, losses);
}

// ---- cross-entropy: in place, bad targets
// --------------------------------------------------------------------

template <typename T>
std::vector<T> rounded(const std::vector<double>& x) {
  std::vector<T> v(x.size());
  for (size_t i = 0; i < x.size(); ++i) v[i] = mpt::from_float<T>(static_cast<float>(x[i]));
  return v;
}

template <typename T>
void check_crossentropy_in_place() {
  std::mt19937_64 rng(kSeed + 5);
  const std::vector<T> logits = rounded<T>(random_logits(rng));
  const std::vector<int32_t> targets = random_tokens(kRows, kV, rng);
  using F = cpu::opmath_t<T>;
  const F dloss = F(1024) / F(kRows);
  std::vector<F> losses(sz(kRows));
  std::vector<T> dlogits(logits.size());
  cpu::crossentropy_forward_backward(dlogits.data(), losses.data(), logits.data(), targets.data(), kRows, kV,
                                     kVp, dloss);
  std::vector<F> losses_in_place(sz(kRows));
  std::vector<T> in_place = logits;
  cpu::crossentropy_forward_backward(in_place.data(), losses_in_place.data(), in_place.data(), targets.data(),
                                     kRows, kV, kVp, dloss);
  EXPECT_EQ(std::memcmp(losses.data(), losses_in_place.data(), losses.size() * sizeof(F)), 0);
  EXPECT_EQ(std::memcmp(dlogits.data(), in_place.data(), dlogits.size() * sizeof(T)), 0);
  for (int64_t r = 0; r < kRows; ++r) {
    for (int64_t j = kV; j < kVp; ++j) ASSERT_EQ(mpt::to_float(in_place[sz(r * kVp + j)]), 0.0f);
  }
}

TEST(CpuLayersCrossEntropy, InPlaceMatchesOutOfPlace) {
  check_crossentropy_in_place<double>();
  check_crossentropy_in_place<float>();
  check_crossentropy_in_place<half>();
  check_crossentropy_in_place<bf16>();
}

TEST(CpuLayersCrossEntropy, BadTargetThrowsBeforeWriting) {
  std::mt19937_64 rng(kSeed + 6);
  const std::vector<float> logits(sz(kRows * kVp), 0.5f);
  std::vector<int32_t> targets = random_tokens(kRows, kV, rng);
  for (int32_t bad : {static_cast<int32_t>(kV), -1, static_cast<int32_t>(kVp)}) {
    targets[5] = bad;
    std::vector<float> losses(sz(kRows), -7.0f);
    std::vector<float> dlogits(sz(kRows * kVp), -7.0f);
    try {
      cpu::crossentropy_forward_backward(dlogits.data(), losses.data(), logits.data(), targets.data(), kRows,
                                         kV, kVp, 1.0f);
      ADD_FAILURE() << "target " << bad << " was accepted";
    } catch (const mpt::Error& e) {
      EXPECT_NE(std::string(e.what()).find(fmt::format("targets[5] = {}", bad)), std::string::npos)
          << e.what();
    }
    EXPECT_TRUE(std::all_of(losses.begin(), losses.end(), [](float x) { return x == -7.0f; }));
    EXPECT_TRUE(std::all_of(dlogits.begin(), dlogits.end(), [](float x) { return x == -7.0f; }));
  }
}

// ---- argument checks
// ---------------------------------------------------------------------------------------

/// Expects fn() to throw mpt::Error whose message contains `name`.
template <typename Fn>
void expect_error_naming(const std::string& name, Fn&& fn) {
  try {
    fn();
    ADD_FAILURE() << "no error for bad " << name;
  } catch (const mpt::Error& e) {
    EXPECT_NE(std::string(e.what()).find(name), std::string::npos) << e.what();
  }
}

TEST(CpuLayersArguments, BadArgumentsAreNamed) {
  std::vector<float> a(sz(kRows * kVp), 0.0f);
  std::vector<float> b(sz(kRows * kVp), 0.0f);
  std::vector<float> c(sz(kRows * kVp), 0.0f);
  std::vector<int32_t> tokens(sz(kRows), 1);
  float* p = a.data();
  const float* q = b.data();
  float* s = c.data();
  expect_error_naming("B must be positive",
                      [&] { cpu::embedding_forward(p, tokens.data(), q, q, 0, kT, kC); });
  expect_error_naming("wpe is null",
                      [&] { cpu::embedding_forward<float>(p, tokens.data(), q, nullptr, kB, kT, kC); });
  expect_error_naming("dwte is null",
                      [&] { cpu::embedding_backward<float>(nullptr, p, q, tokens.data(), kB, kT, kC); });
  tokens[sz(kT + 4)] = -3;
  expect_error_naming("tokens[1, 4] = -3",
                      [&] { cpu::embedding_forward(p, tokens.data(), q, q, kB, kT, kC); });
  expect_error_naming("tokens[1, 4] = -3",
                      [&] { cpu::embedding_backward(p, s, q, tokens.data(), kB, kT, kC); });
  expect_error_naming("C must be positive", [&] { cpu::layernorm_forward(p, s, s, q, q, q, kRows, -1); });
  expect_error_naming("rstd is null",
                      [&] { cpu::layernorm_backward<float>(p, p, p, q, q, q, s, nullptr, kRows, kC); });
  expect_error_naming("n must be positive", [&] { cpu::gelu_forward(p, q, 0); });
  expect_error_naming("dout is null", [&] { cpu::gelu_backward<float>(p, q, nullptr, 5); });
  expect_error_naming("b is null", [&] { cpu::residual_forward<float>(p, q, nullptr, 5); });
  expect_error_naming("acc is null", [&] { cpu::accumulate<float>(nullptr, q, 5); });
  expect_error_naming("Vp (36) must be >= V (37)", [&] {
    cpu::crossentropy_forward_backward(p, s, q, tokens.data(), kRows, kV, kV - 1, 1.0f);
  });
  expect_error_naming("losses is null", [&] {
    cpu::crossentropy_forward_backward<float>(p, nullptr, q, tokens.data(), kRows, kV, kVp, 1.0f);
  });
}

// ---- FP16 / BF16 against FP32 on the same rounded inputs
// ------------------------------------------------------

/// Tolerance abs + rel * |ref| for a value stored in T and computed in FP32: rel is 4 times the unit
/// roundoff.
template <typename T>
struct Tolerance;
template <>
struct Tolerance<half> {
  static constexpr double rel = 1.0 / 512;  // 2^-9
  static constexpr double abs = 1e-6;
};
template <>
struct Tolerance<bf16> {
  static constexpr double rel = 1.0 / 64;  // 2^-6
  static constexpr double abs = 1e-6;
};

/// A T buffer whose data() is one element past the start of its allocation (misaligned for SIMD).
template <typename T>
class Misaligned {
 public:
  explicit Misaligned(const std::vector<T>& values) : storage_(values.size() + 1) {
    std::copy(values.begin(), values.end(), storage_.begin() + 1);
  }
  T* data() { return storage_.data() + 1; }
  size_t size() const { return storage_.size() - 1; }

 private:
  std::vector<T> storage_;
};

/// Inputs drawn in double, rounded to T; `low` is T's copy, `ref` the same values as FP32.
template <typename T>
struct Rounded {
  Misaligned<T> low;
  std::vector<float> ref;
};

template <typename T>
Rounded<T> make_rounded(const std::vector<double>& x) {
  const std::vector<T> low = rounded<T>(x);
  std::vector<float> ref(low.size());
  for (size_t i = 0; i < low.size(); ++i) ref[i] = mpt::to_float(low[i]);
  return {Misaligned<T>(low), ref};
}

/// Compares the T result with the FP32 one element by element; prints the first mismatch and the largest
/// errors.
template <typename T>
void expect_close(const std::string& what, const T* got, const float* ref, size_t n) {
  const double rel = Tolerance<T>::rel;
  const double abs = Tolerance<T>::abs;
  size_t mismatches = 0;
  size_t first = n;
  double max_abs_error = 0;
  double max_rel_error = 0;  // over |ref| >= 1e-3, where the absolute term does not dominate
  double max_tolerance_fraction = 0;
  for (size_t i = 0; i < n; ++i) {
    const double g = mpt::to_float(got[i]);
    const double r = ref[i];
    const double error = std::abs(g - r);
    const double tolerance = abs + rel * std::abs(r);
    if (!(error <= tolerance)) {
      if (first == n) first = i;
      ++mismatches;
    }
    max_abs_error = std::max(max_abs_error, error);
    if (std::abs(r) >= 1e-3) max_rel_error = std::max(max_rel_error, error / std::abs(r));
    max_tolerance_fraction = std::max(max_tolerance_fraction, error / tolerance);
  }
  const auto dtype = mpt::dtype_name(mpt::dtype_of<T>());
  if (mismatches > 0) {
    ADD_FAILURE() << what << " (" << dtype << "): " << mismatches << " of " << n << " outside " << abs
                  << " + " << rel << "*|ref|; first at index " << first << ": got "
                  << mpt::to_float(got[first]) << ", fp32 " << ref[first];
  }
  std::cout << fmt::format(
      "[ mixed    ] {:<28} {:<4} max abs err {:.3e}  max rel err {:.3e}  ({:.2f} of tolerance)\n", what,
      dtype, max_abs_error, max_rel_error, max_tolerance_fraction);
}

template <typename T>
class CpuLayersMixedPrecision : public ::testing::Test {};
using StorageTypes = ::testing::Types<half, bf16>;
TYPED_TEST_SUITE(CpuLayersMixedPrecision, StorageTypes);

// Odd sizes, bigger than the double tests, with C above the embedding's 256-channel piece.
constexpr int64_t kMB = 3;
constexpr int64_t kMT = 11;
constexpr int64_t kMC = 301;
constexpr int64_t kMV = 67;
constexpr int64_t kMVp = 72;
constexpr int64_t kMRows = kMB * kMT;

TYPED_TEST(CpuLayersMixedPrecision, Embedding) {
  using T = TypeParam;
  std::mt19937_64 rng(kSeed + 10);
  auto wte = make_rounded<T>(uniform(kMV * kMC, rng));
  auto wpe = make_rounded<T>(uniform(kMT * kMC, rng));
  auto dout = make_rounded<T>(uniform(kMRows * kMC, rng, -64.0, 64.0));  // scaled gradients
  auto dwte = make_rounded<T>(uniform(kMV * kMC, rng));
  auto dwpe = make_rounded<T>(uniform(kMT * kMC, rng));
  const std::vector<int32_t> tokens = random_tokens(kMRows, kMV / 4, rng);  // many repeats

  Misaligned<T> out(std::vector<T>(sz(kMRows * kMC)));
  std::vector<float> out_ref(sz(kMRows * kMC));
  cpu::embedding_forward(out.data(), tokens.data(), wte.low.data(), wpe.low.data(), kMB, kMT, kMC);
  cpu::embedding_forward(out_ref.data(), tokens.data(), wte.ref.data(), wpe.ref.data(), kMB, kMT, kMC);
  expect_close("embedding_forward out", out.data(), out_ref.data(), out_ref.size());

  cpu::embedding_backward(dwte.low.data(), dwpe.low.data(), dout.low.data(), tokens.data(), kMB, kMT, kMC);
  cpu::embedding_backward(dwte.ref.data(), dwpe.ref.data(), dout.ref.data(), tokens.data(), kMB, kMT, kMC);
  expect_close("embedding_backward dwte", dwte.low.data(), dwte.ref.data(), dwte.ref.size());
  expect_close("embedding_backward dwpe", dwpe.low.data(), dwpe.ref.data(), dwpe.ref.size());
}

TYPED_TEST(CpuLayersMixedPrecision, LayerNorm) {
  using T = TypeParam;
  std::mt19937_64 rng(kSeed + 11);
  std::vector<double> x = uniform(kMRows * kMC, rng, -3.0, 3.0);
  for (size_t i = 0; i < x.size(); ++i) x[i] += 0.5;
  auto inp = make_rounded<T>(x);
  auto weight = make_rounded<T>(uniform(kMC, rng, 0.5, 1.5));
  auto bias = make_rounded<T>(uniform(kMC, rng, -0.5, 0.5));
  auto dout = make_rounded<T>(uniform(kMRows * kMC, rng, -64.0, 64.0));
  auto dinp = make_rounded<T>(uniform(kMRows * kMC, rng));
  auto dweight = make_rounded<T>(uniform(kMC, rng));
  auto dbias = make_rounded<T>(uniform(kMC, rng));

  Misaligned<T> out(std::vector<T>(sz(kMRows * kMC)));
  std::vector<float> out_ref(sz(kMRows * kMC));
  std::vector<float> mean(sz(kMRows));
  std::vector<float> rstd(sz(kMRows));
  std::vector<float> mean_ref(sz(kMRows));
  std::vector<float> rstd_ref(sz(kMRows));
  cpu::layernorm_forward(out.data(), mean.data(), rstd.data(), inp.low.data(), weight.low.data(),
                         bias.low.data(), kMRows, kMC);
  cpu::layernorm_forward(out_ref.data(), mean_ref.data(), rstd_ref.data(), inp.ref.data(), weight.ref.data(),
                         bias.ref.data(), kMRows, kMC);
  expect_close("layernorm_forward out", out.data(), out_ref.data(), out_ref.size());
  // The statistics are FP32 from identical inputs, so they agree exactly.
  EXPECT_EQ(mean, mean_ref);
  EXPECT_EQ(rstd, rstd_ref);

  cpu::layernorm_backward(dinp.low.data(), dweight.low.data(), dbias.low.data(), dout.low.data(),
                          inp.low.data(), weight.low.data(), mean.data(), rstd.data(), kMRows, kMC);
  cpu::layernorm_backward(dinp.ref.data(), dweight.ref.data(), dbias.ref.data(), dout.ref.data(),
                          inp.ref.data(), weight.ref.data(), mean_ref.data(), rstd_ref.data(), kMRows, kMC);
  expect_close("layernorm_backward dinp", dinp.low.data(), dinp.ref.data(), dinp.ref.size());
  expect_close("layernorm_backward dweight", dweight.low.data(), dweight.ref.data(), dweight.ref.size());
  expect_close("layernorm_backward dbias", dbias.low.data(), dbias.ref.data(), dbias.ref.size());
}

TYPED_TEST(CpuLayersMixedPrecision, Elementwise) {
  using T = TypeParam;
  std::mt19937_64 rng(kSeed + 12);
  const int64_t n = kMRows * kMC;  // several 1024-element chunks and a partial one
  auto a = make_rounded<T>(uniform(n, rng, -6.0, 6.0));
  auto b = make_rounded<T>(uniform(n, rng, -6.0, 6.0));
  auto dout = make_rounded<T>(uniform(n, rng, -64.0, 64.0));
  auto dinp = make_rounded<T>(uniform(n, rng));
  auto acc = make_rounded<T>(uniform(n, rng));

  Misaligned<T> out(std::vector<T>(sz(n)));
  std::vector<float> out_ref(sz(n));
  cpu::gelu_forward(out.data(), a.low.data(), n);
  cpu::gelu_forward(out_ref.data(), a.ref.data(), n);
  expect_close("gelu_forward out", out.data(), out_ref.data(), out_ref.size());

  cpu::gelu_backward(dinp.low.data(), a.low.data(), dout.low.data(), n);
  cpu::gelu_backward(dinp.ref.data(), a.ref.data(), dout.ref.data(), n);
  expect_close("gelu_backward dinp", dinp.low.data(), dinp.ref.data(), dinp.ref.size());

  cpu::residual_forward(out.data(), a.low.data(), b.low.data(), n);
  cpu::residual_forward(out_ref.data(), a.ref.data(), b.ref.data(), n);
  expect_close("residual_forward out", out.data(), out_ref.data(), out_ref.size());

  cpu::accumulate(acc.low.data(), dout.low.data(), n);
  cpu::accumulate(acc.ref.data(), dout.ref.data(), n);
  expect_close("accumulate acc", acc.low.data(), acc.ref.data(), acc.ref.size());
}

TYPED_TEST(CpuLayersMixedPrecision, CrossEntropy) {
  using T = TypeParam;
  std::mt19937_64 rng(kSeed + 13);
  auto logits = make_rounded<T>(uniform(kMRows * kMVp, rng, -8.0, 8.0));
  const std::vector<int32_t> targets = random_tokens(kMRows, kMV, rng);
  const float dloss = 1024.0f / static_cast<float>(kMRows);  // loss scale / rows

  Misaligned<T> dlogits(std::vector<T>(sz(kMRows * kMVp)));
  std::vector<float> dlogits_ref(sz(kMRows * kMVp));
  std::vector<float> losses(sz(kMRows));
  std::vector<float> losses_ref(sz(kMRows));
  cpu::crossentropy_forward_backward(dlogits.data(), losses.data(), logits.low.data(), targets.data(), kMRows,
                                     kMV, kMVp, dloss);
  cpu::crossentropy_forward_backward(dlogits_ref.data(), losses_ref.data(), logits.ref.data(), targets.data(),
                                     kMRows, kMV, kMVp, dloss);
  EXPECT_EQ(losses, losses_ref);  // FP32 from identical inputs
  expect_close("crossentropy dlogits", dlogits.data(), dlogits_ref.data(), dlogits_ref.size());
}

// ---- determinism across thread counts
// ------------------------------------------------------------------------

template <typename T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

template <typename T>
void check_embedding_backward_thread_independent() {
  const int64_t B = 4;
  const int64_t T_ = 64;
  const int64_t C = 300;  // two channel pieces
  const int64_t V = 50;   // ~5 positions per token
  std::mt19937_64 rng(kSeed + 20);
  const std::vector<T> dout = rounded<T>(uniform(B * T_ * C, rng));
  const std::vector<T> dwte0 = rounded<T>(uniform(V * C, rng));
  const std::vector<T> dwpe0 = rounded<T>(uniform(T_ * C, rng));
  const std::vector<int32_t> tokens = random_tokens(B * T_, V, rng);
  auto run = [&](int threads) {
    omp_set_num_threads(threads);
    std::vector<T> dwte = dwte0;
    std::vector<T> dwpe = dwpe0;
    cpu::embedding_backward(dwte.data(), dwpe.data(), dout.data(), tokens.data(), B, T_, C);
    return std::make_pair(dwte, dwpe);
  };
  const auto one = run(1);
  for (int threads : {2, 3}) {
    const auto many = run(threads);
    EXPECT_TRUE(same_bits(one.first, many.first)) << "dwte, " << threads << " threads";
    EXPECT_TRUE(same_bits(one.second, many.second)) << "dwpe, " << threads << " threads";
  }
}

template <typename T>
void check_layernorm_backward_thread_independent() {
  const int64_t rows = 1001;  // 16 row blocks, the last one partial
  const int64_t C = 97;
  using F = cpu::opmath_t<T>;
  std::mt19937_64 rng(kSeed + 21);
  const std::vector<T> inp = rounded<T>(uniform(rows * C, rng, -2.0, 2.0));
  const std::vector<T> weight = rounded<T>(uniform(C, rng, 0.5, 1.5));
  const std::vector<T> bias = rounded<T>(uniform(C, rng));
  const std::vector<T> dout = rounded<T>(uniform(rows * C, rng));
  const std::vector<T> dinp0 = rounded<T>(uniform(rows * C, rng));
  const std::vector<T> dweight0 = rounded<T>(uniform(C, rng));
  const std::vector<T> dbias0 = rounded<T>(uniform(C, rng));
  std::vector<T> out(sz(rows * C));
  std::vector<F> mean(sz(rows));
  std::vector<F> rstd(sz(rows));
  cpu::layernorm_forward(out.data(), mean.data(), rstd.data(), inp.data(), weight.data(), bias.data(), rows,
                         C);
  struct Grads {
    std::vector<T> dinp, dweight, dbias;
  };
  auto run = [&](int threads) {
    omp_set_num_threads(threads);
    Grads g{dinp0, dweight0, dbias0};
    cpu::layernorm_backward(g.dinp.data(), g.dweight.data(), g.dbias.data(), dout.data(), inp.data(),
                            weight.data(), mean.data(), rstd.data(), rows, C);
    return g;
  };
  const Grads one = run(1);
  for (int threads : {2, 3}) {
    const Grads many = run(threads);
    EXPECT_TRUE(same_bits(one.dinp, many.dinp)) << "dinp, " << threads << " threads";
    EXPECT_TRUE(same_bits(one.dweight, many.dweight)) << "dweight, " << threads << " threads";
    EXPECT_TRUE(same_bits(one.dbias, many.dbias)) << "dbias, " << threads << " threads";
  }
}

TEST(CpuLayersDeterminism, EmbeddingBackwardSameBitsForAnyThreadCount) {
  ThreadCountGuard guard;
  check_embedding_backward_thread_independent<float>();
  check_embedding_backward_thread_independent<half>();
  check_embedding_backward_thread_independent<bf16>();
}

TEST(CpuLayersDeterminism, LayerNormBackwardSameBitsForAnyThreadCount) {
  ThreadCountGuard guard;
  check_layernorm_backward_thread_independent<float>();
  check_layernorm_backward_thread_independent<half>();
  check_layernorm_backward_thread_independent<bf16>();
}

}  // namespace
