// Fused GEGLU forward and backward on CUDA; same contract as geglu_{fwd,bwd}_cpu
// (csrc/ops.h), reference: fastgen/ops/geglu.py.
//
//   x = [hidden, gate] along the last dim (rows of 2H values)
//   out = hidden * gelu(gate)                                (rows of H values)
//   dx  = [dout * gelu(gate), dout * hidden * gelu'(gate)]
//
// Design
//  * Memory-bound elementwise op: the forward reads x once and writes out once,
//    the backward reads x and dout once and writes dx once.
//  * Thread blocks are 2-D tiles: threadIdx.x walks column vectors of a row,
//    threadIdx.y rows, so no thread divides a flat index by H, and narrow rows
//    (H = 40) still fill a block. blockDim.x is a power of two chosen to idle
//    the fewest threads on a row (block_x); blocks grid-stride over rows when
//    M exceeds the grid's y limit.
//  * Vector path: each thread moves one 128-bit access per tensor (4 fp32 or
//    8 fp16/bf16), taken when H is a multiple of that width and every pointer
//    is 16-byte aligned (then each row start and the gate half, H elements in,
//    are aligned too). Otherwise one element per thread.
//  * fp32 math: exact gelu with normcdff (Phi without the 1 + erf
//    cancellation in the negative tail); the tanh form as g * sigmoid(2u)
//    through e = exp(-|2u|) <= 1 (no overflow, no cancellation), as on the CPU.

#include "cuda/prelude.cuh"
#include "geglu_args.h"

#include <algorithm>
#include <cstdint>
#include <vector>

namespace fastgen {
namespace {

constexpr const char* kName = "fastgen geglu (cuda)";
constexpr int kThreads = 256;
constexpr int64_t kMaxGridY = 65535;




// ------------------------------------------------------------- math

// gelu(g) and, with grad, gelu'(g).
template <bool kTanh>
__device__ __forceinline__ float gelu(float g, float* dgelu) {
  if constexpr (kTanh) {
    constexpr float kTwoBeta = 2.0f * 0.797884560802865356f;  // 2 * sqrt(2/pi)
    constexpr float kKappa = 0.044715f;
    const float g2 = g * g;
    const float two_u = kTwoBeta * g * (1.0f + kKappa * g2);
    const float e = expf(-fabsf(two_u));
    const float r = 1.0f / (1.0f + e);  // sigmoid(|2u|)
    const float er = e * r;             // 1 - sigmoid(|2u|)
    const float sig = two_u >= 0.0f ? r : er;
    if (dgelu != nullptr) {
      *dgelu = sig + g * (r * er) * (kTwoBeta * (1.0f + 3.0f * kKappa * g2));
    }
    return g * sig;
  } else {
    constexpr float kInvSqrt2Pi = 0.398942280401432678f;
    const float cdf = normcdff(g);
    if (dgelu != nullptr) *dgelu = cdf + g * kInvSqrt2Pi * expf(-0.5f * g * g);
    return g * cdf;
  }
}

// ------------------------------------------------------------- kernels

struct Shape {
  int64_t M;       // rows
  int64_t H;       // columns of out / dout; x and dx rows are 2H
  int64_t groups;  // column groups of V elements per row: H / V
};

template <typename T, int V, bool kTanh>
__global__ void __launch_bounds__(kThreads)
    geglu_fwd_kernel(const T* __restrict__ x, T* __restrict__ out, const Shape s) {
  const int64_t grp = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (grp >= s.groups) return;
  const int64_t col = grp * V;
  for (int64_t r = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < s.M;
       r += static_cast<int64_t>(gridDim.y) * blockDim.y) {
    const T* xr = x + r * 2 * s.H + col;
    float h[V], g[V], o[V];
    load<T, V>(xr, h);
    load<T, V>(xr + s.H, g);
#pragma unroll
    for (int k = 0; k < V; ++k) o[k] = h[k] * gelu<kTanh>(g[k], nullptr);
    store<T, V>(out + r * s.H + col, o);
  }
}

template <typename T, int V, bool kTanh>
__global__ void __launch_bounds__(kThreads)
    geglu_bwd_kernel(const T* __restrict__ dout, const T* __restrict__ x, T* __restrict__ dx,
                     const Shape s) {
  const int64_t grp = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (grp >= s.groups) return;
  const int64_t col = grp * V;
  for (int64_t r = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < s.M;
       r += static_cast<int64_t>(gridDim.y) * blockDim.y) {
    const int64_t xo = r * 2 * s.H + col;
    float d[V], h[V], g[V], dh[V], dg[V];
    load<T, V>(dout + r * s.H + col, d);
    load<T, V>(x + xo, h);
    load<T, V>(x + xo + s.H, g);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      float dgelu;
      const float gl = gelu<kTanh>(g[k], &dgelu);
      dh[k] = d[k] * gl;
      dg[k] = d[k] * h[k] * dgelu;
    }
    store<T, V>(dx + xo, dh);
    store<T, V>(dx + xo + s.H, dg);
  }
}

// ------------------------------------------------------------- launch

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

struct Launch {
  dim3 grid, block;
};

// blockDim.x: for short rows the smallest power of two covering them; else
// the power of two in [32, kThreads] idling the fewest threads on the row
// (320 groups -> 64, not 256 with 37.5% idle), ties to the larger.
int block_x(int64_t groups) {
  int bx = 1;
  while (bx < groups && bx < 32) bx *= 2;
  if (groups <= 32) return bx;
  int64_t best_cost = -1;
  for (int b = 32; b <= kThreads; b *= 2) {
    const int64_t cost = (groups + b - 1) / b * b;
    if (best_cost < 0 || cost <= best_cost) {
      best_cost = cost;
      bx = b;
    }
  }
  return bx;
}

Launch launch_shape(int64_t M, int64_t groups) {
  const int bx = block_x(groups);
  const int by = kThreads / bx;
  const int64_t gx = (groups + bx - 1) / bx;
  const int64_t gy = std::min<int64_t>((M + by - 1) / by, kMaxGridY);
  TORCH_CHECK(gx <= 0x7fffffff, kName, ": rows are too long (", groups, " column groups)");
  return {dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)),
          dim3(static_cast<unsigned>(bx), static_cast<unsigned>(by))};
}

}  // namespace

