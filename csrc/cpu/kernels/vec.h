// The fp32 SIMD layer of the elementwise / reduction CPU kernels (group_norm,
// geglu): GCC vector extensions of the variant's native width (kW fp32 lanes:
// 16 with AVX-512, 8 with AVX2, 4 with the portable SSE2 baseline), typed
// loads / stores that convert fp16 / bf16 in registers, and an exp(-x)
// without libm. Per-ISA code: include only from csrc/cpu/kernels/*.cpp.

// GCC 12's AVX-512 intrinsic headers trip -W(maybe-)uninitialized on their
// own _mm512_undefined_* temporaries (GCC PR 105593); the pragma has to
// precede the first (indirect) include of those headers to take effect.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "cpu/kernels/common.h"

FG_ISA_BEGIN

// --------------------------------------------------------------- SIMD layer

// The per-vector bodies are lambdas handed to for_vectors; unless everything
// is inlined, GCC reloads every captured pointer after each store.
#define FG_INLINE inline __attribute__((always_inline))
#define FG_INLINE_LAMBDA __attribute__((always_inline))

#if defined(__AVX512F__)
#define FG_VEC_BYTES 64
#elif defined(__AVX__)
#define FG_VEC_BYTES 32
#else
#define FG_VEC_BYTES 16
#endif
constexpr int64_t kW = FG_VEC_BYTES / 4;  // fp32 lanes per vector
typedef float vfloat __attribute__((vector_size(FG_VEC_BYTES)));
typedef int32_t vint __attribute__((vector_size(FG_VEC_BYTES)));
typedef uint32_t vuint __attribute__((vector_size(FG_VEC_BYTES)));
typedef uint16_t vu16 __attribute__((vector_size(FG_VEC_BYTES / 2)));

FG_INLINE vfloat splat(float a) { return vfloat{} + a; }

FG_INLINE vfloat vfma(vfloat a, vfloat b, vfloat c) {
#if defined(__AVX512F__)
  return _mm512_fmadd_ps(a, b, c);
#elif defined(__AVX__) && defined(__FMA__)
  return _mm256_fmadd_ps(a, b, c);
#else
  return a * b + c;
#endif
}

// min/max against a constant, returning a (NaN included) when a is NaN:
// minps returns its second operand when either is NaN. Spelled out because
// GCC lowers the vector ternary to compare + blend (two ops).
FG_INLINE vfloat vmin(vfloat a, float b) {
#if defined(__AVX512F__)
  return _mm512_min_ps(splat(b), a);
#elif defined(__AVX__)
  return _mm256_min_ps(splat(b), a);
#else
  return b < a ? splat(b) : a;
#endif
}
FG_INLINE vfloat vmax(vfloat a, float b) {
#if defined(__AVX512F__)
  return _mm512_max_ps(splat(b), a);
#elif defined(__AVX__)
  return _mm256_max_ps(splat(b), a);
#else
  return b > a ? splat(b) : a;
#endif
}

// 1 / d. AVX-512: rcp14 + one Newton step (rel. error ~1e-8 + rounding),
// several times the throughput of vdivps.
FG_INLINE vfloat vrcp(vfloat d) {
#if defined(__AVX512F__)
  const vfloat r = _mm512_rcp14_ps(d);
  return vfma(vfma(-d, r, splat(1.0f)), r, r);
#else
  return 1.0f / d;
#endif
}

// Sum of the lanes (a shuffle tree on AVX-512: short rows call this often).
FG_INLINE float hsum(vfloat v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps(v);
#else
  float s = 0.0f;
  for (int64_t i = 0; i < kW; ++i) s += v[i];
  return s;
#endif
}

// Lanes [0, n) keep v, the rest become 0 (for partial tail vectors).
FG_INLINE vfloat keep_first(vfloat v, int64_t n) {
  vint lane;
  for (int32_t i = 0; i < kW; ++i) lane[i] = i;
  return lane < static_cast<int32_t>(n) ? v : vfloat{};
}

// exp(-x) without libm so everything stays in vector registers (SiLU only
// needs e^-z; computing it directly saves a negation). Range reduction
// -x = n*ln2 + r with |r| <= ln2/2, a degree-6 minimax polynomial for e^r
// (Remez fit for relative error, 1.9e-9 in exact arithmetic; evaluated in
// r' = -r with odd coefficients negated), then p * 2^n. Measured max relative
// error against double exp:
//  * AVX-512: 1.2e-7 for |x| < 20, 3.1e-7 at the ends of the float range
//    (single-step reduction, see below). vrndscaleps rounds, vscalefps
//    applies 2^n with proper overflow to inf / underflow to 0: no clamping.
//  * Elsewhere: 1.1e-7 (two-constant Cody-Waite reduction). Rounding by the
//    1.5*2^23 trick and 2^n built in the exponent bits; inputs are clamped to
//    [-88, 87] to keep 2^n a normal float, so the result saturates at ~1.6e38
//    / ~1.6e-38 (harmless for sigmoid and SiLU).
// NaN propagates in both versions.
FG_INLINE vfloat exp_poly_neg(vfloat r) {  // e^-r
  vfloat p = splat(1.3836845755577087e-3f);
  p = vfma(p, r, splat(-8.374815806746483e-3f));
  p = vfma(p, r, splat(4.166822507977486e-2f));
  p = vfma(p, r, splat(-1.6666419804096222e-1f));
  p = vfma(p, r, splat(4.999999105930328e-1f));
  p = vfma(p, r, splat(-1.0f));
  return vfma(p, r, splat(1.0f));
}

