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
//  * Layout: all tensors are read in sample's memory order. sample must be
//    dense with the batch dim outermost (contiguous, channels-last, ...;
//    anything else is made contiguous), the others are used in place when
//    their strides match sample's and are copied into that layout otherwise.
//    out and x0 get sample's layout.

#include "ops.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

// Must precede every function definition; see the design notes.
#pragma GCC optimize("fp-contract=off")

namespace fastgen {
namespace {

constexpr const char* kName = "fastgen sampling_step (cpu)";
// Elements per block. Worst case (every tensor half precision) uses eight
// fp32 buffers of this size: 16 KB, which stays in L1.
constexpr int64_t kBlock = 512;
// Minimum blocks per parallel task (16K elements), so that small tensors do
// not pay for waking threads.
constexpr int64_t kGrainBlocks = 32;
constexpr int kNumCoeffs = 7;

// ------------------------------------------------------------- dtype I/O

// Returns n fp32 values starting at element `off` of src (src itself for fp32).
const float* load(const void* src, at::ScalarType dt, int64_t off, int64_t n, float* buf) {
  if (dt == at::kFloat) return static_cast<const float*>(src) + off;
  if (dt == at::kBFloat16) {
    const uint16_t* s = static_cast<const uint16_t*>(src) + off;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t bits = static_cast<uint32_t>(s[i]) << 16;
      std::memcpy(&buf[i], &bits, sizeof(float));
    }
    return buf;
  }
  const c10::Half* s = static_cast<const c10::Half*>(src) + off;
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i));
    _mm512_storeu_ps(buf + i, _mm512_cvtph_ps(h));
  }
#elif defined(__F16C__)
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i));
    _mm256_storeu_ps(buf + i, _mm256_cvtph_ps(h));
  }
#endif
  for (; i < n; ++i) buf[i] = static_cast<float>(s[i]);
  return buf;
}

// Where to compute an output block: in place for fp32, else the buffer.
float* out_ptr(void* dst, at::ScalarType dt, int64_t off, float* buf) {
  return dt == at::kFloat ? static_cast<float*>(dst) + off : buf;
}

// Writes a computed block back (a no-op for fp32, computed in place).
void store(const float* buf, void* dst, at::ScalarType dt, int64_t off, int64_t n) {
  if (dt == at::kFloat) return;
  if (dt == at::kBFloat16) {
    uint16_t* d = static_cast<uint16_t*>(dst) + off;
    // Round to nearest even; NaN stays a quiet NaN instead of becoming inf.
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      uint32_t u;
      std::memcpy(&u, &buf[i], sizeof(u));
      const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
      const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
      d[i] = nan ? uint16_t{0x7fc0} : static_cast<uint16_t>(rounded);
    }
    return;
  }
  c10::Half* d = static_cast<c10::Half*>(dst) + off;
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) {
    const __m256i h = _mm512_cvtps_ph(_mm512_loadu_ps(buf + i),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i), h);
  }
#elif defined(__F16C__)
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(buf + i), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i), h);
  }
#endif
  for (; i < n; ++i) d[i] = static_cast<c10::Half>(buf[i]);
}

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

// ------------------------------------------------------------- layout

// Dense, non-overlapping, batch dim outermost (so sample n occupies elements
// [n*S, (n+1)*S) of memory). Contiguous and channels-last tensors qualify.
bool batch_outer_dense(const at::Tensor& t, int64_t S) {
  return t.is_non_overlapping_and_dense() && (t.size(0) <= 1 || t.stride(0) == S);
}

// Whether t (sizes as ref except possibly dim 0) has ref's memory order.
bool same_layout(const at::Tensor& t, const at::Tensor& ref, int64_t S) {
  if (t.size(0) > 1 && t.stride(0) != S) return false;
  for (int64_t d = 1; d < t.dim(); ++d)
    if (t.size(d) > 1 && t.stride(d) != ref.stride(d)) return false;
  return true;
}

// t itself when it has ref's memory order, else a copy in that order.
at::Tensor in_layout(const at::Tensor& t, const at::Tensor& ref, int64_t S) {
  if (same_layout(t, ref, S)) return t;
  std::vector<int64_t> strides(ref.strides().begin(), ref.strides().end());
  strides[0] = S;
  at::Tensor copy = at::empty_strided(t.sizes(), strides, t.options());
  copy.copy_(t);
  return copy;
}

