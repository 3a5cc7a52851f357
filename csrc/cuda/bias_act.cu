// Fused bias + activation + gain + clamp on CUDA, and its first and second
// derivatives; same contract as bias_act_{fwd,grad}_cpu (csrc/ops.h),
// reference: fastgen/ops/bias_act.py (_reference_fwd / _reference_grad).
//
//   z  = x + b[(o / inner) % C]            o: the element's memory offset
//   y  = clamp(act(z) * gain, -clamp, clamp)                   (clamp < 0: none)
//   dx = dy * gain * act^(order)(z), 0 where the clamp cut y
//
// Design
//  * Memory-bound elementwise op: y and dx are empty_like(x) and dy has x's
//    strides, so whatever x's dim order (contiguous, channels-last, permuted)
//    every tensor is walked linearly in memory; shapes only enter through the
//    bias index (csrc/bias_act_args.h says why (o / inner) % C is right for
//    any dense layout).
//  * Grid-stride loop over packs of V elements: one 128-bit access per tensor
//    (4 fp32 or 8 fp16/bf16) when every pointer is 16-byte aligned, else
//    V = 1. The numel % V elements left after the packs take a scalar loop.
//  * The bias index is divided out once per pack and then stepped element by
//    element (BiasCursor), in 32-bit arithmetic when numel fits, since 64-bit
//    integer division is a long instruction sequence on the GPU.
//  * The activation is a template argument (each kernel is straight-line
//    math); bias, clamp and derivative order are uniform runtime branches, so
//    there are 10 activations x 3 dtypes x 2 widths per direction instead of
//    8 times as many kernels for nvcc to build.
//  * fp32 math, one rounding on store. sigmoid goes through e = exp(-|z|) <= 1
//    (s = 1/(1+e) or e/(1+e), s(1-s) = e/(1+e)^2): no overflow, no 1 - s
//    cancellation. tanh is tanhf, and 1 - tanh^2 is (1-|t|)(1+|t|) with
//    1 - |t| = 2 exp(-2|z|) / (1 + exp(-2|z|)). elu/selu use expm1f, softplus
//    max(z, 0) + log1pf(exp(-|z|)) (identity above 20, as F.softplus), and
//    exact gelu normcdff (no 1 + erf cancellation in the negative tail).
//  * The clamp is written with comparisons, so NaN passes through like
//    torch.clamp (fminf / fmaxf would drop it); the gradient mask is
//    torch.clamp's inclusive one, false for NaN.

#include "cuda/prelude.cuh"
#include "bias_act_args.h"

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>
#include <type_traits>

