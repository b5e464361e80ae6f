// CPU LayerNorm over the last dimension (torch.nn.LayerNorm: eps 1e-5, biased variance), forward and
// backward.
//
// Statistics are computed in opmath with two passes over the row (mean, then the mean of squared deviations),
// each a fixed-order 16-lane sum (cpu/lane_reduce.hpp; the backward's two row means likewise), and saved in
// opmath for the backward. Rows are independent and spread over OpenMP threads.
// residual_layernorm_forward adds the residual into the row buffer the LayerNorm then reads, so the residual
// stream is read once instead of being written by one pass and read back by the next.
//
// Backward determinism: dweight and dbias are sums over rows. The rows are cut into fixed blocks of
// kRowsPerBlock (independent of the thread count); each block's partial sums run over its rows in order and
// are written to their own slot, then every channel adds the block partials in block order and rounds once
// into the stored gradient. The result is therefore bitwise the same for any number of threads.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu/lane_reduce.hpp"
#include "cpu/ops.hpp"
#include "mptrain/error.hpp"

namespace mpt::cpu {

namespace {

constexpr double kEps = 1e-5;
/// Rows per block of the dweight/dbias reduction; fixed so the summation order does not follow the threads.
constexpr int64_t kRowsPerBlock = 64;

}  // namespace

namespace {

/// One row of the forward: x[C] (opmath, clobbered) normalised with the row's own statistics, scaled and
/// shifted, rounded once into out; returns the statistics in m and s.
template <typename T>
inline void layernorm_row(T* out, opmath_t<T>* x, const opmath_t<T>* w, const opmath_t<T>* b, int64_t C,
                          opmath_t<T>& m_out, opmath_t<T>& s_out) {
  using F = opmath_t<T>;
  const F inv_C = F(1) / static_cast<F>(C);
  const F m = lane_sum<F>(C, [&](int64_t i) { return x[i]; }) * inv_C;
  const F sq = lane_sum<F>(C, [&](int64_t i) {
    const F d = x[i] - m;
    return d * d;
  });
  const F s = F(1) / std::sqrt(sq * inv_C + static_cast<F>(kEps));
  for (int64_t i = 0; i < C; ++i) x[i] = (x[i] - m) * s * w[i] + b[i];
  store_n<T>(x, out, C);
  m_out = m;
  s_out = s;
}

/// The forward over all rows; `row_input(r, x)` fills x[C] (opmath) with row r's input.
template <typename T, typename RowInput>
void layernorm_rows(T* out, opmath_t<T>* mean, opmath_t<T>* rstd, const T* weight, const T* bias,
                    int64_t rows, int64_t C, RowInput&& row_input) {
  using F = opmath_t<T>;
  const auto Cs = static_cast<size_t>(C);
  std::vector<F> w(Cs);
  std::vector<F> b(Cs);
  load_n(weight, w.data(), C);
  load_n(bias, b.data(), C);
  // One row buffer per thread, allocated here so nothing inside the parallel region can throw.
  std::vector<F> scratch(static_cast<size_t>(omp_get_max_threads()) * Cs);
#pragma omp parallel
  {
    F* x = scratch.data() + static_cast<size_t>(omp_get_thread_num()) * Cs;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      row_input(r, x);
      layernorm_row<T>(out + r * C, x, w.data(), b.data(), C, mean[r], rstd[r]);
    }
  }
}

}  // namespace

template <typename T>
void layernorm_forward(T* out, opmath_t<T>* mean, opmath_t<T>* rstd, const T* inp, const T* weight,
                       const T* bias, int64_t rows, int64_t C) {
  MPT_CHECK(rows > 0, "layernorm_forward: rows must be positive, got {}", rows);
  MPT_CHECK(C > 0, "layernorm_forward: C must be positive, got {}", C);
  MPT_CHECK(out != nullptr, "layernorm_forward: out is null");
  MPT_CHECK(mean != nullptr, "layernorm_forward: mean is null");
  MPT_CHECK(rstd != nullptr, "layernorm_forward: rstd is null");
  MPT_CHECK(inp != nullptr, "layernorm_forward: inp is null");
  MPT_CHECK(weight != nullptr, "layernorm_forward: weight is null");
  MPT_CHECK(bias != nullptr, "layernorm_forward: bias is null");
  layernorm_rows(out, mean, rstd, weight, bias, rows, C,
                 [&](int64_t r, opmath_t<T>* x) { load_n(inp + r * C, x, C); });
}

template <typename T>
void residual_layernorm_forward(T* residual, T* out, opmath_t<T>* mean, opmath_t<T>* rstd, const T* a,
                                const T* b, const T* weight, const T* bias, int64_t rows, int64_t C) {
  MPT_CHECK(rows > 0, "residual_layernorm_forward: rows must be positive, got {}", rows);
  MPT_CHECK(C > 0, "residual_layernorm_forward: C must be positive, got {}", C);
  MPT_CHECK(residual != nullptr, "residual_layernorm_forward: residual is null");
  MPT_CHECK(out != nullptr, "residual_layernorm_forward: out is null");
  MPT_CHECK(mean != nullptr, "residual_layernorm_forward: mean is null");
  MPT_CHECK(rstd != nullptr, "residual_layernorm_forward: rstd is null");
  MPT_CHECK(a != nullptr, "residual_layernorm_forward: a is null");
  MPT_CHECK(b != nullptr, "residual_layernorm_forward: b is null");
  MPT_CHECK(weight != nullptr, "residual_layernorm_forward: weight is null");
  MPT_CHECK(bias != nullptr, "residual_layernorm_forward: bias is null");
  using F = opmath_t<T>;
  // The row's sum is rounded once to T (what residual_forward stores) and normalised from the stored value,
  // so the result is bitwise that of residual_forward followed by layernorm_forward.
  layernorm_rows(out, mean, rstd, weight, bias, rows, C, [&](int64_t r, F* x) {
    constexpr int64_t kPiece = 256;
    const int64_t base = r * C;
    for (int64_t i0 = 0; i0 < C; i0 += kPiece) {
      const int64_t n = std::min(kPiece, C - i0);
      F y[kPiece];
      load_n(a + base + i0, x + i0, n);
      load_n(b + base + i0, y, n);
      for (int64_t i = 0; i < n; ++i) x[i0 + i] += y[i];
      store_n<T>(x + i0, residual + base + i0, n);
      if constexpr (!std::is_same_v<T, F>) load_n(residual + base + i0, x + i0, n);
    }
  });
}

