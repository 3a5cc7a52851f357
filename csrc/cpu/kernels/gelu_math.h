// Vectorised erf-family math shared by the kernels with an exact gelu (geglu,
// bias_act). Per-ISA code: include only from csrc/cpu/kernels/*.cpp. The
// accuracy figures are in csrc/cpu/kernels/geglu.cpp's header comment.
#pragma once

#include "cpu/kernels/common.h"
#include "cpu/kernels/vec.h"

FG_ISA_BEGIN
namespace gelu_math {

FG_INLINE vfloat vabs(vfloat v) {
  return __builtin_bit_cast(vfloat, __builtin_bit_cast(vuint, v) & 0x7fffffffu);
}

// e^x for x <= 0, ~1 ulp (Cody-Waite reduction, Cephes' expf polynomial);
// 0 for x < -87 (results below 1.6e-38 flush to zero, -inf included); NaN for
// NaN. No clamps and no float->int conversion: 2^n comes from the bits of the
// rounding sum t = x / ln2 + 1.5 * 2^23, whose low mantissa bits hold n.
FG_INLINE vfloat exp_neg(vfloat x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;  // 10 significant bits: n * kLn2Hi is exact
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const vfloat t = vfma(x, splat(kLog2e), splat(kRound));
  const vfloat n = t - kRound;
  vfloat r = vfma(n, splat(-kLn2Hi), x);
  r = vfma(n, splat(-kLn2Lo), r);
  vfloat p = splat(1.9875691500e-4f);
  p = vfma(p, r, splat(1.3981999507e-3f));
  p = vfma(p, r, splat(8.3334519073e-3f));
  p = vfma(p, r, splat(4.1665795894e-2f));
  p = vfma(p, r, splat(1.6666665459e-1f));
  p = vfma(p, r, splat(5.0000001201e-1f));
  p = vfma(p, r * r, r) + 1.0f;
  // (n + 127) << 23 for n in [-126, 0]; garbage below -87, which is flushed.
  const vuint scale = (__builtin_bit_cast(vuint, t) - float_to_bits(kRound) + 127u) << 23;
  const vfloat res = p * __builtin_bit_cast(vfloat, scale);
  return x < -87.0f ? vfloat{} : res;
}

constexpr float kInvSqrt2Pi = 0.398942280401432678f;

// Phi(g) = (1 + erf(g / sqrt2)) / 2, and *gauss = exp(-g^2 / 2) (the
// Gaussian density times sqrt(2 pi), which gelu's derivatives need). With
// z = g / sqrt2:
//   |z| < 1 : Phi = (1 + erf(z)) / 2,  erf(z) = z + z * P(z^2)
//   |z| >= 1: Phi = h or 1 - h (g < 0 or not), h = erfc(|z|) / 2
//             = y * Q(y) * exp(-z^2),  y = 1 / (1 + |z| / 2),  Q ~ erfcx / (2y)
FG_INLINE vfloat gelu_cdf(vfloat g, vfloat* gauss) {
  constexpr float kSqrt1_2 = 0.707106781186547524f;
  const vfloat z = g * kSqrt1_2;
  const vfloat s = z * z;
  const vfloat a = vabs(z);
  vfloat p = splat(7.889120752224699e-05f);
  p = vfma(p, s, splat(-0.0008020841632969677f));
  p = vfma(p, s, splat(0.005189535208046436f));
  p = vfma(p, s, splat(-0.026854444295167923f));
  p = vfma(p, s, splat(0.11283600330352783f));
  p = vfma(p, s, splat(-0.3761262595653534f));
  p = vfma(p, s, splat(0.12837916612625122f));
  // erf(z) = z + z * P(z^2) rounds once near erf ~ 0.84 (z * P(z^2) is small),
  // where a direct z * erf(z)/z would round twice.
  const vfloat phi_small = vfma(splat(0.5f), vfma(z, p, z), splat(0.5f));
  const vfloat y = 1.0f / vfma(splat(0.5f), a, splat(1.0f));
  vfloat q = splat(0.044324085116386414f);
  q = vfma(q, y, splat(-0.10813476890325546f));
  q = vfma(q, y, splat(0.037669017910957336f));
  q = vfma(q, y, splat(0.031237907707691193f));
  q = vfma(q, y, splat(0.08967436850070953f));
  q = vfma(q, y, splat(0.12331078201532364f));
  q = vfma(q, y, splat(0.14105015993118286f));
  q = vfma(q, y, splat(0.1410473883152008f));
  *gauss = exp_neg(-s);  // exp(-g^2 / 2)
  const vfloat h = (y * q) * *gauss;
  const vfloat phi_large = g < 0.0f ? h : 1.0f - h;
  return a < 1.0f ? phi_small : phi_large;
}

// Exact gelu(g) = g * Phi(g); with kGrad also gelu'(g) = Phi(g) + g * exp(-g^2 / 2) / sqrt(2 pi).
struct GeluErf {
  template <bool kGrad>
  static FG_INLINE vfloat eval(vfloat g, vfloat* dgelu) {
    vfloat e;
    const vfloat phi = gelu_cdf(g, &e);
    if constexpr (kGrad) *dgelu = vfma(g * kInvSqrt2Pi, e, phi);
    return g * phi;
  }
};

}  // namespace gelu_math
FG_ISA_END
