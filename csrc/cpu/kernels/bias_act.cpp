// Fused bias + activation + gain + clamp on CPU, and its first and second
// derivatives. Reference and contract: fastgen/ops/bias_act.py.
//
//   z  = x + b[(o / inner) % C]            (o: the element's memory offset)
//   y  = clamp(act(z) * gain, -clamp, clamp)
//   dx = dy * gain * act^(order)(z) * [-clamp <= act(z) * gain <= clamp]
//
// Design
//  * Memory-bound: the forward reads x and writes y once, the gradient reads dy
//    and x and writes dx once (eager PyTorch: three or four passes each way).
//    z is recomputed in the gradient rather than stored, and the bias
//    gradient is summed in fp32 registers while dx is written (eager
//    PyTorch reads dx once more for it).
//  * The tensors are walked linearly in memory order, cut into blocks of
//    kBlock elements for at::parallel_for. Within a block the bias index
//    changes only at run boundaries: with inner > 1 (NCHW, dim 1) a run of
//    `inner` elements shares one bias value (a splat); with inner == 1
//    (channels-last, or the last dim) consecutive elements take consecutive
//    bias entries, loaded as a vector. Any dense layout is one of the two.
//  * One template per (dtype, activation, order): the activation's math is
//    inlined branch-free into the loop; the clamp is a uniform runtime branch.
//  * Math is fp32 in SIMD registers (csrc/cpu/kernels/vec.h), without libm:
//      - exp: gelu_math::exp_neg (Cephes' expf polynomial, ~1 ulp).
//      - sigmoid(z) and 1 - sigmoid(z) both from e = exp(-|z|) <= 1: neither
//        overflows nor cancels, so sigmoid'(z) = e / (1 + e)^2 keeps its
//        relative accuracy in the tails.
//      - tanh: Cephes' tanhf odd polynomial for |z| < 0.625, else from
//        e = exp(-2|z|): 1 - |tanh| = 2e / (1 + e) directly, so tanh' =
//        (1 - |t|)(1 + |t|) does not cancel near |t| = 1.
//      - exp(z) - 1 for z <= 0 (elu, selu): a degree-8 Taylor polynomial for
//        z > -0.35 (truncation < 1e-9 relative), exp(z) - 1 below, where it no
//        longer cancels.
//      - softplus = max(z, 0) + log1p(exp(-|z|)), the identity above 20 as in
//        F.softplus; log1p(u) = log(1 + u) + (u - ((1 + u) - 1)) / (1 + u)
//        with Cephes' logf polynomial.
//      - gelu is exact (erf), shared with geglu (gelu_math.h).
//    NaN propagates as in PyTorch (every select keeps z's NaN); no fast-math.

#include "cpu/kernels/kernels.h"
#include "cpu/kernels/gelu_math.h"
#include "cpu/kernels/vec.h"

#include <algorithm>
#include <cstdint>

