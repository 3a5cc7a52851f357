// CPU attention: softmax(q k^T * scale) v, FlashAttention-style.
//
// Contract (see ops.h): q (B,H,Nq,D), k and v (B,H,Nk,D), contiguous, one dtype
// (fp32 / fp16 / bf16). attention_fwd_cpu returns o (q's dtype) and the fp32
// natural-log logsumexp lse (B,H,Nq); attention_bwd_cpu recomputes the
// probabilities from q, k and lse and returns dq, dk, dv. The Nq x Nk matrix is
// never materialised: every thread owns scratch of a few blocks only.
//
// Design
//  * Tiled FlashAttention: never more than a few (query block x key block)
//    tiles per thread; fp32 accumulation, fp32 softmax statistics.
//  * The small GEMMs run through one register-blocked micro-kernel
//    C[MR x N] (= | += | = diag(s) C +) A[MR x K] * B[K x N], N = NV vectors
//    (+ one half vector for row lengths that are an odd multiple of 8, e.g.
//    D = 40), with A read by scalar broadcasts through arbitrary (row, k)
//    strides (so A may be a transposed view for free) and B read as vectors
//    along contiguous rows. W = 16 floats (AVX-512), 8 (AVX2+FMA) or a
//    portable 8-wide loop fallback (FASTGEN_PORTABLE builds).
//  * Forward, one task = (batch*head, block of BQ queries), parallel with
//    at::parallel_for. The query block is packed once as Q^T (D x BQ, times
//    scale*log2(e), 16x16 in-register transposes); each key block of BK keys
//    gives S^T = K_blk Q^T (BK x BQ), so the online softmax (running max m and
//    sum l per query, base-2 exponent) runs down columns: purely vertical
//    vector ops, no horizontal reductions, no masking. Then
//    O = diag(alpha) O + P V. For fp32, K and V are read in place.
//  * Backward (FlashAttention-2 order), one task = (batch*head, a range of
//    key blocks); K^T, V^T, K of a key block are packed once and reused for
//    every query block; dK and dV accumulate in per-task fp32 scratch; dQ
//    accumulates in an fp32 (n_split, B*H, Nq, D) buffer (n_split = number of
//    key ranges per head, 1 unless there are few heads per thread), summed at
//    the end. delta = rowsum(dO * O) is a cheap pre-pass.
//  * fp16 (and bf16 without AVX512_BF16) blocks are converted to fp32 on load.
//    bf16 with AVX512_BF16 and even D >= 16 takes a vdpbf16ps path instead
//    (fwd_bf16 / bwd_bf16 below): same tiling, inputs used as stored, P and dS
//    rounded to bf16 for the GEMMs that consume them, fp32 accumulation;
//    about 1.7x the fp32 path's speed.
//  * exp is a vectorised exp2 (Cephes polynomial on [-0.5, 0.5] + exponent
//    scaling), relative error ~2e-7; every exponent is <= 0 (scores minus the
//    running max, or minus lse), so large logits cannot overflow, and -inf
//    (first block's previous max) gives exactly 0.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <new>
#include <type_traits>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "ops.h"

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define FASTGEN_BF16_DOT 1  // vdpbf16ps path for bf16 inputs
#endif

namespace fastgen {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Cephes exp2f: 2^f = 1 + f * P(f) for f in [-0.5, 0.5].
constexpr float kE0 = 1.535336188319500e-4f;
constexpr float kE1 = 1.339887440266574e-3f;
constexpr float kE2 = 9.618437357674640e-3f;
constexpr float kE3 = 5.550332471162809e-2f;
constexpr float kE4 = 2.402264791363012e-1f;
constexpr float kE5 = 6.931472028550421e-1f;

// ---------------------------------------------------------------------------
// SIMD layer: vf is one native vector of W floats.
// ---------------------------------------------------------------------------
#if defined(__AVX512F__)

constexpr int W = 16;
using vf = __m512;
inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, vf v) { _mm512_storeu_ps(p, v); }
inline vf vset1(float x) { return _mm512_set1_ps(x); }
inline vf vzero() { return _mm512_setzero_ps(); }
inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
inline vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }
inline float vhsum(vf a) { return _mm512_reduce_add_ps(a); }
// 2^x for finite x of any magnitude (scalef saturates to 0 / inf).
inline vf vexp2_finite(vf x) {
  const vf n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const vf f = _mm512_sub_ps(x, n);
  vf p = _mm512_fmadd_ps(_mm512_set1_ps(kE0), f, _mm512_set1_ps(kE1));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kE2));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kE3));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kE4));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kE5));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}
// 2^x, also for x = -inf (-> 0). max/min with the constant first: NaN propagates.
inline vf vexp2(vf x) {
  x = _mm512_max_ps(_mm512_set1_ps(-127.f), x);
  x = _mm512_min_ps(_mm512_set1_ps(127.f), x);
  return vexp2_finite(x);
}
// Half vector (8 floats) for row lengths that are an odd multiple of 8
// (D = 40, 72, ...): a 256-bit FMA costs half a 512-bit one.
constexpr int G = 8;  // granule of GEMM row lengths
using vh = __m256;
inline vh hload(const float* p) { return _mm256_loadu_ps(p); }
inline void hstore(float* p, vh v) { _mm256_storeu_ps(p, v); }
inline vh hzero() { return _mm256_setzero_ps(); }
inline vh hlow(vf v) { return _mm512_castps512_ps256(v); }
inline vh hfma(vh a, vh b, vh c) { return _mm256_fmadd_ps(a, b, c); }
inline vh hmul(vh a, vh b) { return _mm256_mul_ps(a, b); }
// Micro-kernel shapes: accumulators MR x NV (<= 24 of the 32 zmm registers).
constexpr int kMaxNV = 4;
constexpr int mr_for(int nv) { return nv >= 4 ? 6 : 8; }

#elif defined(__AVX2__) && defined(__FMA__)

constexpr int W = 8;
using vf = __m256;
inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, vf v) { _mm256_storeu_ps(p, v); }
inline vf vset1(float x) { return _mm256_set1_ps(x); }
inline vf vzero() { return _mm256_setzero_ps(); }
inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
inline vf vsub(vf a, vf b) { return _mm256_sub_ps(a, b); }
inline vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }
inline float vhsum(vf a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline vf vexp2(vf x) {
  x = _mm256_max_ps(_mm256_set1_ps(-127.f), x);
  x = _mm256_min_ps(_mm256_set1_ps(127.f), x);
  const vf n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const vf f = _mm256_sub_ps(x, n);
  vf p = _mm256_fmadd_ps(_mm256_set1_ps(kE0), f, _mm256_set1_ps(kE1));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kE2));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kE3));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kE4));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kE5));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
  // 2^n via the exponent field; n = -127 gives the bit pattern 0, i.e. 0.f.
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
inline vf vexp2_finite(vf x) { return vexp2(x); }
constexpr int G = W;  // no half vectors: the helpers below are never used
using vh = vf;
inline vh hload(const float* p) { return vload(p); }
inline void hstore(float* p, vh v) { vstore(p, v); }
inline vh hzero() { return vzero(); }
inline vh hlow(vf v) { return v; }
inline vh hfma(vh a, vh b, vh c) { return vfma(a, b, c); }
inline vh hmul(vh a, vh b) { return vmul(a, b); }
constexpr int kMaxNV = 3;
constexpr int mr_for(int nv) { return nv >= 3 ? 4 : (nv == 2 ? 6 : 8); }

