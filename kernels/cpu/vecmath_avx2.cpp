// AVX2 + FMA loops of kernels/cpu/vecmath.cpp (8 lanes, SLEEF's avx2 u10 exp). Compiled with -mavx2
// -mfma (CMakeLists.txt) and called only when cpuid reports AVX2, F16C and FMA.
#include <immintrin.h>
#include <sleef.h>

#include <cstdint>

#include "cpu/vecmath_isa.hpp"

namespace {

struct Avx2 {
  using V = __m256;
  static constexpr int64_t kLanes = 8;
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V div(V a, V b) { return _mm256_div_ps(a, b); }
  static V min(V a, V b) { return _mm256_min_ps(a, b); }
  static V exp(V a) { return Sleef_expf8_u10avx2(a); }
  /// Pairwise: 8 -> 4 -> 2 -> 1 lanes, always in this order.
  static float hsum(V v) {
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    q = _mm_add_ss(q, _mm_movehdup_ps(q));
    return _mm_cvtss_f32(q);
  }
};

}  // namespace

namespace mpt::cpu::vecmath_detail {

void gelu_forward_avx2(float* out, const float* inp, int64_t n) {
  gelu_forward_loop<Avx2>(out, inp, n);
}
void gelu_backward_avx2(float* acc, const float* inp, const float* dout, int64_t n) {
  gelu_backward_loop<Avx2>(acc, inp, dout, n);
}
float exp_shifted_sum_avx2(float* x, float shift, int64_t n) {
  return exp_shifted_sum_loop<Avx2>(x, shift, n);
}

}  // namespace mpt::cpu::vecmath_detail
