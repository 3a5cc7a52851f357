// VAE output post-processing on CPU. Reference: fastgen/ops/vae_postprocess.py.
//
//   y   = clamp(x * 0.5 + 0.5, 0, 1)                  x's dtype and memory order
//   img = round_half_even(y * 255) as uint8, (N, H, W, C)  (the uint8 output)
//   dx  = 0.5 * dy where 0 <= x * 0.5 + 0.5 <= 1, else 0
//
// Design
//  * Memory-bound elementwise op: x is read once, y (or the image) written
//    once; the backward reads x and dy once and writes dx once. Eager PyTorch
//    takes three passes for y and six for the image (scale, shift, clamp,
//    * 255, round, cast, plus the NHWC copy).
//  * fp32 math in SIMD registers (csrc/cpu/kernels/vec.h), fp16 / bf16 converted
//    in registers. x * 0.5 is exact, so the FMA x * 0.5 + 0.5 rounds once, as
//    PyTorch's two ops do: y is bit-identical to the reference. The clamp
//    passes NaN through, as torch.clamp does.
//  * uint8: t = y * 255 is one rounded fp32 multiply (numpy's float32 `images *
//    255`), then cvtps2dq converts it with the MXCSR's default round to nearest
//    even (numpy's `.round()`), and saturating packs narrow it to bytes. No add
//    follows the multiply, so no FMA contraction can change t and the ties
//    k + 0.5 round to even exactly as numpy does. NaN becomes 0 (cvtps2dq
//    gives INT_MIN, which the packs saturate to 0).
//  * Layout: a linear walk when the image's (N, H, W, C) order is x's memory
//    order (channels-last x, C == 1 or H * W == 1) and for y and dx; for a
//    channels-first x each task takes kPix pixels of one image, converts each
//    channel plane into a row of an L1 buffer and interleaves the rows into
//    the image (the NCHW -> NHWC transpose happens in L1).
//
// This file is compiled once per ISA variant (csrc/cpu/kernels/common.h); the
// checks and allocation are in csrc/cpu/vae_postprocess.cpp.

#include "cpu/kernels/kernels.h"
#include "cpu/kernels/vec.h"

#include <algorithm>
#include <cstdint>
#include <cstring>

#if !defined(__SSE2__)
#include <cmath>
#endif