#else  // portable fallback: plain loops the compiler may vectorise

constexpr int W = 8;
struct vf {
  float v[W];
};
inline vf vload(const float* p) {
  vf r;
  for (int i = 0; i < W; ++i) r.v[i] = p[i];
  return r;
}
inline void vstore(float* p, vf a) {
  for (int i = 0; i < W; ++i) p[i] = a.v[i];
}
inline vf vset1(float x) {
  vf r;
  for (int i = 0; i < W; ++i) r.v[i] = x;
  return r;
}
inline vf vzero() { return vset1(0.f); }
inline vf vfma(vf a, vf b, vf c) {
  vf r;
  for (int i = 0; i < W; ++i) r.v[i] = a.v[i] * b.v[i] + c.v[i];
  return r;
}
inline vf vmul(vf a, vf b) {
  vf r;
  for (int i = 0; i < W; ++i) r.v[i] = a.v[i] * b.v[i];
  return r;
}
inline vf vadd(vf a, vf b) {
  vf r;
  for (int i = 0; i < W; ++i) r.v[i] = a.v[i] + b.v[i];
  return r;
}
inline vf vsub(vf a, vf b) {
  vf r;
  for (int i = 0; i < W; ++i) r.v[i] = a.v[i] - b.v[i];
  return r;
}
inline vf vmax(vf a, vf b) {
  vf r;
  for (int i = 0; i < W; ++i) r.v[i] = (a.v[i] > b.v[i] || b.v[i] != b.v[i]) ? a.v[i] : b.v[i];
  return r;
}
inline float vhsum(vf a) {
  float s = 0.f;
  for (int i = 0; i < W; ++i) s += a.v[i];
  return s;
}
inline float exp2_scalar(float x) {
  const float xc = std::min(std::max(x, -127.f), 127.f);  // NaN stays NaN
  const float xs = xc == xc ? xc : 0.f;
  const float n = (xs + 12582912.f) - 12582912.f;  // round to nearest (|xs| <= 127)
  const float f = xs - n;
  float p = kE0 * f + kE1;
  p = p * f + kE2;
  p = p * f + kE3;
  p = p * f + kE4;
  p = p * f + kE5;
  p = p * f + 1.f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float s;
  std::memcpy(&s, &bits, sizeof(s));  // n = -127 -> 0.f
  return xc == xc ? p * s : x;
}
inline vf vexp2(vf x) {
  vf r;
  for (int i = 0; i < W; ++i) r.v[i] = exp2_scalar(x.v[i]);
  return r;
}
inline vf vexp2_finite(vf x) { return vexp2(x); }
constexpr int G = W;  // no half vectors: the helpers below are never used
using vh = vf;
inline vh hload(const float* p) { return vload(p); }
inline void hstore(float* p, vh v) { vstore(p, v); }
inline vh hzero() { return vzero(); }
inline vh hlow(vf v) { return v; }
inline vh hfma(vh a, vh b, vh c) { return vfma(a, b, c); }
inline vh hmul(vh a, vh b) { return vmul(a, b); }
constexpr int kMaxNV = 2;
constexpr int mr_for(int nv) { return nv >= 2 ? 4 : 6; }

#endif

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
inline int64_t cdiv(int64_t x, int64_t m) { return (x + m - 1) / m; }
// Leading dimension of a scratch matrix whose rows are walked with a stride:
// a multiple of W, and not a multiple of 128 bytes (cache-set aliasing).
inline int64_t pad_ld(int64_t n) {
  int64_t ld = round_up(std::max<int64_t>(n, 1), W);
  if ((ld * static_cast<int64_t>(sizeof(float))) % 128 == 0) ld += W;
  return ld;
}

// 64-byte aligned fp32 scratch.
struct Scratch {
  float* p = nullptr;
  explicit Scratch(int64_t n) {
    p = static_cast<float*>(::operator new[](static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(float),
                                             std::align_val_t(64)));
  }
  ~Scratch() { ::operator delete[](p, std::align_val_t(64)); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
};

// ---------------------------------------------------------------------------
// Conversions.
// ---------------------------------------------------------------------------
inline void cvt_to_f32(const float* s, float* d, int64_t n) { std::memcpy(d, s, n * sizeof(float)); }
inline void cvt_to_f32(const at::Half* s, float* d, int64_t n) {
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
inline void cvt_to_f32(const at::BFloat16* s, float* d, int64_t n) {
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
  if constexpr (std::is_same_v<T, at::Half>) {  // round to nearest even, like c10::Half
    for (; i + 16 <= n; i += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i),
                          _mm512_cvtps_ph(vmul(vload(s + i), va), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
#endif
#if defined(FASTGEN_BF16_DOT)
  if constexpr (std::is_same_v<T, at::BFloat16>) {  // round to nearest even, like c10::BFloat16
    for (; i + 16 <= n; i += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i), (__m256i)_mm512_cvtneps_pbh(vmul(vload(s + i), va)));
  }
#endif
  for (; i < n; ++i) d[i] = static_cast<T>(s[i] * a);
}

// ---------------------------------------------------------------------------
// GEMM micro-kernel and driver.
//   C[i][j] (+)= sum_k A[i*ars + k*aks] * B[k*ldb + j],  j < N (N % G == 0)
// MODE 0: C = AB; MODE 1: C += AB; MODE 2: C = diag(rs) C + AB.
// A micro-tile is MR rows x (NV full vectors + H half vector) of C, held in
// registers for the whole K loop; A values are broadcast, B rows loaded.
// ---------------------------------------------------------------------------
//
// BF = true (bf16 dot-product path, AVX512_BF16 only): A and B hold pairs of
// bf16 packed in 32-bit words, K counts pairs, and each step is one
// vdpbf16ps: C += A[.][2k] * B[2k][.] + A[.][2k+1] * B[2k+1][.] in fp32.

template <bool BF>
struct Elem {
  using type = float;
};
template <>
struct Elem<true> {
  using type = uint32_t;
};

template <bool BF>
inline vf bcast(const typename Elem<BF>::type* p) {
#if defined(FASTGEN_BF16_DOT)
  if constexpr (BF) return _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(*p)));
#endif
  return vset1(static_cast<float>(*p));
}
template <bool BF>
inline vf bload(const typename Elem<BF>::type* p) {
  return vload(reinterpret_cast<const float*>(p));
}
template <bool BF>
inline vh bloadh(const typename Elem<BF>::type* p) {
  return hload(reinterpret_cast<const float*>(p));
}
template <bool BF>
inline vf dot(vf x, vf b, vf acc) {
#if defined(FASTGEN_BF16_DOT)
  if constexpr (BF) return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_castps_si512(x), (__m512bh)_mm512_castps_si512(b));
#endif
  return vfma(x, b, acc);
}
template <bool BF>
inline vh doth(vf x, vh b, vh acc) {
#if defined(FASTGEN_BF16_DOT)
  if constexpr (BF)
    return _mm256_dpbf16_ps(acc, (__m256bh)_mm256_castps_si256(hlow(x)), (__m256bh)_mm256_castps_si256(b));
#endif
  return hfma(hlow(x), b, acc);
}

