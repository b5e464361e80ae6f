// CPU mixed-precision check (DESIGN.md phase 4): found_inf and FP64 per-block sums of squares of the rank's
// gradient shard, in one read-only pass; the norm/clip/lr preparation of phase 6 over the gathered block
// sums; and the FP64 loss sum of the model's loss accumulator.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/ops.hpp"
#include "mptrain/error.hpp"

namespace mpt::cpu {

namespace {
constexpr size_t kChunk = 1024;  // multiple of kLanes
constexpr size_t kLanes = 8;

template <typename T>
void to_float_chunk(const T* src, float* dst, size_t n) {
  if constexpr (std::is_same_v<T, float>)
    std::memcpy(dst, src, n * sizeof(float));
  else
    convert(src, dst, n);
}
}  // namespace

template <typename T>
bool grad_check(const T* grads, std::span<const ElementRange> ranges, size_t block_elements,
                std::span<double> block_sums_out) {
  MPT_CHECK(block_elements >= 1, "grad_check: block_elements must be >= 1");
  // Block k of the output -> its first element in the flat buffer.
  std::vector<size_t> block_start;
  for (const ElementRange& r : ranges) {
    MPT_CHECK(r.num_elements % block_elements == 0,
              "grad_check: range at {} has {} elements, not a multiple of the block size {}", r.offset,
              r.num_elements, block_elements);
    for (size_t b = 0; b < r.num_elements; b += block_elements) block_start.push_back(r.offset + b);
  }
  MPT_CHECK(block_sums_out.size() == block_start.size(), "grad_check: block_sums_out has {} entries, need {}",
            block_sums_out.size(), block_start.size());
  const auto num_blocks = static_cast<long long>(block_start.size());
  int found = 0;
#pragma omp parallel for schedule(static) reduction(| : found)
  for (long long k = 0; k < num_blocks; ++k) {
    const T* g = grads + block_start[static_cast<size_t>(k)];
    // kLanes interleaved FP64 partial sums (lane j takes elements i with i % kLanes == j), combined in a
    // fixed tree: the order depends only on the position in the block, never on threads or ranks, and the
    // independent lanes let the compiler vectorise what one running sum would serialise.
    double lane[kLanes] = {};
    bool bad = false;
    float x[kChunk];
    for (size_t begin = 0; begin < block_elements; begin += kChunk) {
      const size_t count = std::min(kChunk, block_elements - begin);
      to_float_chunk(g + begin, x, count);
      for (size_t i = 0; i < count; ++i) {
        bad |= !std::isfinite(x[i]);
        lane[(begin + i) % kLanes] += static_cast<double>(x[i]) * static_cast<double>(x[i]);
      }
    }
    const double sum =
        ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
    block_sums_out[static_cast<size_t>(k)] = sum;
    found |= bad ? 1 : 0;
  }
  return found != 0;
}

void amp_prepare(common::AmpState& state, const double* gathered_block_sums, std::span<const size_t> order,
                 const common::OptimizerRule& rule) {
  double total = 0.0;
  // Sequential in the fixed global order: the same bits for every number of ranks.
  if (state.flags[common::kFoundInf] == 0.0f)
    for (const size_t k : order) total += gathered_block_sums[k];
  common::amp_prepare(state, total, rule);
}

void sum_losses(double* acc, const float* losses, int64_t n) {
  double sum = 0.0;  // FP64, in position order: deterministic
  for (int64_t i = 0; i < n; ++i) sum += static_cast<double>(losses[i]);
  *acc += sum;
}

template bool grad_check<float>(const float*, std::span<const ElementRange>, size_t, std::span<double>);
template bool grad_check<half>(const half*, std::span<const ElementRange>, size_t, std::span<double>);
template bool grad_check<bf16>(const bf16*, std::span<const ElementRange>, size_t, std::span<double>);

}  // namespace mpt::cpu
