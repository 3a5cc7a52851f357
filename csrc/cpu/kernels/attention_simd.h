// Vector layer of the CPU attention kernels: vf is one native vector of W
// floats, vh half of one. W = 16 (AVX-512), 8 (AVX2+FMA) or a portable 8-wide
// loop fallback (the portable ISA variant), so the kernels are written once.
//
// exp2 is Cephes' polynomial on [-0.5, 0.5] plus exponent scaling, relative
// error ~2e-7. The kernels only feed it exponents <= 0 (scores minus the
// running max, or minus lse), so large logits cannot overflow, and -inf (the
// first key block's previous max) gives exactly 0.
// GCC 12's AVX-512 intrinsic headers trip -W(maybe-)uninitialized on their
// own _mm512_undefined_* temporaries (GCC PR 105593); the pragma has to
// precede the first include of those headers to take effect.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cpu/kernels/common.h"

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define FASTGEN_BF16_DOT 1  // vdpbf16ps path for bf16 inputs (attention_bf16.cpp)
#endif

FG_ISA_BEGIN
namespace cpu_attn {

// Softmax runs in base 2 (one exp2 per score); these convert scale and lse
// between natural-log and base-2 units.
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Cephes exp2f: 2^f = 1 + f * P(f) for f in [-0.5, 0.5].
constexpr float kE0 = 1.535336188319500e-4f;
constexpr float kE1 = 1.339887440266574e-3f;
constexpr float kE2 = 9.618437357674640e-3f;
constexpr float kE3 = 5.550332471162809e-2f;
constexpr float kE4 = 2.402264791363012e-1f;
constexpr float kE5 = 6.931472028550421e-1f;

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
inline vf vmin(vf a, vf b) { return _mm512_min_ps(a, b); }
inline float vhsum(vf a) { return _mm512_reduce_add_ps(a); }
inline vf vround(vf x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
// p * 2^n for integral n; scalef saturates to 0 / inf, so any finite n works.
constexpr bool kLdexpAnyN = true;
inline vf vldexp(vf p, vf n) { return _mm512_scalef_ps(p, n); }
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
inline vf vmin(vf a, vf b) { return _mm256_min_ps(a, b); }
inline float vhsum(vf a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline vf vround(vf x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
// p * 2^n via the exponent field: only for n in [-127, 127]; n = -127 gives
// the bit pattern 0, i.e. 0.f.
constexpr bool kLdexpAnyN = false;
inline vf vldexp(vf p, vf n) {
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
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
constexpr int kMaxNV = 2;
constexpr int mr_for(int nv) { return nv >= 2 ? 4 : 6; }

#endif

#if !defined(__AVX512F__)
constexpr int G = W;  // no half vectors: the helpers below are never used
using vh = vf;
inline vh hload(const float* p) { return vload(p); }
inline void hstore(float* p, vh v) { vstore(p, v); }
inline vh hzero() { return vzero(); }
inline vh hlow(vf v) { return v; }
inline vh hfma(vh a, vh b, vh c) { return vfma(a, b, c); }
inline vh hmul(vh a, vh b) { return vmul(a, b); }
#endif

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
// 2^x = 2^n * 2^f with n = round(x), 2^f = 1 + f * P(f) on [-0.5, 0.5].
inline vf exp2_split(vf x) {
  const vf n = vround(x);
  const vf f = vsub(x, n);
  vf p = vfma(vset1(kE0), f, vset1(kE1));
  p = vfma(p, f, vset1(kE2));
  p = vfma(p, f, vset1(kE3));
  p = vfma(p, f, vset1(kE4));
  p = vfma(p, f, vset1(kE5));
  p = vfma(p, f, vset1(1.f));
  return vldexp(p, n);
}
// 2^x, also for x = -inf (-> 0). max/min with the constant first: NaN propagates.
inline vf vexp2(vf x) {
  x = vmax(vset1(-127.f), x);
  x = vmin(vset1(127.f), x);
  return exp2_split(x);
}
// 2^x for finite x: skips the clamp where vldexp takes any exponent.
inline vf vexp2_finite(vf x) {
  if constexpr (kLdexpAnyN) return exp2_split(x);
  return vexp2(x);
}
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


}  // namespace cpu_attn
FG_ISA_END