template <bool BF, int MR, int NV, int H, int MODE>
inline void ukernel(int64_t K, const typename Elem<BF>::type* __restrict A, int64_t ars, int64_t aks,
                    const typename Elem<BF>::type* __restrict B, int64_t ldb, float* __restrict C,
                    int64_t ldc, const float* __restrict rs) {
  using E = typename Elem<BF>::type;
  constexpr int NVA = NV > 0 ? NV : 1;
  constexpr int HA = H > 0 ? H : 1;
  vf acc[MR][NVA];
  vh acch[MR][HA];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    if constexpr (MODE == 0) {
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = vzero();
      if constexpr (H) acch[r][0] = hzero();
    } else if constexpr (MODE == 1) {
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = vload(C + r * ldc + v * W);
      if constexpr (H) acch[r][0] = hload(C + r * ldc + NV * W);
    } else {
      const vf s = vset1(rs[r]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = vmul(vload(C + r * ldc + v * W), s);
      if constexpr (H) acch[r][0] = hmul(hload(C + r * ldc + NV * W), hlow(s));
    }
  }
  const E* a[MR];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) a[r] = A + r * ars;
#pragma GCC unroll 2
  for (int64_t k = 0; k < K; ++k) {
    vf b[NVA];
    vh bh[HA];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) b[v] = bload<BF>(B + k * ldb + v * W);
    if constexpr (H) bh[0] = bloadh<BF>(B + k * ldb + NV * W);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const vf x = bcast<BF>(a[r] + k * aks);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = dot<BF>(x, b[v], acc[r][v]);
      if constexpr (H) acch[r][0] = doth<BF>(x, bh[0], acch[r][0]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) vstore(C + r * ldc + v * W, acc[r][v]);
    if constexpr (H) hstore(C + r * ldc + NV * W, acch[r][0]);
  }
}

// Row tail: t < MR rows.
template <bool BF, int NV, int H, int MODE, int T>
inline void ukernel_tail(int t, int64_t K, const typename Elem<BF>::type* A, int64_t ars, int64_t aks,
                         const typename Elem<BF>::type* B, int64_t ldb, float* C, int64_t ldc,
                         const float* rs) {
  if constexpr (T >= 1) {
    if (t == T) {
      ukernel<BF, T, NV, H, MODE>(K, A, ars, aks, B, ldb, C, ldc, rs);
    } else {
      ukernel_tail<BF, NV, H, MODE, T - 1>(t, K, A, ars, aks, B, ldb, C, ldc, rs);
    }
  }
}

template <bool BF, int NV, int H, int MODE>
void gemm_rows(int64_t M, int64_t K, const typename Elem<BF>::type* A, int64_t ars, int64_t aks,
               const typename Elem<BF>::type* B, int64_t ldb, float* C, int64_t ldc, const float* rs) {
  constexpr int MR = mr_for(NV + H);
  int64_t i = 0;
  for (; i + MR <= M; i += MR)
    ukernel<BF, MR, NV, H, MODE>(K, A + i * ars, ars, aks, B, ldb, C + i * ldc, ldc,
                                 rs ? rs + i : nullptr);
  if (i < M)
    ukernel_tail<BF, NV, H, MODE, MR - 1>(static_cast<int>(M - i), K, A + i * ars, ars, aks, B, ldb,
                                          C + i * ldc, ldc, rs ? rs + i : nullptr);
}

// Dispatch on the panel width: nv full vectors (+ h half vector).
template <bool BF, int MODE, int NV>
inline void gemm_nv(int nv, int h, int64_t M, int64_t K, const typename Elem<BF>::type* A,
                    int64_t ars, int64_t aks, const typename Elem<BF>::type* B, int64_t ldb, float* C,
                    int64_t ldc, const float* rs) {
  if constexpr (NV >= 0) {
    if (nv == NV) {
      if constexpr (G < W && NV < kMaxNV) {
        if (h) {
          gemm_rows<BF, NV, 1, MODE>(M, K, A, ars, aks, B, ldb, C, ldc, rs);
          return;
        }
      }
      if constexpr (NV >= 1) gemm_rows<BF, NV, 0, MODE>(M, K, A, ars, aks, B, ldb, C, ldc, rs);
    } else {
      gemm_nv<BF, MODE, NV - 1>(nv, h, M, K, A, ars, aks, B, ldb, C, ldc, rs);
    }
  }
}

// N must be a multiple of G. Column panels of <= kMaxNV vectors (the half
// vector, if any, counts as one and goes to the last panel), balanced.
template <int MODE, bool BF = false>
void gemm(int64_t M, int64_t N, int64_t K, const typename Elem<BF>::type* A, int64_t ars,
          int64_t aks, const typename Elem<BF>::type* B, int64_t ldb, float* C, int64_t ldc,
          const float* rs = nullptr) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) {
        if constexpr (MODE == 0) C[i * ldc + j] = 0.f;
        if constexpr (MODE == 2) C[i * ldc + j] *= rs[i];
      }
    return;
  }
  const int64_t nfull = N / W;
  const int h = (N % W) ? 1 : 0;
  const int64_t total = nfull + h;
  const int64_t panels = cdiv(total, kMaxNV);
  int64_t col = 0;
  for (int64_t p = 0; p < panels; ++p) {
    const int cnt = static_cast<int>(total / panels + (p < total % panels ? 1 : 0));
    const int ph = (p == panels - 1) ? h : 0;
    gemm_nv<BF, MODE, kMaxNV>(cnt - ph, ph, M, K, A, ars, aks, B + col, ldb, C + col, ldc, rs);
    col += static_cast<int64_t>(cnt - ph) * W;
  }
}

// ---------------------------------------------------------------------------
// Transposed packing: dst[c*ldd + r] = mul * src[r*lds + c] for r < rows,
// c < cols, and dst[c*ldd + r] = 0 for rows <= r < round_up(rows, W).
// ---------------------------------------------------------------------------
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

#if defined(FASTGEN_BF16_DOT)
// ---------------------------------------------------------------------------
// bf16 pair packing for the vdpbf16ps path. A "word" holds two bf16 values,
// the one with the even reduction index in the low half.
// ---------------------------------------------------------------------------
// Words of a row-major (rows x cols) word matrix, transposed:
// dst[c*ldd + r] = src[r*lds + c]; zero for rows <= r < round_up(rows, 16).
inline void pack_transposed_bits(const uint32_t* src, int64_t lds, int64_t rows, int64_t cols,
                                 uint32_t* dst, int64_t ldd) {
  const float* s = reinterpret_cast<const float*>(src);
  float* d = reinterpret_cast<float*>(dst);
  for (int64_t r0 = 0; r0 < rows; r0 += 16) {
    const int nr = static_cast<int>(std::min<int64_t>(16, rows - r0));
    for (int64_t c0 = 0; c0 < cols; c0 += 16) {
      const int nc = static_cast<int>(std::min<int64_t>(16, cols - c0));
      tr16<false>(s + r0 * lds + c0, lds, d + c0 * ldd + r0, ldd, nr, nc, _mm512_setzero_ps());
    }
  }
}

