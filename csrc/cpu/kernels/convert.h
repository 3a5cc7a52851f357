// fp16 / bf16 <-> fp32 block conversion for the CPU kernels that compute in
// fp32 over small blocks: fp32 inputs are used in place and fp32 outputs are
// computed in place, other dtypes go through a caller-provided fp32 buffer.
//
// Rounding matches torch: bf16 rounds to nearest even and a NaN stays a quiet
// NaN (the plain rounding add would carry it into inf); fp16 uses the F16C /
// AVX-512 conversion with round-to-nearest-even, Half for the tail.
#pragma once

// Per-ISA code: include only from csrc/cpu/kernels/*.cpp.
#include <cstdint>
#include <cstring>

#include "cpu/kernels/common.h"

#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

FG_ISA_BEGIN
namespace convert {

#define FG_CONVERT_INLINE inline __attribute__((always_inline))


// ------------------------------------------------------------- typed

// n fp32 values from src: src itself for fp32, else converted into buf.
FG_CONVERT_INLINE const float* load(const float* src, int64_t, float*) { return src; }

FG_CONVERT_INLINE const float* load(const BFloat16* src, int64_t n, float* buf) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) buf[i] = bits_to_float(static_cast<uint32_t>(s[i]) << 16);
  return buf;
}

FG_CONVERT_INLINE const float* load(const Half* src, int64_t n, float* buf) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    _mm512_storeu_ps(buf + i, _mm512_cvtph_ps(h));
  }
#elif defined(__F16C__)
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(buf + i, _mm256_cvtph_ps(h));
  }
#endif
  for (; i < n; ++i) buf[i] = static_cast<float>(src[i]);
  return buf;
}

// Where to compute an output block: in place for fp32, else the buffer.
FG_CONVERT_INLINE float* out_ptr(float* dst, float*) { return dst; }
FG_CONVERT_INLINE float* out_ptr(BFloat16*, float* buf) { return buf; }
FG_CONVERT_INLINE float* out_ptr(Half*, float* buf) { return buf; }

// Writes a computed block back (nothing to do for fp32, computed in place).
FG_CONVERT_INLINE void store(const float*, float*, int64_t) {}

FG_CONVERT_INLINE void store(const float* buf, BFloat16* dst, int64_t n) {
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = float_to_bits(buf[i]);
    const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    d[i] = nan ? uint16_t{0x7fc0} : static_cast<uint16_t>(rounded);
  }
}

FG_CONVERT_INLINE void store(const float* buf, Half* dst, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) {
    const __m256i h = _mm512_cvtps_ph(_mm512_loadu_ps(buf + i),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), h);
  }
#elif defined(__F16C__)
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(buf + i), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<Half>(buf[i]);
}

// ------------------------------------------------------------- runtime dtype
// For kernels whose every tensor may have its own dtype (sampling_step): the
// same conversions, chosen per call, at element offset `off`.

FG_CONVERT_INLINE const float* load(const void* src, Dtype dt, int64_t off, int64_t n,
                                    float* buf) {
  if (dt == Dtype::kFloat) return static_cast<const float*>(src) + off;
  if (dt == Dtype::kBFloat16) return load(static_cast<const BFloat16*>(src) + off, n, buf);
  return load(static_cast<const Half*>(src) + off, n, buf);
}

FG_CONVERT_INLINE float* out_ptr(void* dst, Dtype dt, int64_t off, float* buf) {
  return dt == Dtype::kFloat ? static_cast<float*>(dst) + off : buf;
}

FG_CONVERT_INLINE void store(const float* buf, void* dst, Dtype dt, int64_t off,
                             int64_t n) {
  if (dt == Dtype::kBFloat16) store(buf, static_cast<BFloat16*>(dst) + off, n);
  else if (dt == Dtype::kHalf) store(buf, static_cast<Half*>(dst) + off, n);
}

#undef FG_CONVERT_INLINE

}  // namespace convert
FG_ISA_END
