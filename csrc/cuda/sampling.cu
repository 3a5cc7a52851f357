// Fused sampler step on CUDA; same contract as sampling_step_cpu (csrc/ops.h),
// spec: _reference_step in fastgen/ops/sampling.py.
//
//   e   = model_output                       or  u + g * (c - u)   ([u; c] = model_output, CFG)
//   x0  = c0 * x + c1 * e                    (clamped to [-clip, clip] when clip is set)
//   out = c2 * x + c3 * x0 + c4 * extra1 + c5 * extra2 + c6 * noise
//
// Design
//  * Memory-bound elementwise op. Grid (blocks_x, min(N, 65535)): blockIdx.y
//    walks the samples (so each thread loads its sample's 7 coefficients once
//    per sample, no per-element division), and the x dimension grid-strides
//    over that sample's elements.
//  * Vector path: each thread moves 8 elements per iteration with 128-bit
//    accesses (two float4 for fp32, one uint4 of 8 halves / bfloat16s), using
//    streaming (evict-first) loads and stores since nothing is reused. Taken
//    when every pointer is 16-byte aligned and the per-sample size S is a
//    multiple of 8 (then every sample's start, and the cond half of a CFG
//    batch, stays aligned) -- always true for latents (C*H*W). Otherwise a
//    scalar grid-stride loop.
//  * Each tensor may have its own dtype; the dtype of each input and of the
//    outputs is a runtime value (a warp-uniform switch, free in a memory-bound
//    kernel), while the six present/absent flags (CFG, clip, x0, extra1,
//    extra2, noise) are template parameters: 64 small kernels, absent inputs
//    are neither loaded nor computed.
//  * fp32 math in exactly the reference's order with __fmul_rn / __fadd_rn,
//    which nvcc never contracts into FMAs, so results are bit-identical to the
//    torch reference (fp16/bf16 outputs round to nearest even, like torch).
//  * Layout: tensors are read in sample's memory order. sample is dense with
//    the batch dim outermost (contiguous, channels-last) and the other tensors
//    have its strides: the Python op guarantees it and sampling_args.h checks
//    it (no copies here). out/x0 get sample's layout.

#include "cuda/prelude.cuh"
#include "sampling_args.h"

#include <algorithm>
#include <array>
#include <cstdint>
#include <utility>
#include <vector>

namespace fastgen {
namespace {

constexpr const char* kName = "fastgen sampling_step (cuda)";
constexpr int kThreads = 256;
constexpr int kVec = 8;
constexpr int kMaxGridY = 65535;

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };
enum Flag : int { kCfg = 1, kClip = 2, kX0 = 4, kE1 = 8, kE2 = 16, kNoise = 32 };
constexpr int kNumVariants = 64;

struct Args {
  const void* x;
  const void* u;  // model_output (its first N samples with CFG)
  const void* e[3];
  void* out;
  void* x0;
  const float* coeffs;
  int64_t N, S;
  int64_t cond_off;      // elements from u to the cond half (CFG)
  int64_t coeff_stride;  // 7, or 0 when one row is shared
  float g, lo, hi;
  int dx, du, de[3], dout;
  bool vec;
};

// ------------------------------------------------------------- loads/stores

__device__ __forceinline__ float load1(const void* p, int dt, int64_t i) {
  if (dt == kF32) return __ldcs(static_cast<const float*>(p) + i);
  if (dt == kF16) return __half2float(static_cast<const __half*>(p)[i]);
  return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
}

__device__ __forceinline__ void load8(const void* p, int dt, int64_t i, float v[kVec]) {
  if (dt == kF32) {
    const float4* q = reinterpret_cast<const float4*>(static_cast<const float*>(p) + i);
    const float4 a = __ldcs(q), b = __ldcs(q + 1);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
  } else if (dt == kF16) {
    const uint4 r = __ldcs(reinterpret_cast<const uint4*>(static_cast<const __half*>(p) + i));
    const __half2* h = reinterpret_cast<const __half2*>(&r);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float2 f = __half22float2(h[k]);
      v[2 * k] = f.x;
      v[2 * k + 1] = f.y;
    }
  } else {
    const uint4 r =
        __ldcs(reinterpret_cast<const uint4*>(static_cast<const __nv_bfloat16*>(p) + i));
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&r);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float2 f = __bfloat1622float2(h[k]);
      v[2 * k] = f.x;
      v[2 * k + 1] = f.y;
    }
  }
}

__device__ __forceinline__ void store1(void* p, int dt, int64_t i, float v) {
  if (dt == kF32) __stcs(static_cast<float*>(p) + i, v);
  else if (dt == kF16) static_cast<__half*>(p)[i] = __float2half_rn(v);
  else static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
}