// Words (r0[d], r1[d]) for d < n, zero words up to npad (npad % 8 == 0);
// r1 == nullptr means a zero row.
inline void pack_pair_rows(const at::BFloat16* r0, const at::BFloat16* r1, int64_t n, int64_t npad,
                           uint32_t* dst) {
  for (int64_t d0 = 0; d0 < npad; d0 += 16) {
    const int64_t cn = std::max<int64_t>(0, std::min<int64_t>(16, n - d0));
    const __mmask16 ml = static_cast<__mmask16>((1u << cn) - 1u);
    const __m512i a = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(ml, r0 + d0));
    __m512i w = a;
    if (r1) {
      const __m512i b = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(ml, r1 + d0));
      w = _mm512_or_si512(a, _mm512_slli_epi32(b, 16));
    }
    const int64_t sn = std::min<int64_t>(16, npad - d0);
    _mm512_mask_storeu_epi32(dst + d0, static_cast<__mmask16>((1u << sn) - 1u), w);
  }
}

// 16 words (bf16(a[i]), bf16(b[i])), round to nearest even.
inline __m512i pair_bf16(__m512 a, __m512 b) {
  const __m512i x = (__m512i)_mm512_cvtne2ps_pbh(b, a);  // 16-bit lanes: a[0..15], b[0..15]
  const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                       23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(idx, x);
}
#endif

// ---------------------------------------------------------------------------
// Checks.
// ---------------------------------------------------------------------------
void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const char* fn) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, fn,
              ": q, k, v must be 4-D (B, H, N, D); got q ", q.sizes(), ", k ", k.sizes(), ", v ",
              v.sizes());
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), fn,
              ": q, k, v must be CPU tensors");
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, fn,
              ": dtype must be float32, float16 or bfloat16; got ", dt);
  TORCH_CHECK(k.scalar_type() == dt && v.scalar_type() == dt, fn,
              ": q, k, v must have one dtype; got ", dt, ", ", k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(), fn,
              ": q, k, v must be contiguous");
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0) && k.size(1) == q.size(1) &&
                  v.size(1) == q.size(1),
              fn, ": batch and head sizes must match; got q ", q.sizes(), ", k ", k.sizes(), ", v ",
              v.sizes());
  TORCH_CHECK(k.size(3) == q.size(3) && v.size(3) == q.size(3), fn,
              ": head dim D must match (and v's D must equal q's); got q ", q.sizes(), ", k ",
              k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(k.size(2) == v.size(2), fn, ": k and v must have the same number of keys; got k ",
              k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(q.size(3) >= 1, fn, ": head dim must be >= 1");
  TORCH_CHECK(k.size(2) >= 1 || q.size(2) == 0, fn, ": need at least one key (Nk >= 1)");
}

// ---------------------------------------------------------------------------
// Forward.
// ---------------------------------------------------------------------------
template <typename T>
void fwd_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, float scale,
              at::Tensor& o, at::Tensor& lse) {
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), Nk = k.size(2), D = q.size(3);
  const int64_t BH = B * H;
  const int64_t Dp = round_up(D, G);
  const int nthreads = std::max(1, at::get_num_threads());

  // Query block: large enough to amortise packing, small enough that there are
  // a few tasks per thread and the scratch stays in L2.
  int64_t BQ = D <= 128 ? 128 : (D <= 256 ? 96 : 64);
  while (BQ > 32 && BH * cdiv(Nq, BQ) < 4 * nthreads) BQ /= 2;
  BQ = round_up(std::min<int64_t>(BQ, round_up(Nq, W)), W);
  // Key block (balanced).
  int64_t BK = D <= 128 ? 128 : 64;
  BK = cdiv(Nk, cdiv(Nk, BK));
  const int64_t nqb = cdiv(Nq, BQ);
  const int64_t ldq = pad_ld(BQ);  // Q^T and S^T / P^T leading dimension

  constexpr bool is_f32 = std::is_same_v<T, float>;
  const bool v_direct = is_f32 && Dp == D;
  const float c = scale * kLog2e;

  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  T* op = o.data_ptr<T>();
  float* lp = lse.data_ptr<float>();

  at::parallel_for(0, BH * nqb, 1, [&](int64_t t0, int64_t t1) {
    // Per-thread scratch, all O(block).
    const int64_t n_qt = D * ldq;                   // Q^T (scaled), D x BQ
    const int64_t n_s = BK * ldq;                   // S^T then P^T, BK x BQ
    const int64_t n_o = BQ * Dp;                    // O accumulator
    const int64_t n_k = is_f32 ? 0 : std::max(BK, BQ) * D;  // converted K (and Q) block
    const int64_t n_v = v_direct ? 0 : BK * Dp;     // converted / padded V block
    Scratch buf(n_qt + n_s + n_o + n_k + n_v + 3 * ldq);
    float* Qt = buf.p;
    float* S = Qt + n_qt;
    float* O = S + n_s;
    float* Kb = O + n_o;
    float* Vb = Kb + n_k;
    float* m = Vb + n_v;
    float* l = m + ldq;
    float* alpha = l + ldq;

    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bh = t / nqb;
      const int64_t q0 = (t % nqb) * BQ;
      const int64_t nq = std::min(BQ, Nq - q0);
      const int64_t nqp = round_up(nq, W);
      const T* qb = qp + (bh * Nq + q0) * D;
      const T* kbh = kp + bh * Nk * D;
      const T* vbh = vp + bh * Nk * D;

      // Q^T * scale * log2(e), zero columns past nq.
      if constexpr (is_f32) {
        pack_transposed(reinterpret_cast<const float*>(qb), D, nq, D, Qt, ldq, c);
      } else {
        cvt_to_f32(qb, Kb, nq * D);
        pack_transposed(Kb, D, nq, D, Qt, ldq, c);
      }
      for (int64_t i = 0; i < nqp; ++i) {
        m[i] = -std::numeric_limits<float>::infinity();
        l[i] = 0.f;
      }

      for (int64_t k0 = 0; k0 < Nk; k0 += BK) {
        const int64_t nk = std::min(BK, Nk - k0);
        const float* Kf;
        if constexpr (is_f32) {
          Kf = reinterpret_cast<const float*>(kbh + k0 * D);
        } else {
          cvt_to_f32(kbh + k0 * D, Kb, nk * D);
          Kf = Kb;
        }
        const float* Vf;
        if (v_direct) {
          Vf = reinterpret_cast<const float*>(vbh + k0 * D);
        } else {
          for (int64_t j = 0; j < nk; ++j) load_row(vbh + (k0 + j) * D, Vb + j * Dp, D, Dp);
          Vf = Vb;
        }
        // S^T (nk x nqp) = K_blk (nk x D) * Q^T (D x nqp), in log2 units.
        gemm<0>(nk, nqp, D, Kf, D, 1, Qt, ldq, S, ldq);
        // Online softmax down the columns.
        for (int64_t i = 0; i < nqp; i += W) {
          vf mx = vload(m + i);
          const vf mold = mx;
          {
            vf mx1 = mx;
            int64_t j = 0;
            for (; j + 2 <= nk; j += 2) {
              mx = vmax(mx, vload(S + j * ldq + i));
              mx1 = vmax(mx1, vload(S + (j + 1) * ldq + i));
            }
            if (j < nk) mx = vmax(mx, vload(S + j * ldq + i));
            mx = vmax(mx, mx1);
          }
          const vf a = vexp2(vsub(mold, mx));  // exp2(-inf) -> 0 on the first block
          vf s0 = vzero(), s1 = vzero();
          int64_t j = 0;
          for (; j + 2 <= nk; j += 2) {
            const vf p0 = vexp2_finite(vsub(vload(S + j * ldq + i), mx));
            const vf p1 = vexp2_finite(vsub(vload(S + (j + 1) * ldq + i), mx));
            vstore(S + j * ldq + i, p0);
            vstore(S + (j + 1) * ldq + i, p1);
            s0 = vadd(s0, p0);
            s1 = vadd(s1, p1);
          }
          if (j < nk) {
            const vf p0 = vexp2_finite(vsub(vload(S + j * ldq + i), mx));
            vstore(S + j * ldq + i, p0);
            s0 = vadd(s0, p0);
          }
          vstore(l + i, vfma(vload(l + i), a, vadd(s0, s1)));
          vstore(m + i, mx);
          vstore(alpha + i, a);
        }
        // O = diag(alpha) O + P (nq x nk) V_blk (nk x Dp); P read from P^T.
        if (k0 == 0) {
          gemm<0>(nq, Dp, nk, S, 1, ldq, Vf, v_direct ? D : Dp, O, Dp);
        } else {
          gemm<2>(nq, Dp, nk, S, 1, ldq, Vf, v_direct ? D : Dp, O, Dp, alpha);
        }
      }

      // Normalise and write out.
      T* ob = op + (bh * Nq + q0) * D;
      float* lb = lp + bh * Nq + q0;
      for (int64_t i = 0; i < nq; ++i) {
        store_row_scaled(O + i * Dp, 1.f / l[i], ob + i * D, D);
        lb[i] = (m[i] + std::log2(l[i])) * kLn2;
      }
    }
  });
}

