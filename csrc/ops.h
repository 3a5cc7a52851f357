// Declarations of every native kernel entry point. One op keeps one name in
// every layer: <op>_<fwd|bwd>_<cpu|cuda> here, kernels/<op>.py for Triton,
// fastgen/ops/<op>.py for checks, reference and dispatch.
#pragma once
#include <ATen/ATen.h>
#include <optional>
#include <string>
#include <tuple>

namespace fastgen {

// The CPU entry points are compiled once, for the baseline ISA, and run the
// kernels of the ISA variant chosen at run time (csrc/cpu/dispatch.h).

using Tensor3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// GroupNorm (+ optional SiLU, + optional residual added after the activation).
// x: (N, C, *spatial) with 0-3 spatial dims, contiguous or channels-last
//    dense (csrc/layout.h; x.is_contiguous() == false means channels-last).
// weight, bias: fp32 (C,) contiguous. residual: same sizes, strides, dtype as x.
// These are preconditions (TORCH_CHECK), not conversions: no input is copied
// into another layout. The public op (fastgen/ops/group_norm.py) ensures them.
// Returns y (same sizes/strides/dtype as x), mean and rstd as fp32 (N, G).
Tensor3 group_norm_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                           const at::Tensor& bias,
                           const std::optional<at::Tensor>& residual,
                           int64_t num_groups, double eps, bool silu);
// dy: same sizes/strides/dtype as x. Returns dx (like x), dweight and dbias
// as fp32 (C,). The residual's gradient is dy itself, so it is not computed.
Tensor3 group_norm_bwd_cpu(const at::Tensor& dy, const at::Tensor& x,
                           const at::Tensor& weight, const at::Tensor& bias,
                           const at::Tensor& mean, const at::Tensor& rstd,
                           int64_t num_groups, bool silu);

using Tensor2 = std::tuple<at::Tensor, at::Tensor>;

// Attention softmax(q k^T * scale) v without materialising the Nq x Nk matrix.
// q: (B, H, Nq, D), k and v: (B, H, Nk, D); all contiguous, one dtype
// (fp32/fp16/bf16). Returns o (B, H, Nq, D) in q's dtype and lse, the fp32
// (B, H, Nq) natural-log log-sum-exp of the scaled scores, for the backward.
Tensor2 attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                          const at::Tensor& v, double scale);
// do_: (B, H, Nq, D) contiguous, q's dtype. Returns dq, dk, dv like q, k, v.
Tensor3 attention_bwd_cpu(const at::Tensor& do_, const at::Tensor& q,
                          const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& o, const at::Tensor& lse,
                          double scale);

#ifdef FASTGEN_WITH_CUDA
Tensor2 attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                           const at::Tensor& v, double scale);

Tensor3 group_norm_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& bias,
                            const std::optional<at::Tensor>& residual,
                            int64_t num_groups, double eps, bool silu);
Tensor3 group_norm_bwd_cuda(const at::Tensor& dy, const at::Tensor& x,
                            const at::Tensor& weight, const at::Tensor& bias,
                            const at::Tensor& mean, const at::Tensor& rstd,
                            int64_t num_groups, bool silu);
#endif


// Fused sampler step (fastgen/ops/sampling.py has the formula and the torch
// reference _reference_step, which is the spec):
//   e = model_output, or u + g * (c - u) with guidance_scale g, where
//       model_output = [u; c] is (2N, ...);
//   x0 = c0 * sample + c1 * e, clamped to [-clip, clip] when clip is given;
//   out = c2 * sample + c3 * x0 + c4 * extra1 + c5 * extra2 + c6 * noise.
// sample: (N, ...); extra1, extra2, noise: optional, sample's shape. Every
// tensor may be float32, float16 or bfloat16 independently; math is fp32.
// coeffs: float32 (N, 7), one row per sample ((7,) or (1, 7) is broadcast).
// Preconditions (TORCH_CHECK, csrc/sampling_args.h; nothing is copied):
// sample is dense with the batch dim outermost (contiguous, channels-last),
// the other tensors have sample's strides, coeffs is contiguous. Returns
// (out, x0) in sample's dtype and layout; x0 is an undefined tensor (None in
// Python) unless return_x0.
std::tuple<at::Tensor, at::Tensor> sampling_step_cpu(
    const at::Tensor& sample, const at::Tensor& model_output, const at::Tensor& coeffs,
    const std::optional<at::Tensor>& extra1, const std::optional<at::Tensor>& extra2,
    const std::optional<at::Tensor>& noise, std::optional<double> guidance_scale,
    std::optional<double> clip, bool return_x0);

#ifdef FASTGEN_WITH_CUDA
// Same contract as sampling_step_cpu, for CUDA tensors (coeffs on the same device).
std::tuple<at::Tensor, at::Tensor> sampling_step_cuda(
    const at::Tensor& sample, const at::Tensor& model_output, const at::Tensor& coeffs,
    const std::optional<at::Tensor>& extra1, const std::optional<at::Tensor>& extra2,
    const std::optional<at::Tensor>& noise, std::optional<double> guidance_scale,
    std::optional<double> clip, bool return_x0);
#endif

}  // namespace fastgen

