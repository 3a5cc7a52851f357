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
//  * All math is fp32. fp32 tensors are used in place; fp16/bf16 blocks are
//    converted into L1-resident stack buffers (F16C / AVX-512 for fp16, a shift
//    for bf16) and rounded to nearest even on the way out. The math is one
//    `#pragma omp simd` loop per block, templated on the activation and on
//    forward/backward, with no branches and no libm calls, so GCC vectorises it
//    (16 lanes with AVX-512).
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

#include "ops.h"
#include "cpu/convert.h"
#include "geglu_args.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace fastgen {
namespace {

#define FG_GEGLU_INLINE inline __attribute__((always_inline))

constexpr const char* kName = "fastgen geglu (cpu)";
// Columns per task: the backward's five fp32 buffers of this size take 10 KB
// of L1.
constexpr int64_t kBlock = 512;
// Minimum elements (of one half) per parallel task, so that small tensors do
// not pay for waking threads.
constexpr int64_t kGrainElems = 16384;

// ------------------------------------------------------------------ math

using convert::bits_to_float;
using convert::float_to_bits;

// e^x for x <= 0, ~1 ulp (Cody-Waite reduction, Cephes' expf polynomial);
// 0 for x < -87 (results below 1.6e-38 flush to zero, -inf included); NaN for
// NaN. No clamps and no float->int conversion: 2^n comes from the bits of the
// rounding sum t = x / ln2 + 1.5 * 2^23, whose low mantissa bits hold n.
FG_GEGLU_INLINE float exp_neg(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;  // 10 significant bits: n * kLn2Hi is exact
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float t = x * kLog2e + kRound;
  const float n = t - kRound;
  float r = x - n * kLn2Hi;
  r = r - n * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  // (n + 127) << 23 for n in [-126, 0]; garbage below -87, which is flushed.
  const uint32_t scale = (float_to_bits(t) - float_to_bits(kRound) + 127u) << 23;
  const float res = p * bits_to_float(scale);
  return x < -87.0f ? 0.0f : res;
}

// Exact gelu(g) = g * Phi(g), Phi(g) = (1 + erf(g / sqrt2)) / 2; with kGrad
// also gelu'(g) = Phi(g) + g * exp(-g^2 / 2) / sqrt(2 pi). With z = g / sqrt2:
//   |z| < 1 : Phi = (1 + erf(z)) / 2,  erf(z) = z + z * P(z^2)
//   |z| >= 1: Phi = h or 1 - h (g < 0 or not), h = erfc(|z|) / 2
//             = y * Q(y) * exp(-z^2),  y = 1 / (1 + |z| / 2),  Q ~ erfcx / (2y)
struct GeluErf {
  template <bool kGrad>
  static FG_GEGLU_INLINE float eval(float g, float* dgelu) {
    constexpr float kSqrt1_2 = 0.707106781186547524f;
    constexpr float kInvSqrt2Pi = 0.398942280401432678f;
    const float z = g * kSqrt1_2;
    const float s = z * z;
    const float a = std::fabs(z);
    float p = 7.889120752224699e-05f;
    p = p * s + -0.0008020841632969677f;
    p = p * s + 0.005189535208046436f;
    p = p * s + -0.026854444295167923f;
    p = p * s + 0.11283600330352783f;
    p = p * s + -0.3761262595653534f;
    p = p * s + 0.12837916612625122f;
    // erf(z) = z + z * P(z^2) rounds once near erf ~ 0.84 (z * P(z^2) is small),
    // where a direct z * erf(z)/z would round twice.
    const float phi_small = 0.5f * (z * p + z) + 0.5f;
    const float y = 1.0f / (0.5f * a + 1.0f);
    float q = 0.044324085116386414f;
    q = q * y + -0.10813476890325546f;
    q = q * y + 0.037669017910957336f;
    q = q * y + 0.031237907707691193f;
    q = q * y + 0.08967436850070953f;
    q = q * y + 0.12331078201532364f;
    q = q * y + 0.14105015993118286f;
    q = q * y + 0.1410473883152008f;
    const float e = exp_neg(-s);  // exp(-g^2 / 2)
    const float h = (y * q) * e;
    const float phi_large = g < 0.0f ? h : 1.0f - h;
    const float phi = a < 1.0f ? phi_small : phi_large;
    if constexpr (kGrad) *dgelu = (g * kInvSqrt2Pi) * e + phi;
    return g * phi;
  }
};

// gelu(g) = 0.5 g (1 + tanh(u)) = g * sigmoid(2u), u = sqrt(2/pi) (g + 0.044715 g^3).
// sigmoid(2u) and 1 - sigmoid(2u) are both taken from e = exp(-|2u|) <= 1, so
// neither overflows nor cancels.
struct GeluTanh {
  template <bool kGrad>
  static FG_GEGLU_INLINE float eval(float g, float* dgelu) {
    constexpr float kTwoBeta = 2.0f * 0.797884560802865356f;  // 2 * sqrt(2/pi)
    constexpr float kKappa = 0.044715f;
    const float g2 = g * g;
    const float two_u = kTwoBeta * g * (kKappa * g2 + 1.0f);
    const float e = exp_neg(-std::fabs(two_u));
    const float r = 1.0f / (1.0f + e);  // sigmoid(|2u|)
    const float er = e * r;             // 1 - sigmoid(|2u|)
    const bool pos = two_u >= 0.0f;
    const float sig = pos ? r : er;
    if constexpr (kGrad) {
      // d/dg g * sigmoid(2u) = sig + g * sig * (1 - sig) * 2u'
      const float two_du = kTwoBeta * ((3.0f * kKappa) * g2 + 1.0f);
      *dgelu = (g * (r * er)) * two_du + sig;
    }
    return g * sig;
  }
};

template <class Act>
void fwd_block(const float* __restrict h, const float* __restrict g, float* __restrict out,
               int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = h[i] * Act::template eval<false>(g[i], nullptr);
}

template <class Act>
void bwd_block(const float* __restrict dout, const float* __restrict h, const float* __restrict g,
               float* __restrict dh, float* __restrict dg, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float d;
    const float gl = Act::template eval<true>(g[i], &d);
    const float dy = dout[i];
    dh[i] = dy * gl;
    dg[i] = (dy * h[i]) * d;
  }
}