FG_ISA_BEGIN
namespace {

using gelu_math::exp_neg;
using gelu_math::vabs;

constexpr int64_t kBlock = 4096;     // elements per parallel task
constexpr int64_t kGrainBlocks = 4;  // small tensors stay on one thread

enum Act : int { kLinear, kRelu, kLrelu, kTanh, kSigmoid, kSilu, kGelu, kElu, kSelu, kSoftplus };

constexpr float kSeluLambda = 1.0507009873554804934f;
constexpr float kSeluAlpha = 1.6732632423543772848f;
constexpr float kSoftplusThreshold = 20.0f;

FG_INLINE vfloat copysign_of(vfloat mag, vfloat sign_src) {
  const vuint s = __builtin_bit_cast(vuint, sign_src) & 0x80000000u;
  return __builtin_bit_cast(vfloat, __builtin_bit_cast(vuint, mag) | s);
}

// Sigmoid pieces from e = exp(-|z|): s = sigmoid(z), sc = 1 - s.
FG_INLINE void sigmoid_parts(vfloat z, vfloat* s, vfloat* sc) {
  const vfloat e = exp_neg(-vabs(z));
  const vfloat r = 1.0f / (1.0f + e);
  const vfloat er = e * r;
  *s = z >= 0.0f ? r : er;
  *sc = z >= 0.0f ? er : r;
}

// t = tanh(z) and om = 1 - |tanh(z)|.
FG_INLINE void tanh_parts(vfloat z, vfloat* t, vfloat* om) {
  const vfloat a = vabs(z);
  const vfloat z2 = z * z;
  vfloat p = splat(-5.70498872745e-3f);
  p = vfma(p, z2, splat(2.06390887954e-2f));
  p = vfma(p, z2, splat(-5.37397155531e-2f));
  p = vfma(p, z2, splat(1.33314422036e-1f));
  p = vfma(p, z2, splat(-3.33332819422e-1f));
  const vfloat t_small = vfma(p * z2, z, z);
  const vfloat e = exp_neg(-2.0f * a);
  const vfloat om_large = (2.0f * e) / (1.0f + e);
  *t = a < 0.625f ? t_small : copysign_of(1.0f - om_large, z);
  *om = a < 0.625f ? 1.0f - vabs(t_small) : om_large;
}

// exp(z) - 1 for z <= 0 (z is min(z, 0), NaN kept).
FG_INLINE vfloat expm1_neg(vfloat z) {
  vfloat p = splat(1.0f / 40320.0f);
  p = vfma(p, z, splat(1.0f / 5040.0f));
  p = vfma(p, z, splat(1.0f / 720.0f));
  p = vfma(p, z, splat(1.0f / 120.0f));
  p = vfma(p, z, splat(1.0f / 24.0f));
  p = vfma(p, z, splat(1.0f / 6.0f));
  p = vfma(p, z, splat(0.5f));
  const vfloat small = vfma(p * z, z, z);
  const vfloat large = exp_neg(z) - 1.0f;
  return z > -0.35f ? small : large;
}

// log1p(u) for u in [0, 1] (u = exp(-|z|)).
FG_INLINE vfloat log1p_unit(vfloat u) {
  constexpr float kSqrt2 = 1.41421356237f;
  constexpr float kLn2 = 0.693147180559945f;
  const vfloat w = 1.0f + u;
  const vfloat corr = (u - (w - 1.0f)) / w;  // what rounding 1 + u lost
  const vfloat big = w > kSqrt2 ? splat(1.0f) : vfloat{};  // 1 when log(w) = log(w / 2) + ln2
  const vfloat m = w > kSqrt2 ? w * 0.5f : w;
  const vfloat x = m - 1.0f;  // exact (Sterbenz)
  const vfloat x2 = x * x;
  vfloat p = splat(7.0376836292e-2f);
  p = vfma(p, x, splat(-1.1514610310e-1f));
  p = vfma(p, x, splat(1.1676998740e-1f));
  p = vfma(p, x, splat(-1.2420140846e-1f));
  p = vfma(p, x, splat(1.4249322787e-1f));
  p = vfma(p, x, splat(-1.6668057665e-1f));
  p = vfma(p, x, splat(2.0000714765e-1f));
  p = vfma(p, x, splat(-2.4999993993e-1f));
  p = vfma(p, x, splat(3.3333331174e-1f));
  const vfloat logm = vfma(splat(-0.5f), x2, vfma(p * x2, x, x));
  return vfma(big, splat(kLn2), logm) + corr;
}

// act^(kOrder)(z): the value for kOrder 0, else the derivative.
template <int A, int kOrder>
FG_INLINE vfloat act_eval(vfloat z, float alpha) {
  const vfloat one = splat(1.0f), zero = vfloat{};
  if constexpr (A == kLinear) {
    return kOrder == 0 ? z : (kOrder == 1 ? one : zero);
  } else if constexpr (A == kRelu) {
    if constexpr (kOrder == 0) return z < 0.0f ? zero : z;
    else if constexpr (kOrder == 1) return z > 0.0f ? one : zero;
    else return zero;
  } else if constexpr (A == kLrelu) {
    if constexpr (kOrder == 0) return z > 0.0f ? z : z * alpha;
    else if constexpr (kOrder == 1) return z > 0.0f ? one : splat(alpha);
    else return zero;
  } else if constexpr (A == kTanh) {
    vfloat t, om;
    tanh_parts(z, &t, &om);
    if constexpr (kOrder == 0) return t;
    const vfloat d1 = om * (2.0f - om);  // (1 - |t|)(1 + |t|)
    if constexpr (kOrder == 1) return d1;
    else return -2.0f * t * d1;
  } else if constexpr (A == kSigmoid) {
    vfloat s, sc;
    sigmoid_parts(z, &s, &sc);
    if constexpr (kOrder == 0) return s;
    else if constexpr (kOrder == 1) return s * sc;
    else return (s * sc) * (sc - s);
  } else if constexpr (A == kSilu) {
    vfloat s, sc;
    sigmoid_parts(z, &s, &sc);
    if constexpr (kOrder == 0) return z * s;
    else if constexpr (kOrder == 1) return s * vfma(z, sc, one);
    else return (s * sc) * vfma(z, sc - s, splat(2.0f));
  } else if constexpr (A == kGelu) {
    vfloat gauss;
    const vfloat cdf = gelu_math::gelu_cdf(z, &gauss);
    const vfloat pdf = gauss * gelu_math::kInvSqrt2Pi;
    if constexpr (kOrder == 0) return z * cdf;
    else if constexpr (kOrder == 1) return vfma(z, pdf, cdf);
    else return pdf * (2.0f - z * z);
  } else if constexpr (A == kElu || A == kSelu) {
    const float a = A == kElu ? alpha : kSeluAlpha;
    const float scale = A == kElu ? 1.0f : kSeluLambda;
    const vfloat em1 = expm1_neg(vmin(z, 0.0f));
    vfloat r;
    if constexpr (kOrder == 0) r = z > 0.0f ? z : em1 * a;
    else if constexpr (kOrder == 1) r = z > 0.0f ? one : (em1 + 1.0f) * a;
    else r = z > 0.0f ? zero : (em1 + 1.0f) * a;
    return A == kElu ? r : r * scale;
  } else {  // softplus
    if constexpr (kOrder == 0) {
      const vfloat sp = vmax(z, 0.0f) + log1p_unit(exp_neg(-vabs(z)));
      return z > kSoftplusThreshold ? z : sp;
    } else {
      vfloat s, sc;
      sigmoid_parts(z, &s, &sc);
      const vfloat d = kOrder == 1 ? s : s * sc;
      return z > kSoftplusThreshold ? (kOrder == 1 ? one : zero) : d;
    }
  }
}

// The kernel's parameters by value: read through the BiasActArgs reference, every store to `out` (which may
// alias a float field, as far as the compiler knows) would reload alpha, gain and clamp each vector.
struct Params {
  float alpha, gain, clamp;
  bool has_clamp;
  int64_t C, inner;
  const float* b;
};

template <int A, int kOrder, class T>
struct Run {
  const Params a;
  const T* __restrict x;
  const T* __restrict dy;
  T* __restrict out;

