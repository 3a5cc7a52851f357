// Fused GroupNorm (+ SiLU, + residual) forward and backward on CPU.
//
// Design
//  * All math is fp32 in SIMD registers (GCC vector extensions, kW lanes: 16
//    with AVX-512, 8 with AVX, 4 otherwise). fp16/bf16 are converted on load
//    and rounded to nearest even on store, never staged through memory.
//  * Statistics never use E[x^2] - E[x]^2: every block of kStatBlock elements
//    gets a corrected two-pass mean/M2 while it is hot in L1, and blocks are
//    merged with Chan's parallel formula in double. That is as robust as a
//    global two-pass but reads the input from memory only once.
//  * Channels-first (NCHW): a group is one contiguous range, so one task per
//    (n, g) computes its statistics and then applies them while the group
//    (10-160 KB for SD shapes) is still in L2. With fewer (n, g) pairs than
//    threads, a split path runs statistics blocks and (n, c) rows as
//    separate tasks, with bit-identical results.
//  * Channels-last (NHWC): a group is strided over every pixel, so tasks are
//    (n, chunk of pixels). Per-chunk moments / gradient sums are stored per
//    chunk (deterministic for any thread count) and merged before a second
//    parallel pass vectorised along C. Inputs with S == 1 take this path too
//    (both layouts coincide there, and rows of C channels vectorise).
//  * The forward computes (x - mean) * (rstd * w) + b rather than the single
//    FMA x * scale + shift: the subtraction is exact for inputs with a large
//    mean, where x * scale + shift loses ~log2(|mean| / std) bits.
//  * Backward: per-channel sums of dz and dz * xhat (fp32 within a row or
//    chunk, double across them), then dx = rstd * (w*dz - m1 - xhat*m2).
//    dz is kept in an fp32 scratch between the two passes (SiLU' evaluated
//    once): per thread and group for channels-first, for the whole tensor
//    for channels-last (up to 16 MB, beyond that SiLU' is recomputed).
//  * SiLU uses vexp_neg below (no libm call), and on AVX-512 a
//    Newton-refined reciprocal instead of a division.

// GCC 12's AVX-512 intrinsic headers trip -W(maybe-)uninitialized on their
// own _mm512_undefined_* temporaries (GCC PR 105593); the pragma has to
// precede the first (indirect) include of those headers to take effect.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