namespace fastgen {

// GEGLU (fastgen/ops/geglu.py has the reference): x = [hidden, gate] along the
// last dim, x of shape (..., 2H), float32/float16/bfloat16, contiguous (a
// precondition; dout too). Returns out = hidden * gelu(gate), shape (..., H), x's dtype,
// contiguous; gelu is exact (erf), or the tanh approximation when
// approximate_tanh. Math in fp32.
at::Tensor geglu_fwd_cpu(const at::Tensor& x, bool approximate_tanh);
// dout: (..., H), x's dtype. Returns dx (..., 2H) contiguous in x's dtype:
// [dout * gelu(gate), dout * hidden * gelu'(gate)].
at::Tensor geglu_bwd_cpu(const at::Tensor& dout, const at::Tensor& x, bool approximate_tanh);

#ifdef FASTGEN_WITH_CUDA
// Same contracts as the CPU entry points, for CUDA tensors.
at::Tensor geglu_fwd_cuda(const at::Tensor& x, bool approximate_tanh);
at::Tensor geglu_bwd_cuda(const at::Tensor& dout, const at::Tensor& x, bool approximate_tanh);
#endif

}  // namespace fastgen

namespace fastgen {

// VAE output post-processing (fastgen/ops/vae_postprocess.py has the
// reference): x (B, C, H, W), float32/float16/bfloat16, contiguous or
// channels-last dense (a precondition, csrc/vae_postprocess_args.h).
// Returns clamp(x * 0.5 + 0.5, 0, 1) in x's dtype with x's strides, or with
// to_uint8 a contiguous (B, H, W, C) uint8 tensor of round_half_even(255 *
// that) (NaN -> 0). Math in fp32.
at::Tensor vae_postprocess_fwd_cpu(const at::Tensor& x, bool to_uint8);
// dy: x's sizes, strides and dtype. Returns dx (x's strides and dtype):
// 0.5 * dy where 0 <= x * 0.5 + 0.5 <= 1 (torch.clamp's gradient), else 0.
at::Tensor vae_postprocess_bwd_cpu(const at::Tensor& dy, const at::Tensor& x);

#ifdef FASTGEN_WITH_CUDA
// Same contracts as the CPU entry points, for CUDA tensors.
at::Tensor vae_postprocess_fwd_cuda(const at::Tensor& x, bool to_uint8);
at::Tensor vae_postprocess_bwd_cuda(const at::Tensor& dy, const at::Tensor& x);
#endif

// conv2d with a fused epilogue (fastgen/ops/conv2d.py: _reference_fwd is the
// contract): out = (conv(x, weight) + bias + residual) * output_scale.
// x: (N, C, H, W) contiguous or channels-last dense; weight (K, C, R, S)
// contiguous in x's dtype; bias fp32 (K,); residual: the output's shape,
// dtype and strides. packed / algo: the CPU path and its transformed weight
// (fastgen/ops/_conv2d_cpu_choice.py); the CUDA kernel ignores them. Returns
// (N, K, Ho, Wo) in x's dtype, contiguous if x is, else channels-last.
at::Tensor conv2d_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& residual,
                          const std::optional<at::Tensor>& packed, int64_t stride_h,
                          int64_t stride_w, int64_t pad_t, int64_t pad_b, int64_t pad_l,
                          int64_t pad_r, double output_scale, const std::string& algo);
#ifdef FASTGEN_WITH_CUDA
// Same contract as conv2d_fwd_cpu, for CUDA tensors (packed / algo ignored).
at::Tensor conv2d_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& residual,
                           const std::optional<at::Tensor>& packed, int64_t stride_h,
                           int64_t stride_w, int64_t pad_t, int64_t pad_b, int64_t pad_l,
                           int64_t pad_r, double output_scale, const std::string& algo);
#endif

// bias_act (fastgen/ops/bias_act.py: _reference_fwd / _reference_grad are the
// contracts, csrc/bias_act_args.h the preconditions): y = clamp(act(x + b) *
// gain, -clamp, clamp) (clamp < 0: none). x dense in any dim order,
// float32/float16/bfloat16; b None or contiguous fp32 (x.size(dim),); act an
// index into ACTIVATIONS. Returns y with x's dtype and strides. Math in fp32.
at::Tensor bias_act_fwd_cpu(const at::Tensor& x, const std::optional<at::Tensor>& b, int64_t dim,
                            int64_t act, double alpha, double gain, double clamp);
// dy: x's sizes, strides and dtype. Returns dx = dy * gain * act^(order)(x + b)
// (order 1 or 2), 0 where the clamp cut y, in x's dtype and strides; and db,
// dx summed over every dim but `dim` in fp32 before rounding ((C,) float32;
// (0,) without a bias).
std::tuple<at::Tensor, at::Tensor> bias_act_grad_cpu(const at::Tensor& dy, const at::Tensor& x,
                                                     const std::optional<at::Tensor>& b, int64_t dim,
                                                     int64_t act, double alpha, double gain,
                                                     double clamp, int64_t order);
#ifdef FASTGEN_WITH_CUDA
// Same contracts as the CPU entry points, for CUDA tensors.
at::Tensor bias_act_fwd_cuda(const at::Tensor& x, const std::optional<at::Tensor>& b, int64_t dim,
                             int64_t act, double alpha, double gain, double clamp);
std::tuple<at::Tensor, at::Tensor> bias_act_grad_cuda(const at::Tensor& dy, const at::Tensor& x,
                                                      const std::optional<at::Tensor>& b, int64_t dim,
                                                      int64_t act, double alpha, double gain,
                                                      double clamp, int64_t order);
#endif

}  // namespace fastgen