// ---------------------------------------------------------------------------
// Backward.
// ---------------------------------------------------------------------------
// delta[r] = sum_d dO[r][d] * O[r][d] in fp32, for rows r < rows.
template <typename T>
void compute_delta(const T* dop, const T* op, float* delta, int64_t rows, int64_t D) {
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
    Scratch tmp(2 * D);
    float* a = tmp.p;
    float* b = a + D;
    for (int64_t r = r0; r < r1; ++r) {
      cvt_to_f32(dop + r * D, a, D);
      cvt_to_f32(op + r * D, b, D);
      vf acc = vzero();
      int64_t d = 0;
      for (; d + W <= D; d += W) acc = vfma(vload(a + d), vload(b + d), acc);
      float sum = vhsum(acc);
      for (; d < D; ++d) sum += a[d] * b[d];
      delta[r] = sum;
    }
  });
}

// dq[r] = sum over the n_split partial fp32 accumulators (rows of Dp floats).
template <typename T>
void reduce_dq(const float* acc, T* dq, int64_t n_split, int64_t rows, int64_t D, int64_t Dp) {
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
    Scratch tmp(Dp);
    for (int64_t r = r0; r < r1; ++r) {
      const float* src = acc + r * Dp;
      if (n_split == 1) {
        store_row(src, dq + r * D, D);
      } else {
        std::memcpy(tmp.p, src, sizeof(float) * D);
        for (int64_t sp = 1; sp < n_split; ++sp) {
          const float* x = src + sp * rows * Dp;
          for (int64_t d = 0; d < D; ++d) tmp.p[d] += x[d];
        }
        store_row(tmp.p, dq + r * D, D);
      }
    }
  });
}

template <typename T>
void bwd_impl(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& o, const at::Tensor& lse, float scale, at::Tensor& dq, at::Tensor& dk,
              at::Tensor& dv) {
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), Nk = k.size(2), D = q.size(3);
  const int64_t BH = B * H;
  const int64_t Dp = round_up(D, G);
  const int nthreads = std::max(1, at::get_num_threads());
  const float c = scale * kLog2e;

  const T* dop = dout.data_ptr<T>();
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const T* op = o.data_ptr<T>();
  const float* lp = lse.data_ptr<float>();
  T* dqp = dq.data_ptr<T>();
  T* dkp = dk.data_ptr<T>();
  T* dvp = dv.data_ptr<T>();

  // delta = rowsum(dO * O), fp32.
  at::Tensor delta_t = at::empty({BH * Nq}, q.options().dtype(at::kFloat));
  float* delta = delta_t.data_ptr<float>();
  compute_delta(dop, op, delta, BH * Nq, D);

  int64_t BQ = D <= 160 ? 128 : 64;  // query block
  int64_t BK = D <= 160 ? 128 : 64;  // key block (dK/dV accumulators)
  BK = cdiv(Nk, cdiv(Nk, BK));
  const int64_t nkb = cdiv(Nk, BK);
  // Key ranges per head: 1 unless the heads alone cannot keep the threads
  // evenly busy (each extra range costs one more fp32 dQ partial buffer).
  int64_t n_split = 1;
  if (BH < 4 * nthreads && BH % nthreads != 0) n_split = std::min<int64_t>(nkb, cdiv(4 * nthreads, BH));
  const int64_t kb_per_split = cdiv(nkb, n_split);
  n_split = cdiv(nkb, kb_per_split);

  const int64_t ldk = pad_ld(BK);  // K^T, V^T, S, dP leading dimension
  const bool qdo_direct = std::is_same_v<T, float> && Dp == D;

  at::Tensor dqacc_t = at::zeros({n_split, BH, Nq, Dp}, q.options().dtype(at::kFloat));
  float* dqacc = dqacc_t.data_ptr<float>();

  at::parallel_for(0, BH * n_split, 1, [&](int64_t t0, int64_t t1) {
    const int64_t n_kt = D * ldk;  // K^T
    const int64_t n_vt = D * ldk;  // V^T
    const int64_t n_kf = BK * Dp;  // K, padded
    const int64_t n_acc = BK * Dp; // dK, dV accumulators
    const int64_t n_sp = BQ * ldk; // S/P and dP/dS
    const int64_t n_q = qdo_direct ? 0 : BQ * Dp;
    const int64_t n_vtmp = std::is_same_v<T, float> ? 0 : BK * D;
    Scratch buf(n_kt + n_vt + n_kf + 2 * n_acc + 2 * n_sp + 2 * n_q + n_vtmp);
    float* Kt = buf.p;
    float* Vt = Kt + n_kt;
    float* Kf = Vt + n_vt;
    float* dK = Kf + n_kf;
    float* dV = dK + n_acc;
    float* S = dV + n_acc;
    float* dP = S + n_sp;
    float* Qb = dP + n_sp;
    float* dOb = Qb + n_q;
    float* Vtmp = dOb + n_q;

    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bh = t / n_split;
      const int64_t sp = t % n_split;
      float* dqa = dqacc + (sp * BH + bh) * Nq * Dp;
      const int64_t kb_end = std::min(nkb, (sp + 1) * kb_per_split);
      for (int64_t kb = sp * kb_per_split; kb < kb_end; ++kb) {
        const int64_t k0 = kb * BK;
        const int64_t nk = std::min(BK, Nk - k0);
        const int64_t nkp = round_up(nk, W);
        const T* kbp = kp + (bh * Nk + k0) * D;
        const T* vbp = vp + (bh * Nk + k0) * D;
        // Pack K^T, V^T (zero columns past nk) and K (zero columns past D).
        for (int64_t j = 0; j < nk; ++j) load_row(kbp + j * D, Kf + j * Dp, D, Dp);
        pack_transposed(Kf, Dp, nk, D, Kt, ldk, 1.f);
        if constexpr (std::is_same_v<T, float>) {
          pack_transposed(reinterpret_cast<const float*>(vbp), D, nk, D, Vt, ldk, 1.f);
        } else {
          cvt_to_f32(vbp, Vtmp, nk * D);
          pack_transposed(Vtmp, D, nk, D, Vt, ldk, 1.f);
        }
        std::memset(dK, 0, sizeof(float) * nk * Dp);
        std::memset(dV, 0, sizeof(float) * nk * Dp);

        for (int64_t q0 = 0; q0 < Nq; q0 += BQ) {
          const int64_t nq = std::min(BQ, Nq - q0);
          const T* qb = qp + (bh * Nq + q0) * D;
          const T* dob = dop + (bh * Nq + q0) * D;
          const float* Qf;
          const float* dOf;
          if (qdo_direct) {
            Qf = reinterpret_cast<const float*>(qb);
            dOf = reinterpret_cast<const float*>(dob);
          } else {
            for (int64_t i = 0; i < nq; ++i) {
              load_row(qb + i * D, Qb + i * Dp, D, Dp);
              load_row(dob + i * D, dOb + i * Dp, D, Dp);
            }
            Qf = Qb;
            dOf = dOb;
          }
          // S = Q K^T, dP = dO V^T (nq x nkp).
          gemm<0>(nq, nkp, D, Qf, Dp, 1, Kt, ldk, S, ldk);
          gemm<0>(nq, nkp, D, dOf, Dp, 1, Vt, ldk, dP, ldk);
          // P = exp(scale*S - lse); dS = scale * P * (dP - delta).
          const float* lb = lp + bh * Nq + q0;
          const float* db = delta + bh * Nq + q0;
          const vf vc = vset1(c);
          const vf vscale = vset1(scale);
          for (int64_t i = 0; i < nq; ++i) {
            const vf nl = vset1(-lb[i] * kLog2e);
            const vf dl = vset1(db[i]);
            float* s = S + i * ldk;
            float* g = dP + i * ldk;
            for (int64_t j = 0; j < nkp; j += W) {
              const vf p = vexp2_finite(vfma(vload(s + j), vc, nl));
              vstore(s + j, p);
              vstore(g + j, vmul(vmul(p, vscale), vsub(vload(g + j), dl)));
            }
          }
          // dV += P^T dO, dK += dS^T Q (nk x Dp).
          gemm<1>(nk, Dp, nq, S, 1, ldk, dOf, Dp, dV, Dp);
          gemm<1>(nk, Dp, nq, dP, 1, ldk, Qf, Dp, dK, Dp);
          // dQ += dS K (nq x Dp).
          gemm<1>(nq, Dp, nk, dP, ldk, 1, Kf, Dp, dqa + q0 * Dp, Dp);
        }
        T* dkb = dkp + (bh * Nk + k0) * D;
        T* dvb = dvp + (bh * Nk + k0) * D;
        for (int64_t j = 0; j < nk; ++j) {
          store_row(dK + j * Dp, dkb + j * D, D);
          store_row(dV + j * Dp, dvb + j * D, D);
        }
      }
    }
  });

  reduce_dq(dqacc, dqp, n_split, BH * Nq, D, Dp);
}