FG_INLINE vfloat vexp_neg(vfloat x) {
  constexpr float kNegLog2e = -1.44269504088896341f;
#if defined(__AVX512F__)
  // With a true FMA one step suffices: n * ln2f is exact inside the FMA, and
  // |ln2 - ln2f| = 1.9e-9 adds at most |n| * 1.9e-9 (< 6e-8 for |x| < 20).
  const vfloat n =
      _mm512_roundscale_ps(x * kNegLog2e, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const vfloat r = vfma(n, splat(0.693147182464599609375f), x);  // = -(-x - n*ln2)
  return _mm512_scalef_ps(exp_poly_neg(r), n);
#else
  constexpr float kLn2Hi = 0.693359375f;  // 10 significant bits: n * hi is exact
  constexpr float kLn2Lo = -2.12194440e-4f;
  x = vmax(vmin(x, 87.0f), -88.0f);
  const vfloat n = (x * kNegLog2e + 12582912.0f) - 12582912.0f;
  const vfloat r = vfma(n, splat(kLn2Lo), vfma(n, splat(kLn2Hi), x));
  const vint e = (__builtin_convertvector(n, vint) + 127) << 23;
  return exp_poly_neg(r) * __builtin_bit_cast(vfloat, e);
#endif
}

// z is clamped at -88 so e^-z <= ~1.6e38 and 1 + e^-z stays finite for the
// reciprocal's Newton step (inf * 0 would give NaN for z < -88.7).
FG_INLINE vfloat vsigmoid(vfloat z) { return vrcp(1.0f + vexp_neg(vmax(z, -88.0f))); }
FG_INLINE vfloat vsilu(vfloat z) { return z * vsigmoid(z); }

// dy * d silu(z) / dz, with z = xhat * w + b recomputed rather than stored.
template <bool kSilu>
FG_INLINE vfloat grad_z(vfloat dy, vfloat xhat, vfloat w, vfloat b) {
  if (!kSilu) return dy;
  const vfloat z = vfma(xhat, w, b);
  const vfloat s = vsigmoid(z);
  return dy * s * vfma(z, 1.0f - s, splat(1.0f));
}

// ----------------------------------------------------------- typed vectors
// load/store kW elements of T as fp32; *_n variants handle a partial tail.

template <typename T>
struct Vio;

template <>
struct Vio<float> {
  static FG_INLINE vfloat load(const float* p) {
    vfloat v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static FG_INLINE void store(float* p, vfloat v) { std::memcpy(p, &v, sizeof(v)); }
};

template <>
struct Vio<BFloat16> {
  static FG_INLINE vfloat load(const BFloat16* p) {
#if defined(__AVX512F__)
    // GCC splits the generic widening below into two halves; one vpmovzxwd.
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
#elif defined(__AVX2__)
    // Likewise with AVX2 (GCC 12 emits five instructions for the generic code).
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
#else
    vu16 h;
    std::memcpy(&h, p, sizeof(h));
    return __builtin_bit_cast(vfloat, __builtin_convertvector(h, vuint) << 16);
#endif
  }
  // Round to nearest even; NaN stays a quiet NaN instead of rounding to inf.
  static FG_INLINE void store(BFloat16* p, vfloat v) {
#if defined(__AVX512BF16__) && defined(__AVX512F__)
    // One instruction; like PyTorch's AVX512-BF16 path it flushes fp32
    // denormals (< 1.2e-38) to zero.
    const __m256bh h = _mm512_cvtneps_pbh(v);
    std::memcpy(p, &h, sizeof(h));
#elif defined(__AVX2__) && !defined(__AVX512F__)
    // The generic code below, spelled out: GCC 12 narrows the 32-bit lanes
    // with a long shuffle sequence. packus is exact (lanes are in [0, 0xffff]).
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i rounded =
        _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                           _mm256_set1_epi32(0x7f800000));
    const __m256i out = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7fc0), nan);
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(out, out), 0xd8);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
#else
    const vuint u = __builtin_bit_cast(vuint, v);
    const vuint rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const vuint out = (u & 0x7fffffffu) > 0x7f800000u ? vuint{} + 0x7fc0u : rounded;
    const vu16 h = __builtin_convertvector(out, vu16);
    std::memcpy(p, &h, sizeof(h));
#endif
  }
};

template <>
struct Vio<Half> {
  static FG_INLINE vfloat load(const Half* p) {
#if defined(__AVX512F__)
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif defined(__AVX__) && defined(__F16C__)
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
    vfloat v;
    for (int64_t i = 0; i < kW; ++i) v[i] = static_cast<float>(p[i]);
    return v;
#endif
  }
  static FG_INLINE void store(Half* p, vfloat v) {
#if defined(__AVX512F__)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                        _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif defined(__AVX__) && defined(__F16C__)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
#else
    for (int64_t i = 0; i < kW; ++i) p[i] = static_cast<Half>(v[i]);
#endif
  }
};

// n is the constant kW in unrolled loops, so the tail branch folds away there.
template <typename T>
FG_INLINE vfloat load_n(const T* p, int64_t n) {
  if (n == kW) return Vio<T>::load(p);
  T tmp[kW] = {};
  std::copy(p, p + n, tmp);
  return Vio<T>::load(tmp);
}

template <typename T>
FG_INLINE void store_n(T* p, vfloat v, int64_t n) {
  if (n == kW) return Vio<T>::store(p, v);
  T tmp[kW];
  Vio<T>::store(tmp, v);
  std::copy(tmp, tmp + n, p);
}


FG_ISA_END
