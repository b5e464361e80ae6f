// CPU AdamW over a rank's FP32 master shard (DESIGN.md phase 6) and the cast of the shard back into the
// model's storage type (phase 7). Element math: kernels/common/adamw.hpp.
#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/ops.hpp"

namespace mpt::cpu {

template <typename T>
void adamw(float* master, float* m, float* v, const T* grads, std::span<const AdamWSegment> segments,
           const common::AdamWStep& step) {
  // Fixed chunks of every segment, all in one parallel loop (one fork/join per step, not one per tensor);
  // each chunk converts its gradients with the SIMD bulk converters first.
  constexpr size_t kChunk = 2048;
  struct Chunk {
    const AdamWSegment* segment;
    size_t begin;
  };
  std::vector<Chunk> chunks;
  for (const AdamWSegment& s : segments)
    for (size_t begin = 0; begin < s.num_elements; begin += kChunk) chunks.push_back({&s, begin});
  // A local copy: the element loop's stores to p, m, v cannot alias it, so the compiler hoists the step's
  // constants and vectorises the loop (sqrtps/divps, the same IEEE results as the scalar instructions).
  const common::AdamWStep st = step;
#pragma omp parallel for schedule(static) if (chunks.size() > 1)
  for (size_t c = 0; c < chunks.size(); ++c) {
    const AdamWSegment& s = *chunks[c].segment;
    const size_t begin = chunks[c].begin;
    const size_t count = std::min(kChunk, s.num_elements - begin);
    float* p = master + s.shard_offset + begin;
    float* ms = m + s.shard_offset + begin;
    float* vs = v + s.shard_offset + begin;
    const T* g = grads + s.flat_offset + begin;
    float gf[kChunk];
    if constexpr (std::is_same_v<T, float>)
      std::memcpy(gf, g, count * sizeof(float));
    else
      convert(g, gf, count);
    if (s.decay)
      for (size_t i = 0; i < count; ++i) common::adamw_update(p[i], ms[i], vs[i], gf[i], true, st);
    else
      for (size_t i = 0; i < count; ++i) common::adamw_update(p[i], ms[i], vs[i], gf[i], false, st);
  }
}

template <typename T>
void cast_master(T* params, const float* master, std::span<const ElementRange> ranges) {
  size_t shard = 0;
  for (const ElementRange& r : ranges) {
    T* dst = params + r.offset;
    const float* src = master + shard;
    if constexpr (std::is_same_v<T, float>) {
      std::memcpy(dst, src, r.num_elements * sizeof(float));
    } else {
      // SIMD bulk conversion (bit-identical to the scalar rounding), split across threads in fixed chunks.
      constexpr size_t kChunk = size_t{1} << 16;
      const auto chunks = static_cast<long long>((r.num_elements + kChunk - 1) / kChunk);
#pragma omp parallel for schedule(static)
      for (long long c = 0; c < chunks; ++c) {
        const size_t begin = static_cast<size_t>(c) * kChunk;
        convert(src + begin, dst + begin, std::min(kChunk, r.num_elements - begin));
      }
    }
    shard += r.num_elements;
  }
}

template void adamw<float>(float*, float*, float*, const float*, std::span<const AdamWSegment>,
                           const common::AdamWStep&);
template void adamw<half>(float*, float*, float*, const half*, std::span<const AdamWSegment>,
                          const common::AdamWStep&);
template void adamw<bf16>(float*, float*, float*, const bf16*, std::span<const AdamWSegment>,
                          const common::AdamWStep&);
template void cast_master<float>(float*, const float*, std::span<const ElementRange>);
template void cast_master<half>(half*, const float*, std::span<const ElementRange>);
template void cast_master<bf16>(bf16*, const float*, std::span<const ElementRange>);

}  // namespace mpt::cpu