#include "ops.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace fastgen {
namespace {

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
struct Vio<c10::BFloat16> {
  static FG_INLINE vfloat load(const c10::BFloat16* p) {
#if defined(__AVX512F__)
    // GCC splits the generic widening below into two halves; one vpmovzxwd.
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
#else
    vu16 h;
    std::memcpy(&h, p, sizeof(h));
    return __builtin_bit_cast(vfloat, __builtin_convertvector(h, vuint) << 16);
#endif
  }
  // Round to nearest even; NaN stays a quiet NaN instead of rounding to inf.
  static FG_INLINE void store(c10::BFloat16* p, vfloat v) {
#if defined(__AVX512BF16__) && defined(__AVX512F__)
    // One instruction; like PyTorch's AVX512-BF16 path it flushes fp32
    // denormals (< 1.2e-38) to zero.
    const __m256bh h = _mm512_cvtneps_pbh(v);
    std::memcpy(p, &h, sizeof(h));
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
struct Vio<c10::Half> {
  static FG_INLINE vfloat load(const c10::Half* p) {
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
  static FG_INLINE void store(c10::Half* p, vfloat v) {
#if defined(__AVX512F__)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                        _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif defined(__AVX__) && defined(__F16C__)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
#else
    for (int64_t i = 0; i < kW; ++i) p[i] = static_cast<c10::Half>(v[i]);
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

// Per-row coefficients are one value for a whole row (channels-first) or one
// per element (channels-last, vectorised along C); `coef` hides which.
FG_INLINE vfloat coef(vfloat v, int64_t, int64_t) { return v; }
FG_INLINE vfloat coef(const float* p, int64_t i, int64_t n) { return load_n(p + i, n); }

// Calls body(i, count, acc) for the vectors covering [0, n). The main loop is
// unrolled 4x and `acc` (0..3, a compile-time constant) names one of four
// independent accumulators, so reductions are not bound by add latency.
template <typename F>
FG_INLINE void for_vectors(int64_t n, F&& body) {
  using I0 = std::integral_constant<int, 0>;
  int64_t i = 0;
  for (; i + 4 * kW <= n; i += 4 * kW) {
    body(i, kW, I0{});
    body(i + kW, kW, std::integral_constant<int, 1>{});
    body(i + 2 * kW, kW, std::integral_constant<int, 2>{});
    body(i + 3 * kW, kW, std::integral_constant<int, 3>{});
  }
  for (; i < n; i += kW) body(i, std::min(kW, n - i), I0{});
}

// ------------------------------------------------------------- statistics

// Elements per statistics block; at 16 KB (fp32) it stays in L1 for pass 2.
constexpr int64_t kStatBlock = 4096;
// Minimum elements per parallel task, so tiny tensors do not pay for threads.
constexpr int64_t kMinTaskElems = 16384;
// Channels-last chunk: about this many elements, at least kMinChunkRows rows.
constexpr int64_t kChunkElems = 65536;
constexpr int64_t kMinChunkRows = 16;

// Count, mean and sum of squared deviations; merged with Chan et al.
struct Moments {
  double count = 0.0, mean = 0.0, m2 = 0.0;

  void merge(double n, double mean_b, double m2_b) {
    if (n <= 0.0) return;
    const double total = count + n;
    const double delta = mean_b - mean;
    mean += delta * (n / total);
    m2 += m2_b + delta * delta * (count * n / total);
    count = total;
  }
  void merge(const Moments& o) { merge(o.count, o.mean, o.m2); }

  // From sums of deviations d = x - m0 around a provisional mean m0: the
  // corrected two-pass formula, exact up to rounding even if m0 is off.
  static Moments from_deviations(double n, double m0, double sum_d, double sum_d2) {
    Moments out;
    out.count = n;
    out.mean = m0 + sum_d / n;
    out.m2 = std::max(0.0, sum_d2 - sum_d * sum_d / n);
    return out;
  }
};

// Two passes over one block: the sum (from memory), then deviations (L1).
template <typename T>
Moments block_moments(const T* x, int64_t n) {
  vfloat s[4] = {};
  for_vectors(n, [&](int64_t i, int64_t cnt, auto k) FG_INLINE_LAMBDA {
    s[k] += load_n(x + i, cnt);
  });
  const float m = hsum((s[0] + s[1]) + (s[2] + s[3])) / static_cast<float>(n);
  const vfloat vm = splat(m);
  vfloat d[4] = {}, q[4] = {};
  for_vectors(n, [&](int64_t i, int64_t cnt, auto k) FG_INLINE_LAMBDA {
    vfloat v = load_n(x + i, cnt) - vm;
    if (cnt < kW) v = keep_first(v, cnt);
    d[k] += v;
    q[k] = vfma(v, v, q[k]);
  });
  return Moments::from_deviations(n, m, hsum((d[0] + d[1]) + (d[2] + d[3])),
                                  hsum((q[0] + q[1]) + (q[2] + q[3])));
}

template <typename T>
Moments range_moments(const T* x, int64_t len) {
  Moments acc;
  for (int64_t o = 0; o < len; o += kStatBlock)
    acc.merge(block_moments(x + o, std::min(kStatBlock, len - o)));
  return acc;
}

// Variance of an empty group is taken as 0, so rstd = 1/sqrt(eps) there.
inline float rstd_of(const Moments& m, double eps) {
  const double var = m.count > 0.0 ? m.m2 / m.count : 0.0;
  return static_cast<float>(1.0 / std::sqrt(var + eps));
}

// ---------------------------------------------------------- row kernels
// A "row" is n contiguous elements sharing coefficients of type P (a splat
// vfloat for channels-first, const float* per channel for channels-last).

template <typename T, bool kSilu, bool kRes, typename P>
inline void fwd_row(const T* x, const T* r, T* y, int64_t n, P mean, P scale, P shift) {
  for_vectors(n, [&](int64_t i, int64_t cnt, auto) FG_INLINE_LAMBDA {
    vfloat z = vfma(load_n(x + i, cnt) - coef(mean, i, cnt), coef(scale, i, cnt),
                    coef(shift, i, cnt));
    if (kSilu) z = vsilu(z);
    if (kRes) z += load_n(r + i, cnt);
    store_n(y + i, z, cnt);
  });
}

// Per-row statistics of the backward: sum(dz) and sum(dz * xhat). With a
// non-null dz_out, dz is also kept for the dx pass (saves recomputing SiLU').
template <typename T, bool kSilu>
inline void bwd_row_sums(const T* x, const T* dy, int64_t n, vfloat mean, vfloat rstd,
                         vfloat w, vfloat b, double& sum_dz, double& sum_dz_xhat,
                         float* dz_out) {
  vfloat a[4] = {}, c[4] = {};
  for_vectors(n, [&](int64_t i, int64_t cnt, auto k) FG_INLINE_LAMBDA {
    const vfloat xh = (load_n(x + i, cnt) - mean) * rstd;
    vfloat dz = grad_z<kSilu>(load_n(dy + i, cnt), xh, w, b);
    if (dz_out) store_n(dz_out + i, dz, cnt);
    if (cnt < kW) dz = keep_first(dz, cnt);
    a[k] += dz;
    c[k] = vfma(dz, xh, c[k]);
  });
  sum_dz = hsum((a[0] + a[1]) + (a[2] + a[3]));
  sum_dz_xhat = hsum((c[0] + c[1]) + (c[2] + c[3]));
}

// Channels-last variant over `nrows` rows of C channels: per-channel sums of
// dz and dz * xhat into sum_dz[c], sum_dz_xhat[c] (and dz into dz_out with
// the same layout as x, when non-null). U vectors of channels keep their
// accumulators in registers while the rows stream past.
template <typename T, bool kSilu, int U>
FG_INLINE void bwd_column_block(const T* x, const T* dy, int64_t nrows, int64_t C,
                                const float* mean, const float* rstd, const float* w,
                                const float* b, float* sum_dz, float* sum_dz_xhat,
                                float* dz_out, int64_t last) {
  auto cnt = [last](int k) { return k == U - 1 ? last : kW; };
  vfloat a[U] = {}, c[U] = {};
  for (int64_t row = 0; row < nrows; ++row)
    for (int k = 0; k < U; ++k) {
      const int64_t i = k * kW, o = row * C + i;
      const vfloat xh =
          (load_n(x + o, cnt(k)) - load_n(mean + i, cnt(k))) * load_n(rstd + i, cnt(k));
      const vfloat dz = grad_z<kSilu>(load_n(dy + o, cnt(k)), xh, load_n(w + i, cnt(k)),
                                      load_n(b + i, cnt(k)));
      if (dz_out) store_n(dz_out + o, dz, cnt(k));
      a[k] += dz;
      c[k] = vfma(dz, xh, c[k]);
    }
  for (int k = 0; k < U; ++k) {
    store_n(sum_dz + k * kW, a[k], cnt(k));
    store_n(sum_dz_xhat + k * kW, c[k], cnt(k));
  }
}

template <typename T, bool kSilu>
void bwd_chunk_sums_cl(const T* x, const T* dy, int64_t nrows, int64_t C, const float* mean,
                       const float* rstd, const float* w, const float* b, float* sum_dz,
                       float* sum_dz_xhat, float* dz_out) {
  int64_t c0 = 0;
  for (; c0 + 4 * kW <= C; c0 += 4 * kW)
    bwd_column_block<T, kSilu, 4>(x + c0, dy + c0, nrows, C, mean + c0, rstd + c0, w + c0,
                                  b + c0, sum_dz + c0, sum_dz_xhat + c0,
                                  dz_out ? dz_out + c0 : nullptr, kW);
  for (; c0 < C; c0 += kW)
    bwd_column_block<T, kSilu, 1>(x + c0, dy + c0, nrows, C, mean + c0, rstd + c0, w + c0,
                                  b + c0, sum_dz + c0, sum_dz_xhat + c0,
                                  dz_out ? dz_out + c0 : nullptr, std::min(kW, C - c0));
}

// dx = rstd * (w*dz - m1 - xhat*m2), m1 = mean_g(w*dz), m2 = mean_g(w*dz*xhat).
// The bracket is formed before scaling by rstd, so groups with tiny variance
// (huge rstd) do not amplify its rounding. dz comes from `src`: recomputed
// from dy when kRecompute (SiLU), else read as is (dy, or pass-1 scratch).
template <typename T, bool kRecompute, typename U, typename P>
inline void bwd_row_dx(const T* x, const U* src, T* dx, int64_t n, P mean, P rstd, P w,
                       P b, P neg_m1, P neg_m2) {
  for_vectors(n, [&](int64_t i, int64_t cnt, auto) FG_INLINE_LAMBDA {
    const vfloat rs = coef(rstd, i, cnt), wv = coef(w, i, cnt);
    const vfloat xh = (load_n(x + i, cnt) - coef(mean, i, cnt)) * rs;
    vfloat dz = load_n(src + i, cnt);
    if (kRecompute) dz = grad_z<true>(dz, xh, wv, coef(b, i, cnt));
    const vfloat bracket =
        vfma(coef(neg_m2, i, cnt), xh, vfma(wv, dz, coef(neg_m1, i, cnt)));
    store_n(dx + i, rs * bracket, cnt);
  });
}

// Problem geometry shared by all paths: x viewed as (N, C, S) or (N, S, C).
struct Shape {
  int64_t N, C, S, G;
  int64_t cpg() const { return C / G; }
  int64_t group_elems() const { return C / G * S; }
};

inline int64_t grain_for(int64_t elems_per_item) {
  return std::max<int64_t>(1, kMinTaskElems / std::max<int64_t>(elems_per_item, 1));
}

// ------------------------------------------------- channels-first forward

// One task per (n, g): statistics and apply back to back, group hot in L2.
template <typename T, bool kSilu, bool kRes>
void fwd_cf_fused(const T* x, const T* r, T* y, const float* w, const float* b,
                  const Shape& sh, double eps, float* mean, float* rstd) {
  const int64_t cpg = sh.cpg(), S = sh.S, L = sh.group_elems();
  at::parallel_for(0, sh.N * sh.G, grain_for(L), [&](int64_t begin, int64_t end) {
    for (int64_t ng = begin; ng < end; ++ng) {
      const Moments mo = range_moments(x + ng * L, L);
      const float m = static_cast<float>(mo.mean), rs = rstd_of(mo, eps);
      mean[ng] = m;
      rstd[ng] = rs;
      const int64_t c0 = (ng % sh.G) * cpg;
      for (int64_t j = 0; j < cpg; ++j) {
        const int64_t off = ng * L + j * S;
        fwd_row<T, kSilu, kRes>(x + off, kRes ? r + off : nullptr, y + off, S, splat(m),
                                splat(rs * w[c0 + j]), splat(b[c0 + j]));
      }
    }
  });
}

// Fewer (n, g) pairs than threads: the same statistics blocks as
// range_moments, but as separate tasks (merged in the same order, so results
// do not depend on the path), then an apply pass over (n, c) rows.
template <typename T, bool kSilu, bool kRes>
void fwd_cf_split(const T* x, const T* r, T* y, const float* w, const float* b,
                  const Shape& sh, double eps, float* mean, float* rstd) {
  const int64_t C = sh.C, S = sh.S, cpg = sh.cpg(), L = sh.group_elems();
  const int64_t nb = (L + kStatBlock - 1) / kStatBlock;  // blocks per group
  std::vector<Moments> blocks(sh.N * sh.G * nb);
  at::parallel_for(0, sh.N * sh.G * nb, grain_for(kStatBlock), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t o = i % nb * kStatBlock;
      blocks[i] = block_moments(x + i / nb * L + o, std::min(kStatBlock, L - o));
    }
  });
  for (int64_t ng = 0; ng < sh.N * sh.G; ++ng) {
    Moments mo;
    for (int64_t k = 0; k < nb; ++k) mo.merge(blocks[ng * nb + k]);
    mean[ng] = static_cast<float>(mo.mean);
    rstd[ng] = rstd_of(mo, eps);
  }
  at::parallel_for(0, sh.N * C, grain_for(S), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {  // i = n * C + c, and i / cpg = n * G + g
      const int64_t c = i % C, ng = i / cpg;
      fwd_row<T, kSilu, kRes>(x + i * S, kRes ? r + i * S : nullptr, y + i * S, S,
                              splat(mean[ng]), splat(rstd[ng] * w[c]), splat(b[c]));
    }
  });
}

// ------------------------------------------------- channels-first backward

// Largest group whose dz is kept in a per-thread fp32 scratch between the two
// backward passes (1 MB: within L2); larger groups recompute SiLU'.
constexpr int64_t kMaxDzScratch = 1 << 18;
// Channels-last must keep dz for the whole tensor (pass 2 needs every chunk's
// sums first): worth it while that fp32 scratch (16 MB) can stay in L3.
constexpr int64_t kMaxDzScratchCl = 1 << 22;

// -m1 and -m2 of one group (see bwd_row_dx) from its per-channel sums.
struct GroupGrad {
  float neg_m1, neg_m2;
};

inline GroupGrad group_grad(const double* sum_dz, const double* sum_dz_xhat,
                            const float* w, int64_t cpg, int64_t L) {
  double m1 = 0.0, m2 = 0.0;
  for (int64_t j = 0; j < cpg; ++j) {
    m1 += w[j] * sum_dz[j];
    m2 += w[j] * sum_dz_xhat[j];
  }
  return {static_cast<float>(-m1 / L), static_cast<float>(-m2 / L)};
}

template <typename T, bool kSilu>
void bwd_cf(const T* dy, const T* x, T* dx, const float* w, const float* b,
            const float* mean, const float* rstd, const Shape& sh, double* sum_dz,
            double* sum_dz_xhat) {
  const int64_t C = sh.C, S = sh.S, G = sh.G, cpg = sh.cpg(), L = sh.group_elems();
  // i = n * C + c, and i / cpg = n * G + g. dz_group: scratch for the group's
  // dz (only with SiLU), or nullptr to recompute it in the dx pass.
  auto row_sums = [&](int64_t i, float* dz_group) {
    const int64_t c = i % C, ng = i / cpg;
    bwd_row_sums<T, kSilu>(x + i * S, dy + i * S, S, splat(mean[ng]), splat(rstd[ng]),
                           splat(w[c]), splat(b[c]), sum_dz[i], sum_dz_xhat[i],
                           dz_group ? dz_group + (i % cpg) * S : nullptr);
  };
  auto group_dx = [&](int64_t ng, const float* dz_group) {
    const int64_t c0 = (ng % G) * cpg, i0 = ng * cpg;
    const GroupGrad gg = group_grad(sum_dz + i0, sum_dz_xhat + i0, w + c0, cpg, L);
    for (int64_t j = 0; j < cpg; ++j) {
      const int64_t off = (i0 + j) * S, c = c0 + j;
      const vfloat m = splat(mean[ng]), rs = splat(rstd[ng]), wc = splat(w[c]),
                   bc = splat(b[c]), nm1 = splat(gg.neg_m1), nm2 = splat(gg.neg_m2);
      if (!kSilu)  // dz is dy
        bwd_row_dx<T, false>(x + off, dy + off, dx + off, S, m, rs, wc, bc, nm1, nm2);
      else if (dz_group)
        bwd_row_dx<T, false>(x + off, dz_group + j * S, dx + off, S, m, rs, wc, bc, nm1, nm2);
      else
        bwd_row_dx<T, true>(x + off, dy + off, dx + off, S, m, rs, wc, bc, nm1, nm2);
    }
  };
  if (sh.N * G >= at::get_num_threads()) {
    // Fused per group: the dx pass re-reads x (and dy or dz) from L2.
    const bool keep_dz = kSilu && L <= kMaxDzScratch;
    at::parallel_for(0, sh.N * G, grain_for(2 * L), [&](int64_t begin, int64_t end) {
      std::vector<float> scratch(keep_dz ? L : 0);
      float* dz_group = keep_dz ? scratch.data() : nullptr;
      for (int64_t ng = begin; ng < end; ++ng) {
        for (int64_t j = 0; j < cpg; ++j) row_sums(ng * cpg + j, dz_group);
        group_dx(ng, dz_group);
      }
    });
  } else {
    at::parallel_for(0, sh.N * C, grain_for(S), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) row_sums(i, nullptr);
    });
    at::parallel_for(0, sh.N * G, 1, [&](int64_t begin, int64_t end) {
      for (int64_t ng = begin; ng < end; ++ng) group_dx(ng, nullptr);
    });
  }
}

// ------------------------------------------------------ channels-last paths

// x viewed as (N, S, C): rows of C channels, split into per_n chunks of about
// kChunkElems elements per sample, with sizes evened out (no 1-row tail
// chunk paying the per-chunk group bookkeeping on its own).
struct Chunks {
  int64_t rows, per_n;
  explicit Chunks(const Shape& sh) {
    const int64_t target = std::max(kMinChunkRows, kChunkElems / std::max<int64_t>(sh.C, 1));
    per_n = std::max<int64_t>(1, (sh.S + target - 1) / target);
    rows = std::max<int64_t>(1, (sh.S + per_n - 1) / per_n);
  }
  int64_t grain(const Shape& sh) const { return grain_for(rows * sh.C); }
  // Task t covers rows [begin, end) of sample n.
  int64_t n(int64_t t) const { return t / per_n; }
  int64_t begin(int64_t t) const { return t % per_n * rows; }
  int64_t end(int64_t t, int64_t S) const { return std::min(S, begin(t) + rows); }
};

// Per-channel sums over `nrows` rows (leading dimension ld) of v = x - center
// and, with kSq, of v^2. U vectors of channels stay in registers while the
// rows stream past; only the last vector may be partial (`last` lanes).
template <typename T, bool kSq, int U>
FG_INLINE void column_block(const T* x, int64_t nrows, int64_t ld, const float* center,
                            float* sum, float* sq, int64_t last) {
  auto cnt = [last](int k) { return k == U - 1 ? last : kW; };
  vfloat m[U], s[U] = {}, q[U] = {};
  for (int k = 0; k < U; ++k) m[k] = load_n(center + k * kW, cnt(k));
  for (int64_t row = 0; row < nrows; ++row)
    for (int k = 0; k < U; ++k) {
      const vfloat v = load_n(x + row * ld + k * kW, cnt(k)) - m[k];
      s[k] += v;
      if (kSq) q[k] = vfma(v, v, q[k]);
    }
  for (int k = 0; k < U; ++k) {
    store_n(sum + k * kW, s[k], cnt(k));
    if (kSq) store_n(sq + k * kW, q[k], cnt(k));
  }
}

template <typename T, bool kSq>
void column_sums(const T* x, int64_t nrows, int64_t C, const float* center, float* sum,
                 float* sq) {
  int64_t c0 = 0;
  for (; c0 + 4 * kW <= C; c0 += 4 * kW)
    column_block<T, kSq, 4>(x + c0, nrows, C, center + c0, sum + c0, kSq ? sq + c0 : nullptr,
                            kW);
  for (; c0 < C; c0 += kW)
    column_block<T, kSq, 1>(x + c0, nrows, C, center + c0, sum + c0, kSq ? sq + c0 : nullptr,
                            std::min(kW, C - c0));
}

// Moments of every group within `nrows` rows of one sample (corrected
// two-pass: per-channel sums, group means, then deviations from them).
template <typename T>
void cl_chunk_moments(const T* x, int64_t nrows, const Shape& sh, float* scratch,
                      Moments* out) {
  const int64_t C = sh.C, cpg = sh.cpg();
  float* zero = scratch;  // kept all zero by the caller
  float* mean_c = scratch + C;
  float* dev = scratch + 2 * C;
  float* sq = scratch + 3 * C;
  column_sums<T, false>(x, nrows, C, zero, dev, nullptr);
  const double cnt_g = static_cast<double>(nrows * cpg);
  for (int64_t g = 0; g < sh.G; ++g) {
    double s = 0.0;
    for (int64_t j = 0; j < cpg; ++j) s += dev[g * cpg + j];
    std::fill(mean_c + g * cpg, mean_c + (g + 1) * cpg, static_cast<float>(s / cnt_g));
  }
  column_sums<T, true>(x, nrows, C, mean_c, dev, sq);
  for (int64_t g = 0; g < sh.G; ++g) {
    double d = 0.0, q = 0.0;
    for (int64_t j = 0; j < cpg; ++j) {
      d += dev[g * cpg + j];
      q += sq[g * cpg + j];
    }
    out[g] = Moments::from_deviations(cnt_g, mean_c[g * cpg], d, q);
  }
}

// Broadcast per-(n, g) values to per-(n, c) arrays for the C-vectorised loops.
inline std::vector<float> expand_groups(const float* per_group, const Shape& sh) {
  std::vector<float> per_c(sh.N * sh.C);
  for (int64_t ng = 0; ng < sh.N * sh.G; ++ng)
    std::fill_n(per_c.begin() + ng * sh.cpg(), sh.cpg(), per_group[ng]);
  return per_c;
}

template <typename T, bool kSilu, bool kRes>
void fwd_cl(const T* x, const T* r, T* y, const float* w, const float* b,
            const Shape& sh, double eps, float* mean, float* rstd) {
  const int64_t C = sh.C, S = sh.S, G = sh.G;
  const Chunks ch(sh);
  std::vector<Moments> chunk_mom(sh.N * ch.per_n * G);
  at::parallel_for(0, sh.N * ch.per_n, ch.grain(sh), [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(4 * C, 0.0f);
    for (int64_t t = begin; t < end; ++t)
      cl_chunk_moments(x + (ch.n(t) * S + ch.begin(t)) * C, ch.end(t, S) - ch.begin(t), sh,
                       scratch.data(), chunk_mom.data() + t * G);
  });
  for (int64_t ng = 0; ng < sh.N * G; ++ng) {
    const int64_t n = ng / G, g = ng % G;
    Moments mo;
    for (int64_t k = 0; k < ch.per_n; ++k) mo.merge(chunk_mom[(n * ch.per_n + k) * G + g]);
    mean[ng] = static_cast<float>(mo.mean);
    rstd[ng] = rstd_of(mo, eps);
  }
  const std::vector<float> mean_c = expand_groups(mean, sh);
  std::vector<float> scale_c = expand_groups(rstd, sh);
  for (int64_t n = 0; n < sh.N; ++n)
    for (int64_t c = 0; c < C; ++c) scale_c[n * C + c] *= w[c];

  at::parallel_for(0, sh.N * ch.per_n, ch.grain(sh), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* mc = mean_c.data() + ch.n(t) * C;
      const float* sc = scale_c.data() + ch.n(t) * C;
      for (int64_t s = ch.begin(t); s < ch.end(t, S); ++s) {
        const int64_t off = (ch.n(t) * S + s) * C;
        fwd_row<T, kSilu, kRes>(x + off, kRes ? r + off : nullptr, y + off, C, mc, sc, b);
      }
    }
  });
}