namespace fastgen {
namespace {

constexpr const char* kName = "fastgen bias_act (cuda)";
constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535LL * 8;

constexpr float kInvSqrt2Pi = 0.398942280401432678f;
constexpr float kSeluLambda = 1.05070098735548049f;
constexpr float kSeluAlpha = 1.67326324235437728f;
constexpr float kSoftplusThreshold = 20.0f;


// ------------------------------------------------------------- math

struct Sigmoid {
  float s, s1;  // sigmoid(z) and 1 - sigmoid(z), neither by subtraction
};

__device__ __forceinline__ Sigmoid sigmoid_parts(float z) {
  const float e = expf(-fabsf(z));
  const float r = 1.0f / (1.0f + e);
  const float er = e * r;
  return z >= 0.0f ? Sigmoid{r, er} : Sigmoid{er, r};
}

template <int kAct>
__device__ __forceinline__ float act_fwd(float z, float alpha) {
  constexpr auto kind = static_cast<BiasActKind>(kAct);
  if constexpr (kind == BiasActKind::kLinear) {
    return z;
  } else if constexpr (kind == BiasActKind::kRelu) {
    return z < 0.0f ? 0.0f : z;  // not fmaxf: F.relu keeps NaN
  } else if constexpr (kind == BiasActKind::kLrelu) {
    return z < 0.0f ? z * alpha : z;
  } else if constexpr (kind == BiasActKind::kTanh) {
    return tanhf(z);
  } else if constexpr (kind == BiasActKind::kSigmoid) {
    return sigmoid_parts(z).s;
  } else if constexpr (kind == BiasActKind::kSilu) {
    return z * sigmoid_parts(z).s;
  } else if constexpr (kind == BiasActKind::kGelu) {
    return z * normcdff(z);
  } else if constexpr (kind == BiasActKind::kElu) {
    return z > 0.0f ? z : alpha * expm1f(z);
  } else if constexpr (kind == BiasActKind::kSelu) {
    return kSeluLambda * (z > 0.0f ? z : kSeluAlpha * expm1f(z));
  } else {
    static_assert(kind == BiasActKind::kSoftplus, "unknown activation");
    return z > kSoftplusThreshold ? z : fmaxf(z, 0.0f) + log1pf(expf(-fabsf(z)));
  }
}

// act'(z) (order 1) or act''(z) (order 2), as act_derivative_reference.
template <int kAct>
__device__ __forceinline__ float act_deriv(float z, float alpha, int order) {
  constexpr auto kind = static_cast<BiasActKind>(kAct);
  const bool first = order == 1;
  if constexpr (kind == BiasActKind::kLinear) {
    return first ? 1.0f : 0.0f;
  } else if constexpr (kind == BiasActKind::kRelu) {
    return first && z > 0.0f ? 1.0f : 0.0f;
  } else if constexpr (kind == BiasActKind::kLrelu) {
    return first ? (z > 0.0f ? 1.0f : alpha) : 0.0f;
  } else if constexpr (kind == BiasActKind::kTanh) {
    const float t = tanhf(z);
    const float e2 = expf(-2.0f * fabsf(z));
    const float d = 2.0f * e2 / (1.0f + e2) * (1.0f + fabsf(t));  // 1 - t^2
    return first ? d : -2.0f * t * d;
  } else if constexpr (kind == BiasActKind::kSigmoid) {
    const Sigmoid sg = sigmoid_parts(z);
    const float d = sg.s * sg.s1;
    return first ? d : d * (sg.s1 - sg.s);
  } else if constexpr (kind == BiasActKind::kSilu) {
    const Sigmoid sg = sigmoid_parts(z);
    return first ? sg.s * (1.0f + z * sg.s1) : sg.s * sg.s1 * (2.0f + z * (sg.s1 - sg.s));
  } else if constexpr (kind == BiasActKind::kGelu) {
    const float pdf = kInvSqrt2Pi * expf(-0.5f * z * z);
    return first ? normcdff(z) + z * pdf : pdf * (2.0f - z * z);
  } else if constexpr (kind == BiasActKind::kElu || kind == BiasActKind::kSelu) {
    constexpr bool kSelu = kind == BiasActKind::kSelu;
    const float a = kSelu ? kSeluAlpha : alpha;
    // expf(z), not expf(fminf(z, 0)): fminf would turn NaN into 0 (z > 0 selects the other side anyway)
    const float d = z > 0.0f ? (first ? 1.0f : 0.0f) : a * expf(z);
    return kSelu ? kSeluLambda * d : d;
  } else {
    static_assert(kind == BiasActKind::kSoftplus, "unknown activation");
    if (z > kSoftplusThreshold) return first ? 1.0f : 0.0f;
    const Sigmoid sg = sigmoid_parts(z);
    return first ? sg.s : sg.s * sg.s1;
  }
}

// ------------------------------------------------------------- kernels

struct Params {
  int64_t numel;
  int64_t C;
  int64_t inner;
  float alpha, gain, clamp;
  bool has_bias, has_clamp, small;  // small: numel < 2**31, 32-bit index math
  int order;
};

// The bias index of consecutive offsets: one division to start, then a step.
struct BiasCursor {
  int64_t r;  // o % inner
  int64_t c;  // (o / inner) % C