  // cnt elements at offset o with bias vector bv; returns what was stored, in fp32 (lanes past cnt: 0).
  FG_INLINE vfloat step(int64_t o, vfloat bv, int64_t cnt) const {
    const vfloat z = load_n(x + o, cnt) + bv;
    if constexpr (kOrder == 0) {
      vfloat y = act_eval<A, 0>(z, a.alpha) * a.gain;
      if (a.has_clamp) y = vmax(vmin(y, a.clamp), -a.clamp);
      store_n(out + o, y, cnt);
      return y;
    } else {
      vfloat g = (load_n(dy + o, cnt) * a.gain) * act_eval<A, kOrder>(z, a.alpha);
      if (a.has_clamp) {
        const vfloat y = act_eval<A, 0>(z, a.alpha) * a.gain;
        g = (y >= -a.clamp) & (y <= a.clamp) ? g : vfloat{};
      }
      store_n(out + o, g, cnt);
      return cnt == kW ? g : keep_first(g, cnt);
    }
  }

  // A partial vector, out of line: inlined, every loop would carry a second copy of the activation's math
  // (half of this file's compile time, for a path that runs once per run of elements).
  __attribute__((noinline)) vfloat step_tail(int64_t o, vfloat bv, int64_t cnt) const { return step(o, bv, cnt); }

  // [o, o + n) with one bias value; adds the sum of the gradient to *acc (gradient with a bias).
  FG_INLINE void run_splat(int64_t o, int64_t n, float bias, float* acc) const {
    const vfloat bv = splat(bias);
    vfloat sum{};
    int64_t i = 0;
    for (; i + kW <= n; i += kW) sum += step(o + i, bv, kW);
    if (i < n) sum += step_tail(o + i, bv, n - i);
    if (acc != nullptr) *acc += hsum(sum);
  }

