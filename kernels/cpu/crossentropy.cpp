// CPU fused softmax cross-entropy over padded logits, with the logits gradient written in the same pass.
//
// Per row: the row is read once into an opmath buffer, the statistics (max over the V real columns, sum of
// exp(x - max): FP32 through SLEEF's vector exp in fixed lanes) come from the buffer, and only then is the
// gradient row written. Because a row is fully read before any of it is written, dlogits may alias logits (in
// place, as llm.c does to save the largest activation). Rows are independent, so results do not depend on the
// thread count.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu/lane_reduce.hpp"
#include "cpu/ops.hpp"
#include "cpu/vecmath.hpp"
#include "mptrain/error.hpp"

namespace mpt::cpu {

template <typename T>
void crossentropy_forward_backward(T* dlogits, opmath_t<T>* losses, const T* logits, const int32_t* targets,
                                   int64_t rows, int64_t V, int64_t Vp, opmath_t<T> dloss) {
  MPT_CHECK(rows > 0, "crossentropy_forward_backward: rows must be positive, got {}", rows);
  MPT_CHECK(V > 0, "crossentropy_forward_backward: V must be positive, got {}", V);
  MPT_CHECK(Vp >= V, "crossentropy_forward_backward: Vp ({}) must be >= V ({})", Vp, V);
  MPT_CHECK(losses != nullptr, "crossentropy_forward_backward: losses is null");
  MPT_CHECK(logits != nullptr, "crossentropy_forward_backward: logits is null");
  MPT_CHECK(targets != nullptr, "crossentropy_forward_backward: targets is null");
  // All targets are checked before anything is written, so a bad batch leaves every output untouched.
  for (int64_t r = 0; r < rows; ++r) {
    MPT_CHECK(targets[r] >= 0 && targets[r] < V,
              "crossentropy_forward_backward: targets[{}] = {} is outside the vocabulary [0, {})", r,
              targets[r], V);
  }
  using F = opmath_t<T>;
  const auto Vps = static_cast<size_t>(Vp);
  // One row buffer per thread, allocated here so nothing inside the parallel region can throw.
  std::vector<F> scratch(static_cast<size_t>(omp_get_max_threads()) * Vps);
#pragma omp parallel
  {
    F* e = scratch.data() + static_cast<size_t>(omp_get_thread_num()) * Vps;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      // Read: the real columns only (the padding of the logits is never looked at).
      load_n(logits + r * Vp, e, V);
      const int64_t target = targets[r];
      const F x_target = e[target];
      // Stats: e becomes exp(x - max): FP32 through SLEEF's vector exp, summed in its fixed lane order
      // (cpu/vecmath.hpp); FP64 with std::exp in column order.
      const F row_max = lane_max(e, V);
      const F sum = exp_shifted_sum(e, row_max, V);
      losses[r] = std::log(sum) + row_max - x_target;
      // Write: (softmax - onehot) * dloss for the real columns, zeros for the padding.
      if (dlogits != nullptr) {
        for (int64_t j = 0; j < V; ++j) e[j] = (e[j] / sum - (j == target ? F(1) : F(0))) * dloss;
        std::fill(e + V, e + Vp, F(0));
        store_n<T>(e, dlogits + r * Vp, Vp);
      }
    }
  }
}

#define MPT_INSTANTIATE_CROSSENTROPY(T)                                                               \
  template void crossentropy_forward_backward<T>(T*, opmath_t<T>*, const T*, const int32_t*, int64_t, \
                                                 int64_t, int64_t, opmath_t<T>);

MPT_INSTANTIATE_CROSSENTROPY(float)
MPT_INSTANTIATE_CROSSENTROPY(half)
MPT_INSTANTIATE_CROSSENTROPY(bf16)
MPT_INSTANTIATE_CROSSENTROPY(double)

#undef MPT_INSTANTIATE_CROSSENTROPY

}  // namespace mpt::cpu