__device__ __forceinline__ void store8(void* p, int dt, int64_t i, const float v[kVec]) {
  if (dt == kF32) {
    float4* q = reinterpret_cast<float4*>(static_cast<float*>(p) + i);
    __stcs(q, make_float4(v[0], v[1], v[2], v[3]));
    __stcs(q + 1, make_float4(v[4], v[5], v[6], v[7]));
  } else if (dt == kF16) {
    uint4 r;
    __half2* h = reinterpret_cast<__half2*>(&r);
#pragma unroll
    for (int k = 0; k < 4; ++k) h[k] = __floats2half2_rn(v[2 * k], v[2 * k + 1]);
    __stcs(reinterpret_cast<uint4*>(static_cast<__half*>(p) + i), r);
  } else {
    uint4 r;
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&r);
#pragma unroll
    for (int k = 0; k < 4; ++k) h[k] = __floats2bfloat162_rn(v[2 * k], v[2 * k + 1]);
    __stcs(reinterpret_cast<uint4*>(static_cast<__nv_bfloat16*>(p) + i), r);
  }
}

// ------------------------------------------------------------- math

struct Coeffs {
  float c0, c1, c2, c3, c4, c5, c6;
};

// x0 from (x, e); round-to-nearest multiply and add, never fused.
template <int F>
__device__ __forceinline__ float x0_of(float x, float e, const Coeffs& c, float lo, float hi) {
  float x0 = __fadd_rn(__fmul_rn(c.c0, x), __fmul_rn(c.c1, e));
  if constexpr ((F & kClip) != 0) {
    // torch.clamp: min(max(x0, lo), hi), NaN passes through.
    x0 = x0 < lo ? lo : x0;
    x0 = x0 > hi ? hi : x0;
  }
  return x0;
}

template <int F>
__device__ __forceinline__ float guided(float u, float cond, float g) {
  if constexpr ((F & kCfg) != 0) return __fadd_rn(u, __fmul_rn(g, __fsub_rn(cond, u)));
  return u;
}

template <int F>
__global__ void __launch_bounds__(kThreads) sampling_step_kernel(const Args a) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  for (int64_t n = blockIdx.y; n < a.N; n += gridDim.y) {
    const float* cp = a.coeffs + n * a.coeff_stride;
    Coeffs c;
    c.c0 = __ldg(cp + 0);
    c.c1 = __ldg(cp + 1);
    c.c2 = __ldg(cp + 2);
    c.c3 = __ldg(cp + 3);
    c.c4 = (F & kE1) ? __ldg(cp + 4) : 0.0f;
    c.c5 = (F & kE2) ? __ldg(cp + 5) : 0.0f;
    c.c6 = (F & kNoise) ? __ldg(cp + 6) : 0.0f;
    const int64_t base = n * a.S;
    if (a.vec) {
      const int64_t groups = a.S / kVec;
      for (int64_t grp = tid; grp < groups; grp += stride) {
        const int64_t i = base + grp * kVec;
        float x[kVec], e[kVec], t[kVec], out[kVec], x0[kVec];
        load8(a.x, a.dx, i, x);
        load8(a.u, a.du, i, e);
        if constexpr ((F & kCfg) != 0) {
          load8(a.u, a.du, i + a.cond_off, t);
#pragma unroll
          for (int k = 0; k < kVec; ++k) e[k] = guided<F>(e[k], t[k], a.g);
        }
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          x0[k] = x0_of<F>(x[k], e[k], c, a.lo, a.hi);
          out[k] = __fadd_rn(__fmul_rn(c.c2, x[k]), __fmul_rn(c.c3, x0[k]));
        }
        if constexpr ((F & kE1) != 0) {
          load8(a.e[0], a.de[0], i, t);
#pragma unroll
          for (int k = 0; k < kVec; ++k) out[k] = __fadd_rn(out[k], __fmul_rn(c.c4, t[k]));
        }
        if constexpr ((F & kE2) != 0) {
          load8(a.e[1], a.de[1], i, t);
#pragma unroll
          for (int k = 0; k < kVec; ++k) out[k] = __fadd_rn(out[k], __fmul_rn(c.c5, t[k]));
        }
        if constexpr ((F & kNoise) != 0) {
          load8(a.e[2], a.de[2], i, t);
#pragma unroll
          for (int k = 0; k < kVec; ++k) out[k] = __fadd_rn(out[k], __fmul_rn(c.c6, t[k]));
        }
        store8(a.out, a.dout, i, out);
        if constexpr ((F & kX0) != 0) store8(a.x0, a.dout, i, x0);
      }
    } else {
      for (int64_t j = tid; j < a.S; j += stride) {
        const int64_t i = base + j;
        const float x = load1(a.x, a.dx, i);
        float e = load1(a.u, a.du, i);
        if constexpr ((F & kCfg) != 0) e = guided<F>(e, load1(a.u, a.du, i + a.cond_off), a.g);
        const float x0 = x0_of<F>(x, e, c, a.lo, a.hi);
        float out = __fadd_rn(__fmul_rn(c.c2, x), __fmul_rn(c.c3, x0));
        if constexpr ((F & kE1) != 0) out = __fadd_rn(out, __fmul_rn(c.c4, load1(a.e[0], a.de[0], i)));
        if constexpr ((F & kE2) != 0) out = __fadd_rn(out, __fmul_rn(c.c5, load1(a.e[1], a.de[1], i)));
        if constexpr ((F & kNoise) != 0) out = __fadd_rn(out, __fmul_rn(c.c6, load1(a.e[2], a.de[2], i)));
        store1(a.out, a.dout, i, out);
        if constexpr ((F & kX0) != 0) store1(a.x0, a.dout, i, x0);
      }
    }
  }
}