template <typename T, bool kSilu>
void bwd_cl(const T* dy, const T* x, T* dx, const float* w, const float* b,
            const float* mean, const float* rstd, const Shape& sh, double* sum_dz,
            double* sum_dz_xhat) {
  const int64_t C = sh.C, S = sh.S, G = sh.G, cpg = sh.cpg();
  const Chunks ch(sh);
  const std::vector<float> mean_c = expand_groups(mean, sh), rstd_c = expand_groups(rstd, sh);

  // Pass 1: per-chunk, per-channel sums of dz and dz * xhat. With SiLU and a
  // tensor small enough to stay in cache, dz is kept for pass 2 as well.
  const bool keep_dz = kSilu && sh.N * S * C <= kMaxDzScratchCl;
  at::Tensor dz_all;  // same (n, s, c) indexing as x
  if (keep_dz) dz_all = at::empty({sh.N * S * C}, at::kFloat);
  float* dzp = keep_dz ? dz_all.mutable_data_ptr<float>() : nullptr;
  std::vector<float> part(sh.N * ch.per_n * 2 * C);
  at::parallel_for(0, sh.N * ch.per_n, ch.grain(sh), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      float* p = part.data() + t * 2 * C;
      const int64_t n = ch.n(t), off = (n * S + ch.begin(t)) * C;
      bwd_chunk_sums_cl<T, kSilu>(x + off, dy + off, ch.end(t, S) - ch.begin(t), C,
                                  mean_c.data() + n * C, rstd_c.data() + n * C, w, b, p,
                                  p + C, keep_dz ? dzp + off : nullptr);
    }
  });

  // Merge chunks per (n, c), then per-(n, g) coefficients broadcast to C.
  std::vector<float> nm1_c(sh.N * C), nm2_c(sh.N * C);
  for (int64_t n = 0; n < sh.N; ++n) {
    for (int64_t c = 0; c < C; ++c) {
      double s1 = 0.0, s2 = 0.0;
      for (int64_t k = 0; k < ch.per_n; ++k) {
        const float* p = part.data() + (n * ch.per_n + k) * 2 * C;
        s1 += p[c];
        s2 += p[C + c];
      }
      sum_dz[n * C + c] = s1;
      sum_dz_xhat[n * C + c] = s2;
    }
    for (int64_t g = 0; g < G; ++g) {
      const int64_t i0 = n * C + g * cpg;
      const GroupGrad gg = group_grad(sum_dz + i0, sum_dz_xhat + i0, w + g * cpg, cpg, cpg * S);
      std::fill(nm1_c.begin() + i0, nm1_c.begin() + i0 + cpg, gg.neg_m1);
      std::fill(nm2_c.begin() + i0, nm2_c.begin() + i0 + cpg, gg.neg_m2);
    }
  }

  // Pass 2: dx, vectorised along C.
  at::parallel_for(0, sh.N * ch.per_n, ch.grain(sh), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t pc = ch.n(t) * C;
      for (int64_t s = ch.begin(t); s < ch.end(t, S); ++s) {
        const int64_t off = (ch.n(t) * S + s) * C;
        if (keep_dz)
          bwd_row_dx<T, false, float, const float*>(x + off, dzp + off, dx + off, C,
                                                    mean_c.data() + pc, rstd_c.data() + pc,
                                                    w, b, nm1_c.data() + pc, nm2_c.data() + pc);
        else
          bwd_row_dx<T, kSilu, T, const float*>(x + off, dy + off, dx + off, C,
                                                mean_c.data() + pc, rstd_c.data() + pc, w, b,
                                                nm1_c.data() + pc, nm2_c.data() + pc);
      }
    }
  });
}

