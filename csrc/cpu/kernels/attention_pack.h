// Moving blocks between the tensors' storage dtype and the fp32 scratch
// layouts the GEMMs want: dtype conversion on load and store, and transposed
// packing (16x16 in-register transposes), so that a GEMM operand read by
// rows can be a transposed block without a strided walk in the inner loop.
#pragma once

#include <type_traits>

#include "cpu/kernels/attention_simd.h"

FG_ISA_BEGIN
namespace cpu_attn {

inline void cvt_to_f32(const float* s, float* d, int64_t n) { std::memcpy(d, s, n * sizeof(float)); }
inline void cvt_to_f32(const Half* s, float* d, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(d + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i))));
#elif defined(__F16C__) && defined(__AVX__)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(d + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
#endif
  for (; i < n; ++i) d[i] = static_cast<float>(s[i]);
}
inline void cvt_to_f32(const BFloat16* s, float* d, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) {
    const __m512i x = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i)));
    _mm512_storeu_ps(d + i, _mm512_castsi512_ps(_mm512_slli_epi32(x, 16)));
  }
#elif defined(__AVX2__)
  for (; i + 8 <= n; i += 8) {
    const __m256i x = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
    _mm256_storeu_ps(d + i, _mm256_castsi256_ps(_mm256_slli_epi32(x, 16)));
  }
#endif
  for (; i < n; ++i) d[i] = static_cast<float>(s[i]);
}
// Row of n values to fp32, zero-filled up to npad.
template <typename T>
inline void load_row(const T* s, float* d, int64_t n, int64_t npad) {
  cvt_to_f32(s, d, n);
  for (int64_t i = n; i < npad; ++i) d[i] = 0.f;
}
template <typename T>
inline void store_row(const float* s, T* d, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(d, s, n * sizeof(float));
  } else {
    for (int64_t i = 0; i < n; ++i) d[i] = static_cast<T>(s[i]);  // round to nearest even
  }
}
template <typename T>
inline void store_row_scaled(const float* s, float a, T* d, int64_t n) {
  int64_t i = 0;
  const vf va = vset1(a);
  if constexpr (std::is_same_v<T, float>) {
    for (; i + W <= n; i += W) vstore(d + i, vmul(vload(s + i), va));
  }
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, Half>) {  // round to nearest even, like c10::Half
    for (; i + 16 <= n; i += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i),
                          _mm512_cvtps_ph(vmul(vload(s + i), va), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
#endif
#if defined(FASTGEN_BF16_DOT)
  if constexpr (std::is_same_v<T, BFloat16>) {  // round to nearest even, like c10::BFloat16
    for (; i + 16 <= n; i += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i), (__m256i)_mm512_cvtneps_pbh(vmul(vload(s + i), va)));
  }
#endif
  for (; i < n; ++i) d[i] = static_cast<T>(s[i] * a);
}

// Transposed packing: dst[c*ldd + r] = mul * src[r*lds + c] for r < rows,
// c < cols, and dst[c*ldd + r] = 0 for rows <= r < round_up(rows, W).
#if defined(__AVX512F__)
// MUL = false moves bit patterns only (used for packed bf16 pairs).
template <bool MUL>
inline void tr16(const float* s, int64_t lds, float* d, int64_t ldd, int nr, int nc, __m512 mul) {
  __m512 r[16], t[16];
  const __mmask16 mc = static_cast<__mmask16>((1u << nc) - 1u);
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) {
    if (i < nr) {
      r[i] = _mm512_maskz_loadu_ps(mc, s + i * lds);
      if constexpr (MUL) r[i] = _mm512_mul_ps(r[i], mul);
    } else {
      r[i] = _mm512_setzero_ps();
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    const __m512d a0 = _mm512_castps_pd(t[4 * i]), a1 = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d a2 = _mm512_castps_pd(t[4 * i + 2]), a3 = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a0, a2));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a0, a2));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(a1, a3));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(a1, a3));
  }
#pragma GCC unroll 4
  for (int c = 0; c < 4; ++c) {
    const __m512 u0 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x88);
    const __m512 u1 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xdd);
    const __m512 u2 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x88);
    const __m512 u3 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xdd);
    t[c] = _mm512_shuffle_f32x4(u0, u2, 0x88);
    t[c + 8] = _mm512_shuffle_f32x4(u0, u2, 0xdd);
    t[c + 4] = _mm512_shuffle_f32x4(u1, u3, 0x88);
    t[c + 12] = _mm512_shuffle_f32x4(u1, u3, 0xdd);
  }
#pragma GCC unroll 16
  for (int c = 0; c < 16; ++c)
    if (c < nc) _mm512_storeu_ps(d + c * ldd, t[c]);
}
#endif

inline void pack_transposed(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst,
                            int64_t ldd, float mul) {
#if defined(__AVX512F__)
  const __m512 vm = _mm512_set1_ps(mul);
  for (int64_t r0 = 0; r0 < rows; r0 += 16) {
    const int nr = static_cast<int>(std::min<int64_t>(16, rows - r0));
    for (int64_t c0 = 0; c0 < cols; c0 += 16) {
      const int nc = static_cast<int>(std::min<int64_t>(16, cols - c0));
      tr16<true>(src + r0 * lds + c0, lds, dst + c0 * ldd + r0, ldd, nr, nc, vm);
    }
  }
#else
  const int64_t rp = round_up(rows, W);
  for (int64_t c = 0; c < cols; ++c) {
    float* d = dst + c * ldd;
    for (int64_t r = 0; r < rows; ++r) d[r] = mul * src[r * lds + c];
    for (int64_t r = rows; r < rp; ++r) d[r] = 0.f;
  }
#endif
}

}  // namespace cpu_attn
FG_ISA_END