#if defined(FASTGEN_BF16_DOT)
// ---------------------------------------------------------------------------
// bf16 with AVX512_BF16 (even D): the GEMMs run on vdpbf16ps (bf16 x bf16
// products, fp32 accumulation, twice the fp32 FMA rate). Same blocking as the
// fp32 path; q, k, v, do are used as stored (bf16 pairs along D), P and dS
// are rounded to bf16 before the GEMMs that consume them (as torch's SDPA
// does); softmax statistics, O, dQ, dK, dV accumulate in fp32.
// ---------------------------------------------------------------------------
void fwd_bf16(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, float scale,
              at::Tensor& o, at::Tensor& lse) {
  using T = at::BFloat16;
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), Nk = k.size(2), D = q.size(3);
  const int64_t BH = B * H;
  const int64_t D2 = D / 2;  // words per row
  const int64_t Dp = round_up(D, G);
  const int nthreads = std::max(1, at::get_num_threads());

  int64_t BQ = D <= 128 ? 128 : (D <= 256 ? 96 : 64);
  while (BQ > 32 && BH * cdiv(Nq, BQ) < 4 * nthreads) BQ /= 2;
  BQ = round_up(std::min<int64_t>(BQ, round_up(Nq, W)), W);
  int64_t BK = D <= 128 ? 128 : 64;
  BK = round_up(cdiv(Nk, cdiv(Nk, BK)), 2);
  const int64_t nqb = cdiv(Nq, BQ);
  const int64_t ldq = pad_ld(BQ);
  const float c = scale * kLog2e;

  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  T* op = o.data_ptr<T>();
  float* lp = lse.data_ptr<float>();

  at::parallel_for(0, BH * nqb, 1, [&](int64_t t0, int64_t t1) {
    const int64_t n_qt = D2 * ldq;       // Q^T pairs (words)
    const int64_t n_s = BK * ldq;        // S^T (fp32), then P^T pairs (words) in place
    const int64_t n_o = BQ * Dp;         // O accumulator
    const int64_t n_v = (BK / 2) * Dp;   // V pairs (words)
    Scratch buf(n_qt + n_s + n_o + n_v + 3 * ldq);
    uint32_t* Qt = reinterpret_cast<uint32_t*>(buf.p);
    float* S = buf.p + n_qt;
    uint32_t* Pw = reinterpret_cast<uint32_t*>(S);
    float* O = S + n_s;
    uint32_t* Vw = reinterpret_cast<uint32_t*>(O + n_o);
    float* m = O + n_o + n_v;
    float* l = m + ldq;
    float* alpha = l + ldq;
    const vf vc = vset1(c);

    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bh = t / nqb;
      const int64_t q0 = (t % nqb) * BQ;
      const int64_t nq = std::min(BQ, Nq - q0);
      const int64_t nqp = round_up(nq, W);
      const T* qb = qp + (bh * Nq + q0) * D;
      const T* kbh = kp + bh * Nk * D;
      const T* vbh = vp + bh * Nk * D;

      pack_transposed_bits(reinterpret_cast<const uint32_t*>(qb), D2, nq, D2, Qt, ldq);
      for (int64_t i = 0; i < nqp; ++i) {
        m[i] = -std::numeric_limits<float>::infinity();
        l[i] = 0.f;
      }

      for (int64_t k0 = 0; k0 < Nk; k0 += BK) {
        const int64_t nk = std::min(BK, Nk - k0);
        const int64_t nk2 = cdiv(nk, 2);
        // S^T (nk x nqp) = K_blk Q^T (unscaled).
        gemm<0, true>(nk, nqp, D2, reinterpret_cast<const uint32_t*>(kbh + k0 * D), D2, 1, Qt, ldq,
                      S, ldq);
        for (int64_t u = 0; u < nk2; ++u) {
          const T* r0 = vbh + (k0 + 2 * u) * D;
          pack_pair_rows(r0, 2 * u + 1 < nk ? r0 + D : nullptr, D, Dp, Vw + u * Dp);
        }
        for (int64_t i = 0; i < nqp; i += W) {
          vf mx = vload(m + i);
          const vf mold = mx;
          if (c > 0.f) {  // max(c * s) = c * max(s)
            vf r0 = vload(S + i), r1 = r0;
            int64_t j = 1;
            for (; j + 2 <= nk; j += 2) {
              r0 = vmax(r0, vload(S + j * ldq + i));
              r1 = vmax(r1, vload(S + (j + 1) * ldq + i));
            }
            if (j < nk) r0 = vmax(r0, vload(S + j * ldq + i));
            mx = vmax(mx, vmul(vmax(r0, r1), vc));
          } else {
            for (int64_t j = 0; j < nk; ++j) mx = vmax(mx, vmul(vload(S + j * ldq + i), vc));
          }
          const vf a = vexp2(vsub(mold, mx));
          const vf nmx = vsub(vzero(), mx);
          vf s0 = vzero(), s1 = vzero();
          for (int64_t j = 0; j < nk; j += 2) {
            // Rows j, j+1 of S^T are read before word row j/2 (<= j) is written.
            const vf p0 = vexp2_finite(vfma(vload(S + j * ldq + i), vc, nmx));
            const vf p1 = j + 1 < nk ? vexp2_finite(vfma(vload(S + (j + 1) * ldq + i), vc, nmx)) : vzero();
            s0 = vadd(s0, p0);
            s1 = vadd(s1, p1);
            _mm512_storeu_si512(Pw + (j / 2) * ldq + i, pair_bf16(p0, p1));
          }
          vstore(l + i, vfma(vload(l + i), a, vadd(s0, s1)));
          vstore(m + i, mx);
          vstore(alpha + i, a);
        }
        if (k0 == 0) {
          gemm<0, true>(nq, Dp, nk2, Pw, 1, ldq, Vw, Dp, O, Dp);
        } else {
          gemm<2, true>(nq, Dp, nk2, Pw, 1, ldq, Vw, Dp, O, Dp, alpha);
        }
      }

      T* ob = op + (bh * Nq + q0) * D;
      float* lb = lp + bh * Nq + q0;
      for (int64_t i = 0; i < nq; ++i) {
        store_row_scaled(O + i * Dp, 1.f / l[i], ob + i * D, D);
        lb[i] = (m[i] + std::log2(l[i])) * kLn2;
      }
    }
  });
}

