// CPU causal multi-head self-attention (GPT-2, as in llm.c): softmax(q k^T / sqrt(hs)) v per head, with the
// softmax probabilities saved for the backward pass.
//
// Work is split over (batch, head) pairs; each pair's q, k, v (and dout) are first gathered into contiguous
// [T, hs] opmath arrays so that every inner loop runs over hs contiguous elements. A pair writes only its own
// rows of att and its own channel range of out/dqkv, so the results do not depend on the thread count. Sums
// run in opmath_t<T> (FP32, FP64 for double) and each stored result is rounded once.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include <omp.h>

#include "cpu/ops.hpp"
#include "mptrain/error.hpp"

namespace mpt::cpu {

namespace {

/// Below this many multiply-adds (B * NH * T^2 * hs) the op stays on the calling thread: waking the OpenMP
/// team would cost more than the work.
constexpr int64_t kParallelMinWork = int64_t{1} << 16;

/// Dot product. `omp simd` lets the compiler split the sum into vector lanes; the lane order is fixed at
/// compile time, so the result is the same on every run.
template <typename A>
inline A dot(const A* x, const A* y, int64_t n) {
  A sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += x[i] * y[i];
  return sum;
}

/// y[n] += a * x[n].
template <typename A>
inline void axpy(A* y, A a, const A* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

void check_shape(const char* op, int64_t B, int64_t T_, int64_t C, int64_t NH) {
  MPT_CHECK(B >= 0 && T_ >= 0 && C >= 0, "{}: negative size (B = {}, T = {}, C = {})", op, B, T_, C);
  MPT_CHECK(NH >= 1 && C % NH == 0, "{}: C = {} is not a multiple of NH = {}", op, C, NH);
}

}  // namespace

template <typename T>
void attention_forward(T* out, T* att, const T* qkv, int64_t B, int64_t T_, int64_t C, int64_t NH) {
  using A = opmath_t<T>;
  check_shape("attention_forward", B, T_, C, NH);
  if (B == 0 || T_ == 0 || C == 0) return;
  MPT_CHECK(out != nullptr, "attention_forward: out is null");
  MPT_CHECK(att != nullptr, "attention_forward: att is null");
  MPT_CHECK(qkv != nullptr, "attention_forward: qkv is null");
  const int64_t hs = C / NH;
  const int64_t C3 = 3 * C;
  const A scale = A(1) / std::sqrt(static_cast<A>(hs));
  const int64_t pairs = B * NH;

  // Per thread: q, k, v [T, hs], one probability row [T], one output row [hs]. Allocated before the
  // parallel region so an allocation failure throws here rather than terminating inside it.
  const int64_t per_thread = 3 * T_ * hs + T_ + hs;
  std::vector<A> scratch(static_cast<size_t>(per_thread * omp_get_max_threads()));

#pragma omp parallel if (pairs > 1 && pairs * T_ * T_ * hs >= kParallelMinWork)
  {
    A* const q = scratch.data() + per_thread * omp_get_thread_num();
    A* const k = q + T_ * hs;
    A* const v = k + T_ * hs;
    A* const p = v + T_ * hs;
    A* const o = p + T_;
#pragma omp for schedule(static)
    for (int64_t pair = 0; pair < pairs; ++pair) {
      const int64_t b = pair / NH;
      const int64_t h = pair % NH;
      const T* src = qkv + b * T_ * C3 + h * hs;
      for (int64_t t = 0; t < T_; ++t) {
        load_n(src + t * C3, q + t * hs, hs);
        load_n(src + t * C3 + C, k + t * hs, hs);
        load_n(src + t * C3 + 2 * C, v + t * hs, hs);
      }
      T* att_bh = att + pair * T_ * T_;
      for (int64_t t = 0; t < T_; ++t) {
        const A* qt = q + t * hs;
        A max_score = -std::numeric_limits<A>::infinity();
        for (int64_t t2 = 0; t2 <= t; ++t2) {
          p[t2] = dot(qt, k + t2 * hs, hs) * scale;
          max_score = std::max(max_score, p[t2]);
        }
        A sum = 0;
        for (int64_t t2 = 0; t2 <= t; ++t2) {
          p[t2] = std::exp(p[t2] - max_score);
          sum += p[t2];
        }
        const A inv_sum = A(1) / sum;
        for (int64_t t2 = 0; t2 <= t; ++t2) p[t2] *= inv_sum;
        T* att_row = att_bh + t * T_;
        store_n(p, att_row, t + 1);
        std::fill(att_row + t + 1, att_row + T_, store<T>(A(0)));
        // The output uses the opmath probabilities; att is rounded only for storage.
        std::fill(o, o + hs, A(0));
        for (int64_t t2 = 0; t2 <= t; ++t2) axpy(o, p[t2], v + t2 * hs, hs);
        store_n(o, out + (b * T_ + t) * C + h * hs, hs);
      }
    }
  }
}

template <typename T>
void attention_backward(T* dqkv, const T* dout, const T* qkv, const T* att, int64_t B, int64_t T_, int64_t C,
                        int64_t NH, std::vector<opmath_t<T>>& workspace) {
  using A = opmath_t<T>;
  check_shape("attention_backward", B, T_, C, NH);
  if (B == 0 || T_ == 0 || C == 0) return;
  MPT_CHECK(dqkv != nullptr, "attention_backward: dqkv is null");
  MPT_CHECK(dout != nullptr, "attention_backward: dout is null");
  MPT_CHECK(qkv != nullptr, "attention_backward: qkv is null");
  MPT_CHECK(att != nullptr, "attention_backward: att is null");
  const int64_t hs = C / NH;
  const int64_t C3 = 3 * C;
  const A scale = A(1) / std::sqrt(static_cast<A>(hs));
  const int64_t pairs = B * NH;

  // Per thread: q, k, v, dout, dq, dk, dv [T, hs]; one att row and one datt row [T].
  const int64_t per_thread = 7 * T_ * hs + 2 * T_;
  const auto needed = static_cast<size_t>(per_thread * omp_get_max_threads());
  if (workspace.size() < needed) workspace.resize(needed);

#pragma omp parallel if (pairs > 1 && pairs * T_ * T_ * hs >= kParallelMinWork)
  {
    A* const q = workspace.data() + per_thread * omp_get_thread_num();
    A* const k = q + T_ * hs;
    A* const v = k + T_ * hs;
    A* const dy = v + T_ * hs;
    A* const dq = dy + T_ * hs;
    A* const dk = dq + T_ * hs;
    A* const dv = dk + T_ * hs;
    A* const a = dv + T_ * hs;
    A* const datt = a + T_;
#pragma omp for schedule(static)
    for (int64_t pair = 0; pair < pairs; ++pair) {
      const int64_t b = pair / NH;
      const int64_t h = pair % NH;
      const T* src = qkv + b * T_ * C3 + h * hs;
      const T* dsrc = dout + b * T_ * C + h * hs;
      for (int64_t t = 0; t < T_; ++t) {
        load_n(src + t * C3, q + t * hs, hs);
        load_n(src + t * C3 + C, k + t * hs, hs);
        load_n(src + t * C3 + 2 * C, v + t * hs, hs);
        load_n(dsrc + t * C, dy + t * hs, hs);
      }
      std::fill(dq, dq + 3 * T_ * hs, A(0));  // dq, dk, dv are adjacent
      const T* att_bh = att + pair * T_ * T_;
      for (int64_t t = 0; t < T_; ++t) {
        load_n(att_bh + t * T_, a, t + 1);
        const A* dyt = dy + t * hs;
        // out[t] = sum_t2 a[t2] v[t2]: datt[t2] = dout[t] . v[t2] and dv[t2] += a[t2] dout[t].
        A sum_a_datt = 0;
        for (int64_t t2 = 0; t2 <= t; ++t2) {
          datt[t2] = dot(dyt, v + t2 * hs, hs);
          sum_a_datt += a[t2] * datt[t2];
          axpy(dv + t2 * hs, a[t2], dyt, hs);
        }
        // Softmax backward in closed form, dpreatt = a * (datt - a . datt), then through the scaled q k^T.
        const A* qt = q + t * hs;
        A* dqt = dq + t * hs;
        for (int64_t t2 = 0; t2 <= t; ++t2) {
          const A dscore = a[t2] * (datt[t2] - sum_a_datt) * scale;
          axpy(dqt, dscore, k + t2 * hs, hs);
          axpy(dk + t2 * hs, dscore, qt, hs);
        }
      }
      // One rounding per gradient element: dqkv = round(dqkv + opmath result).
      T* dst = dqkv + b * T_ * C3 + h * hs;
      for (int64_t t = 0; t < T_; ++t) {
        for (int64_t part = 0; part < 3; ++part) {
          T* g = dst + t * C3 + part * C;
          const A* r = dq + part * T_ * hs + t * hs;
          for (int64_t i = 0; i < hs; ++i) g[i] = store<T>(load<T>(g[i]) + r[i]);
        }
      }
    }
  }
}

#define MPT_INSTANTIATE_ATTENTION(T)                                                                        \
  template void attention_forward<T>(T*, T*, const T*, int64_t, int64_t, int64_t, int64_t);                 \
  template void attention_backward<T>(T*, const T*, const T*, const T*, int64_t, int64_t, int64_t, int64_t, \
                                      std::vector<opmath_t<T>>&);
MPT_INSTANTIATE_ATTENTION(float)
MPT_INSTANTIATE_ATTENTION(half)
MPT_INSTANTIATE_ATTENTION(bf16)
MPT_INSTANTIATE_ATTENTION(double)
#undef MPT_INSTANTIATE_ATTENTION

}  // namespace mpt::cpu
