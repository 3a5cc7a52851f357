// Fused sampler step (DDPM / DDIM / Euler / Heun / DPM-Solver++ and the
// forward process) on CPU. Formula and reference: fastgen/ops/sampling.py.
//
//   e   = model_output                       or  u + g * (c - u)   ([u; c] = model_output, CFG)
//   x0  = c0 * x + c1 * e                    (clamped to [-clip, clip] when clip is set)
//   out = c2 * x + c3 * x0 + c4 * extra1 + c5 * extra2 + c6 * noise
//
// Design
//  * Memory-bound elementwise op: every input is read once and out (and x0)
//    written once. The work is cut into blocks of kBlock elements that never
//    straddle two samples, so a block uses one row of coefficients; blocks are
//    spread over threads with at::parallel_for.
//  * All math is fp32, in exactly the reference's order with a separate
//    multiply and add (FMA contraction is switched off for this file below:
//    GCC contracts by default even without fast-math), so results are
//    bit-identical to the torch reference. The op is memory-bound, so the
//    FMAs would buy no speed.
//  * Each input may have its own dtype. fp32 inputs are read in place; fp16 and
//    bf16 inputs are converted block by block into L1-resident stack buffers
//    (F16C / AVX-512 for fp16, a shift for bf16). fp32 outputs are written in
//    place; fp16/bf16 outputs are computed into a buffer and rounded to
//    nearest-even on the way out. So dtypes are runtime, and only the inner
//    loop is a template, over the six present/absent flags (CFG, clip, x0,
//    extra1, extra2, noise): absent tensors cost nothing, and every variant is
//    one `omp simd` loop with no branches.
//  * Layout: all tensors are read in sample's memory order. sample is dense
//    with the batch dim outermost (contiguous, channels-last, ...) and the
//    others have its strides: the Python op guarantees it, and the entry
//    point (csrc/cpu/sampling.cpp) checks it. out and x0 get sample's layout.
//
// This file is compiled once per ISA variant (csrc/cpu/kernels/common.h).

#include "cpu/kernels/kernels.h"
#include "cpu/kernels/convert.h"

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <utility>

#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

// Must precede every function definition; see the design notes.
#pragma GCC optimize("fp-contract=off")

FG_ISA_BEGIN
namespace {

// Elements per block. Worst case (every tensor half precision) uses eight
// fp32 buffers of this size: 16 KB, which stays in L1.
constexpr int64_t kBlock = 512;
// Minimum blocks per parallel task (16K elements), so that small tensors do
// not pay for waking threads.
constexpr int64_t kGrainBlocks = 32;
constexpr int kNumCoeffs = 7;

using convert::load;
using convert::out_ptr;
using convert::store;

// ------------------------------------------------------------- inner loop

enum Flag : int {
  kCfg = 1, kClip = 2, kX0 = 4, kE1 = 8, kE2 = 16, kNoise = 32,
};
constexpr int kNumVariants = 64;

// One block, all pointers fp32 and disjoint.
struct Block {
  const float* x;
  const float* u;  // model_output, or the unconditional half with CFG
  const float* c;  // conditional half (CFG only)
  const float* e1;
  const float* e2;
  const float* nz;
  float* out;
  float* x0;
  int64_t n;
};

struct Params {
  float c[kNumCoeffs];
  float g, lo, hi;
};

template <int F>
void step_block(const Block& b, const Params& p) {
  const float* __restrict x = b.x;
  const float* __restrict u = b.u;
  const float* __restrict c = b.c;
  const float* __restrict e1 = b.e1;
  const float* __restrict e2 = b.e2;
  const float* __restrict nz = b.nz;
  float* __restrict out = b.out;
  float* __restrict x0p = b.x0;
  const float c0 = p.c[0], c1 = p.c[1], c2 = p.c[2], c3 = p.c[3], c4 = p.c[4], c5 = p.c[5],
              c6 = p.c[6];
  const float g = p.g, lo = p.lo, hi = p.hi;
#pragma omp simd
  for (int64_t i = 0; i < b.n; ++i) {
    float e = u[i];
    if constexpr ((F & kCfg) != 0) e = e + g * (c[i] - e);
    const float xi = x[i];
    float x0 = c0 * xi + c1 * e;
    if constexpr ((F & kClip) != 0) {
      // torch.clamp: min(max(x0, lo), hi), NaN propagates (comparisons are false).
      x0 = x0 < lo ? lo : x0;
      x0 = x0 > hi ? hi : x0;
    }
    float o = c2 * xi + c3 * x0;
    if constexpr ((F & kE1) != 0) o = o + c4 * e1[i];
    if constexpr ((F & kE2) != 0) o = o + c5 * e2[i];
    if constexpr ((F & kNoise) != 0) o = o + c6 * nz[i];
    out[i] = o;
    if constexpr ((F & kX0) != 0) x0p[i] = x0;
  }
}

using StepFn = void (*)(const Block&, const Params&);

template <std::size_t... I>
constexpr std::array<StepFn, sizeof...(I)> make_table(std::index_sequence<I...>) {
  return {&step_block<static_cast<int>(I)>...};
}
constexpr std::array<StepFn, kNumVariants> kStepTable =
    make_table(std::make_index_sequence<kNumVariants>{});

}  // namespace