at::Tensor geglu_fwd_cuda(const at::Tensor& x_in, bool approximate_tanh) {
  check_geglu_x(kName, x_in, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor& x = x_in;  // contiguous (checked above)
  at::Tensor out = at::empty(geglu_half_sizes(x), x.options());
  if (out.numel() == 0) return out;
  const int64_t H = x.size(-1) / 2;
  const int64_t M = out.numel() / H;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float_dtype(kName, x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = 16 / sizeof(T);
    const T* xp = static_cast<const T*>(x.const_data_ptr());
    T* op = static_cast<T*>(out.mutable_data_ptr());
    const bool vec = H % kVec == 0 && aligned16(xp) && aligned16(op);
    const Shape s{M, H, vec ? H / kVec : H};
    const Launch l = launch_shape(M, s.groups);
    if (vec) {
      if (approximate_tanh) geglu_fwd_kernel<T, kVec, true><<<l.grid, l.block, 0, stream>>>(xp, op, s);
      else geglu_fwd_kernel<T, kVec, false><<<l.grid, l.block, 0, stream>>>(xp, op, s);
    } else {
      if (approximate_tanh) geglu_fwd_kernel<T, 1, true><<<l.grid, l.block, 0, stream>>>(xp, op, s);
      else geglu_fwd_kernel<T, 1, false><<<l.grid, l.block, 0, stream>>>(xp, op, s);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor geglu_bwd_cuda(const at::Tensor& dout_in, const at::Tensor& x_in,
                          bool approximate_tanh) {
  check_geglu_x(kName, x_in, c10::DeviceType::CUDA);
  check_geglu_dout(kName, dout_in, x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor& x = x_in;  // contiguous (checked above)
  const at::Tensor& dout = dout_in;
  at::Tensor dx = at::empty(x.sizes(), x.options());
  if (dout.numel() == 0) return dx;
  const int64_t H = x.size(-1) / 2;
  const int64_t M = dout.numel() / H;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float_dtype(kName, x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = 16 / sizeof(T);
    const T* dp = static_cast<const T*>(dout.const_data_ptr());
    const T* xp = static_cast<const T*>(x.const_data_ptr());
    T* dxp = static_cast<T*>(dx.mutable_data_ptr());
    const bool vec = H % kVec == 0 && aligned16(dp) && aligned16(xp) && aligned16(dxp);
    const Shape s{M, H, vec ? H / kVec : H};
    const Launch l = launch_shape(M, s.groups);
    if (vec) {
      if (approximate_tanh) geglu_bwd_kernel<T, kVec, true><<<l.grid, l.block, 0, stream>>>(dp, xp, dxp, s);
      else geglu_bwd_kernel<T, kVec, false><<<l.grid, l.block, 0, stream>>>(dp, xp, dxp, s);
    } else {
      if (approximate_tanh) geglu_bwd_kernel<T, 1, true><<<l.grid, l.block, 0, stream>>>(dp, xp, dxp, s);
      else geglu_bwd_kernel<T, 1, false><<<l.grid, l.block, 0, stream>>>(dp, xp, dxp, s);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dx;
}

}  // namespace fastgen