using convert::load;
using convert::out_ptr;
using convert::store;

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
void fwd_typed(const T* x, T* out, const Plan& p) {
  const int64_t H = p.H, nb = p.blocks_per_row;
  at::parallel_for(0, p.M * nb, p.grain, [&](int64_t begin, int64_t end) {
    alignas(64) float bh[kBlock], bg[kBlock], bo[kBlock];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r = t / nb;
      const int64_t c0 = (t % nb) * kBlock;
      const int64_t n = std::min(kBlock, H - c0);
      const T* xr = x + r * 2 * H + c0;
      T* o = out + r * H + c0;
      const float* hf = load(xr, n, bh);
      const float* gf = load(xr + H, n, bg);
      float* of = out_ptr(o, bo);
      fwd_block<Act>(hf, gf, of, n);
      store(of, o, n);
    }
  });
}

template <class Act, class T>
void bwd_typed(const T* dout, const T* x, T* dx, const Plan& p) {
  const int64_t H = p.H, nb = p.blocks_per_row;
  at::parallel_for(0, p.M * nb, p.grain, [&](int64_t begin, int64_t end) {
    alignas(64) float bd[kBlock], bh[kBlock], bg[kBlock], bdh[kBlock], bdg[kBlock];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r = t / nb;
      const int64_t c0 = (t % nb) * kBlock;
      const int64_t n = std::min(kBlock, H - c0);
      const T* xr = x + r * 2 * H + c0;
      T* dxr = dx + r * 2 * H + c0;
      const float* df = load(dout + r * H + c0, n, bd);
      const float* hf = load(xr, n, bh);
      const float* gf = load(xr + H, n, bg);
      float* dhf = out_ptr(dxr, bdh);
      float* dgf = out_ptr(dxr + H, bdg);
      bwd_block<Act>(df, hf, gf, dhf, dgf, n);
      store(dhf, dxr, n);
      store(dgf, dxr + H, n);
    }
  });
}

template <class F>
void dispatch_dtype(at::ScalarType dt, F&& f) {
  switch (dt) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}); break;
    default: TORCH_CHECK(false, kName, ": expected float32, float16 or bfloat16, got ", dt);
  }
}

}  // namespace

at::Tensor geglu_fwd_cpu(const at::Tensor& x_in, bool approximate_tanh) {
  check_geglu_x(kName, x_in, c10::DeviceType::CPU);
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty(geglu_half_sizes(x), x.options());
  const int64_t H = x.size(-1) / 2;
  if (out.numel() == 0) return out;
  const Plan p = plan(out.numel() / H, H);
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.const_data_ptr<T>();
    T* op = out.mutable_data_ptr<T>();
    if (approximate_tanh) fwd_typed<GeluTanh>(xp, op, p);
    else fwd_typed<GeluErf>(xp, op, p);
  });
  return out;
}

at::Tensor geglu_bwd_cpu(const at::Tensor& dout_in, const at::Tensor& x_in,
                         bool approximate_tanh) {
  check_geglu_x(kName, x_in, c10::DeviceType::CPU);
  check_geglu_dout(kName, dout_in, x_in);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor dout = dout_in.contiguous();
  at::Tensor dx = at::empty(x.sizes(), x.options());
  const int64_t H = x.size(-1) / 2;
  if (dout.numel() == 0) return dx;
  const Plan p = plan(dout.numel() / H, H);
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* dp = dout.const_data_ptr<T>();
    const T* xp = x.const_data_ptr<T>();
    T* dxp = dx.mutable_data_ptr<T>();
    if (approximate_tanh) bwd_typed<GeluTanh>(dp, xp, dxp, p);
    else bwd_typed<GeluErf>(dp, xp, dxp, p);
  });
  return dx;
}

}  // namespace fastgen