  __device__ __forceinline__ BiasCursor(int64_t o, const Params& p) {
    if (p.small) {
      const uint32_t u = static_cast<uint32_t>(o), in = static_cast<uint32_t>(p.inner);
      const uint32_t q = u / in;
      r = u - q * in;
      c = q % static_cast<uint32_t>(p.C);
    } else {
      const int64_t q = o / p.inner;
      r = o - q * p.inner;
      c = q % p.C;
    }
  }
  __device__ __forceinline__ void step(const Params& p) {
    if (++r == p.inner) {
      r = 0;
      if (++c == p.C) c = 0;
    }
  }
};

template <int kAct>
__device__ __forceinline__ float fwd_value(float z, const Params& p) {
  float y = act_fwd<kAct>(z, p.alpha) * p.gain;
  if (p.has_clamp) y = y > p.clamp ? p.clamp : (y < -p.clamp ? -p.clamp : y);
  return y;
}

template <int kAct>
__device__ __forceinline__ float grad_value(float d, float z, const Params& p) {
  const float dx = d * p.gain * act_deriv<kAct>(z, p.alpha, p.order);
  if (p.has_clamp) {
    const float y = act_fwd<kAct>(z, p.alpha) * p.gain;
    if (!(y >= -p.clamp && y <= p.clamp)) return 0.0f;
  }
  return dx;
}

template <int V>
__device__ __forceinline__ void add_bias(float (&z)[V], const float* __restrict__ b, int64_t o,
                                         const Params& p) {
  if (!p.has_bias) return;
  BiasCursor cur(o, p);
#pragma unroll
  for (int k = 0; k < V; ++k) {
    z[k] += __ldg(b + cur.c);
    cur.step(p);
  }
}

__device__ __forceinline__ int64_t thread_index() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ int64_t thread_count() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x;
}

template <typename T, int V, int kAct>
__global__ void __launch_bounds__(kThreads)
    bias_act_fwd_kernel(const T* __restrict__ x, const float* __restrict__ b, T* __restrict__ y,
                        const Params p) {
  const int64_t packs = p.numel / V;
  for (int64_t i = thread_index(); i < packs; i += thread_count()) {
    const int64_t o = i * V;
    float z[V];
    load<T, V>(x + o, z);
    add_bias<V>(z, b, o, p);
#pragma unroll
    for (int k = 0; k < V; ++k) z[k] = fwd_value<kAct>(z[k], p);
    store<T, V>(y + o, z);
  }
  for (int64_t o = packs * V + thread_index(); o < p.numel; o += thread_count()) {
    float z[1] = {to_float(x[o])};
    add_bias<1>(z, b, o, p);
    y[o] = from_float<T>(fwd_value<kAct>(z[0], p));
  }
}

template <typename T, int V, int kAct>
__global__ void __launch_bounds__(kThreads)
    bias_act_grad_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                         const float* __restrict__ b, T* __restrict__ dx, const Params p) {
  const int64_t packs = p.numel / V;
  for (int64_t i = thread_index(); i < packs; i += thread_count()) {
    const int64_t o = i * V;
    float z[V], d[V];
    load<T, V>(x + o, z);
    load<T, V>(dy + o, d);
    add_bias<V>(z, b, o, p);
#pragma unroll
    for (int k = 0; k < V; ++k) d[k] = grad_value<kAct>(d[k], z[k], p);
    store<T, V>(dx + o, d);
  }
  for (int64_t o = packs * V + thread_index(); o < p.numel; o += thread_count()) {
    float z[1] = {to_float(x[o])};
    add_bias<1>(z, b, o, p);
    dx[o] = from_float<T>(grad_value<kAct>(to_float(dy[o]), z[0], p));
  }
}

// ------------------------------------------------------------- launch

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

unsigned grid_for(int64_t work) {
  return static_cast<unsigned>(
      std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, kMaxBlocks)));
}

// Calls f with std::integral_constant<int, act>, the kernels' template argument.
template <int kAct = 0, typename F>
void dispatch_act(int64_t act, F&& f) {
  if constexpr (kAct < kBiasActKinds) {
    if (act == kAct) {
      f(std::integral_constant<int, kAct>{});
    } else {
      dispatch_act<kAct + 1>(act, f);
    }
  } else {
    TORCH_CHECK(false, kName, ": unknown activation code ", act);
  }
}