void sampling_step(const SamplingArgs& a) {
  const int64_t N = a.N, S = a.S, coeff_stride = a.coeff_stride;
  if (N * S == 0) return;
  const bool cfg = a.cfg, return_x0 = a.return_x0;
  const int flags = (cfg ? kCfg : 0) | (a.clip ? kClip : 0) | (return_x0 ? kX0 : 0) |
                    (a.extra[0] ? kE1 : 0) | (a.extra[1] ? kE2 : 0) | (a.extra[2] ? kNoise : 0);
  const StepFn fn = kStepTable[flags];
  const float g = cfg ? a.guidance : 0.0f;
  const float hi = a.clip ? a.clip_value : 0.0f;
  const float* cp = a.coeffs;
  const Dtype sdt = a.sample_dtype, mdt = a.model_output_dtype;
  const void* xp = a.sample;
  const void* mp = a.model_output;
  const int64_t cond_off = N * S;  // elements from u to c with CFG
  const void* const* ep = a.extra;
  const Dtype* edt = a.extra_dtype;
  void* op = a.out;
  void* x0p = a.x0;

  const int64_t blocks_per_sample = (S + kBlock - 1) / kBlock;
  parallel_for(a.par, 0, N * blocks_per_sample, kGrainBlocks, [&](int64_t begin, int64_t end) {
    alignas(64) float bx[kBlock], bu[kBlock], bc[kBlock], be[3][kBlock], bo[kBlock], b0[kBlock];
    Params p;
    p.g = g;
    p.lo = -hi;
    p.hi = hi;
    int64_t loaded_n = -1;
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t n = blk / blocks_per_sample;
      const int64_t start = (blk - n * blocks_per_sample) * kBlock;
      const int64_t len = std::min(kBlock, S - start);
      const int64_t off = n * S + start;
      if (n != loaded_n) {
        std::memcpy(p.c, cp + n * coeff_stride, sizeof(p.c));
        loaded_n = n;
      }
      Block b;
      b.n = len;
      b.x = load(xp, sdt, off, len, bx);
      b.u = load(mp, mdt, off, len, bu);
      b.c = cfg ? load(mp, mdt, off + cond_off, len, bc) : nullptr;
      b.e1 = ep[0] ? load(ep[0], edt[0], off, len, be[0]) : nullptr;
      b.e2 = ep[1] ? load(ep[1], edt[1], off, len, be[1]) : nullptr;
      b.nz = ep[2] ? load(ep[2], edt[2], off, len, be[2]) : nullptr;
      b.out = out_ptr(op, sdt, off, bo);
      b.x0 = return_x0 ? out_ptr(x0p, sdt, off, b0) : nullptr;
      fn(b, p);
      store(bo, op, sdt, off, len);
      if (return_x0) store(b0, x0p, sdt, off, len);
    }
  });
}

FG_ISA_END