FG_ISA_BEGIN
namespace {

// Elements per linear task chunk, and chunks per parallel task at least (so
// that small images do not pay for waking threads).
constexpr int64_t kChunk = 4096;
constexpr int64_t kGrainChunks = 8;
// Pixels per task of the transposing (channels-first -> NHWC) path.
constexpr int64_t kPix = 2048;

// clamp(x * 0.5 + 0.5, 0, 1); NaN stays NaN (vmin / vmax return a NaN first operand).
FG_INLINE vfloat denorm(vfloat x) { return vmin(vmax(vfma(x, splat(0.5f), splat(0.5f)), 0.0f), 1.0f); }

// n (<= kW) bytes of round_half_even(y * 255) for y in [0, 1] or NaN (-> 0).
FG_INLINE void store_u8(uint8_t* p, vfloat y, int64_t n) {
  const vfloat t = y * 255.0f;
  alignas(16) uint8_t b[16];
#if defined(__AVX512F__)
  const __m512i i = _mm512_max_epi32(_mm512_cvtps_epi32(t), _mm512_setzero_si512());  // NaN: INT_MIN -> 0
  _mm_store_si128(reinterpret_cast<__m128i*>(b), _mm512_cvtusepi32_epi8(i));
#elif defined(__AVX2__)
  const __m256i i = _mm256_cvtps_epi32(t);
  const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
  _mm_store_si128(reinterpret_cast<__m128i*>(b), _mm_packus_epi16(w, w));
#elif defined(__SSE2__)
  const __m128i i = _mm_cvtps_epi32(t);
  const __m128i w = _mm_packs_epi32(i, i);
  _mm_store_si128(reinterpret_cast<__m128i*>(b), _mm_packus_epi16(w, w));
#else
  for (int64_t k = 0; k < kW; ++k) b[k] = t[k] > 0.0f ? static_cast<uint8_t>(std::nearbyint(t[k])) : 0;
#endif
  std::memcpy(p, b, n == kW ? kW : n);
}

template <class T>
void fwd_linear(const VaePostprocessArgs& a, const T* x, void* out_v) {
  const int64_t total = a.N * a.C * a.P;
  const int64_t chunks = (total + kChunk - 1) / kChunk;
  parallel_for(a.par, 0, chunks, kGrainChunks, [&](int64_t begin, int64_t end) {
    for (int64_t ch = begin; ch < end; ++ch) {
      const int64_t i0 = ch * kChunk;
      const int64_t n = std::min(kChunk, total - i0);
      const T* xs = x + i0;
      if (a.to_uint8) {
        uint8_t* o = static_cast<uint8_t*>(out_v) + i0;
        int64_t i = 0;
        for (; i + kW <= n; i += kW) store_u8(o + i, denorm(load_n(xs + i, kW)), kW);
        if (i < n) store_u8(o + i, denorm(load_n(xs + i, n - i)), n - i);
      } else {
        T* o = static_cast<T*>(out_v) + i0;
        int64_t i = 0;
        for (; i + kW <= n; i += kW) store_n(o + i, denorm(load_n(xs + i, kW)), kW);
        if (i < n) store_n(o + i, denorm(load_n(xs + i, n - i)), n - i);
      }
    }
  });
}

// The channels-first -> NHWC image: per task kPix pixels of one image. Each channel plane is converted
// into a row of an L1 buffer, then the rows are interleaved into the image in one pass over the pixels
// (for C = 3 and 4 a loop of fixed group size, which GCC vectorises with shuffles; other C one strided
// pass per channel).
template <int64_t kC, class T>
void fwd_transpose(const VaePostprocessArgs& a, const T* x, uint8_t* out) {
  constexpr int64_t kRows = kC > 0 ? kC : 1;
  const int64_t C = kC > 0 ? kC : a.C, P = a.P;
  const int64_t blocks = (P + kPix - 1) / kPix;
  const int64_t grain = std::max<int64_t>(1, kGrainChunks * kChunk / (kPix * C));
  parallel_for(a.par, 0, a.N * blocks, grain, [&](int64_t begin, int64_t end) {
    alignas(64) uint8_t buf[kRows][kPix];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / blocks;
      const int64_t p0 = (t % blocks) * kPix;
      const int64_t np = std::min(kPix, P - p0);
      uint8_t* __restrict o = out + (b * P + p0) * C;
      for (int64_t c = 0; c < C; ++c) {
        uint8_t* row = buf[kC > 0 ? c : 0];
        const T* xs = x + (b * C + c) * P + p0;
        int64_t i = 0;
        for (; i + kW <= np; i += kW) store_u8(row + i, denorm(load_n(xs + i, kW)), kW);
        if (i < np) store_u8(row + i, denorm(load_n(xs + i, np - i)), np - i);
        if constexpr (kC == 0) {
          for (int64_t p = 0; p < np; ++p) o[p * C + c] = row[p];
        }
      }
      if constexpr (kC > 0) {
        for (int64_t p = 0; p < np; ++p) {
          for (int64_t c = 0; c < kC; ++c) o[p * kC + c] = buf[c][p];
        }
      }
    }
  });
}

template <class T>
FG_INLINE void bwd_vec(const T* x, const T* dy, T* dx, int64_t n) {
  const vfloat u = vfma(load_n(x, n), splat(0.5f), splat(0.5f));
  const vfloat g = load_n(dy, n) * 0.5f;
  // torch.clamp's gradient: passed where min <= u <= max (NaN: not passed).
  store_n(dx, ((u >= 0.0f) & (u <= 1.0f)) ? g : vfloat{}, n);
}

}  // namespace

void vae_postprocess_fwd(const VaePostprocessArgs& a) {
  if (a.N * a.C * a.P == 0) return;
  with_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* x = static_cast<const T*>(a.x);
    if (!a.to_uint8 || !a.transpose) return fwd_linear<T>(a, x, a.out);
    uint8_t* out = static_cast<uint8_t*>(a.out);
    if (a.C == 3) fwd_transpose<3>(a, x, out);
    else if (a.C == 4) fwd_transpose<4>(a, x, out);
    else fwd_transpose<0>(a, x, out);
  });
}

void vae_postprocess_bwd(const VaePostprocessArgs& a) {
  const int64_t total = a.N * a.C * a.P;
  if (total == 0) return;
  with_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* x = static_cast<const T*>(a.x);
    const T* dy = static_cast<const T*>(a.dy);
    T* dx = static_cast<T*>(a.out);
    const int64_t chunks = (total + kChunk - 1) / kChunk;
    parallel_for(a.par, 0, chunks, kGrainChunks, [&](int64_t begin, int64_t end) {
      for (int64_t ch = begin; ch < end; ++ch) {
        const int64_t i0 = ch * kChunk;
        const int64_t n = std::min(kChunk, total - i0);
        int64_t i = i0;
        for (; i + kW <= i0 + n; i += kW) bwd_vec(x + i, dy + i, dx + i, kW);
        if (i < i0 + n) bwd_vec(x + i, dy + i, dx + i, i0 + n - i);
      }
    });
  });
}

FG_ISA_END