using KernelFn = void (*)(const Args);

template <std::size_t... I>
std::array<KernelFn, sizeof...(I)> make_table(std::index_sequence<I...>) {
  return {&sampling_step_kernel<static_cast<int>(I)>...};
}

// ------------------------------------------------------------- host helpers

// The dtype was checked by prepare_sampling_step.
int dtype_code(const at::Tensor& t) {
  const auto dt = t.scalar_type();
  return dt == at::kHalf ? kF16 : dt == at::kBFloat16 ? kBF16 : kF32;
}

bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

int sm_count(int device) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return std::max(sms, 1);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> sampling_step_cuda(
    const at::Tensor& sample_in, const at::Tensor& model_output, const at::Tensor& coeffs_in,
    const std::optional<at::Tensor>& extra1, const std::optional<at::Tensor>& extra2,
    const std::optional<at::Tensor>& noise, std::optional<double> guidance_scale,
    std::optional<double> clip, bool return_x0) {
  const SamplingStepArgs p = prepare_sampling_step(kName, c10::DeviceType::CUDA, sample_in, model_output,
                                                   coeffs_in, extra1, extra2, noise,
                                                   guidance_scale.has_value());
  const c10::cuda::CUDAGuard guard(sample_in.device());
  const auto device = sample_in.device();
  const at::Tensor &sample = p.sample, &mo = p.model_output, &coeffs = p.coeffs;
  const at::Tensor* extra = p.extra;
  const int64_t N = p.N, S = p.S, numel = sample.numel();
  const bool cfg = p.cfg;
  Args a{};
  a.dx = dtype_code(sample);
  a.du = dtype_code(mo);
  for (int k = 0; k < 3; ++k)
    if (extra[k].defined()) a.de[k] = dtype_code(extra[k]);

  at::Tensor out = at::empty_like(sample);
  at::Tensor x0 = return_x0 ? at::empty_like(sample) : at::Tensor();
  if (numel == 0) return {out, x0};

  a.x = sample.const_data_ptr();
  a.u = mo.const_data_ptr();
  for (int k = 0; k < 3; ++k) a.e[k] = extra[k].defined() ? extra[k].const_data_ptr() : nullptr;
  a.out = out.mutable_data_ptr();
  a.x0 = return_x0 ? x0.mutable_data_ptr() : nullptr;
  a.dout = a.dx;
  a.coeffs = coeffs.const_data_ptr<float>();
  a.N = N;
  a.S = S;
  a.cond_off = N * S;
  a.coeff_stride = p.coeff_stride;
  a.g = cfg ? static_cast<float>(*guidance_scale) : 0.0f;
  a.hi = clip.has_value() ? static_cast<float>(*clip) : 0.0f;
  a.lo = -a.hi;
  a.vec = S % kVec == 0 && aligned16(a.x) && aligned16(a.u) && aligned16(a.out) &&
          (a.x0 == nullptr || aligned16(a.x0));
  for (int k = 0; k < 3; ++k) a.vec = a.vec && (a.e[k] == nullptr || aligned16(a.e[k]));

  const int flags = (cfg ? kCfg : 0) | (clip.has_value() ? kClip : 0) | (return_x0 ? kX0 : 0) |
                    (a.e[0] ? kE1 : 0) | (a.e[1] ? kE2 : 0) | (a.e[2] ? kNoise : 0);
  static const std::array<KernelFn, kNumVariants> table =
      make_table(std::make_index_sequence<kNumVariants>{});

  // Enough blocks for ~8 resident per SM in total; the rest is grid-stride.
  const int sms = sm_count(device.index());
  const int64_t grid_y = std::min<int64_t>(N, kMaxGridY);
  const int64_t work = a.vec ? S / kVec : S;
  const int64_t want_x = (work + kThreads - 1) / kThreads;
  const int64_t cap_x = std::max<int64_t>(1, (static_cast<int64_t>(sms) * 8 + grid_y - 1) / grid_y);
  const dim3 grid(static_cast<unsigned>(std::max<int64_t>(1, std::min(want_x, cap_x))),
                  static_cast<unsigned>(grid_y));
  table[flags]<<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, x0};
}

}  // namespace fastgen
