// conv2d on CPU: the Winograd transforms and the fused epilogue. Reference:
// fastgen/ops/conv2d.py; the entry point (csrc/cpu/conv2d.cpp) runs the
// Winograd-domain GEMMs between the two transforms.
//
// Winograd F(m x m, 3 x 3), m = 2 or 4, tile side A = m + 2 (Lavin & Gray,
// "Fast Algorithms for Convolutional Neural Networks", 2016; interpolation
// points 0, +-1, +-2, inf for m = 4):
//   V = B^T d B         d: an A x A input tile, per input channel
//   M[e] = V[e] @ U[e]  e: each of the A*A positions; U = G g G^T, packed by
//                       fastgen/ops/_conv2d_cpu_choice.py (fp64, rounded once)
//   y = A^T M A         an m x m output tile, per output channel
// A 3x3 direct convolution costs 9 multiplies per output and input channel;
// F(2,3) 16/4 = 4 (2.25x fewer), F(4,3) 36/16 = 2.25 (4x fewer).
//
// Design
//  * Input: each task takes tile rows; it first copies the A input rows one
//    tile row needs into an L2 scratch in (row, column, channel) order, with
//    the zero padding written in and fp16 / bf16 converted to fp32. So one
//    transform loop serves channels-first and channels-last x, and the
//    transform itself has no bounds checks. Channel blocks keep the scratch
//    under kScratchBytes. The transform vectorises over channels: kW
//    channels of a tile are one SIMD lane group, A*A vectors, B^T on the
//    columns then on the rows.
//  * Output: A^T on the columns, then on the rows, into an L2 scratch of m
//    output rows (column, channel order); then the epilogue bias + residual,
//    * scale, converted to the output dtype and stored in the output's
//    layout. Channels-last stores are vectors; channels-first ones walk each
//    channel's row (contiguous in the output).
//  * fp32 everywhere inside; the output is rounded once.
//
// This file is compiled once per ISA variant (csrc/cpu/kernels/common.h).

#include "cpu/kernels/kernels.h"
#include "cpu/kernels/vec.h"

#include <algorithm>
#include <vector>

