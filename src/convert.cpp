// Bulk float <-> half / bf16 conversion with run-time SIMD dispatch (AVX2+F16C, AVX-512F+BW, scalar).
//
// Every path is bit-identical to the scalar reference in kernels/common/fp16.hpp for every input, NaNs
// included; tests/test_dtype.cpp checks this exhaustively for 16-bit inputs and on every rounding boundary
// for float inputs. The SIMD kernels are compiled with __attribute__((target(...))) so this file needs no
// -march flag and the binary still runs on CPUs without AVX2; the level is picked with cpuid at run time.
//
// Two hardware quirks shape the kernels:
//  - VCVTPH2PS (F16C and AVX-512) quiets a signalling half NaN (0x7c01 -> 0x7fc02000), whereas the scalar
//    reference widens the bits unchanged (0x7f802000). The half -> float kernels copy half bit 9 into float
//    bit 22 on NaN lanes so the two agree. VCVTPS2PH already matches the reference.
//  - float -> bf16 is integer round-to-nearest-even, never VCVTNEPS2BF16: that instruction flushes subnormal
//    inputs to zero, and bf16 subnormals are ordinary values in training (tiny gradients).
#include <cstddef>
#include <cstdint>

#include "common/fp16.hpp"
#include "mptrain/dtype.hpp"
#include "mptrain/error.hpp"

#if defined(__x86_64__) || defined(__i386__)
#define MPT_CONVERT_X86 1
#include <cpuid.h>
#include <immintrin.h>
#else
#define MPT_CONVERT_X86 0
#endif

namespace mpt {
namespace {

// ---- Scalar: the reference, and the tail of every SIMD loop ---------------------------------------------

void float_to_half_scalar(const float* src, half* dst, size_t begin, size_t n) {
  for (size_t i = begin; i < n; ++i) dst[i].bits = common::float_to_half_bits(src[i]);
}

void half_to_float_scalar(const half* src, float* dst, size_t begin, size_t n) {
  for (size_t i = begin; i < n; ++i) dst[i] = common::half_bits_to_float(src[i].bits);
}

void float_to_bf16_scalar(const float* src, bf16* dst, size_t begin, size_t n) {
  for (size_t i = begin; i < n; ++i) dst[i].bits = common::float_to_bf16_bits(src[i]);
}

void bf16_to_float_scalar(const bf16* src, float* dst, size_t begin, size_t n) {
  for (size_t i = begin; i < n; ++i) dst[i] = common::bf16_bits_to_float(src[i].bits);
}

#if MPT_CONVERT_X86

// Round-to-nearest-even immediate for VCVTPS2PH; NO_EXC because converters must not raise FP exceptions.
constexpr int kRoundNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

// ---- AVX2 + F16C: 8 lanes -------------------------------------------------------------------------------

__attribute__((target("avx2,f16c"))) void float_to_half_avx2(const float* src, half* dst, size_t n) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), kRoundNearest);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
  }
  float_to_half_scalar(src, dst, i, n);
}

__attribute__((target("avx2,f16c"))) void half_to_float_avx2(const half* src, float* dst, size_t n) {
  const __m256i abs_mask = _mm256_set1_epi32(0x7fff);
  const __m256i half_inf = _mm256_set1_epi32(0x7c00);
  const __m256i half_quiet = _mm256_set1_epi32(0x0200);
  const __m256i float_quiet = _mm256_set1_epi32(0x00400000);
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h16 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    const __m256i f = _mm256_castps_si256(_mm256_cvtph_ps(h16));
    // Signalling NaN lanes (exponent all ones, mantissa != 0, quiet bit clear): undo the hardware's quieting.
    const __m256i h = _mm256_cvtepu16_epi32(h16);
    const __m256i is_nan = _mm256_cmpgt_epi32(_mm256_and_si256(h, abs_mask), half_inf);
    const __m256i is_snan =
        _mm256_andnot_si256(_mm256_cmpeq_epi32(_mm256_and_si256(h, half_quiet), half_quiet), is_nan);
    const __m256i fixed = _mm256_andnot_si256(_mm256_and_si256(is_snan, float_quiet), f);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), fixed);
  }
  half_to_float_scalar(src, dst, i, n);
}