  // [o, o + n) taking bias entries b[0], b[1], ...; the gradient adds into acc[0], acc[1], ...
  FG_INLINE void run_vector(int64_t o, int64_t n, const float* b, float* acc) const {
    int64_t i = 0;
    for (; i + kW <= n; i += kW) {
      const vfloat g = step(o + i, load_n(b + i, kW), kW);
      if (acc != nullptr) store_n(acc + i, load_n(acc + i, kW) + g, kW);
    }
    if (i < n) {
      const vfloat g = step_tail(o + i, load_n(b + i, n - i), n - i);
      if (acc != nullptr) store_n(acc + i, load_n(acc + i, n - i) + g, n - i);
    }
  }

  // Elements [begin, end); acc: this part's bias-gradient row, or nullptr. One division per block: the
  // bias index then advances run by run (a division per 64-element run cost as much as the run's math).
  void block(int64_t begin, int64_t end, float* acc) const {
    if (a.b == nullptr) return run_splat(begin, end - begin, 0.0f, nullptr);
    int64_t o = begin;
    if (a.inner == 1) {
      int64_t c = o % a.C;
      while (o < end) {
        const int64_t n = std::min(end - o, a.C - c);
        run_vector(o, n, a.b + c, acc == nullptr ? nullptr : acc + c);
        o += n;
        c = 0;
      }
      return;
    }
    const int64_t q = o / a.inner;
    int64_t r = o - q * a.inner;  // position within the run
    int64_t c = q % a.C;
    while (o < end) {
      const int64_t n = std::min(end - o, a.inner - r);
      run_splat(o, n, a.b[c], acc == nullptr ? nullptr : acc + c);
      o += n;
      r = 0;
      if (++c == a.C) c = 0;
    }
  }
};

template <int A, int kOrder, class T>
void run_typed(const BiasActArgs& a) {
  const Params params{a.alpha, a.gain, a.clamp, a.clamp >= 0.0f, a.C, a.inner, a.b};
  const Run<A, kOrder, T> r{params, static_cast<const T*>(a.x), static_cast<const T*>(a.dy),
                            static_cast<T*>(a.out)};
  const int64_t blocks = (a.numel + kBlock - 1) / kBlock;
  if (kOrder == 0 || a.b == nullptr || a.db_parts == nullptr) {
    parallel_for(a.par, 0, blocks, kGrainBlocks, [&](int64_t b0, int64_t b1) {
      for (int64_t t = b0; t < b1; ++t) r.block(t * kBlock, std::min(a.numel, (t + 1) * kBlock), nullptr);
    });
    return;
  }
  // The bias gradient: part p covers a contiguous run of blocks and sums into row p, so no two threads
  // write one row and the rows are added up once at the end (csrc/cpu/bias_act.cpp).
  const int64_t parts = a.parts;
  const int64_t per_part = (blocks + parts - 1) / parts;
  parallel_for(a.par, 0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t e0 = std::min(a.numel, p * per_part * kBlock);
      const int64_t e1 = std::min(a.numel, (p + 1) * per_part * kBlock);
      if (e0 < e1) r.block(e0, e1, a.db_parts + p * a.C);
    }
  });
}

template <int A, class T>
void run_order(const BiasActArgs& a) {
  if (a.order == 0) run_typed<A, 0, T>(a);
  else if (a.order == 1) run_typed<A, 1, T>(a);
  else run_typed<A, 2, T>(a);
}

template <class T>
void run_act(const BiasActArgs& a) {
  switch (a.act) {
    case kLinear: return run_order<kLinear, T>(a);
    case kRelu: return run_order<kRelu, T>(a);
    case kLrelu: return run_order<kLrelu, T>(a);
    case kTanh: return run_order<kTanh, T>(a);
    case kSigmoid: return run_order<kSigmoid, T>(a);
    case kSilu: return run_order<kSilu, T>(a);
    case kGelu: return run_order<kGelu, T>(a);
    case kElu: return run_order<kElu, T>(a);
    case kSelu: return run_order<kSelu, T>(a);
    default: return run_order<kSoftplus, T>(a);
  }
}

}  // namespace

void bias_act(const BiasActArgs& a) {
  if (a.numel == 0) return;
  with_dtype(a.dtype, [&](auto tag) { run_act<decltype(tag)>(a); });
}

FG_ISA_END
