// AVX-512F loops of kernels/cpu/vecmath.cpp (16 lanes, SLEEF's avx512f u10 exp). Compiled with
// -mavx512f -mfma (CMakeLists.txt) and called only when cpuid reports AVX-512F and AVX-512BW.
#include <immintrin.h>
#include <sleef.h>

#include <cstdint>

#include "cpu/vecmath_isa.hpp"

// GCC 12's AVX-512 intrinsics start from _mm512_undefined_*(), which it reports as used uninitialized once
// inlined; the warning is spurious (as in src/convert.cpp).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace {

struct Avx512 {
  using V = __m512;
  static constexpr int64_t kLanes = 16;
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V div(V a, V b) { return _mm512_div_ps(a, b); }
  static V min(V a, V b) { return _mm512_min_ps(a, b); }
  static V exp(V a) { return Sleef_expf16_u10avx512f(a); }
  /// Pairwise: 16 -> 8 -> 4 -> 2 -> 1 lanes, always in this order.
  static float hsum(V v) {
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v),
                                   _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    q = _mm_add_ss(q, _mm_movehdup_ps(q));
    return _mm_cvtss_f32(q);
  }
};

}  // namespace

namespace mpt::cpu::vecmath_detail {

void gelu_forward_avx512(float* out, const float* inp, int64_t n) {
  gelu_forward_loop<Avx512>(out, inp, n);
}
void gelu_backward_avx512(float* acc, const float* inp, const float* dout, int64_t n) {
  gelu_backward_loop<Avx512>(acc, inp, dout, n);
}
float exp_shifted_sum_avx512(float* x, float shift, int64_t n) {
  return exp_shifted_sum_loop<Avx512>(x, shift, n);
}

}  // namespace mpt::cpu::vecmath_detail
