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

// This file is compiled once per ISA variant (csrc/cpu/kernels/common.h);
// the checks and allocation are in csrc/cpu/group_norm.cpp.

#include "cpu/kernels/kernels.h"
#include "cpu/kernels/vec.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

FG_ISA_BEGIN
namespace {

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

// The same for elementwise bodies (no accumulators). With 16 vector
// registers (AVX2, SSE2) the 4x unrolled SiLU + fp16/bf16 rounding body
// spills, and out-of-order execution overlaps the iterations anyway; with
// AVX-512's 32 registers the unrolled loop is kept.
template <typename F>
FG_INLINE void for_each_vector(int64_t n, F&& body) {
#if FG_VEC_BYTES == 64
  for_vectors(n, static_cast<F&&>(body));
#else
  using I0 = std::integral_constant<int, 0>;
  int64_t i = 0;
  for (; i + kW <= n; i += kW) body(i, kW, I0{});
  if (i < n) body(i, n - i, I0{});
#endif
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
  for_each_vector(n, [&](int64_t i, int64_t cnt, auto) FG_INLINE_LAMBDA {
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
  for_each_vector(n, [&](int64_t i, int64_t cnt, auto) FG_INLINE_LAMBDA {
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
void fwd_cf_fused(const Parallel& par, const T* x, const T* r, T* y, const float* w,
                  const float* b, const Shape& sh, double eps, float* mean, float* rstd) {
  const int64_t cpg = sh.cpg(), S = sh.S, L = sh.group_elems();
  parallel_for(par, 0, sh.N * sh.G, grain_for(L), [&](int64_t begin, int64_t end) {
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
void fwd_cf_split(const Parallel& par, const T* x, const T* r, T* y, const float* w,
                  const float* b, const Shape& sh, double eps, float* mean, float* rstd) {
  const int64_t C = sh.C, S = sh.S, cpg = sh.cpg(), L = sh.group_elems();
  const int64_t nb = (L + kStatBlock - 1) / kStatBlock;  // blocks per group
  std::vector<Moments> blocks(sh.N * sh.G * nb);
  parallel_for(par, 0, sh.N * sh.G * nb, grain_for(kStatBlock), [&](int64_t begin, int64_t end) {
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
  parallel_for(par, 0, sh.N * C, grain_for(S), [&](int64_t begin, int64_t end) {
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
void bwd_cf(const Parallel& par, const T* dy, const T* x, T* dx, const float* w,
            const float* b, const float* mean, const float* rstd, const Shape& sh, double* sum_dz,
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
  if (sh.N * G >= par.num_threads) {
    // Fused per group: the dx pass re-reads x (and dy or dz) from L2.
    const bool keep_dz = kSilu && L <= kMaxDzScratch;
    parallel_for(par, 0, sh.N * G, grain_for(2 * L), [&](int64_t begin, int64_t end) {
      std::vector<float> scratch(keep_dz ? L : 0);
      float* dz_group = keep_dz ? scratch.data() : nullptr;
      for (int64_t ng = begin; ng < end; ++ng) {
        for (int64_t j = 0; j < cpg; ++j) row_sums(ng * cpg + j, dz_group);
        group_dx(ng, dz_group);
      }
    });
  } else {
    parallel_for(par, 0, sh.N * C, grain_for(S), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) row_sums(i, nullptr);
    });
    parallel_for(par, 0, sh.N * G, 1, [&](int64_t begin, int64_t end) {
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
void fwd_cl(const Parallel& par, const T* x, const T* r, T* y, const float* w,
                  const float* b, const Shape& sh, double eps, float* mean, float* rstd) {
  const int64_t C = sh.C, S = sh.S, G = sh.G;
  const Chunks ch(sh);
  std::vector<Moments> chunk_mom(sh.N * ch.per_n * G);
  parallel_for(par, 0, sh.N * ch.per_n, ch.grain(sh), [&](int64_t begin, int64_t end) {
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

  parallel_for(par, 0, sh.N * ch.per_n, ch.grain(sh), [&](int64_t begin, int64_t end) {
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
void bwd_cl(const Parallel& par, const T* dy, const T* x, T* dx, const float* w,
            const float* b, const float* mean, const float* rstd, const Shape& sh, double* sum_dz,
            double* sum_dz_xhat) {
  const int64_t C = sh.C, S = sh.S, G = sh.G, cpg = sh.cpg();
  const Chunks ch(sh);
  const std::vector<float> mean_c = expand_groups(mean, sh), rstd_c = expand_groups(rstd, sh);

  // Pass 1: per-chunk, per-channel sums of dz and dz * xhat. With SiLU and a
  // tensor small enough to stay in cache, dz is kept for pass 2 as well.
  const bool keep_dz = kSilu && sh.N * S * C <= kMaxDzScratchCl;
  std::unique_ptr<float[]> dz_all;  // same (n, s, c) indexing as x
  if (keep_dz) dz_all.reset(new float[sh.N * S * C]);
  float* dzp = dz_all.get();
  std::vector<float> part(sh.N * ch.per_n * 2 * C);
  parallel_for(par, 0, sh.N * ch.per_n, ch.grain(sh), [&](int64_t begin, int64_t end) {
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
  parallel_for(par, 0, sh.N * ch.per_n, ch.grain(sh), [&](int64_t begin, int64_t end) {
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

// Calls f(T{}, flag_a, flag_b) with the dtype and both flags as compile-time
// constants (std::bool_constant).
template <typename F>
void dispatch(Dtype dt, bool flag_a, bool flag_b, F&& f) {
  with_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    if (flag_a && flag_b) f(T{}, std::true_type{}, std::true_type{});
    else if (flag_a) f(T{}, std::true_type{}, std::false_type{});
    else if (flag_b) f(T{}, std::false_type{}, std::true_type{});
    else f(T{}, std::false_type{}, std::false_type{});
  });
}

}  // namespace

void group_norm_fwd(const GroupNormArgs& a) {
  const Shape sh{a.N, a.C, a.S, a.G};
  dispatch(a.dtype, a.silu, a.residual != nullptr, [&](auto tag, auto silu_c, auto res_c) {
    using T = decltype(tag);
    constexpr bool kSilu = decltype(silu_c)::value, kRes = decltype(res_c)::value;
    const T* xp = static_cast<const T*>(a.x);
    const T* rp = static_cast<const T*>(a.residual);
    T* yp = static_cast<T*>(a.y);
    if (a.channels_last || sh.S == 1)  // S == 1: both layouts coincide; rows of C vectorise
      fwd_cl<T, kSilu, kRes>(a.par, xp, rp, yp, a.weight, a.bias, sh, a.eps, a.mean, a.rstd);
    else if (sh.N * sh.G >= a.par.num_threads)
      fwd_cf_fused<T, kSilu, kRes>(a.par, xp, rp, yp, a.weight, a.bias, sh, a.eps, a.mean, a.rstd);
    else
      fwd_cf_split<T, kSilu, kRes>(a.par, xp, rp, yp, a.weight, a.bias, sh, a.eps, a.mean, a.rstd);
  });
}

void group_norm_bwd(const GroupNormArgs& a) {
  const Shape sh{a.N, a.C, a.S, a.G};
  // S == 1: both layouts coincide, and rows of C channels vectorise better.
  dispatch(a.dtype, a.silu, a.channels_last || sh.S == 1, [&](auto tag, auto silu_c, auto cl_c) {
    using T = decltype(tag);
    constexpr bool kSilu = decltype(silu_c)::value;
    const T* dyp = static_cast<const T*>(a.dy);
    const T* xp = static_cast<const T*>(a.x);
    T* dxp = static_cast<T*>(a.y);
    if (decltype(cl_c)::value)
      bwd_cl<T, kSilu>(a.par, dyp, xp, dxp, a.weight, a.bias, a.mean, a.rstd, sh, a.sum_dz,
                       a.sum_dz_xhat);
    else
      bwd_cf<T, kSilu>(a.par, dyp, xp, dxp, a.weight, a.bias, a.mean, a.rstd, sh, a.sum_dz,
                       a.sum_dz_xhat);
  });
}

FG_ISA_END