// ------------------------------------------------------- layout & checks

// True when memory order is (N, *spatial, C) without gaps. Strides of size-1
// dims are ignored, as PyTorch does.
bool is_channels_last_dense(const at::Tensor& t) {
  int64_t expected = 1;
  auto step = [&](int64_t d) {
    if (t.size(d) != 1 && t.stride(d) != expected) return false;
    expected *= t.size(d);
    return true;
  };
  if (!step(1)) return false;
  for (int64_t d = t.dim() - 1; d >= 2; --d)
    if (!step(d)) return false;
  return step(0);
}

// t (same sizes as x) in x's layout: as is when it already is, else a copy.
at::Tensor like_layout(const at::Tensor& t, const at::Tensor& x, bool cl) {
  const bool same = cl ? (!t.is_contiguous() && is_channels_last_dense(t)) : t.is_contiguous();
  return same ? t : at::empty_like(x).copy_(t);
}

void check_dtype(const at::Tensor& x) {
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "fastgen group_norm (cpu): expected x of dtype float32, float16 or "
              "bfloat16, got ", dt);
}

at::Tensor checked_param(const at::Tensor& p, const char* name, int64_t C) {
  TORCH_CHECK(p.defined() && p.device().is_cpu() && p.scalar_type() == at::kFloat &&
                  p.numel() == C,
              "fastgen group_norm (cpu): expected ", name,
              " to be a float32 CPU tensor of C=", C, " elements, got ",
              p.defined() ? c10::toString(p.scalar_type()) : "undefined", " with ",
              p.defined() ? p.numel() : 0, " elements");
  return p.contiguous();
}