void bwd_bf16(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& o, const at::Tensor& lse, float scale, at::Tensor& dq, at::Tensor& dk,
              at::Tensor& dv) {
  using T = at::BFloat16;
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), Nk = k.size(2), D = q.size(3);
  const int64_t BH = B * H;
  const int64_t D2 = D / 2;
  const int64_t Dp = round_up(D, G);
  const int nthreads = std::max(1, at::get_num_threads());
  const float c = scale * kLog2e;

  const T* dop = dout.data_ptr<T>();
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const T* op = o.data_ptr<T>();
  const float* lp = lse.data_ptr<float>();
  T* dqp = dq.data_ptr<T>();
  T* dkp = dk.data_ptr<T>();
  T* dvp = dv.data_ptr<T>();

  at::Tensor delta_t = at::empty({BH * Nq}, q.options().dtype(at::kFloat));
  float* delta = delta_t.data_ptr<float>();
  compute_delta(dop, op, delta, BH * Nq, D);

  int64_t BQ = D <= 160 ? 128 : 64;
  int64_t BK = D <= 160 ? 128 : 64;
  BK = round_up(cdiv(Nk, cdiv(Nk, BK)), 2);
  const int64_t nkb = cdiv(Nk, BK);
  int64_t n_split = 1;
  if (BH < 4 * nthreads && BH % nthreads != 0) n_split = std::min<int64_t>(nkb, cdiv(4 * nthreads, BH));
  const int64_t kb_per_split = cdiv(nkb, n_split);
  n_split = cdiv(nkb, kb_per_split);
  const int64_t ldk = pad_ld(BK);  // words / floats per row of K^T, V^T, S, dP
  const int64_t ldr = pad_ld(BK);  // words per row of dS (row-major bf16 pairs use ldk/2 of them)

  at::Tensor dqacc_t = at::zeros({n_split, BH, Nq, Dp}, q.options().dtype(at::kFloat));
  float* dqacc = dqacc_t.data_ptr<float>();

  at::parallel_for(0, BH * n_split, 1, [&](int64_t t0, int64_t t1) {
    const int64_t n_kt = D2 * ldk;            // K^T pairs along D (words)
    const int64_t n_kq = (BK / 2) * Dp;       // K pairs along keys (words)
    const int64_t n_acc = BK * Dp;            // dK, dV
    const int64_t n_sp = BQ * ldk;            // S -> P pairs, dP -> dS pairs
    const int64_t n_ds = BQ * ldr / 2 + 16;   // dS row-major bf16
    const int64_t n_qq = (BQ / 2) * Dp;       // Q, dO pairs along queries
    Scratch buf(2 * n_kt + n_kq + 2 * n_acc + 2 * n_sp + n_ds + 2 * n_qq);
    uint32_t* Kt = reinterpret_cast<uint32_t*>(buf.p);
    uint32_t* Vt = Kt + n_kt;
    uint32_t* Kq = Vt + n_kt;
    float* dK = reinterpret_cast<float*>(Kq + n_kq);
    float* dV = dK + n_acc;
    float* S = dV + n_acc;
    float* dP = S + n_sp;
    uint32_t* Pw = reinterpret_cast<uint32_t*>(S);
    uint32_t* dSw = reinterpret_cast<uint32_t*>(dP);
    uint32_t* dSr = reinterpret_cast<uint32_t*>(dP + n_sp);
    uint32_t* Qq = dSr + n_ds;
    uint32_t* dOq = Qq + n_qq;
    const vf vc = vset1(c);
    const vf vscale = vset1(scale);

    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bh = t / n_split;
      const int64_t sp = t % n_split;
      float* dqa = dqacc + (sp * BH + bh) * Nq * Dp;
      const int64_t kb_end = std::min(nkb, (sp + 1) * kb_per_split);
      for (int64_t kb = sp * kb_per_split; kb < kb_end; ++kb) {
        const int64_t k0 = kb * BK;
        const int64_t nk = std::min(BK, Nk - k0);
        const int64_t nkp = round_up(nk, W);
        const int64_t nk2 = cdiv(nk, 2);
        const T* kbp = kp + (bh * Nk + k0) * D;
        const T* vbp = vp + (bh * Nk + k0) * D;
        pack_transposed_bits(reinterpret_cast<const uint32_t*>(kbp), D2, nk, D2, Kt, ldk);
        pack_transposed_bits(reinterpret_cast<const uint32_t*>(vbp), D2, nk, D2, Vt, ldk);
        for (int64_t w = 0; w < nk2; ++w) {
          const T* r0 = kbp + 2 * w * D;
          pack_pair_rows(r0, 2 * w + 1 < nk ? r0 + D : nullptr, D, Dp, Kq + w * Dp);
        }
        std::memset(dK, 0, sizeof(float) * nk * Dp);
        std::memset(dV, 0, sizeof(float) * nk * Dp);
        const __mmask16 jmask = static_cast<__mmask16>((1u << (nk - (nkp - W))) - 1u);

        for (int64_t q0 = 0; q0 < Nq; q0 += BQ) {
          const int64_t nq = std::min(BQ, Nq - q0);
          const int64_t nq2 = cdiv(nq, 2);
          const T* qb = qp + (bh * Nq + q0) * D;
          const T* dob = dop + (bh * Nq + q0) * D;
          gemm<0, true>(nq, nkp, D2, reinterpret_cast<const uint32_t*>(qb), D2, 1, Kt, ldk, S, ldk);
          gemm<0, true>(nq, nkp, D2, reinterpret_cast<const uint32_t*>(dob), D2, 1, Vt, ldk, dP, ldk);
          const float* lb = lp + bh * Nq + q0;
          const float* db = delta + bh * Nq + q0;
          for (int64_t i = 0; i < nq; i += 2) {
            const bool two = i + 1 < nq;
            const vf nl0 = vset1(-lb[i] * kLog2e), dl0 = vset1(db[i]);
            const vf nl1 = vset1(two ? -lb[i + 1] * kLog2e : 0.f), dl1 = vset1(two ? db[i + 1] : 0.f);
            const float* s0 = S + i * ldk;
            const float* g0 = dP + i * ldk;
            uint16_t* r0 = reinterpret_cast<uint16_t*>(dSr) + i * ldr;
            for (int64_t j = 0; j < nkp; j += W) {
              const __mmask16 mk = j + W <= nk ? static_cast<__mmask16>(0xffff) : jmask;
              const vf p0 = _mm512_maskz_mov_ps(mk, vexp2_finite(vfma(vload(s0 + j), vc, nl0)));
              const vf d0 = vmul(vmul(p0, vscale), vsub(vload(g0 + j), dl0));
              vf p1 = vzero(), d1 = vzero();
              if (two) {
                p1 = _mm512_maskz_mov_ps(mk, vexp2_finite(vfma(vload(s0 + ldk + j), vc, nl1)));
                d1 = vmul(vmul(p1, vscale), vsub(vload(g0 + ldk + j), dl1));
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(r0 + ldr + j),
                                    (__m256i)_mm512_cvtneps_pbh(d1));
              }
              _mm256_storeu_si256(reinterpret_cast<__m256i*>(r0 + j), (__m256i)_mm512_cvtneps_pbh(d0));
              // Word row i/2 (<= i) of P and dS, after rows i, i+1 were read.
              _mm512_storeu_si512(Pw + (i / 2) * ldk + j, pair_bf16(p0, p1));
              _mm512_storeu_si512(dSw + (i / 2) * ldk + j, pair_bf16(d0, d1));
            }
          }
          for (int64_t u = 0; u < nq2; ++u) {
            const bool two = 2 * u + 1 < nq;
            pack_pair_rows(qb + 2 * u * D, two ? qb + (2 * u + 1) * D : nullptr, D, Dp, Qq + u * Dp);
            pack_pair_rows(dob + 2 * u * D, two ? dob + (2 * u + 1) * D : nullptr, D, Dp,
                           dOq + u * Dp);
          }
          // dV += P^T dO, dK += dS^T Q (reduction over query pairs).
          gemm<1, true>(nk, Dp, nq2, Pw, 1, ldk, dOq, Dp, dV, Dp);
          gemm<1, true>(nk, Dp, nq2, dSw, 1, ldk, Qq, Dp, dK, Dp);
          // dQ += dS K (reduction over key pairs).
          gemm<1, true>(nq, Dp, nk2, dSr, ldr / 2, 1, Kq, Dp, dqa + q0 * Dp, Dp);
        }
        T* dkb = dkp + (bh * Nk + k0) * D;
        T* dvb = dvp + (bh * Nk + k0) * D;
        for (int64_t j = 0; j < nk; ++j) {
          store_row(dK + j * Dp, dkb + j * D, D);
          store_row(dV + j * Dp, dvb + j * D, D);
        }
      }
    }
  });
  reduce_dq(dqacc, dqp, n_split, BH * Nq, D, Dp);
}
#endif

}  // namespace

