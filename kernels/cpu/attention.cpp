// CPU causal multi-head self-attention (GPT-2, as in llm.c): softmax(q k^T / sqrt(hs)) v per head, with the
// softmax probabilities saved for the backward pass, computed as GEMMs.
//
// Work is split over (batch, head) pairs. For FP32 and FP64 storage the GEMMs read each pair's q, k, v (and
// dout) in place with their leading dimensions and write out (forward) and add dq, dk, dv into dqkv
// (backward, beta = 1) in place; for FP16/BF16 they are first widened into contiguous [T, hs] FP32 arrays.
// The products then run through OpenBLAS (SGEMM, DGEMM for double) on row tiles of kTile queries, each tile
// multiplying only the key columns at or left of its last row, so the masked upper triangle is skipped except
// inside the diagonal tiles:
//   forward:  S = scale q k^T (tile x keys), causal softmax per row (the exponential through SLEEF's vector
//             exp, kernels/cpu/vecmath.hpp, for FP32), out = P v;
//   backward: dv = P^T dout and dk = dS^T q (column tiles, rows at or below the tile), dP = dout v^T,
//             dS = P (dP - rowsum(P dP)) scale (the row sum in 16 fixed lanes, cpu/lane_reduce.hpp),
//             dq = dS k (row tiles).
// A pair is computed by one thread (BLAS inside the parallel region runs on the calling thread), writes only
// its own rows of att and its own channel range of out/dqkv, and the tiles are fixed by T, so the results do
// not depend on the thread count. Sums run in opmath_t<T> (FP32, FP64 for double) and each stored result is
// rounded once. Why GEMMs and not a fused flash-style kernel: the saved probabilities are part of the Backend
// contract (att), so the T x T matrix is written anyway, and at the model's head sizes (32) BLAS's kernels
// reach several times the FLOP rate of hand-vectorised dot/axpy loops.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include <omp.h>

#include "cpu/lane_reduce.hpp"
#include "cpu/ops.hpp"
#include "cpu/vecmath.hpp"
#include "mptrain/error.hpp"