Shape checked_shape(const at::Tensor& x, int64_t num_groups) {
  TORCH_CHECK(x.device().is_cpu(), "fastgen group_norm (cpu): expected a CPU tensor");
  TORCH_CHECK(x.dim() >= 2 && x.dim() <= 5,
              "fastgen group_norm (cpu): expected x of shape (N, C, *spatial) with 0-3 "
              "spatial dims, got ", x.sizes());
  Shape sh{x.size(0), x.size(1), 1, num_groups};
  for (int64_t d = 2; d < x.dim(); ++d) sh.S *= x.size(d);
  TORCH_CHECK(num_groups > 0 && sh.C % num_groups == 0,
              "fastgen group_norm (cpu): expected num_groups > 0 dividing C=", sh.C,
              ", got num_groups=", num_groups);
  return sh;
}

// Chooses the kernel layout: channels-last when x is, else channels-first
// (a copy when x is neither, which the Python layer does not send).
at::Tensor with_kernel_layout(const at::Tensor& x, bool& cl) {
  cl = !x.is_contiguous() && is_channels_last_dense(x);
  return (cl || x.is_contiguous()) ? x : x.contiguous();
}

// Calls f(T{}, flag_a, flag_b) with the dtype and both flags as compile-time
// constants (std::bool_constant).
template <typename F>
void dispatch(at::ScalarType dt, bool flag_a, bool flag_b, F&& f) {
  auto with_flags = [&](auto tag) {
    using T = decltype(tag);
    if (flag_a && flag_b) f(T{}, std::true_type{}, std::true_type{});
    else if (flag_a) f(T{}, std::true_type{}, std::false_type{});
    else if (flag_b) f(T{}, std::false_type{}, std::true_type{});
    else f(T{}, std::false_type{}, std::false_type{});
  };
  switch (dt) {
    case at::kFloat: with_flags(float{}); break;
    case at::kHalf: with_flags(c10::Half{}); break;
    case at::kBFloat16: with_flags(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, "fastgen group_norm (cpu): unsupported dtype ", dt);
  }
}

}  // namespace

