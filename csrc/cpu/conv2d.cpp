// conv2d entry point on CPU: preconditions, allocation, and the path the
// public op chose (fastgen/ops/_conv2d_cpu_choice.py; the reference is
// fastgen/ops/conv2d.py). Compiled once, for the baseline ISA.
//
// Paths (`algo`):
//  * "winograd4" / "winograd2" (3x3, stride 1): Winograd F(4,3) / F(2,3).
//    Tile rows are processed in chunks whose transformed input V and products
//    M (fp32, A*A x tiles x channels each) stay within kChunkBytes, so the
//    workspace stays in the allocator's reusable range and mostly in L3. Per
//    chunk: the input transform (ISA kernel, threads over tile rows), the
//    A*A Winograd-domain GEMMs M[e] = V[e] @ U[e] as one at::bmm (BLAS, its
//    own threads), the output transform with the fused epilogue.
//  * "gemm" (1x1, stride 1, no padding): fp32 BLAS GEMMs over the pixels, then
//    the fused epilogue (oneDNN's NCHW 1x1 convolution reaches about half of
//    what the GEMM does on the SD1.5 shapes).
//  * "direct": PyTorch's convolution (oneDNN) in x's dtype with the bias fused
//    by oneDNN, then one fused residual + scale pass where needed.
//  * "direct_fp32": the same in fp32 for an fp16 / bf16 x (on CPUs without
//    native bf16 / fp16 GEMMs oneDNN's low-precision convolution is ~100x
//    slower), the epilogue rounding once to x's dtype.
#include "ops.h"
#include "cpu/dispatch.h"
#include "conv2d_args.h"

#include <algorithm>