// 8 floats (as int bits) -> 8 bf16 in the low 16 bits of each lane, exactly as common::float_to_bf16_bits.
__attribute__((target("avx2"))) inline __m256i float_bits_to_bf16_avx2(__m256i x) {
  const __m256i one = _mm256_set1_epi32(1);
  const __m256i bias = _mm256_set1_epi32(0x7fff);
  const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff);
  const __m256i float_inf = _mm256_set1_epi32(0x7f800000);
  const __m256i bf16_quiet = _mm256_set1_epi32(0x0040);
  const __m256i top = _mm256_srli_epi32(x, 16);
  // The add wraps only for negative NaNs, whose lanes the blend below replaces.
  const __m256i rounded =
      _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(x, bias), _mm256_and_si256(top, one)), 16);
  // Signed compare is safe: both sides are non-negative after masking the sign.
  const __m256i is_nan = _mm256_cmpgt_epi32(_mm256_and_si256(x, abs_mask), float_inf);
  return _mm256_blendv_epi8(rounded, _mm256_or_si256(top, bf16_quiet), is_nan);
}

__attribute__((target("avx2"))) void float_to_bf16_avx2(const float* src, bf16* dst, size_t n) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i b = float_bits_to_bf16_avx2(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i)));
    // Lanes hold 0..0xffff, so unsigned saturation is an exact narrowing.
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), packed);
  }
  float_to_bf16_scalar(src, dst, i, n);
}

__attribute__((target("avx2"))) void bf16_to_float_avx2(const bf16* src, float* dst, size_t n) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i b = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), _mm256_slli_epi32(b, 16));
  }
  bf16_to_float_scalar(src, dst, i, n);
}

// ---- AVX-512F (+BW for dispatch): 16 lanes --------------------------------------------------------------

// GCC 12's AVX-512 intrinsics start from _mm512_undefined_*(), which it then reports as "may be used
// uninitialized" once inlined into a target("avx512f") function; the warning is spurious (GCC 12.2).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

__attribute__((target("avx512f,avx512bw"))) void float_to_half_avx512(const float* src, half* dst, size_t n) {
  size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i h = _mm512_cvtps_ph(_mm512_loadu_ps(src + i), kRoundNearest);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), h);
  }
  float_to_half_scalar(src, dst, i, n);
}

__attribute__((target("avx512f,avx512bw"))) void half_to_float_avx512(const half* src, float* dst, size_t n) {
  const __m512i abs_mask = _mm512_set1_epi32(0x7fff);
  const __m512i half_inf = _mm512_set1_epi32(0x7c00);
  const __m512i half_quiet = _mm512_set1_epi32(0x0200);
  const __m512i float_signal_mask = _mm512_set1_epi32(~0x00400000);
  size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i h16 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    const __m512i f = _mm512_castps_si512(_mm512_cvtph_ps(h16));
    // Same signalling-NaN fix-up as the AVX2 kernel: clear float bit 22 where the half NaN had bit 9 clear.
    const __m512i h = _mm512_cvtepu16_epi32(h16);
    const __mmask16 is_nan = _mm512_cmpgt_epi32_mask(_mm512_and_si512(h, abs_mask), half_inf);
    const __mmask16 is_snan = _mm512_mask_testn_epi32_mask(is_nan, h, half_quiet);
    const __m512i fixed = _mm512_mask_and_epi32(f, is_snan, f, float_signal_mask);
    _mm512_storeu_si512(dst + i, fixed);
  }
  half_to_float_scalar(src, dst, i, n);
}