Params make_params(const BiasActGeometry& g, const std::optional<at::Tensor>& b, double alpha,
                   double gain, double clamp, int64_t order) {
  Params p;
  p.numel = g.numel;
  p.C = g.C;
  p.inner = g.inner;
  p.alpha = static_cast<float>(alpha);
  p.gain = static_cast<float>(gain);
  p.clamp = static_cast<float>(clamp);
  p.has_bias = b.has_value();
  p.has_clamp = clamp >= 0.0;
  // offsets up to numel - 1 and the cursor's quotient stay below 2**31
  p.small = g.numel <= 0x7fffffffLL;
  p.order = static_cast<int>(order);
  return p;
}

const float* bias_ptr(const std::optional<at::Tensor>& b) {
  return b.has_value() ? b->const_data_ptr<float>() : nullptr;
}

// The bias gradient, dx summed over every dim but `dim` in fp32. Not fused into the kernel on CUDA: a
// separate at::sum reads dx once more (the CPU kernel sums while it writes).
at::Tensor bias_grad(const at::Tensor& dx, const std::optional<at::Tensor>& b, int64_t dim) {
  if (!b.has_value()) return at::empty({0}, dx.options().dtype(at::kFloat));
  std::vector<int64_t> dims;
  for (int64_t d = 0; d < dx.dim(); ++d)
    if (d != dim) dims.push_back(d);
  if (dims.empty()) return dx.to(at::kFloat);
  return at::sum(dx, dims, /*keepdim=*/false, at::kFloat);
}

}  // namespace

at::Tensor bias_act_fwd_cuda(const at::Tensor& x, const std::optional<at::Tensor>& b, int64_t dim,
                             int64_t act, double alpha, double gain, double clamp) {
  const BiasActGeometry g = check_bias_act(kName, x, b, dim, act, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x);  // x's strides: the kernel walks both linearly
  if (g.numel == 0) return y;
  const Params p = make_params(g, b, alpha, gain, clamp, 1);
  const float* bp = bias_ptr(b);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float_dtype(kName, x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = 16 / sizeof(T);
    const T* xp = static_cast<const T*>(x.const_data_ptr());
    T* yp = static_cast<T*>(y.mutable_data_ptr());
    const bool vec = aligned16(xp) && aligned16(yp);
    dispatch_act(act, [&](auto act_tag) {
      constexpr int kAct = decltype(act_tag)::value;
      if (vec) {
        bias_act_fwd_kernel<T, kVec, kAct>
            <<<grid_for(g.numel / kVec + 1), kThreads, 0, stream>>>(xp, bp, yp, p);
      } else {
        bias_act_fwd_kernel<T, 1, kAct><<<grid_for(g.numel), kThreads, 0, stream>>>(xp, bp, yp, p);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> bias_act_grad_cuda(const at::Tensor& dy, const at::Tensor& x,
                                                      const std::optional<at::Tensor>& b, int64_t dim,
                                                      int64_t act, double alpha, double gain,
                                                      double clamp, int64_t order) {
  const BiasActGeometry g = check_bias_act(kName, x, b, dim, act, c10::DeviceType::CUDA);
  check_bias_act_dy(kName, dy, x, order);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::empty_like(x);
  if (g.numel == 0) return {dx, bias_grad(dx, b, dim)};
  const Params p = make_params(g, b, alpha, gain, clamp, order);
  const float* bp = bias_ptr(b);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float_dtype(kName, x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = 16 / sizeof(T);
    const T* dp = static_cast<const T*>(dy.const_data_ptr());
    const T* xp = static_cast<const T*>(x.const_data_ptr());
    T* dxp = static_cast<T*>(dx.mutable_data_ptr());
    const bool vec = aligned16(dp) && aligned16(xp) && aligned16(dxp);
    dispatch_act(act, [&](auto act_tag) {
      constexpr int kAct = decltype(act_tag)::value;
      if (vec) {
        bias_act_grad_kernel<T, kVec, kAct>
            <<<grid_for(g.numel / kVec + 1), kThreads, 0, stream>>>(dp, xp, bp, dxp, p);
      } else {
        bias_act_grad_kernel<T, 1, kAct>
            <<<grid_for(g.numel), kThreads, 0, stream>>>(dp, xp, bp, dxp, p);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {dx, bias_grad(dx, b, dim)};
}

}  // namespace fastgen