Tensor3 group_norm_fwd_cpu(const at::Tensor& x_in, const at::Tensor& weight,
                           const at::Tensor& bias,
                           const std::optional<at::Tensor>& residual,
                           int64_t num_groups, double eps, bool silu) {
  check_dtype(x_in);
  const Shape sh = checked_shape(x_in, num_groups);
  const at::Tensor w = checked_param(weight, "weight", sh.C);
  const at::Tensor b = checked_param(bias, "bias", sh.C);
  bool cl = false;
  const at::Tensor x = with_kernel_layout(x_in, cl);

  at::Tensor r;
  const bool has_res = residual.has_value() && residual->defined();
  if (has_res) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type() &&
                    residual->device().is_cpu(),
                "fastgen group_norm (cpu): expected residual of shape ", x.sizes(),
                " and dtype ", x.scalar_type(), " on CPU, got ", residual->sizes(), " and ",
                residual->scalar_type());
    r = like_layout(*residual, x, cl);
  }

  at::Tensor y = at::empty_like(x);
  const auto fopts = x.options().dtype(at::kFloat);
  at::Tensor mean = at::empty({sh.N, sh.G}, fopts);
  at::Tensor rstd = at::empty({sh.N, sh.G}, fopts);
  if (x.numel() == 0) {
    mean.zero_();
    rstd.fill_(1.0 / std::sqrt(eps));
    return {y, mean, rstd};
  }

  dispatch(x.scalar_type(), silu, has_res, [&](auto tag, auto silu_c, auto res_c) {
    using T = decltype(tag);
    constexpr bool kSilu = decltype(silu_c)::value, kRes = decltype(res_c)::value;
    const T* xp = x.const_data_ptr<T>();
    const T* rp = kRes ? r.const_data_ptr<T>() : nullptr;
    T* yp = y.mutable_data_ptr<T>();
    const float* wp = w.const_data_ptr<float>();
    const float* bp = b.const_data_ptr<float>();
    float* mp = mean.mutable_data_ptr<float>();
    float* sp = rstd.mutable_data_ptr<float>();
    if (cl || sh.S == 1)  // S == 1: both layouts coincide; rows of C vectorise
      fwd_cl<T, kSilu, kRes>(xp, rp, yp, wp, bp, sh, eps, mp, sp);
    else if (sh.N * sh.G >= at::get_num_threads())
      fwd_cf_fused<T, kSilu, kRes>(xp, rp, yp, wp, bp, sh, eps, mp, sp);
    else
      fwd_cf_split<T, kSilu, kRes>(xp, rp, yp, wp, bp, sh, eps, mp, sp);
  });
  return {y, mean, rstd};
}

