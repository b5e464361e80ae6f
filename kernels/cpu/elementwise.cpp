// CPU elementwise ops of the GPT-2 block: tanh-GELU forward/backward (element math in
// kernels/common/gelu.hpp), the residual add and gradient accumulation.
//
// float/half/bf16 compute GELU in FP32 through the vectorised SLEEF loops of kernels/cpu/vecmath.hpp (within
// a few ulp of the tanh-GELU of kernels/common/gelu.hpp); double keeps the scalar formula.
//
// Every op walks its n elements in fixed chunks split across OpenMP threads; a chunk of half/bf16 is widened
// to opmath with the SIMD bulk converters, computed, and rounded once on store (float and double storage is
// computed in place, without the copies). No element depends on another, so
// results do not depend on the thread count. Each chunk is read completely before it is written, so an output
// may alias an input (in-place gelu_forward, or residual_forward into a or b).
#include <algorithm>
#include <cstdint>

#include "common/gelu.hpp"
#include "cpu/ops.hpp"
#include "cpu/vecmath.hpp"
#include "mptrain/error.hpp"

namespace mpt::cpu {

namespace {

constexpr int64_t kChunk = 1024;

/// Runs body(begin, count) over [0, n) in chunks of kChunk, chunks spread over the OpenMP threads.
template <typename Body>
void for_each_chunk(int64_t n, Body&& body) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t begin = c * kChunk;
    body(begin, std::min(kChunk, n - begin));
  }
}

}  // namespace

template <typename T>
void gelu_forward(T* out, const T* inp, int64_t n) {
  MPT_CHECK(n > 0, "gelu_forward: n must be positive, got {}", n);
  MPT_CHECK(out != nullptr, "gelu_forward: out is null");
  MPT_CHECK(inp != nullptr, "gelu_forward: inp is null");
  using F = opmath_t<T>;
  if constexpr (std::is_same_v<T, float>) {  // no widening: straight from inp to out
    for_each_chunk(n,
                   [&](int64_t begin, int64_t count) { gelu_forward_f32(out + begin, inp + begin, count); });
    return;
  }
  for_each_chunk(n, [&](int64_t begin, int64_t count) {
    F x[kChunk];
    load_n(inp + begin, x, count);
    if constexpr (std::is_same_v<F, float>)
      gelu_forward_f32(x, x, count);  // SLEEF exp sigmoid form, vectorised
    else
      for (int64_t i = 0; i < count; ++i) x[i] = common::gelu_tanh(x[i]);
    store_n<T>(x, out + begin, count);
  });
}

template <typename T>
void gelu_backward(T* dinp, const T* inp, const T* dout, int64_t n) {
  MPT_CHECK(n > 0, "gelu_backward: n must be positive, got {}", n);
  MPT_CHECK(dinp != nullptr, "gelu_backward: dinp is null");
  MPT_CHECK(inp != nullptr, "gelu_backward: inp is null");
  MPT_CHECK(dout != nullptr, "gelu_backward: dout is null");
  using F = opmath_t<T>;
  if constexpr (std::is_same_v<T, float>) {
    for_each_chunk(n, [&](int64_t begin, int64_t count) {
      gelu_backward_f32(dinp + begin, inp + begin, dout + begin, count);
    });
    return;
  }
  for_each_chunk(n, [&](int64_t begin, int64_t count) {
    F x[kChunk];
    F dy[kChunk];
    F acc[kChunk];
    load_n(inp + begin, x, count);
    load_n(dout + begin, dy, count);
    load_n(dinp + begin, acc, count);
    if constexpr (std::is_same_v<F, float>)
      gelu_backward_f32(acc, x, dy, count);  // SLEEF exp sigmoid form, vectorised
    else
      for (int64_t i = 0; i < count; ++i) acc[i] += dy[i] * common::gelu_tanh_derivative(x[i]);
    store_n<T>(acc, dinp + begin, count);
  });
}

template <typename T>
void residual_forward(T* out, const T* a, const T* b, int64_t n) {
  MPT_CHECK(n > 0, "residual_forward: n must be positive, got {}", n);
  MPT_CHECK(out != nullptr, "residual_forward: out is null");
  MPT_CHECK(a != nullptr, "residual_forward: a is null");
  MPT_CHECK(b != nullptr, "residual_forward: b is null");
  using F = opmath_t<T>;
  if constexpr (std::is_same_v<T, F>) {
    for_each_chunk(n, [&](int64_t begin, int64_t count) {
      for (int64_t i = begin; i < begin + count; ++i) out[i] = a[i] + b[i];
    });
    return;
  }
  for_each_chunk(n, [&](int64_t begin, int64_t count) {
    F x[kChunk];
    F y[kChunk];
    load_n(a + begin, x, count);
    load_n(b + begin, y, count);
    for (int64_t i = 0; i < count; ++i) x[i] += y[i];
    store_n<T>(x, out + begin, count);
  });
}

template <typename T>
void accumulate(T* acc, const T* x, int64_t n) {
  MPT_CHECK(n > 0, "accumulate: n must be positive, got {}", n);
  MPT_CHECK(acc != nullptr, "accumulate: acc is null");
  MPT_CHECK(x != nullptr, "accumulate: x is null");
  using F = opmath_t<T>;
  if constexpr (std::is_same_v<T, F>) {
    for_each_chunk(n, [&](int64_t begin, int64_t count) {
      for (int64_t i = begin; i < begin + count; ++i) acc[i] += x[i];
    });
    return;
  }
  for_each_chunk(n, [&](int64_t begin, int64_t count) {
    F sum[kChunk];
    F y[kChunk];
    load_n(acc + begin, sum, count);
    load_n(x + begin, y, count);
    for (int64_t i = 0; i < count; ++i) sum[i] += y[i];
    store_n<T>(sum, acc + begin, count);
  });
}

#define MPT_INSTANTIATE_ELEMENTWISE(T)                                \
  template void gelu_forward<T>(T*, const T*, int64_t);               \
  template void gelu_backward<T>(T*, const T*, const T*, int64_t);    \
  template void residual_forward<T>(T*, const T*, const T*, int64_t); \
  template void accumulate<T>(T*, const T*, int64_t);

MPT_INSTANTIATE_ELEMENTWISE(float)
MPT_INSTANTIATE_ELEMENTWISE(half)
MPT_INSTANTIATE_ELEMENTWISE(bf16)
MPT_INSTANTIATE_ELEMENTWISE(double)

#undef MPT_INSTANTIATE_ELEMENTWISE

template <typename T>
void accumulate_f32(float* acc, const T* x, int64_t n) {
  MPT_CHECK(n >= 0, "accumulate_f32: n must be >= 0, got {}", n);
  MPT_CHECK(n == 0 || (acc != nullptr && x != nullptr), "accumulate_f32: null buffer");
  constexpr int64_t kBlock = 1024;
  const int64_t blocks = (n + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t begin = b * kBlock, count = std::min(kBlock, n - begin);
    float v[kBlock];
    if constexpr (std::is_same_v<T, float>)
      std::copy_n(x + begin, count, v);
    else
      convert(x + begin, v, static_cast<size_t>(count));
    for (int64_t i = 0; i < count; ++i) acc[begin + i] += v[i];
  }
}

template void accumulate_f32<float>(float*, const float*, int64_t);
template void accumulate_f32<half>(float*, const half*, int64_t);
template void accumulate_f32<bf16>(float*, const bf16*, int64_t);

}  // namespace mpt::cpu
