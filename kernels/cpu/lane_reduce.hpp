// Fixed-order vectorisable reductions of the CPU backend (internal): a row's sum split over kLanes
// interleaved partial sums, so the compiler can keep the lanes in SIMD registers (at any -m level: the lanes
// are plain arrays, nothing is reassociated), combined in a fixed pairwise tree.
//
// Element i always goes to lane i % kLanes, each lane adds its elements in index order, and the lanes are
// combined as lane[l] += lane[l + w] for w = 8, 4, 2, 1. The result therefore depends only on the values and
// n: the same on every CPU, build flag and thread count, and usually closer to the exact sum than a
// sequential loop (the error grows with n / kLanes + log2 kLanes terms instead of n). LayerNorm's row
// statistics and the attention softmax's row sums use it; a sequential float sum over a 128-wide row is a
// chain of 128 dependent adds (4 cycles each), 16 lanes cut it to 8 plus the tree.
#pragma once

#include <algorithm>
#include <cstdint>

namespace mpt::cpu {

inline constexpr int64_t kLanes = 16;

namespace lane_detail {
template <typename F>
inline F combine(F* acc) {
  for (int64_t w = kLanes / 2; w >= 1; w /= 2)
    for (int64_t l = 0; l < w; ++l) acc[l] += acc[l + w];
  return acc[0];
}
}  // namespace lane_detail

/// sum over i < n of term(i) (F float or double), in the lane order above; 0 for n <= 0.
template <typename F, typename Term>
inline F lane_sum(int64_t n, Term&& term) {
  F acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) acc[l] += term(i + l);
  for (int64_t l = 0; i + l < n; ++l) acc[l] += term(i + l);
  return lane_detail::combine(acc);
}

/// The two sums sum term_a(i) and sum term_b(i) over i < n in one pass, each in the lane order above.
template <typename F, typename TermA, typename TermB>
inline void lane_sum2(int64_t n, TermA&& term_a, TermB&& term_b, F& sum_a, F& sum_b) {
  F a[kLanes] = {};
  F b[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) {
      a[l] += term_a(i + l);
      b[l] += term_b(i + l);
    }
  for (int64_t l = 0; i + l < n; ++l) {
    a[l] += term_a(i + l);
    b[l] += term_b(i + l);
  }
  sum_a = lane_detail::combine(a);
  sum_b = lane_detail::combine(b);
}

/// max over i < n of x[i] (n >= 1), in lanes as lane_sum; exact, so the order matters only for NaN (a NaN
/// may or may not win, as with a sequential std::max: callers whose results a NaN poisons anyway).
template <typename F>
inline F lane_max(const F* x, int64_t n) {
  F acc[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) acc[l] = x[0];
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) acc[l] = std::max(acc[l], x[i + l]);
  for (int64_t l = 0; i + l < n; ++l) acc[l] = std::max(acc[l], x[i + l]);
  for (int64_t w = kLanes / 2; w >= 1; w /= 2)
    for (int64_t l = 0; l < w; ++l) acc[l] = std::max(acc[l], acc[l + w]);
  return acc[0];
}

}  // namespace mpt::cpu