Tensor3 group_norm_bwd_cpu(const at::Tensor& dy_in, const at::Tensor& x_in,
                           const at::Tensor& weight, const at::Tensor& bias,
                           const at::Tensor& mean_in, const at::Tensor& rstd_in,
                           int64_t num_groups, bool silu) {
  check_dtype(x_in);
  const Shape sh = checked_shape(x_in, num_groups);
  const at::Tensor w = checked_param(weight, "weight", sh.C);
  const at::Tensor b = checked_param(bias, "bias", sh.C);
  TORCH_CHECK(dy_in.sizes() == x_in.sizes() && dy_in.scalar_type() == x_in.scalar_type() &&
                  dy_in.device().is_cpu(),
              "fastgen group_norm (cpu): expected dy of shape ", x_in.sizes(), " and dtype ",
              x_in.scalar_type(), " on CPU, got ", dy_in.sizes(), " and ",
              dy_in.scalar_type());
  for (const at::Tensor* t : {&mean_in, &rstd_in})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat &&
                    t->numel() == sh.N * sh.G,
                "fastgen group_norm (cpu): expected mean and rstd as float32 (N, G) = (",
                sh.N, ", ", sh.G, ") CPU tensors");
  bool cl = false;
  const at::Tensor x = with_kernel_layout(x_in, cl);
  const at::Tensor dy = like_layout(dy_in, x, cl);
  const at::Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous();

  at::Tensor dx = at::empty_like(x);
  // Per-(n, c) sums in double; reduced over n below in a fixed order.
  std::vector<double> sum_dz(sh.N * sh.C, 0.0), sum_dz_xhat(sh.N * sh.C, 0.0);
  if (x.numel() > 0) {
    // S == 1: both layouts coincide, and rows of C channels vectorise better.
    dispatch(x.scalar_type(), silu, cl || sh.S == 1, [&](auto tag, auto silu_c, auto cl_c) {
      using T = decltype(tag);
      constexpr bool kSilu = decltype(silu_c)::value;
      const T* dyp = dy.const_data_ptr<T>();
      const T* xp = x.const_data_ptr<T>();
      T* dxp = dx.mutable_data_ptr<T>();
      const float* wp = w.const_data_ptr<float>();
      const float* bp = b.const_data_ptr<float>();
      const float* mp = mean.const_data_ptr<float>();
      const float* sp = rstd.const_data_ptr<float>();
      if (decltype(cl_c)::value)
        bwd_cl<T, kSilu>(dyp, xp, dxp, wp, bp, mp, sp, sh, sum_dz.data(), sum_dz_xhat.data());
      else
        bwd_cf<T, kSilu>(dyp, xp, dxp, wp, bp, mp, sp, sh, sum_dz.data(), sum_dz_xhat.data());
    });
  }

  const auto fopts = x.options().dtype(at::kFloat);
  at::Tensor dweight = at::empty({sh.C}, fopts), dbias = at::empty({sh.C}, fopts);
  float* dwp = dweight.mutable_data_ptr<float>();
  float* dbp = dbias.mutable_data_ptr<float>();
  for (int64_t c = 0; c < sh.C; ++c) {
    double dw = 0.0, db = 0.0;
    for (int64_t n = 0; n < sh.N; ++n) {
      dw += sum_dz_xhat[n * sh.C + c];
      db += sum_dz[n * sh.C + c];
    }
    dwp[c] = static_cast<float>(dw);
    dbp[c] = static_cast<float>(db);
  }
  return {dx, dweight, dbias};
}

}  // namespace fastgen