void check_float(const at::Tensor& t, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, kName, ": expected ",
              name, " of dtype float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(t.device().is_cpu(), kName, ": expected ", name, " on the CPU, got ", t.device());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> sampling_step_cpu(
    const at::Tensor& sample_in, const at::Tensor& model_output, const at::Tensor& coeffs_in,
    const std::optional<at::Tensor>& extra1, const std::optional<at::Tensor>& extra2,
    const std::optional<at::Tensor>& noise, std::optional<double> guidance_scale,
    std::optional<double> clip, bool return_x0) {
  check_float(sample_in, "sample");
  check_float(model_output, "model_output");
  TORCH_CHECK(sample_in.dim() >= 1, kName, ": sample needs a batch dimension");
  const int64_t N = sample_in.size(0);
  const bool cfg = guidance_scale.has_value();
  {
    std::vector<int64_t> want(sample_in.sizes().begin(), sample_in.sizes().end());
    if (cfg) want[0] *= 2;
    TORCH_CHECK(model_output.sizes() == at::IntArrayRef(want), kName, ": expected model_output of shape ",
                at::IntArrayRef(want), cfg ? " ([uncond; cond])" : "", ", got ", model_output.sizes());
  }
  TORCH_CHECK(coeffs_in.scalar_type() == at::kFloat && coeffs_in.device().is_cpu(), kName,
              ": expected float32 CPU coeffs, got ", coeffs_in.scalar_type(), " on ",
              coeffs_in.device());
  const bool per_sample = coeffs_in.dim() == 2 && coeffs_in.size(0) == N &&
                          coeffs_in.size(1) == kNumCoeffs;
  const bool shared = coeffs_in.numel() == kNumCoeffs && coeffs_in.dim() <= 2 &&
                      coeffs_in.size(-1) == kNumCoeffs;
  TORCH_CHECK(per_sample || shared, kName, ": expected coeffs of shape (N, 7) with N=", N,
              " (or (7,) / (1, 7)), got ", coeffs_in.sizes());
  const at::Tensor coeffs = coeffs_in.contiguous();
  const int64_t coeff_stride = per_sample && N > 1 ? kNumCoeffs : 0;

  const int64_t numel = sample_in.numel();
  const int64_t S = N > 0 ? numel / N : 0;
  const at::Tensor sample = batch_outer_dense(sample_in, S) ? sample_in : sample_in.contiguous();
  const at::Tensor mo = in_layout(model_output, sample, S);

  const std::optional<at::Tensor>* opt[3] = {&extra1, &extra2, &noise};
  const char* opt_names[3] = {"extra1", "extra2", "noise"};
  at::Tensor extra[3];
  for (int k = 0; k < 3; ++k) {
    if (!opt[k]->has_value() || !(*opt[k])->defined()) continue;
    const at::Tensor& t = **opt[k];
    check_float(t, opt_names[k]);
    TORCH_CHECK(t.sizes() == sample.sizes(), kName, ": expected ", opt_names[k], " of shape ",
                sample.sizes(), ", got ", t.sizes());
    extra[k] = in_layout(t, sample, S);
  }

  at::Tensor out = at::empty_like(sample);
  at::Tensor x0 = return_x0 ? at::empty_like(sample) : at::Tensor();
  if (numel == 0) return {out, x0};

  const int flags = (cfg ? kCfg : 0) | (clip.has_value() ? kClip : 0) | (return_x0 ? kX0 : 0) |
                    (extra[0].defined() ? kE1 : 0) | (extra[1].defined() ? kE2 : 0) |
                    (extra[2].defined() ? kNoise : 0);
  const StepFn fn = kStepTable[flags];

  const float g = cfg ? static_cast<float>(*guidance_scale) : 0.0f;
  const float hi = clip.has_value() ? static_cast<float>(*clip) : 0.0f;
  const float* cp = coeffs.const_data_ptr<float>();

  const at::ScalarType sdt = sample.scalar_type(), mdt = mo.scalar_type();
  const void* xp = sample.const_data_ptr();
  const char* mp = static_cast<const char*>(mo.const_data_ptr());
  const int64_t cond_off = N * S;  // elements from u to c with CFG
  const void* ep[3] = {nullptr, nullptr, nullptr};
  at::ScalarType edt[3] = {sdt, sdt, sdt};
  for (int k = 0; k < 3; ++k)
    if (extra[k].defined()) {
      ep[k] = extra[k].const_data_ptr();
      edt[k] = extra[k].scalar_type();
    }
  void* op = out.mutable_data_ptr();
  void* x0p = return_x0 ? x0.mutable_data_ptr() : nullptr;

  const int64_t blocks_per_sample = (S + kBlock - 1) / kBlock;
  at::parallel_for(0, N * blocks_per_sample, kGrainBlocks, [&](int64_t begin, int64_t end) {
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
  return {out, x0};
}

}  // namespace fastgen
