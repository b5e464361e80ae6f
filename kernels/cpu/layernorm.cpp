// CPU LayerNorm over the last dimension (torch.nn.LayerNorm: eps 1e-5, biased variance), forward and
// backward.
//
// Statistics are computed in opmath with two passes over the row (mean, then the mean of squared deviations),
// and saved in opmath for the backward. Rows are independent and spread over OpenMP threads.
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

#include "cpu/ops.hpp"
#include "mptrain/error.hpp"

namespace mpt::cpu {

namespace {

constexpr double kEps = 1e-5;
/// Rows per block of the dweight/dbias reduction; fixed so the summation order does not follow the threads.
constexpr int64_t kRowsPerBlock = 64;

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
  using F = opmath_t<T>;
  const auto Cs = static_cast<size_t>(C);
  std::vector<F> w(Cs);
  std::vector<F> b(Cs);
  load_n(weight, w.data(), C);
  load_n(bias, b.data(), C);
  // One row buffer per thread, allocated here so nothing inside the parallel region can throw.
  std::vector<F> scratch(static_cast<size_t>(omp_get_max_threads()) * Cs);
  const F inv_C = F(1) / static_cast<F>(C);
#pragma omp parallel
  {
    F* x = scratch.data() + static_cast<size_t>(omp_get_thread_num()) * Cs;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      load_n(inp + r * C, x, C);
      F sum = 0;
      for (int64_t i = 0; i < C; ++i) sum += x[i];
      const F m = sum * inv_C;
      F sq = 0;
      for (int64_t i = 0; i < C; ++i) {
        const F d = x[i] - m;
        sq += d * d;
      }
      const F s = F(1) / std::sqrt(sq * inv_C + static_cast<F>(kEps));
      for (int64_t i = 0; i < C; ++i) x[i] = (x[i] - m) * s * w[i] + b[i];
      store_n<T>(x, out + r * C, C);
      mean[r] = m;
      rstd[r] = s;
    }
  }
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
        F dnorm_sum = 0;
        F dnorm_xhat_sum = 0;
        for (int64_t i = 0; i < C; ++i) {
          x[i] = (x[i] - m) * s;
          const F dnorm = dy[i] * w[i];
          dnorm_sum += dnorm;
          dnorm_xhat_sum += dnorm * x[i];
        }
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
                                      const opmath_t<T>*, int64_t, int64_t);

MPT_INSTANTIATE_LAYERNORM(float)
MPT_INSTANTIATE_LAYERNORM(half)
MPT_INSTANTIATE_LAYERNORM(bf16)
MPT_INSTANTIATE_LAYERNORM(double)

#undef MPT_INSTANTIATE_LAYERNORM

}  // namespace mpt::cpu
