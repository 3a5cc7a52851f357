// 2-D convolution with a fused epilogue on CUDA; same contract as
// conv2d_fwd_cpu (csrc/ops.h), reference: fastgen/ops/conv2d.py
// _reference_fwd.
//
//   out = (conv2d(F.pad(x, (pad_l, pad_r, pad_t, pad_b)), weight) + bias + residual) * output_scale
//
// in x's dtype, contiguous when x is contiguous, else channels-last. `packed`
// and `algo` are the CPU kernel's and are ignored here.
//
// Design
//  * The convolution is cuDNN's, through at::convolution (bias-free), so it
//    honours torch.backends.cudnn's flags (enabled, benchmark, deterministic,
//    allow_tf32) and falls back as F.conv2d does where cuDNN cannot run it.
//    For a contiguous x it returns a contiguous output; for a channels-last x
//    a channels-last one (cuDNN's NHWC kernels; the contiguous weight is put
//    into channels-last by cuDNN's wrapper, exactly as for eager F.conv2d).
//  * Then ONE epilogue pass applies bias[k] + residual and the scale while
//    rounding once to x's dtype: it reads the convolution's output (and the
//    residual) once and writes the result once, in place when the
//    convolution's output already has the contract's strides. Eager PyTorch
//    spends three passes on the same (cuDNN's bias add_, the residual add,
//    the division). With no bias, no residual and a scale of 1 the
//    convolution's output is returned as is (no epilogue).
//  * Why the bias is not handed to cuDNN: ATen's cuDNN path does not fuse it
//    either (at::_convolution runs cudnn_convolution, then output.add_(bias),
//    a full extra pass), and it would need the bias in x's dtype, rounding
//    the fp32 bias and the sum once more. The fused epilogue costs the same
//    one pass that add_ would and keeps the bias in fp32.
//  * Asymmetric padding (pad_t != pad_b or pad_l != pad_r; the VAE's stride-2
//    Downsample2D pads (0, 1, 0, 1)): cuDNN takes one pad per spatial dim
//    (the legacy descriptors ATen uses are symmetric). The convolution runs
//    with the symmetric pad P = the smallest value >= max(pad_t, pad_b) with
//    P - pad_t a multiple of the stride, and the wanted outputs are the window
//    starting (P - pad_t) / stride rows in (columns alike): with that offset
//    every output reads the same input rows as under the asymmetric pad, and
//    P >= pad_b covers the last one. The epilogue then reads the strided
//    window and writes the dense output (out of place). Cost: (2P - pad_t -
//    pad_b) / stride extra output rows (1 row and 1 column for the VAE's
//    downsampler, ~1.6% more convolution work at 128x128 outputs) plus a
//    temporary of the convolution's size. The alternative, at::constant_pad_nd
//    of x, reads and writes the whole input once more (4x the output's bytes
//    at stride 2 when C == K) and allocates a padded copy of it, so it costs
//    more whenever the epilogue runs anyway, which it does here.
//  * Numerics: cuDNN accumulates in fp32 (TF32 for fp32 inputs when
//    torch.backends.cudnn.allow_tf32, as F.conv2d and the reference on CUDA),
//    the epilogue computes ((y + bias) + residual) * scale in fp32, the
//    reference's order, with no multiply-add contraction possible. For fp32
//    that is the reference's arithmetic. For fp16 / bf16 cuDNN's output y is
//    already rounded to x's dtype, so the result rounds twice (the
//    convolution, then the epilogue) where the reference rounds once; eager
//    PyTorch in fp16 rounds up to four times (conv, bias, add, div), and two
//    roundings stay within the tolerance rule (docs/design.md "Numerics and
//    tolerances": at most 2x eager's error in the same dtype). Running cuDNN
//    with an fp32 output is not cheap: ATen's cuDNN convolution takes one
//    dtype for input, weight and output, so it would mean an fp32 copy of x
//    and weight and an fp32 convolution (TF32 at best, about half the fp16
//    tensor-core rate on Hopper, plus twice the output's bytes).
//  * Epilogue kernel: a grid-stride loop over the output in its memory order,
//    one vector of V elements (16 bytes: 4 fp32 or 8 fp16 / bf16) per thread
//    and step when the channel is constant over a vector or advances with it
//    and every pointer is 16-byte aligned, else one element. The channel of
//    element i is (i / HW) % K for NCHW and i % K for NHWC. 32-bit index math
//    when the output has fewer than 2^31 elements. The strided variant
//    (asymmetric padding, or a convolution output in an unexpected layout)
//    also decomposes i into (n, k, h, w) to address the source.

