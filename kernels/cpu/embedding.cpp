// CPU token + position embedding of GPT-2: forward gather and its deterministic backward scatter.
//
// Backward determinism: the (b,t) positions are sorted by token once (key (token, b*T+t), so the order is
// total); every wte row then receives the sum of its positions' dout rows in increasing b*T+t order,
// accumulated in opmath, added to the stored gradient with one rounding. Work items are (token, channel
// piece) pairs and each is computed entirely by one thread, so the result is bitwise the same for any thread
// count (no atomics, no per-thread partials). dwpe[t] sums over b in increasing order, per (t, channel
// piece).
#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "cpu/ops.hpp"
#include "mptrain/error.hpp"

namespace mpt::cpu {

namespace {

/// Channels handled per work item: stack buffers, and enough items to balance a skewed token distribution.
constexpr int64_t kPiece = 256;

/// Throws mpt::Error naming the first (b,t) whose token is negative. The op has no vocabulary size, so the
/// upper bound (token < V) is the caller's to guarantee (the data loader checks it).
void check_tokens(const char* op, const int32_t* tokens, int64_t B, int64_t T) {
  const int64_t n = B * T;
  for (int64_t i = 0; i < n; ++i) {
    MPT_CHECK(tokens[i] >= 0, "{}: tokens[{}, {}] = {} is negative", op, i / T, i % T, tokens[i]);
  }
}

}  // namespace

template <typename T>
void embedding_forward(T* out, const int32_t* tokens, const T* wte, const T* wpe, int64_t B, int64_t T_,
                       int64_t C) {
  MPT_CHECK(B > 0, "embedding_forward: B must be positive, got {}", B);
  MPT_CHECK(T_ > 0, "embedding_forward: T must be positive, got {}", T_);
  MPT_CHECK(C > 0, "embedding_forward: C must be positive, got {}", C);
  MPT_CHECK(out != nullptr, "embedding_forward: out is null");
  MPT_CHECK(tokens != nullptr, "embedding_forward: tokens is null");
  MPT_CHECK(wte != nullptr, "embedding_forward: wte is null");
  MPT_CHECK(wpe != nullptr, "embedding_forward: wpe is null");
  check_tokens("embedding_forward", tokens, B, T_);
  using F = opmath_t<T>;
  const int64_t pieces = (C + kPiece - 1) / kPiece;
  const int64_t items = B * T_ * pieces;
#pragma omp parallel for schedule(static)
  for (int64_t item = 0; item < items; ++item) {
    const int64_t bt = item / pieces;
    const int64_t c0 = (item % pieces) * kPiece;
    const int64_t count = std::min(kPiece, C - c0);
    const int64_t t = bt % T_;
    F x[kPiece];
    F p[kPiece];
    load_n(wte + static_cast<int64_t>(tokens[bt]) * C + c0, x, count);
    load_n(wpe + t * C + c0, p, count);
    for (int64_t i = 0; i < count; ++i) x[i] += p[i];
    store_n<T>(x, out + bt * C + c0, count);
  }
}

template <typename T>
void embedding_backward(T* dwte, T* dwpe, const T* dout, const int32_t* tokens, int64_t B, int64_t T_,
                        int64_t C) {
  MPT_CHECK(B > 0, "embedding_backward: B must be positive, got {}", B);
  MPT_CHECK(T_ > 0, "embedding_backward: T must be positive, got {}", T_);
  MPT_CHECK(C > 0, "embedding_backward: C must be positive, got {}", C);
  MPT_CHECK(dwte != nullptr, "embedding_backward: dwte is null");
  MPT_CHECK(dwpe != nullptr, "embedding_backward: dwpe is null");
  MPT_CHECK(dout != nullptr, "embedding_backward: dout is null");
  MPT_CHECK(tokens != nullptr, "embedding_backward: tokens is null");
  check_tokens("embedding_backward", tokens, B, T_);
  using F = opmath_t<T>;
  const int64_t n = B * T_;
  const int64_t pieces = (C + kPiece - 1) / kPiece;

  // Positions grouped by token: order[group_start[g], group_start[g+1]) holds one token's b*T+t, ascending.
  std::vector<std::pair<int32_t, int64_t>> order(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) order[static_cast<size_t>(i)] = {tokens[i], i};
  std::sort(order.begin(), order.end());
  std::vector<size_t> group_start;
  for (size_t i = 0; i < order.size(); ++i) {
    if (i == 0 || order[i].first != order[i - 1].first) group_start.push_back(i);
  }
  const auto groups = static_cast<int64_t>(group_start.size());
  group_start.push_back(order.size());

  // dynamic: a frequent token's group is long; any thread may take any item without changing its result.
  const int64_t wte_items = groups * pieces;
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t item = 0; item < wte_items; ++item) {
    const auto g = static_cast<size_t>(item / pieces);
    const int64_t c0 = (item % pieces) * kPiece;
    const int64_t count = std::min(kPiece, C - c0);
    F sum[kPiece] = {};
    F dy[kPiece];
    for (size_t k = group_start[g]; k < group_start[g + 1]; ++k) {
      load_n(dout + order[k].second * C + c0, dy, count);
      for (int64_t i = 0; i < count; ++i) sum[i] += dy[i];
    }
    T* row = dwte + static_cast<int64_t>(order[group_start[g]].first) * C + c0;
    F acc[kPiece];
    load_n(row, acc, count);
    for (int64_t i = 0; i < count; ++i) acc[i] += sum[i];
    store_n<T>(acc, row, count);
  }

  const int64_t wpe_items = T_ * pieces;
#pragma omp parallel for schedule(static)
  for (int64_t item = 0; item < wpe_items; ++item) {
    const int64_t t = item / pieces;
    const int64_t c0 = (item % pieces) * kPiece;
    const int64_t count = std::min(kPiece, C - c0);
    F sum[kPiece] = {};
    F dy[kPiece];
    for (int64_t b = 0; b < B; ++b) {
      load_n(dout + (b * T_ + t) * C + c0, dy, count);
      for (int64_t i = 0; i < count; ++i) sum[i] += dy[i];
    }
    T* row = dwpe + t * C + c0;
    F acc[kPiece];
    load_n(row, acc, count);
    for (int64_t i = 0; i < count; ++i) acc[i] += sum[i];
    store_n<T>(acc, row, count);
  }
}

#define MPT_INSTANTIATE_EMBEDDING(T)                                                                     \
  template void embedding_forward<T>(T*, const int32_t*, const T*, const T*, int64_t, int64_t, int64_t); \
  template void embedding_backward<T>(T*, T*, const T*, const int32_t*, int64_t, int64_t, int64_t);

MPT_INSTANTIATE_EMBEDDING(float)
MPT_INSTANTIATE_EMBEDDING(half)
MPT_INSTANTIATE_EMBEDDING(bf16)
MPT_INSTANTIATE_EMBEDDING(double)

#undef MPT_INSTANTIATE_EMBEDDING

}  // namespace mpt::cpu
