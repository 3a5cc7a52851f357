// Fused GEGLU forward and backward on CPU. Reference: fastgen/ops/geglu.py.
//
//   x = [hidden, gate]  (each row of x: 2H values, the two halves of the last dim)
//   out    = hidden * gelu(gate)                                  (rows of H values)
//   dx     = [dout * gelu(gate), dout * hidden * gelu'(gate)]
//
// gelu is exact (erf) or the tanh approximation, as F.gelu(approximate=...).
//
// Design
//  * Memory-bound elementwise op: the forward reads x once and writes out once,
//    the backward reads x and dout once and writes dx once (eager PyTorch makes
//    three to six passes, materialising gelu(gate) and its gradient).
//  * Work is cut into tasks of one row and kBlock columns of that row, spread
//    over threads with at::parallel_for (rows alone would leave threads idle for
//    few, very wide rows).
//  * All math is fp32 in SIMD registers: GCC vector extensions of the ISA
//    variant's width (csrc/cpu/kernels/vec.h: 16 lanes with AVX-512, 8 with
//    AVX2, 4 with the portable SSE2 build), written out explicitly rather
//    than left to the auto-vectoriser (which kept the AVX2 build scalar).
//    fp16/bf16 are converted in registers on load and rounded to nearest even
//    on store. No branches and no libm calls in the loops.
//  * Phi(g) = (1 + erf(g / sqrt2)) / 2 is evaluated without libm (libm's erff
//    does not vectorise). With z = g / sqrt2:
//      |z| < 1 : erf(z) = z + z * P(z^2),                          P degree 6
//      |z| >= 1: erfc(|z|) / 2 = y * Q(y) * exp(-z^2),  y = 1 / (1 + |z|/2),
//                Q degree 7; Phi = erfc/2 for g < 0, 1 - erfc/2 otherwise
//    (both branches are computed and blended). P and Q are minimax fits made
//    for this file (relative error 1.2e-9 and 8.3e-8 in exact arithmetic; the
//    y = 1/(1 + |z|/2) form is that of Numerical Recipes' erfcc). Measured in
//    fp32 over [-17, 17] (24M points) against double erfc: max absolute error
//    of Phi 6.5e-8 (about 1 ulp at Phi ~ 0.9; (1 + glibc erff) / 2: 6.3e-8),
//    i.e. 1.3e-7 on the erf scale, and of gelu'(g) 1.4e-7. PyTorch's own
//    vectorised erf (Abramowitz-Stegun 7.1.26) is off by up to 1.5e-7 before
//    rounding. For g < 0, Phi = erfc(|z|) / 2 is computed directly, so gelu
//    keeps its relative accuracy far into the negative tail (1.4e-5 at
//    g = -12, where 1 + erf cancels to 0 in PyTorch).
//  * exp(-z^2) is shared by erfc and, in the backward, the Gaussian density
//    of gelu'(g) = Phi(g) + g * phi(g): one exp per element either way. exp is
//    Cody-Waite reduction + Cephes' expf polynomial (max relative error 8.4e-8
//    measured on [-87, 0]), and flushes to zero below e^-87.
//  * tanh approximation: 0.5 * (1 + tanh(u)) = sigmoid(2u), u = sqrt(2/pi) *
//    (g + 0.044715 g^3). With e = exp(-|2u|) <= 1, sigmoid(|2u|) = 1 / (1 + e)
//    and 1 - sigmoid(|2u|) = e / (1 + e): no overflow and no cancellation, for
//    the value and for the derivative's sigmoid * (1 - sigmoid).
//  * No fast-math (NaN and inf propagate as in PyTorch); GCC contracts a*b+c
//    into FMAs, which only helps here.

//
// This file is compiled once per ISA variant (csrc/cpu/kernels/common.h);
// the checks and allocation are in csrc/cpu/geglu.cpp.

#include "cpu/kernels/kernels.h"
#include "cpu/kernels/vec.h"
#include "cpu/kernels/gelu_math.h"

#include <algorithm>
#include <cstdint>

