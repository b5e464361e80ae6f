// CPU LAMB over a rank's FP32 master shard (DESIGN.md phase 6, "Large batch"): pass 1 (moments and the
// per-segment FP64 sums of w^2 and r^2), the per-tensor trust ratios from the gathered segment sums in the
// fixed global order, and pass 2 (the update). Element math: kernels/common/lamb.hpp.
#include <cstring>

#include "common/lamb.hpp"
#include "cpu/ops.hpp"
#include "mptrain/error.hpp"

namespace mpt::cpu {

namespace {
constexpr size_t kLanes = 8;

/// Interleaved FP64 lanes (lane j takes the elements at positions i % kLanes == j) combined in a fixed tree:
/// the order depends only on the position in the segment.
double combine(const double (&lane)[kLanes]) {
  return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
}
}  // namespace

template <typename T>
void lamb_moments(const float* master, float* m, float* v, const T* grads,
                  std::span<const LambSegment> segments, double* segment_sums,
                  const common::AdamWStep& step) {
  const auto count = static_cast<long long>(segments.size());
#pragma omp parallel for schedule(static)
  for (long long k = 0; k < count; ++k) {
    const LambSegment& s = segments[static_cast<size_t>(k)];
    double w_lane[kLanes] = {}, r_lane[kLanes] = {};
    for (size_t i = 0; i < s.num_elements; ++i) {
      const size_t j = s.shard_offset + i;
      common::lamb_moments(m[j], v[j], to_float(grads[s.flat_offset + i]), step);
      const float w = master[j];
      const float r = common::lamb_direction(w, m[j], v[j], s.decay, step);
      w_lane[i % kLanes] += static_cast<double>(w) * static_cast<double>(w);
      r_lane[i % kLanes] += static_cast<double>(r) * static_cast<double>(r);
    }
    segment_sums[2 * static_cast<size_t>(k)] = combine(w_lane);
    segment_sums[2 * static_cast<size_t>(k) + 1] = combine(r_lane);
  }
}

void lamb_trust(float* trust, const double* gathered_sums, std::span<const size_t> order,
                std::span<const size_t> tensor_begin) {
  MPT_CHECK(!tensor_begin.empty() && tensor_begin.back() == order.size(),
            "lamb_trust: tensor_begin must end at the order's length {}", order.size());
  for (size_t t = 0; t + 1 < tensor_begin.size(); ++t) {
    double w_sq = 0.0, r_sq = 0.0;  // one by one in the fixed global order: the same bits for every N
    for (size_t j = tensor_begin[t]; j < tensor_begin[t + 1]; ++j) {
      w_sq += gathered_sums[2 * order[j]];
      r_sq += gathered_sums[2 * order[j] + 1];
    }
    trust[t] = common::lamb_trust(w_sq, r_sq, true);
  }
}

void lamb_apply(float* master, const float* m, const float* v, std::span<const LambSegment> segments,
                const float* trust, const common::AdamWStep& step) {
  const auto count = static_cast<long long>(segments.size());
#pragma omp parallel for schedule(static)
  for (long long k = 0; k < count; ++k) {
    const LambSegment& s = segments[static_cast<size_t>(k)];
    const float ratio = s.decay ? trust[s.tensor] : 1.0f;
    for (size_t i = 0; i < s.num_elements; ++i) {
      const size_t j = s.shard_offset + i;
      const float r = common::lamb_direction(master[j], m[j], v[j], s.decay, step);
      common::lamb_apply(master[j], r, ratio, step);
    }
  }
}

template void lamb_moments<float>(const float*, float*, float*, const float*, std::span<const LambSegment>,
                                  double*, const common::AdamWStep&);
template void lamb_moments<half>(const float*, float*, float*, const half*, std::span<const LambSegment>,
                                 double*, const common::AdamWStep&);
template void lamb_moments<bf16>(const float*, float*, float*, const bf16*, std::span<const LambSegment>,
                                 double*, const common::AdamWStep&);

}  // namespace mpt::cpu
