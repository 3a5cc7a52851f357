// VAE output post-processing on CUDA; same contract as
// vae_postprocess_{fwd,bwd}_cpu (csrc/ops.h), reference:
// fastgen/ops/vae_postprocess.py.
//
//   y   = clamp(x * 0.5 + 0.5, 0, 1)                  x's dtype and memory order
//   img = round_half_even(y * 255) as uint8, (N, H, W, C)
//   dx  = 0.5 * dy where 0 <= x * 0.5 + 0.5 <= 1, else 0
//
// Design
//  * Memory-bound elementwise op: one read of x (and dy), one write of the
//    output. Grid-stride loops over elements, one element per thread per step.
//  * y and dx (and the image of a channels-last x, or of C == 1 or H * W == 1)
//    are linear walks in x's memory order. The image of a channels-first x is
//    written in output order: thread o reads x[(b * C + c) * P + p] for
//    o = (b * P + p) * C + c, so consecutive threads write consecutive bytes
//    and read C short runs of consecutive pixels.
//  * fp32 math. x * 0.5 is exact, so the fused x * 0.5 + 0.5 rounds once as
//    the reference's two ops do. The clamp is written with comparisons so that
//    NaN passes through (fminf / fmaxf would drop it). t = y * 255 is one
//    rounded multiply (__fmul_rn, never contracted into a later add) and
//    __float2int_rn rounds it half to even, numpy's round(); NaN gives 0.

#include "cuda/prelude.cuh"
#include "vae_postprocess_args.h"

#include <algorithm>
#include <cstdint>

namespace fastgen {
namespace {

constexpr const char* kName = "fastgen vae_postprocess (cuda)";
constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535LL * 8;

// clamp(x * 0.5 + 0.5, 0, 1) with NaN passed through, as torch.clamp.
__device__ __forceinline__ float denorm(float x) {
  const float u = fmaf(x, 0.5f, 0.5f);
  return u < 0.0f ? 0.0f : (u > 1.0f ? 1.0f : u);
}

__device__ __forceinline__ uint8_t to_u8(float y) {
  const float t = __fmul_rn(y, 255.0f);
  return t > 0.0f ? static_cast<uint8_t>(__float2int_rn(t)) : uint8_t{0};  // NaN -> 0
}

template <typename T, bool kU8, bool kTranspose>
__global__ void __launch_bounds__(kThreads)
    vae_postprocess_fwd_kernel(const T* __restrict__ x, void* __restrict__ out_v, int64_t total,
                               int64_t C, int64_t P) {
  for (int64_t o = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; o < total;
       o += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t src = o;
    if constexpr (kTranspose) {
      const int64_t c = o % C;
      const int64_t bp = o / C;  // b * P + p
      const int64_t b = bp / P;
      src = (b * C + c) * P + (bp - b * P);
    }
    const float y = denorm(to_float(x[src]));
    if constexpr (kU8) static_cast<uint8_t*>(out_v)[o] = to_u8(y);
    else static_cast<T*>(out_v)[o] = from_float<T>(y);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    vae_postprocess_bwd_kernel(const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ dx,
                               int64_t total) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float u = fmaf(to_float(x[i]), 0.5f, 0.5f);
    // torch.clamp's gradient: passed where min <= u <= max (NaN: not passed).
    dx[i] = from_float<T>(u >= 0.0f && u <= 1.0f ? 0.5f * to_float(dy[i]) : 0.0f);
  }
}

unsigned blocks_for(int64_t total) {
  return static_cast<unsigned>(std::min<int64_t>((total + kThreads - 1) / kThreads, kMaxBlocks));
}

}  // namespace

at::Tensor vae_postprocess_fwd_cuda(const at::Tensor& x, bool to_uint8) {
  check_vae_postprocess_x(kName, x, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = to_uint8 ? at::empty(vae_postprocess_nhwc_sizes(x), x.options().dtype(at::kByte))
                            : at::empty_like(x);
  const int64_t total = x.numel();
  if (total == 0) return out;
  const int64_t C = x.size(1), P = x.size(2) * x.size(3);
  const bool transpose = to_uint8 && x.is_contiguous() && C > 1 && P > 1;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const unsigned blocks = blocks_for(total);
  dispatch_float_dtype(kName, x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = static_cast<const T*>(x.const_data_ptr());
    void* op = out.mutable_data_ptr();
    if (!to_uint8) vae_postprocess_fwd_kernel<T, false, false><<<blocks, kThreads, 0, stream>>>(xp, op, total, C, P);
    else if (transpose) vae_postprocess_fwd_kernel<T, true, true><<<blocks, kThreads, 0, stream>>>(xp, op, total, C, P);
    else vae_postprocess_fwd_kernel<T, true, false><<<blocks, kThreads, 0, stream>>>(xp, op, total, C, P);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor vae_postprocess_bwd_cuda(const at::Tensor& dy, const at::Tensor& x) {
  check_vae_postprocess_x(kName, x, c10::DeviceType::CUDA);
  check_vae_postprocess_dy(kName, dy, x);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::empty_like(x);
  const int64_t total = x.numel();
  if (total == 0) return dx;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float_dtype(kName, x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    vae_postprocess_bwd_kernel<T><<<blocks_for(total), kThreads, 0, stream>>>(
        static_cast<const T*>(x.const_data_ptr()), static_cast<const T*>(dy.const_data_ptr()),
        static_cast<T*>(dx.mutable_data_ptr()), total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dx;
}

}  // namespace fastgen