#include "cuda/prelude.cuh"
#include "conv2d_args.h"

#include <algorithm>
#include <array>
#include <cstdint>
#include <optional>
#include <string>

namespace fastgen {
namespace {

constexpr const char* kName = "fastgen conv2d (cuda)";
constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535LL * 8;



template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, V>*>(p);
}

// ------------------------------------------------------------- epilogue

struct Epilogue {
  const float* bias;  // (K,) fp32, or nullptr
  float scale;
};

// out[i + j] = ((y[j] + bias[channel]) + residual[i + j]) * scale, j < V.
// kChannelStep: the channel advances with j (NHWC) or is k for all j (NCHW).
template <typename T, int V, bool kChannelStep>
__device__ __forceinline__ void apply(const Pack<T, V>& y, const T* __restrict__ res, int64_t i,
                                      int64_t k, const Epilogue& e, T* out) {
  Pack<T, V> r;
  if (res != nullptr) r = load_pack<T, V>(res + i);
  Pack<T, V> o;
#pragma unroll
  for (int j = 0; j < V; ++j) {
    float a = to_float(y.v[j]);
    if (e.bias != nullptr) a += __ldg(e.bias + (kChannelStep ? k + j : k));
    if (res != nullptr) a += to_float(r.v[j]);
    o.v[j] = from_float<T>(a * e.scale);
  }
  *reinterpret_cast<Pack<T, V>*>(out + i) = o;
}

// The convolution's output y is dense in out's memory order: y may be out
// itself (in place, so neither pointer is __restrict__). HW = Ho * Wo.
template <typename T, int V, bool kCL, typename Idx>
__global__ void __launch_bounds__(kThreads)
    conv2d_epilogue_dense_kernel(const T* y, T* out, const T* __restrict__ res, Epilogue e,
                                 Idx nvec, Idx K, Idx HW) {
  for (Idx v = static_cast<Idx>(blockIdx.x) * blockDim.x + threadIdx.x; v < nvec;
       v += static_cast<Idx>(gridDim.x) * blockDim.x) {
    const Idx i = v * V;
    const Idx k = kCL ? i % K : (i / HW) % K;
    apply<T, V, kCL>(load_pack<T, V>(y + i), res, static_cast<int64_t>(i),
                     static_cast<int64_t>(k), e, out);
  }
}

// Strides of the source, in elements, of the (n, k, h, w) dims (0 for a dim of size 1).
struct SrcStrides {
  int64_t n, k, h, w;
};

// y is any strided (N, K, Ho, Wo) tensor (a window of a larger convolution's
// output); out is dense (NCHW, or NHWC when kCL) and distinct from y. With
// V > 1 the vector's elements are consecutive in y too (checked on the host).
template <typename T, int V, bool kCL>
__global__ void __launch_bounds__(kThreads)
    conv2d_epilogue_strided_kernel(const T* __restrict__ y, T* __restrict__ out,
                                   const T* __restrict__ res, Epilogue e, int64_t nvec, int64_t K,
                                   int64_t Ho, int64_t Wo, SrcStrides st) {
  for (int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < nvec;
       v += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = v * V;
    int64_t n, k, h, w;
    if constexpr (kCL) {
      k = i % K;
      const int64_t p = i / K;  // (n * Ho + h) * Wo + w
      w = p % Wo;
      const int64_t nh = p / Wo;
      h = nh % Ho;
      n = nh / Ho;
    } else {
      w = i % Wo;
      const int64_t r = i / Wo;  // (n * K + k) * Ho + h
      h = r % Ho;
      const int64_t nk = r / Ho;
      k = nk % K;
      n = nk / K;
    }
    const int64_t src = n * st.n + k * st.k + h * st.h + w * st.w;
    apply<T, V, kCL>(load_pack<T, V>(y + src), res, i, k, e, out);
  }
}

// ------------------------------------------------------------- launch

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

unsigned blocks_for(int64_t work) {
  return static_cast<unsigned>(std::min<int64_t>((work + kThreads - 1) / kThreads, kMaxBlocks));
}

template <typename T, int V, bool kCL>
void launch_dense(const T* y, T* out, const T* res, const Epilogue& e, int64_t total, int64_t K,
                  int64_t HW, cudaStream_t stream) {
  const int64_t nvec = total / V;
  const unsigned blocks = blocks_for(nvec);
  if (total < (int64_t{1} << 31)) {
    conv2d_epilogue_dense_kernel<T, V, kCL, uint32_t><<<blocks, kThreads, 0, stream>>>(
        y, out, res, e, static_cast<uint32_t>(nvec), static_cast<uint32_t>(K),
        static_cast<uint32_t>(HW));
  } else {
    conv2d_epilogue_dense_kernel<T, V, kCL, int64_t><<<blocks, kThreads, 0, stream>>>(
        y, out, res, e, nvec, K, HW);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int V, bool kCL>
void launch_strided(const T* y, T* out, const T* res, const Epilogue& e, int64_t total,
                    const Conv2dGeometry& g, const SrcStrides& st, cudaStream_t stream) {
  const int64_t nvec = total / V;
  conv2d_epilogue_strided_kernel<T, V, kCL><<<blocks_for(nvec), kThreads, 0, stream>>>(
      y, out, res, e, nvec, g.K, g.Ho, g.Wo, st);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// out = epilogue(y). y: (N, K, Ho, Wo) in x's dtype; when dense_src, y has
// out's strides (and may be out); else any strides. out: dense with the
// contract's strides.
template <typename T>
void run_epilogue(const at::Tensor& y, bool dense_src, const at::Tensor& out,
                  const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                  double output_scale, const Conv2dGeometry& g, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t total = out.numel();
  const int64_t HW = g.Ho * g.Wo;
  const bool cl = g.channels_last;
  const T* yp = static_cast<const T*>(y.const_data_ptr());
  T* op = static_cast<T*>(out.mutable_data_ptr());
  const T* rp = residual.has_value() && residual->defined()
                    ? static_cast<const T*>(residual->const_data_ptr())
                    : nullptr;
  Epilogue e;
  e.bias = bias.has_value() && bias->defined() ? bias->const_data_ptr<float>() : nullptr;
  e.scale = static_cast<float>(output_scale);  // what y * output_scale multiplies an fp32 tensor by

  // A vector must not straddle a change of channel in NCHW nor a pixel in
  // NHWC (then it also stays inside one row of Wo / one pixel's K), and every
  // tensor it touches must be 16-byte aligned.
  bool vec = (cl ? g.K % kVec == 0 : HW % kVec == 0) && aligned16(yp) && aligned16(op) &&
             (rp == nullptr || aligned16(rp));

  if (dense_src) {
    if (vec) {
      if (cl) launch_dense<T, kVec, true>(yp, op, rp, e, total, g.K, HW, stream);
      else launch_dense<T, kVec, false>(yp, op, rp, e, total, g.K, HW, stream);
    } else {
      if (cl) launch_dense<T, 1, true>(yp, op, rp, e, total, g.K, HW, stream);
      else launch_dense<T, 1, false>(yp, op, rp, e, total, g.K, HW, stream);
    }
    return;
  }
  // Size-1 dims never move the address: their strides are set to 0.
  auto stride_of = [&](int64_t d) { return y.size(d) == 1 ? int64_t{0} : y.stride(d); };
  const SrcStrides st{stride_of(0), stride_of(1), stride_of(2), stride_of(3)};
  if (cl) {
    // Vectors along channels: y's channel stride is 1, the others keep alignment.
    vec = vec && (g.K == 1 || st.k == 1) && st.n % kVec == 0 && st.h % kVec == 0 &&
          st.w % kVec == 0;
  } else {
    // Vectors along rows: y's column stride is 1, rows do not straddle vectors.
    vec = vec && g.Wo % kVec == 0 && (g.Wo == 1 || st.w == 1) && st.n % kVec == 0 &&
          st.k % kVec == 0 && st.h % kVec == 0;
  }
  if (vec) {
    if (cl) launch_strided<T, kVec, true>(yp, op, rp, e, total, g, st, stream);
    else launch_strided<T, kVec, false>(yp, op, rp, e, total, g, st, stream);
  } else {
    if (cl) launch_strided<T, 1, true>(yp, op, rp, e, total, g, st, stream);
    else launch_strided<T, 1, false>(yp, op, rp, e, total, g, st, stream);
  }
}

// The symmetric pad that reproduces an asymmetric (lo, hi) pad at `stride`:
// the smallest P >= max(lo, hi) with (P - lo) % stride == 0. The wanted
// outputs then start (P - lo) / stride in.
int64_t symmetric_pad(int64_t lo, int64_t hi, int64_t stride) {
  const int64_t extra = std::max<int64_t>(hi - lo, 0);
  return lo + (extra + stride - 1) / stride * stride;
}

}  // namespace

at::Tensor conv2d_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& residual,
                           const std::optional<at::Tensor>& packed, int64_t stride_h,
                           int64_t stride_w, int64_t pad_t, int64_t pad_b, int64_t pad_l,
                           int64_t pad_r, double output_scale, const std::string& algo) {
  (void)packed;  // the CPU kernel's transformed weight
  (void)algo;    // the CPU kernel's path
  const Conv2dGeometry g = check_conv2d_fwd(kName, c10::DeviceType::CUDA, x, weight, bias,
                                            residual, stride_h, stride_w, pad_t, pad_b, pad_l,
                                            pad_r);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto sizes = g.out_sizes();
  const auto strides = g.out_strides();
  const at::IntArrayRef out_sizes(sizes.data(), sizes.size());
  const at::IntArrayRef out_strides(strides.data(), strides.size());
  const at::TensorOptions opts = x.options().memory_format(g.out_format());
  const bool has_bias = bias.has_value() && bias->defined();
  const bool has_res = residual.has_value() && residual->defined();
  const bool need_epilogue = has_bias || has_res || output_scale != 1.0;

  const int64_t total = g.N * g.K * g.Ho * g.Wo;
  if (total == 0) return at::empty(out_sizes, opts);

  at::Tensor y;
  if (x.numel() == 0) {
    // x is empty and the output is not (no input channels, or an image of
    // padding only): every product is with a zero, the convolution is 0.
    y = at::zeros(out_sizes, opts);
  } else if (g.symmetric_padding()) {
    y = at::convolution(x, weight, std::nullopt, {stride_h, stride_w}, {pad_t, pad_l}, {1, 1},
                        /*transposed=*/false, {0, 0}, /*groups=*/1);
  } else {
    const int64_t ph = symmetric_pad(pad_t, pad_b, stride_h);
    const int64_t pw = symmetric_pad(pad_l, pad_r, stride_w);
    const int64_t oh = (ph - pad_t) / stride_h, ow = (pw - pad_l) / stride_w;
    const at::Tensor full = at::convolution(x, weight, std::nullopt, {stride_h, stride_w},
                                            {ph, pw}, {1, 1}, /*transposed=*/false, {0, 0},
                                            /*groups=*/1);
    TORCH_INTERNAL_ASSERT(full.size(2) >= oh + g.Ho && full.size(3) >= ow + g.Wo, kName,
                          ": the symmetric-pad convolution ", full.sizes(),
                          " does not hold the window at (", oh, ", ", ow, ")");
    y = full.slice(2, oh, oh + g.Ho).slice(3, ow, ow + g.Wo);
  }

  // y addresses memory as a dense output with the contract's strides (the
  // usual case: every symmetric call): the epilogue runs in place, and the
  // view only rewrites the strides of size-1 dims to the contract's.
  const bool dense = conv2d_has_strides(y, strides);
  at::Tensor out = dense ? y.as_strided(out_sizes, out_strides, y.storage_offset())
                         : at::empty(out_sizes, opts);
  if (dense && !need_epilogue) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float_dtype(kName, x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    run_epilogue<T>(dense ? out : y, dense, out, bias, residual, output_scale, g, stream);
  });
  return out;
}

}  // namespace fastgen