namespace fastgen {
namespace {

constexpr const char* kName = "fastgen conv2d (cpu)";
constexpr int64_t kChunkBytes = 24LL << 20;

std::vector<int64_t> layout_strides(at::IntArrayRef sizes, at::MemoryFormat fmt) {
  const int64_t C = sizes[1], H = sizes[2], W = sizes[3];
  if (fmt == at::MemoryFormat::Contiguous) return {C * H * W, H * W, W, 1};
  return {H * W * C, 1, W * C, C};
}

// The paths take the geometry check_conv2d_fwd derived (csrc/conv2d_args.h): sizes, padding, output layout.
at::Tensor winograd(const Conv2dGeometry& g, const at::Tensor& x, const std::optional<at::Tensor>& bias,
                    const std::optional<at::Tensor>& residual, const at::Tensor& packed, double scale, int m) {
  const int64_t N = g.N, C = g.C, H = g.H, W = g.W, K = g.K, Ho = g.Ho, Wo = g.Wo;
  TORCH_CHECK(g.R == 3 && g.S == 3 && g.stride_h == 1 && g.stride_w == 1, kName,
              ": Winograd needs a 3x3 kernel at stride 1");
  const int64_t A = m + 2;
  TORCH_CHECK(packed.scalar_type() == at::kFloat && packed.is_contiguous() && packed.dim() == 3 &&
                  packed.size(0) == A * A && packed.size(1) == C && packed.size(2) == K,
              kName, ": the packed Winograd weight must be a contiguous float32 (", A * A, ", ", C, ", ", K,
              ") tensor (fastgen.ops._conv2d_cpu_choice.pack_weight), got ", packed.sizes());
  at::Tensor out = at::empty({N, K, Ho, Wo}, x.options(), g.out_format());

  cpu::ConvWinogradArgs a{};
  a.dtype = cpu::to_dtype(x.scalar_type(), kName);
  a.m = m;
  a.N = N, a.C = C, a.H = H, a.W = W, a.K = K, a.Ho = Ho, a.Wo = Wo;
  a.pad_t = g.pad_t, a.pad_l = g.pad_l;
  a.TH = (Ho + m - 1) / m, a.TW = (Wo + m - 1) / m;
  a.channels_last = !x.is_contiguous();
  a.x = x.const_data_ptr();
  a.bias = bias ? bias->const_data_ptr<float>() : nullptr;
  a.residual = residual ? residual->const_data_ptr() : nullptr;
  a.scale = static_cast<float>(scale);
  a.out = out.mutable_data_ptr();
  a.par = cpu::parallel();

  const int64_t rows = N * a.TH;
  const int64_t row_bytes = A * A * a.TW * (C + K) * 4;
  const int64_t per_chunk = std::clamp<int64_t>(kChunkBytes / std::max<int64_t>(row_bytes, 1), 1, rows);
  const int64_t max_tiles = per_chunk * a.TW;
  at::Tensor V = at::empty({A * A * max_tiles * C}, x.options().dtype(at::kFloat));
  at::Tensor M = at::empty({A * A * max_tiles * K}, x.options().dtype(at::kFloat));
  a.V = V.mutable_data_ptr<float>();
  a.M = M.const_data_ptr<float>();
  for (int64_t r0 = 0; r0 < rows; r0 += per_chunk) {
    a.row_begin = r0;
    a.row_end = std::min(rows, r0 + per_chunk);
    const int64_t tiles = (a.row_end - a.row_begin) * a.TW;
    cpu::kernels().conv2d_winograd_input(a);
    at::Tensor Mv = M.narrow(0, 0, A * A * tiles * K).view({A * A, tiles, K});
    at::bmm_out(Mv, V.narrow(0, 0, A * A * tiles * C).view({A * A, tiles, C}), packed);
    cpu::kernels().conv2d_winograd_output(a);
  }
  return out;
}

void run_epilogue(const at::Tensor& y, const std::optional<at::Tensor>& bias,
                  const std::optional<at::Tensor>& residual, double scale, const at::Tensor& out) {
  cpu::ConvEpilogueArgs e{};
  e.dtype = cpu::to_dtype(out.scalar_type(), kName);
  e.N = out.size(0), e.K = out.size(1), e.P = out.size(2) * out.size(3);
  e.channels_last = !out.is_contiguous();
  e.y = y.const_data_ptr<float>();
  e.bias = bias ? bias->const_data_ptr<float>() : nullptr;
  e.residual = residual ? residual->const_data_ptr() : nullptr;
  e.scale = static_cast<float>(scale);
  e.out = out.mutable_data_ptr();
  e.par = cpu::parallel();
  cpu::kernels().conv2d_epilogue(e);
}

at::Tensor direct(const Conv2dGeometry& g, const at::Tensor& x, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual, double scale,
                  bool in_fp32) {
  const bool fp32 = x.scalar_type() == at::kFloat || in_fp32;
  const bool symmetric = g.symmetric_padding();
  const at::MemoryFormat fmt = g.out_format();
  // oneDNN picks its output layout from x's and the weight's strides, including those of size-1 dims (a
  // 1x1 weight reads as channels-last, and so would x at 1x1 spatial): views with the canonical strides of
  // the contract's layout address the same memory and make it pick that layout.
  at::Tensor xv = x.as_strided(x.sizes(), layout_strides(x.sizes(), fmt));
  at::Tensor xin = symmetric ? xv : at::constant_pad_nd(xv, {g.pad_l, g.pad_r, g.pad_t, g.pad_b}, 0.0);
  if (fp32 && xin.scalar_type() != at::kFloat) xin = xin.to(at::kFloat);  // keeps the memory format
  at::Tensor wv = weight.as_strided(weight.sizes(), layout_strides(weight.sizes(), at::MemoryFormat::Contiguous));
  at::Tensor w = fp32 ? wv.to(at::kFloat) : wv;
  // oneDNN fuses an fp32 bias for free; a low-precision convolution's bias is added (in fp32) afterwards.
  std::optional<at::Tensor> conv_bias = fp32 ? bias : std::nullopt;
  std::vector<int64_t> pad = symmetric ? std::vector<int64_t>{g.pad_t, g.pad_l} : std::vector<int64_t>{0, 0};
  at::Tensor y = at::convolution(xin, w, conv_bias, {g.stride_h, g.stride_w}, pad, {1, 1}, false, {0, 0}, 1);
  TORCH_CHECK(y.is_contiguous(fmt), kName, ": the convolution returned strides ", y.strides(),
              " for x's strides ", x.strides());
  const bool epilogue_bias = bias && !fp32;
  if (y.scalar_type() == x.scalar_type() && !residual && !epilogue_bias && scale == 1.0) return y;
  at::Tensor out = y.scalar_type() == x.scalar_type() && fp32 ? y : at::empty(y.sizes(), x.options(), fmt);
  if (y.scalar_type() != at::kFloat) y = y.to(at::kFloat);  // the epilogue reads fp32
  run_epilogue(y, epilogue_bias ? bias : std::nullopt, residual, scale, out);
  return out;
}

// A 1x1 stride-1 unpadded convolution is a GEMM over pixels: per image (K, C) @ (C, H*W) for NCHW, one
// (N*H*W, C) @ (C, K) for channels-last; fp32 GEMMs (BLAS), then the epilogue in place.
at::Tensor gemm_1x1(const Conv2dGeometry& g, const at::Tensor& x, const at::Tensor& weight,
                    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                    double scale) {
  TORCH_CHECK(g.R == 1 && g.S == 1 && g.stride_h == 1 && g.stride_w == 1 && g.pad_t == 0 && g.pad_b == 0 &&
                  g.pad_l == 0 && g.pad_r == 0,
              kName, ": the gemm path takes 1x1 stride-1 unpadded convolutions");
  const int64_t N = g.N, C = g.C, P = g.H * g.W, K = g.K;
  const at::MemoryFormat fmt = g.out_format();
  at::Tensor out = at::empty({N, K, g.Ho, g.Wo}, x.options(), fmt);
  const bool fp32 = x.scalar_type() == at::kFloat;
  at::Tensor y = fp32 ? out : at::empty({N, K, g.Ho, g.Wo}, x.options().dtype(at::kFloat), fmt);
  at::Tensor xf = fp32 ? x : x.to(at::kFloat);  // keeps the memory format
  at::Tensor w = weight.as_strided({K, C}, {C, 1});
  if (!fp32) w = w.to(at::kFloat);
  if (fmt == at::MemoryFormat::Contiguous) {
    at::Tensor x3 = xf.as_strided({N, C, P}, {C * P, P, 1});
    at::Tensor y3 = y.as_strided({N, K, P}, {K * P, P, 1});
    for (int64_t n = 0; n < N; ++n) {
      at::Tensor yn = y3.select(0, n);
      at::mm_out(yn, w, x3.select(0, n));
    }
  } else {
    at::Tensor y2 = y.as_strided({N * P, K}, {K, 1});
    at::mm_out(y2, xf.as_strided({N * P, C}, {C, 1}), w.t());
  }
  run_epilogue(y, bias, residual, scale, out);
  return out;
}

}  // namespace

at::Tensor conv2d_fwd_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& packed,
                          int64_t stride_h, int64_t stride_w, int64_t pad_t, int64_t pad_b, int64_t pad_l,
                          int64_t pad_r, double output_scale, const std::string& algo) {
  const Conv2dGeometry g = check_conv2d_fwd(kName, c10::DeviceType::CPU, x, weight, bias, residual, stride_h,
                                            stride_w, pad_t, pad_b, pad_l, pad_r);
  if (algo == "winograd4" || algo == "winograd2") {
    TORCH_CHECK(packed.has_value(), kName, ": Winograd needs the packed weight");
    return winograd(g, x, bias, residual, *packed, output_scale, algo == "winograd4" ? 4 : 2);
  }
  if (algo == "gemm") return gemm_1x1(g, x, weight, bias, residual, output_scale);
  TORCH_CHECK(algo == "direct" || algo == "direct_fp32", kName, ": unknown algo '", algo,
              "' (expected winograd4, winograd2, gemm, direct or direct_fp32)");
  return direct(g, x, weight, bias, residual, output_scale, algo == "direct_fp32");
}

}  // namespace fastgen