__attribute__((target("avx512f,avx512bw"))) void float_to_bf16_avx512(const float* src, bf16* dst, size_t n) {
  const __m512i one = _mm512_set1_epi32(1);
  const __m512i bias = _mm512_set1_epi32(0x7fff);
  const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff);
  const __m512i float_inf = _mm512_set1_epi32(0x7f800000);
  const __m512i bf16_quiet = _mm512_set1_epi32(0x0040);
  size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512i x = _mm512_loadu_si512(src + i);
    const __m512i top = _mm512_srli_epi32(x, 16);
    const __m512i rounded =
        _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(x, bias), _mm512_and_si512(top, one)), 16);
    const __mmask16 is_nan = _mm512_cmpgt_epi32_mask(_mm512_and_si512(x, abs_mask), float_inf);
    const __m512i b = _mm512_mask_blend_epi32(is_nan, rounded, _mm512_or_si512(top, bf16_quiet));
    // VPMOVDW truncates each lane to its low 16 bits, which hold the whole result.
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), _mm512_cvtepi32_epi16(b));
  }
  float_to_bf16_scalar(src, dst, i, n);
}

__attribute__((target("avx512f,avx512bw"))) void bf16_to_float_avx512(const bf16* src, float* dst, size_t n) {
  size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512i b = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i)));
    _mm512_storeu_si512(dst + i, _mm512_slli_epi32(b, 16));
  }
  bf16_to_float_scalar(src, dst, i, n);
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

// F16C is read from cpuid leaf 1 (ECX bit 29) because Clang's __builtin_cpu_supports has no "f16c" name.
// Its registers are the AVX ones, whose OS support the avx2 check below already covers.
bool cpu_has_f16c() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  return __get_cpuid(1, &eax, &ebx, &ecx, &edx) != 0 && (ecx & bit_F16C) != 0;
}

SimdLevel detect_simd_level() {
  // Needed when this runs before the runtime's own constructor, e.g. from another static initialiser.
  __builtin_cpu_init();
  // The runtime (libgcc, compiler-rt) also checks XCR0, so a feature whose registers the OS does not save
  // on context switch reads as unsupported.
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) return SimdLevel::avx512;
  if (__builtin_cpu_supports("avx2") && cpu_has_f16c()) return SimdLevel::avx2;
  return SimdLevel::scalar;
}

#else

SimdLevel detect_simd_level() {
  return SimdLevel::scalar;
}

#endif  // MPT_CONVERT_X86

void check_level(SimdLevel level) {
  const SimdLevel detected = detected_simd_level();
  MPT_CHECK(level <= detected, "convert: SIMD level {} is not supported by this CPU (best supported: {})",
            simd_level_name(level), simd_level_name(detected));
}

}  // namespace

SimdLevel detected_simd_level() {
  static const SimdLevel level = detect_simd_level();
  return level;
}

std::string_view simd_level_name(SimdLevel level) {
  switch (level) {
    case SimdLevel::scalar:
      return "scalar";
    case SimdLevel::avx2:
      return "avx2";
    case SimdLevel::avx512:
      return "avx512";
  }
  return "unknown";
}

void convert(const float* src, half* dst, size_t n, SimdLevel level) {
  check_level(level);
#if MPT_CONVERT_X86
  if (level == SimdLevel::avx512) return float_to_half_avx512(src, dst, n);
  if (level == SimdLevel::avx2) return float_to_half_avx2(src, dst, n);
#endif
  float_to_half_scalar(src, dst, 0, n);
}

void convert(const half* src, float* dst, size_t n, SimdLevel level) {
  check_level(level);
#if MPT_CONVERT_X86
  if (level == SimdLevel::avx512) return half_to_float_avx512(src, dst, n);
  if (level == SimdLevel::avx2) return half_to_float_avx2(src, dst, n);
#endif
  half_to_float_scalar(src, dst, 0, n);
}

void convert(const float* src, bf16* dst, size_t n, SimdLevel level) {
  check_level(level);
#if MPT_CONVERT_X86
  if (level == SimdLevel::avx512) return float_to_bf16_avx512(src, dst, n);
  if (level == SimdLevel::avx2) return float_to_bf16_avx2(src, dst, n);
#endif
  float_to_bf16_scalar(src, dst, 0, n);
}

void convert(const bf16* src, float* dst, size_t n, SimdLevel level) {
  check_level(level);
#if MPT_CONVERT_X86
  if (level == SimdLevel::avx512) return bf16_to_float_avx512(src, dst, n);
  if (level == SimdLevel::avx2) return bf16_to_float_avx2(src, dst, n);
#endif
  bf16_to_float_scalar(src, dst, 0, n);
}

}  // namespace mpt