FG_ISA_BEGIN
namespace {

using gelu_math::exp_neg;
using gelu_math::GeluErf;
using gelu_math::vabs;

// Columns per task.
constexpr int64_t kBlock = 1024;
// Minimum elements (of one half) per parallel task, so that small tensors do
// not pay for waking threads.
constexpr int64_t kGrainElems = 16384;

// gelu(g) = 0.5 g (1 + tanh(u)) = g * sigmoid(2u), u = sqrt(2/pi) (g + 0.044715 g^3).
// sigmoid(2u) and 1 - sigmoid(2u) are both taken from e = exp(-|2u|) <= 1, so
// neither overflows nor cancels.
struct GeluTanh {
  template <bool kGrad>
  static FG_INLINE vfloat eval(vfloat g, vfloat* dgelu) {
    constexpr float kTwoBeta = 2.0f * 0.797884560802865356f;  // 2 * sqrt(2/pi)
    constexpr float kKappa = 0.044715f;
    const vfloat g2 = g * g;
    const vfloat two_u = (kTwoBeta * g) * vfma(splat(kKappa), g2, splat(1.0f));
    const vfloat e = exp_neg(-vabs(two_u));
    const vfloat r = 1.0f / (1.0f + e);  // sigmoid(|2u|)
    const vfloat er = e * r;             // 1 - sigmoid(|2u|)
    const vfloat sig = two_u >= 0.0f ? r : er;
    if constexpr (kGrad) {
      // d/dg g * sigmoid(2u) = sig + g * sig * (1 - sig) * 2u'
      const vfloat two_du = kTwoBeta * vfma(splat(3.0f * kKappa), g2, splat(1.0f));
      *dgelu = vfma(g * (r * er), two_du, sig);
    }
    return g * sig;
  }
};

// ------------------------------------------------------------- drivers

struct Plan {
  int64_t M, H, blocks_per_row, grain;
};

Plan plan(int64_t M, int64_t H) {
  Plan p;
  p.M = M;
  p.H = H;
  p.blocks_per_row = (H + kBlock - 1) / kBlock;
  p.grain = std::max<int64_t>(1, kGrainElems / std::min(H, kBlock));
  return p;
}

template <class Act, class T>
FG_INLINE void fwd_vec(const T* h, const T* g, T* out, int64_t cnt) {
  const vfloat gl = Act::template eval<false>(load_n(g, cnt), nullptr);
  store_n(out, load_n(h, cnt) * gl, cnt);
}

template <class Act, class T>
void fwd_typed(const Parallel& par, const T* x, T* out, const Plan& p) {
  const int64_t H = p.H, nb = p.blocks_per_row;
  parallel_for(par, 0, p.M * nb, p.grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r = t / nb;
      const int64_t c0 = (t % nb) * kBlock;
      const int64_t n = std::min(kBlock, H - c0);
      const T* hr = x + r * 2 * H + c0;
      const T* gr = hr + H;
      T* o = out + r * H + c0;
      int64_t i = 0;
      for (; i + kW <= n; i += kW) fwd_vec<Act>(hr + i, gr + i, o + i, kW);
      if (i < n) fwd_vec<Act>(hr + i, gr + i, o + i, n - i);
    }
  });
}

template <class Act, class T>
FG_INLINE void bwd_vec(const T* d, const T* h, const T* g, T* dh, T* dg, int64_t cnt) {
  vfloat dgelu;
  const vfloat gl = Act::template eval<true>(load_n(g, cnt), &dgelu);
  const vfloat dy = load_n(d, cnt);
  store_n(dh, dy * gl, cnt);
  store_n(dg, (dy * load_n(h, cnt)) * dgelu, cnt);
}

template <class Act, class T>
void bwd_typed(const Parallel& par, const T* dout, const T* x, T* dx, const Plan& p) {
  const int64_t H = p.H, nb = p.blocks_per_row;
  parallel_for(par, 0, p.M * nb, p.grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r = t / nb;
      const int64_t c0 = (t % nb) * kBlock;
      const int64_t n = std::min(kBlock, H - c0);
      const T* hr = x + r * 2 * H + c0;
      const T* gr = hr + H;
      const T* d = dout + r * H + c0;
      T* dh = dx + r * 2 * H + c0;
      T* dg = dh + H;
      int64_t i = 0;
      for (; i + kW <= n; i += kW) bwd_vec<Act>(d + i, hr + i, gr + i, dh + i, dg + i, kW);
      if (i < n) bwd_vec<Act>(d + i, hr + i, gr + i, dh + i, dg + i, n - i);
    }
  });
}

}  // namespace

void geglu_fwd(const GegluArgs& a) {
  if (a.M == 0 || a.H == 0) return;
  const Plan p = plan(a.M, a.H);
  with_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* xp = static_cast<const T*>(a.x);
    T* op = static_cast<T*>(a.out);
    if (a.approximate_tanh) fwd_typed<GeluTanh>(a.par, xp, op, p);
    else fwd_typed<GeluErf>(a.par, xp, op, p);
  });
}

void geglu_bwd(const GegluArgs& a) {
  if (a.M == 0 || a.H == 0) return;
  const Plan p = plan(a.M, a.H);
  with_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* dp = static_cast<const T*>(a.dout);
    const T* xp = static_cast<const T*>(a.x);
    T* dxp = static_cast<T*>(a.out);
    if (a.approximate_tanh) bwd_typed<GeluTanh>(a.par, dp, xp, dxp, p);
    else bwd_typed<GeluErf>(a.par, dp, xp, dxp, p);
  });
}

FG_ISA_END