template <typename T>
void layernorm_backward(T* dinp, T* dweight, T* dbias, const T* dout, const T* inp, const T* weight,
                        const opmath_t<T>* mean, const opmath_t<T>* rstd, int64_t rows, int64_t C) {
  MPT_CHECK(rows > 0, "layernorm_backward: rows must be positive, got {}", rows);
  MPT_CHECK(C > 0, "layernorm_backward: C must be positive, got {}", C);
  MPT_CHECK(dinp != nullptr, "layernorm_backward: dinp is null");
  MPT_CHECK(dweight != nullptr, "layernorm_backward: dweight is null");
  MPT_CHECK(dbias != nullptr, "layernorm_backward: dbias is null");
  MPT_CHECK(dout != nullptr, "layernorm_backward: dout is null");
  MPT_CHECK(inp != nullptr, "layernorm_backward: inp is null");
  MPT_CHECK(weight != nullptr, "layernorm_backward: weight is null");
  MPT_CHECK(mean != nullptr, "layernorm_backward: mean is null");
  MPT_CHECK(rstd != nullptr, "layernorm_backward: rstd is null");
  using F = opmath_t<T>;
  const auto Cs = static_cast<size_t>(C);
  std::vector<F> w(Cs);
  load_n(weight, w.data(), C);
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  // partial[2*k*C ...] = block k's dweight sums, then its dbias sums.
  std::vector<F> partial(static_cast<size_t>(blocks) * 2 * Cs);
  // Per thread: x, dy, the dinp row.
  std::vector<F> scratch(static_cast<size_t>(omp_get_max_threads()) * 3 * Cs);
  const F inv_C = F(1) / static_cast<F>(C);
#pragma omp parallel
  {
    F* x = scratch.data() + static_cast<size_t>(omp_get_thread_num()) * 3 * Cs;
    F* dy = x + Cs;
    F* dx = dy + Cs;
#pragma omp for schedule(static)
    for (int64_t k = 0; k < blocks; ++k) {
      F* dw = partial.data() + static_cast<size_t>(k) * 2 * Cs;
      F* db = dw + Cs;
      const int64_t row_end = std::min(rows, (k + 1) * kRowsPerBlock);
      for (int64_t r = k * kRowsPerBlock; r < row_end; ++r) {
        load_n(inp + r * C, x, C);
        load_n(dout + r * C, dy, C);
        load_n(dinp + r * C, dx, C);
        const F m = mean[r];
        const F s = rstd[r];
        // x becomes xhat; the two row means of the input gradient formula.
        for (int64_t i = 0; i < C; ++i) x[i] = (x[i] - m) * s;
        F dnorm_sum, dnorm_xhat_sum;
        lane_sum2<F>(
            C, [&](int64_t i) { return dy[i] * w[i]; }, [&](int64_t i) { return dy[i] * w[i] * x[i]; },
            dnorm_sum, dnorm_xhat_sum);
        const F dnorm_mean = dnorm_sum * inv_C;
        const F dnorm_xhat_mean = dnorm_xhat_sum * inv_C;
        for (int64_t i = 0; i < C; ++i) {
          dx[i] += (dy[i] * w[i] - dnorm_mean - x[i] * dnorm_xhat_mean) * s;
          dw[i] += dy[i] * x[i];
          db[i] += dy[i];
        }
        store_n<T>(dx, dinp + r * C, C);
      }
    }
    // Channels: add the block partials in block order, then one rounding into the stored gradient.
#pragma omp for schedule(static)
    for (int64_t i = 0; i < C; ++i) {
      F sw = 0;
      F sb = 0;
      for (int64_t k = 0; k < blocks; ++k) {
        sw += partial[static_cast<size_t>(k) * 2 * Cs + static_cast<size_t>(i)];
        sb += partial[static_cast<size_t>(k) * 2 * Cs + Cs + static_cast<size_t>(i)];
      }
      dweight[i] = store<T>(load(dweight[i]) + sw);
      dbias[i] = store<T>(load(dbias[i]) + sb);
    }
  }
}

#define MPT_INSTANTIATE_LAYERNORM(T)                                                                        \
  template void layernorm_forward<T>(T*, opmath_t<T>*, opmath_t<T>*, const T*, const T*, const T*, int64_t, \
                                     int64_t);                                                              \
  template void layernorm_backward<T>(T*, T*, T*, const T*, const T*, const T*, const opmath_t<T>*,         \
                                      const opmath_t<T>*, int64_t, int64_t);                                \
  template void residual_layernorm_forward<T>(T*, T*, opmath_t<T>*, opmath_t<T>*, const T*, const T*,       \
                                              const T*, const T*, int64_t, int64_t);

MPT_INSTANTIATE_LAYERNORM(float)
MPT_INSTANTIATE_LAYERNORM(half)
MPT_INSTANTIATE_LAYERNORM(bf16)
MPT_INSTANTIATE_LAYERNORM(double)

#undef MPT_INSTANTIATE_LAYERNORM

}  // namespace mpt::cpu