Tensor2 attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          double scale) {
  check_qkv(q, k, v, "attention_fwd_cpu");
  at::Tensor o = at::empty_like(q);
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {o, lse};
  const float s = static_cast<float>(scale);
  switch (q.scalar_type()) {
    case at::kFloat: fwd_impl<float>(q, k, v, s, o, lse); break;
    case at::kHalf: fwd_impl<at::Half>(q, k, v, s, o, lse); break;
    case at::kBFloat16:
#if defined(FASTGEN_BF16_DOT)
      if (q.size(3) % 2 == 0 && q.size(3) >= 16) {
        fwd_bf16(q, k, v, s, o, lse);
        break;
      }
#endif
      fwd_impl<at::BFloat16>(q, k, v, s, o, lse);
      break;
    default: TORCH_CHECK(false, "attention_fwd_cpu: unsupported dtype ", q.scalar_type());
  }
  return {o, lse};
}

Tensor3 attention_bwd_cpu(const at::Tensor& do_, const at::Tensor& q, const at::Tensor& k,
                          const at::Tensor& v, const at::Tensor& o, const at::Tensor& lse,
                          double scale) {
  check_qkv(q, k, v, "attention_bwd_cpu");
  TORCH_CHECK(do_.sizes() == q.sizes() && o.sizes() == q.sizes(),
              "attention_bwd_cpu: do and o must have q's shape ", q.sizes(), "; got do ",
              do_.sizes(), ", o ", o.sizes());
  TORCH_CHECK(do_.scalar_type() == q.scalar_type() && o.scalar_type() == q.scalar_type(),
              "attention_bwd_cpu: do and o must have q's dtype ", q.scalar_type(), "; got do ",
              do_.scalar_type(), ", o ", o.scalar_type());
  TORCH_CHECK(do_.is_contiguous() && o.is_contiguous(),
              "attention_bwd_cpu: do and o must be contiguous");
  TORCH_CHECK(do_.device().is_cpu() && o.device().is_cpu() && lse.device().is_cpu(),
              "attention_bwd_cpu: all tensors must be CPU tensors");
  TORCH_CHECK(lse.scalar_type() == at::kFloat, "attention_bwd_cpu: lse must be float32; got ",
              lse.scalar_type());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) &&
                  lse.size(2) == q.size(2),
              "attention_bwd_cpu: lse must have shape (B, H, Nq) = (", q.size(0), ", ", q.size(1),
              ", ", q.size(2), "); got ", lse.sizes());
  TORCH_CHECK(lse.is_contiguous(), "attention_bwd_cpu: lse must be contiguous");
  at::Tensor dq = at::empty_like(q);
  at::Tensor dk = at::empty_like(k);
  at::Tensor dv = at::empty_like(v);
  if (q.size(0) * q.size(1) == 0) return {dq, dk, dv};
  if (q.size(2) == 0 || k.size(2) == 0) {  // nothing flows
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  const float s = static_cast<float>(scale);
  switch (q.scalar_type()) {
    case at::kFloat: bwd_impl<float>(do_, q, k, v, o, lse, s, dq, dk, dv); break;
    case at::kHalf: bwd_impl<at::Half>(do_, q, k, v, o, lse, s, dq, dk, dv); break;
    case at::kBFloat16:
#if defined(FASTGEN_BF16_DOT)
      if (q.size(3) % 2 == 0 && q.size(3) >= 16) {
        bwd_bf16(do_, q, k, v, o, lse, s, dq, dk, dv);
        break;
      }
#endif
      bwd_impl<at::BFloat16>(do_, q, k, v, o, lse, s, dq, dk, dv);
      break;
    default: TORCH_CHECK(false, "attention_bwd_cpu: unsupported dtype ", q.scalar_type());
  }
  return {dq, dk, dv};
}

}  // namespace fastgen