FG_ISA_BEGIN
namespace {

constexpr int64_t kScratchBytes = 384 * 1024;

FG_INLINE int64_t round_up(int64_t v, int64_t to) { return (v + to - 1) / to * to; }

// t = B^T d for one column of an A x A tile.
template <int M>
FG_INLINE void bt(const vfloat* d, vfloat* t);

template <>
FG_INLINE void bt<2>(const vfloat* d, vfloat* t) {
  t[0] = d[0] - d[2];
  t[1] = d[1] + d[2];
  t[2] = d[2] - d[1];
  t[3] = d[1] - d[3];
}

template <>
FG_INLINE void bt<4>(const vfloat* d, vfloat* t) {
  const vfloat four = splat(4.0f), five = splat(5.0f), two = splat(2.0f);
  t[0] = vfma(four, d[0], d[4]) - five * d[2];
  const vfloat q = d[4] - four * d[2];  // rows 1, 2 share (d4 - 4 d2) +- (d3 - 4 d1)
  const vfloat r = d[3] - four * d[1];
  t[1] = q + r;
  t[2] = q - r;
  const vfloat s = d[4] - d[2];  // rows 3, 4 share (d4 - d2) +- 2 (d3 - d1)
  const vfloat u = two * (d[3] - d[1]);
  t[3] = s + u;
  t[4] = s - u;
  t[5] = vfma(four, d[1], d[5]) - five * d[3];
}

// y = A^T m for one column: A inputs, M outputs.
template <int M>
FG_INLINE void at_(const vfloat* m, vfloat* y);

template <>
FG_INLINE void at_<2>(const vfloat* m, vfloat* y) {
  y[0] = m[0] + m[1] + m[2];
  y[1] = m[1] - m[2] - m[3];
}

template <>
FG_INLINE void at_<4>(const vfloat* m, vfloat* y) {
  const vfloat a = m[1] + m[2], b = m[1] - m[2];
  const vfloat c = m[3] + m[4], d = m[3] - m[4];
  y[0] = m[0] + a + c;
  y[1] = vfma(splat(2.0f), d, b);
  y[2] = vfma(splat(4.0f), c, a);
  y[3] = vfma(splat(8.0f), d, b) + m[5];
}

template <class T>
FG_INLINE float to_f32(T v) { return static_cast<float>(v); }

// Fill scr (A rows x Wp columns x cb channels, fp32) with the zero-padded input
// rows y0 .. y0 + A - 1, columns -pad_l .. Wp - pad_l - 1, channels c0 .. c0 + cn.
template <class T, int M>
void gather_rows(const ConvWinogradArgs& a, const T* x, int64_t n, int64_t y0, int64_t c0, int64_t cn,
                 int64_t cb, int64_t Wp, float* scr) {
  constexpr int A = M + 2;
  const int64_t H = a.H, W = a.W, C = a.C;
  std::fill(scr, scr + A * Wp * cb, 0.0f);
  for (int i = 0; i < A; ++i) {
    const int64_t y = y0 + i;
    if (y < 0 || y >= H) continue;
    const int64_t j0 = std::max<int64_t>(0, a.pad_l), j1 = std::min<int64_t>(Wp, W + a.pad_l);
    float* row = scr + i * Wp * cb;
    if (a.channels_last) {
      for (int64_t j = j0; j < j1; ++j) {
        const T* src = x + ((n * H + y) * W + (j - a.pad_l)) * C + c0;
        float* dst = row + j * cb;
        int64_t c = 0;
        for (; c + kW <= cn; c += kW) Vio<float>::store(dst + c, Vio<T>::load(src + c));
        for (; c < cn; ++c) dst[c] = to_f32(src[c]);
      }
    } else {
      for (int64_t c = 0; c < cn; ++c) {
        const T* src = x + ((n * C + c0 + c) * H + y) * W - a.pad_l;
        for (int64_t j = j0; j < j1; ++j) row[j * cb + c] = to_f32(src[j]);
      }
    }
  }
}

template <class T, int M>
void winograd_input(const ConvWinogradArgs& a, const T* x) {
  constexpr int A = M + 2;
  const int64_t TW = a.TW, C = a.C;
  const int64_t tiles = (a.row_end - a.row_begin) * TW;
  const int64_t Wp = TW * M + 2;
  const int64_t fit = std::max<int64_t>(kW, kScratchBytes / 4 / (A * Wp) / kW * kW);
  const int64_t cb = std::min(round_up(C, kW), fit);
  float* V = a.V;
  parallel_for(a.par, a.row_begin, a.row_end, 1, [&](int64_t rb, int64_t re) {
    std::vector<float> scratch(A * Wp * cb);
    float* scr = scratch.data();
    for (int64_t row = rb; row < re; ++row) {
      const int64_t n = row / a.TH, ty = row % a.TH;
      const int64_t t_base = (row - a.row_begin) * TW;
      for (int64_t c0 = 0; c0 < C; c0 += cb) {
        const int64_t cn = std::min(cb, C - c0);
        gather_rows<T, M>(a, x, n, ty * M - a.pad_t, c0, cn, cb, Wp, scr);
        for (int64_t tx = 0; tx < TW; ++tx) {
          const float* base = scr + tx * M * cb;
          float* vout = V + (t_base + tx) * C + c0;
          for (int64_t cv = 0; cv < cn; cv += kW) {
            vfloat d[A][A], t[A][A];
            for (int i = 0; i < A; ++i)
              for (int j = 0; j < A; ++j) d[i][j] = Vio<float>::load(base + (i * Wp + j) * cb + cv);
            for (int j = 0; j < A; ++j) {  // B^T on each column
              vfloat col[A], res[A];
              for (int i = 0; i < A; ++i) col[i] = d[i][j];
              bt<M>(col, res);
              for (int i = 0; i < A; ++i) t[i][j] = res[i];
            }
            const int64_t cnt = std::min<int64_t>(kW, cn - cv);
            for (int i = 0; i < A; ++i) {  // then on each row
              vfloat res[A];
              bt<M>(t[i], res);
              for (int j = 0; j < A; ++j) store_n(vout + (i * A + j) * tiles * C + cv, res[j], cnt);
            }
          }
        }
      }
    }
  });
}

template <class T>
FG_INLINE vfloat load_or_zero(const T* p, int64_t n) { return p ? load_n(p, n) : splat(0.0f); }

template <class T, int M>
void winograd_output(const ConvWinogradArgs& a, T* out, const T* residual) {
  constexpr int A = M + 2;
  const int64_t TW = a.TW, K = a.K, Ho = a.Ho, Wo = a.Wo;
  const int64_t tiles = (a.row_end - a.row_begin) * TW;
  const int64_t Ws = TW * M;
  const int64_t fit = std::max<int64_t>(kW, kScratchBytes / 4 / (M * Ws) / kW * kW);
  const int64_t kb = std::min(round_up(K, kW), fit);
  const float* Mw = a.M;
  const float scale = a.scale;
  parallel_for(a.par, a.row_begin, a.row_end, 1, [&](int64_t rb, int64_t re) {
    std::vector<float> scratch(M * Ws * kb);
    float* scr = scratch.data();
    for (int64_t row = rb; row < re; ++row) {
      const int64_t n = row / a.TH, ty = row % a.TH;
      const int64_t t_base = (row - a.row_begin) * TW;
      const int64_t rows = std::min<int64_t>(M, Ho - ty * M);
      for (int64_t k0 = 0; k0 < K; k0 += kb) {
        const int64_t kn = std::min(kb, K - k0);
        for (int64_t tx = 0; tx < TW; ++tx) {
          const float* min_ = Mw + (t_base + tx) * K + k0;
          for (int64_t kv = 0; kv < kn; kv += kW) {
            const int64_t cnt = std::min<int64_t>(kW, kn - kv);
            vfloat s[M][A];
            for (int j = 0; j < A; ++j) {  // A^T on each column
              vfloat col[A], res[M];
              for (int i = 0; i < A; ++i) col[i] = load_n(min_ + (i * A + j) * tiles * K + kv, cnt);
              at_<M>(col, res);
              for (int i = 0; i < M; ++i) s[i][j] = res[i];
            }
            for (int i = 0; i < M; ++i) {  // then on each row
              vfloat res[M];
              at_<M>(s[i], res);
              for (int j = 0; j < M; ++j) Vio<float>::store(scr + (i * Ws + tx * M + j) * kb + kv, res[j]);
            }
          }
        }
        // The epilogue, into the output's layout.
        if (a.channels_last) {
          for (int64_t i = 0; i < rows; ++i) {
            const int64_t y = ty * M + i;
            for (int64_t xx = 0; xx < Wo; ++xx) {
              const int64_t off = ((n * Ho + y) * Wo + xx) * K + k0;
              const float* src = scr + (i * Ws + xx) * kb;
              for (int64_t kv = 0; kv < kn; kv += kW) {
                const int64_t cnt = std::min<int64_t>(kW, kn - kv);
                vfloat v = Vio<float>::load(src + kv);
                if (a.bias) v += load_n(a.bias + k0 + kv, cnt);
                if (residual) v += load_n(residual + off + kv, cnt);
                store_n(out + off + kv, v * scale, cnt);
              }
            }
          }
        } else {
          for (int64_t k = 0; k < kn; ++k) {
            const float b = a.bias ? a.bias[k0 + k] : 0.0f;
            for (int64_t i = 0; i < rows; ++i) {
              const int64_t off = ((n * K + k0 + k) * Ho + ty * M + i) * Wo;
              const float* src = scr + i * Ws * kb + k;
              for (int64_t xx = 0; xx < Wo; ++xx) {
                float v = src[xx * kb] + b;
                if (residual) v += to_f32(residual[off + xx]);
                out[off + xx] = T(v * scale);
              }
            }
          }
        }
      }
    }
  });
}

template <class T>
void epilogue(const ConvEpilogueArgs& a, T* out, const T* residual) {
  const int64_t rows = a.N * (a.channels_last ? a.P : a.K);
  const int64_t len = a.channels_last ? a.K : a.P;
  const float scale = a.scale;
  parallel_for(a.par, 0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(len, 1)),
               [&](int64_t rb, int64_t re) {
    for (int64_t r = rb; r < re; ++r) {
      const float* y = a.y + r * len;
      T* o = out + r * len;
      const T* res = residual ? residual + r * len : nullptr;
      if (a.channels_last) {
        for (int64_t i = 0; i < len; i += kW) {
          const int64_t cnt = std::min<int64_t>(kW, len - i);
          vfloat v = load_n(y + i, cnt);
          if (a.bias) v += load_n(a.bias + i, cnt);
          if (res) v += load_n(res + i, cnt);
          store_n(o + i, v * scale, cnt);
        }
      } else {
        const vfloat b = splat(a.bias ? a.bias[r % a.K] : 0.0f);
        for (int64_t i = 0; i < len; i += kW) {
          const int64_t cnt = std::min<int64_t>(kW, len - i);
          vfloat v = load_n(y + i, cnt) + b;
          if (res) v += load_n(res + i, cnt);
          store_n(o + i, v * scale, cnt);
        }
      }
    }
  });
}

}  // namespace

void conv2d_winograd_input(const ConvWinogradArgs& a) {
  with_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* x = static_cast<const T*>(a.x);
    if (a.m == 4) winograd_input<T, 4>(a, x);
    else winograd_input<T, 2>(a, x);
  });
}

void conv2d_winograd_output(const ConvWinogradArgs& a) {
  with_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    T* out = static_cast<T*>(a.out);
    const T* res = static_cast<const T*>(a.residual);
    if (a.m == 4) winograd_output<T, 4>(a, out, res);
    else winograd_output<T, 2>(a, out, res);
  });
}

void conv2d_epilogue(const ConvEpilogueArgs& a) {
  with_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    epilogue<T>(a, static_cast<T*>(a.out), static_cast<const T*>(a.residual));
  });
}

FG_ISA_END