namespace mpt::cpu {

namespace {

/// Below this many multiply-adds (B * NH * T^2 * hs) the op stays on the calling thread: waking the OpenMP
/// team would cost more than the work.
constexpr int64_t kParallelMinWork = int64_t{1} << 16;
/// Query rows per tile (and key columns per tile in the backward's column passes).
constexpr int64_t kTile = 64;

void check_shape(const char* op, int64_t B, int64_t T_, int64_t C, int64_t NH) {
  MPT_CHECK(B >= 0 && T_ >= 0 && C >= 0, "{}: negative size (B = {}, T = {}, C = {})", op, B, T_, C);
  MPT_CHECK(NH >= 1 && C % NH == 0, "{}: C = {} is not a multiple of NH = {}", op, C, NH);
  MPT_CHECK(T_ <= std::numeric_limits<int>::max() / std::max<int64_t>(T_, 1),
            "{}: T = {} is too long (T * T must fit BLAS's int)", op, T_);
}

/// row[0..n) = exp(row[i] - max) / sum, the softmax of n >= 1 scores; FP32 through SLEEF's vector exp.
template <typename A>
void softmax_row(A* row, int64_t n) {
  const A sum = exp_shifted_sum(row, lane_max(row, n), n);
  const A inv_sum = A(1) / sum;
  for (int64_t i = 0; i < n; ++i) row[i] *= inv_sum;
}

/// Opmath storage (float, double): the GEMMs read and write the model's buffers in place, with their leading
/// dimensions; 16-bit storage goes through widened [T, hs] copies.
template <typename T>
constexpr bool kInPlace = std::is_same_v<T, opmath_t<T>>;

/// One (batch, head) pair's q, k, v as GEMM operands: row t of q is q[t * ld].
template <typename A>
struct Operands {
  const A* q;
  const A* k;
  const A* v;
  int64_t ld;
};

/// The pair whose q row 0 starts at src (rows 3C apart, k and v at +C and +2C): in place for opmath storage,
/// else widened into q, k, v [T, hs] (rows of the pair: T = the scratch's rows).
template <typename T, typename A = opmath_t<T>>
Operands<A> gather_qkv(const T* src, int64_t C, A* q, A* k, A* v, int64_t hs, int64_t T_) {
  const int64_t C3 = 3 * C;
  if constexpr (kInPlace<T>) {
    (void)q, (void)k, (void)v, (void)hs, (void)T_;
    return {reinterpret_cast<const A*>(src), reinterpret_cast<const A*>(src + C),
            reinterpret_cast<const A*>(src + 2 * C), C3};
  } else {
    for (int64_t t = 0; t < T_; ++t) {
      load_n(src + t * C3, q + t * hs, hs);
      load_n(src + t * C3 + C, k + t * hs, hs);
      load_n(src + t * C3 + 2 * C, v + t * hs, hs);
    }
    return {q, k, v, hs};
  }
}

}  // namespace

template <typename T>
void attention_forward(T* out, T* att, const T* qkv, int64_t B, int64_t T_, int64_t C, int64_t NH) {
  std::vector<opmath_t<T>> workspace;
  attention_forward(out, att, qkv, B, T_, C, NH, workspace);
}

template <typename T>
void attention_forward(T* out, T* att, const T* qkv, int64_t B, int64_t T_, int64_t C, int64_t NH,
                       std::vector<opmath_t<T>>& workspace) {
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

  // Per thread: q, k, v, o [T, hs] and the probabilities P [T, T]. Grown before the parallel region so an
  // allocation failure throws here rather than terminating inside it.
  const int64_t per_thread = 4 * T_ * hs + T_ * T_;
  const auto needed = static_cast<size_t>(per_thread * omp_get_max_threads());
  if (workspace.size() < needed) workspace.resize(needed);

#pragma omp parallel if (pairs > 1 && pairs * T_ * T_ * hs >= kParallelMinWork)
  {
    A* const q = workspace.data() + per_thread * omp_get_thread_num();
    A* const k = q + T_ * hs;
    A* const v = k + T_ * hs;
    A* const o = v + T_ * hs;
    A* const p = o + T_ * hs;
#pragma omp for schedule(static)
    for (int64_t pair = 0; pair < pairs; ++pair) {
      const int64_t b = pair / NH;
      const int64_t h = pair % NH;
      const T* src = qkv + b * T_ * C3 + h * hs;
      T* dst = out + b * T_ * C + h * hs;
      // Opmath storage: the GEMMs read q, k, v in place (leading dimension 3C) and write the output rows in
      // place (C); 16-bit storage: widened copies [T, hs].
      const Operands<A> x = gather_qkv<T>(src, C, q, k, v, hs, T_);
      A* const o_ptr = kInPlace<T> ? reinterpret_cast<A*>(dst) : o;
      const int64_t ld_o = kInPlace<T> ? C : hs;
      T* att_bh = att + pair * T_ * T_;
      for (int64_t r0 = 0; r0 < T_; r0 += kTile) {
        const int64_t r1 = std::min(T_, r0 + kTile);  // rows [r0, r1) see keys [0, r1)
        blas_gemm<A>(false, true, r1 - r0, r1, hs, scale, x.q + r0 * x.ld, x.ld, x.k, x.ld, A(0), p + r0 * T_,
                     T_);
        for (int64_t t = r0; t < r1; ++t) {
          A* row = p + t * T_;
          softmax_row(row, t + 1);
          std::fill(row + t + 1, row + r1, A(0));  // masked: the P v product below reads up to r1
          T* att_row = att_bh + t * T_;
          store_n(row, att_row, t + 1);
          std::fill(att_row + t + 1, att_row + T_, store<T>(A(0)));
        }
        // The output uses the opmath probabilities; att is rounded only for storage.
        blas_gemm<A>(false, false, r1 - r0, hs, r1, A(1), p + r0 * T_, T_, x.v, x.ld, A(0), o_ptr + r0 * ld_o,
                     ld_o);
      }
      if constexpr (!kInPlace<T>)
        for (int64_t t = 0; t < T_; ++t) store_n(o + t * hs, dst + t * C, hs);
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

  // Per thread: q, k, v, dout, dq, dk, dv [T, hs]; P and dP, then dS in place of dP [T, T].
  const int64_t per_thread = 7 * T_ * hs + 2 * T_ * T_;
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
    A* const p = dv + T_ * hs;
    A* const ds = p + T_ * T_;
#pragma omp for schedule(static)
    for (int64_t pair = 0; pair < pairs; ++pair) {
      const int64_t b = pair / NH;
      const int64_t h = pair % NH;
      const T* src = qkv + b * T_ * C3 + h * hs;
      const T* dsrc = dout + b * T_ * C + h * hs;
      T* dst = dqkv + b * T_ * C3 + h * hs;
      // Opmath storage: q, k, v, dout read in place, and dq, dk, dv added into dqkv by the GEMMs themselves
      // (beta = 1: dqkv = dqkv + product, the same single rounding as adding the product afterwards).
      const Operands<A> x = gather_qkv<T>(src, C, q, k, v, hs, T_);
      const A* dy_ptr = dy;
      int64_t ld_dy = hs;
      if constexpr (kInPlace<T>) {
        dy_ptr = reinterpret_cast<const A*>(dsrc);
        ld_dy = C;
      } else {
        for (int64_t t = 0; t < T_; ++t) load_n(dsrc + t * C, dy + t * hs, hs);
      }
      // Where the GEMMs write dq, dk, dv: in place into dqkv (beta = 1), or the opmath scratch (beta = 0).
      A* const dq_ptr = kInPlace<T> ? reinterpret_cast<A*>(dst) : dq;
      A* const dk_ptr = kInPlace<T> ? reinterpret_cast<A*>(dst + C) : dk;
      A* const dv_ptr = kInPlace<T> ? reinterpret_cast<A*>(dst + 2 * C) : dv;
      const int64_t ld_d = kInPlace<T> ? C3 : hs;
      const A beta = kInPlace<T> ? A(1) : A(0);
      const T* att_bh = att + pair * T_ * T_;
      // P in opmath: the saved probabilities themselves when they are stored in opmath (float, double: the
      // forward wrote zeros above the diagonal), else a widened copy.
      const A* pm = nullptr;
      if constexpr (std::is_same_v<T, A>) {
        pm = att_bh;
      } else {
        for (int64_t t = 0; t < T_; ++t) {
          load_n(att_bh + t * T_, p + t * T_, t + 1);
          std::fill(p + t * T_ + t + 1, p + (t + 1) * T_, A(0));
        }
        pm = p;
      }
      for (int64_t r0 = 0; r0 < T_; r0 += kTile) {
        const int64_t r1 = std::min(T_, r0 + kTile);
        // dP = dout v^T on the tile's rows and the keys they see; then, per row, the softmax backward in
        // closed form dS = P (dP - P . dP) scale, zero above the diagonal.
        blas_gemm<A>(false, true, r1 - r0, r1, hs, A(1), dy_ptr + r0 * ld_dy, ld_dy, x.v, x.ld, A(0),
                     ds + r0 * T_, T_);
        for (int64_t t = r0; t < r1; ++t) {
          const A* pr = pm + t * T_;
          A* dr = ds + t * T_;
          const A sum_p_dp = lane_sum<A>(t + 1, [&](int64_t j) { return pr[j] * dr[j]; });
          for (int64_t j = 0; j <= t; ++j) dr[j] = pr[j] * (dr[j] - sum_p_dp) * scale;
          std::fill(dr + t + 1, dr + T_, A(0));
        }
        // dq[rows] = dS[rows, keys] k[keys].
        blas_gemm<A>(false, false, r1 - r0, hs, r1, A(1), ds + r0 * T_, T_, x.k, x.ld, beta,
                     dq_ptr + r0 * ld_d, ld_d);
      }
      // Column tiles: key j is seen by queries t >= j, so dv[c0:c1] = P[c0:, c0:c1]^T dout[c0:] and
      // dk[c0:c1] = dS[c0:, c0:c1]^T q[c0:].
      for (int64_t c0 = 0; c0 < T_; c0 += kTile) {
        const int64_t c1 = std::min(T_, c0 + kTile);
        blas_gemm<A>(true, false, c1 - c0, hs, T_ - c0, A(1), pm + c0 * T_ + c0, T_, dy_ptr + c0 * ld_dy,
                     ld_dy, beta, dv_ptr + c0 * ld_d, ld_d);
        blas_gemm<A>(true, false, c1 - c0, hs, T_ - c0, A(1), ds + c0 * T_ + c0, T_, x.q + c0 * x.ld, x.ld,
                     beta, dk_ptr + c0 * ld_d, ld_d);
      }
      // 16-bit storage: one rounding per gradient element, dqkv = round(dqkv + opmath result), through the
      // SIMD bulk converters (bit-identical to the scalar load/store) in pieces of a stack buffer.
      if constexpr (!kInPlace<T>) {
        for (int64_t t = 0; t < T_; ++t) {
          for (int64_t part = 0; part < 3; ++part) {
            T* g = dst + t * C3 + part * C;
            const A* r = dq + part * T_ * hs + t * hs;
            constexpr int64_t kPiece = 256;
            for (int64_t i0 = 0; i0 < hs; i0 += kPiece) {
              const int64_t n = std::min(kPiece, hs - i0);
              A sum[kPiece];
              load_n(g + i0, sum, n);
              for (int64_t i = 0; i < n; ++i) sum[i] += r[i0 + i];
              store_n(sum, g + i0, n);
            }
          }
        }
      }
    }
  }
}

#define MPT_INSTANTIATE_ATTENTION(T)                                                                        \
  template void attention_forward<T>(T*, T*, const T*, int64_t, int64_t, int64_t, int64_t);                 \
  template void attention_forward<T>(T*, T*, const T*, int64_t, int64_t, int64_t, int64_t,                  \
                                     std::vector<opmath_t<T>>&);                                            \
  template void attention_backward<T>(T*, const T*, const T*, const T*, int64_t, int64_t, int64_t, int64_t, \
                                      std::vector<opmath_t<T>>&);
MPT_INSTANTIATE_ATTENTION(float)
MPT_INSTANTIATE_ATTENTION(half)
MPT_INSTANTIATE_ATTENTION(bf16)
MPT_INSTANTIATE_ATTENTION(double)
#undef MPT_INSTANTIATE_ATTENTION

}  // namespace mpt::cpu
