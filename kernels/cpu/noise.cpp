// CPU ops of the gradient noise scale (kernels/common/noise_scale.hpp): the FP64 sum of squares of a range of
// a gradient buffer, in fixed chunks combined in order, and the step's estimate folded into the averages.
#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/ops.hpp"

namespace mpt::cpu {

template <typename T>
double sum_squares(const T* data, size_t num_elements) {
  constexpr size_t kChunk = 4096;
  constexpr size_t kLanes = 8;
  const size_t chunks = (num_elements + kChunk - 1) / kChunk;
  std::vector<double> partial(chunks, 0.0);
#pragma omp parallel for schedule(static)
  for (long long c = 0; c < static_cast<long long>(chunks); ++c) {
    const size_t begin = static_cast<size_t>(c) * kChunk;
    const size_t count = std::min(kChunk, num_elements - begin);
    float x[kChunk];
    if constexpr (std::is_same_v<T, float>)
      std::memcpy(x, data + begin, count * sizeof(float));
    else
      convert(data + begin, x, count);
    // Interleaved lanes in a fixed tree: the order depends only on the element positions.
    double lane[kLanes] = {};
    for (size_t i = 0; i < count; ++i)
      lane[i % kLanes] += static_cast<double>(x[i]) * static_cast<double>(x[i]);
    partial[static_cast<size_t>(c)] =
        ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
  }
  double total = 0.0;
  for (const double p : partial) total += p;  // chunk order
  return total;
}

void noise_prepare(common::AmpState& state, const double* gathered, std::span<const size_t> indices,
                   const common::NoiseRule& rule) {
  double total = 0.0;
  for (const size_t k : indices) total += gathered[k];
  common::noise_prepare(state, total, rule);
}

template double sum_squares<float>(const float*, size_t);
template double sum_squares<half>(const half*, size_t);
template double sum_squares<bf16>(const bf16*, size_t);

}  // namespace mpt::cpu
