// Preconditions shared by the CPU and CUDA entry points of conv2d, so both
// backends refuse bad input with the same message (the op name, e.g.
// "fastgen conv2d (cuda)", and the device type are parameters). The public op
// (fastgen/ops/conv2d.py) validates the arguments with clear ValueError /
// TypeError messages and hands over (see its _reference_fwd, the contract):
//   x        (N, C, H, W) float32 / float16 / bfloat16, contiguous or
//            channels-last dense (any other strides are copied there);
//   weight   (K, C, R, S) contiguous, x's dtype (groups are not supported);
//   bias     None or float32 (K,) contiguous;
//   residual None or the output's sizes, dtype (x's) and strides.
// The output is (N, K, Ho, Wo) in x's dtype, contiguous when x is contiguous,
// else channels-last (conv2d_out_strides). These cheap checks only keep a
// direct call in bounds; nothing here copies or changes a layout.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cstdint>
#include <optional>

#include "layout.h"

namespace fastgen {

// The shapes of one call, as the kernels read them.
struct Conv2dGeometry {
  int64_t N = 0, C = 0, H = 0, W = 0;  // x
  int64_t K = 0, R = 0, S = 0;         // weight (K, C, R, S)
  int64_t Ho = 0, Wo = 0;              // output (N, K, Ho, Wo)
  int64_t stride_h = 1, stride_w = 1;
  int64_t pad_t = 0, pad_b = 0, pad_l = 0, pad_r = 0;
  bool channels_last = false;  // the output (and x) is channels-last, not contiguous

  std::array<int64_t, 4> out_sizes() const { return {N, K, Ho, Wo}; }
  // fastgen/ops/conv2d.py _out_strides: contiguous, or channels-last.
  std::array<int64_t, 4> out_strides() const {
    if (!channels_last) return {K * Ho * Wo, Ho * Wo, Wo, 1};
    return {Ho * Wo * K, 1, Wo * K, K};
  }
  at::MemoryFormat out_format() const {
    return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  }
  bool symmetric_padding() const { return pad_t == pad_b && pad_l == pad_r; }
};

// Whether t (sizes `sizes`) addresses memory with `strides`: equal strides on
// every dim of size > 1 (layout::same_strides against explicit strides).
inline bool conv2d_has_strides(const at::Tensor& t, const std::array<int64_t, 4>& strides) {
  if (t.dim() != 4) return false;
  for (int64_t d = 0; d < 4; ++d)
    if (t.size(d) > 1 && t.stride(d) != strides[d]) return false;
  return true;
}

inline void check_conv2d_x(const char* op, const at::Tensor& x, c10::DeviceType device_type) {
  TORCH_CHECK(x.defined(), op, ": x is undefined");
  TORCH_CHECK(x.device().type() == device_type, op, ": x must be a ",
              c10::DeviceTypeName(device_type, /*lower_case=*/true), " tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D (N, C, H, W), got ", x.dim(), " dims");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
              ": x must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(x.numel() == 0 || x.is_contiguous() || layout::is_channels_last_dense(x), op,
              ": x must be contiguous or channels-last dense, got strides ", x.strides());
}

inline void check_conv2d_weight(const char* op, const at::Tensor& weight, const at::Tensor& x) {
  TORCH_CHECK(weight.defined(), op, ": weight is undefined");
  TORCH_CHECK(weight.device() == x.device(), op, ": weight must be on x's device ", x.device(),
              ", got ", weight.device());
  TORCH_CHECK(weight.dim() == 4, op, ": weight must be 4-D (K, C, R, S), got ", weight.dim(),
              " dims");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight must have x's dtype ",
              x.scalar_type(), ", got ", weight.scalar_type());
  TORCH_CHECK(weight.is_contiguous(), op, ": weight must be contiguous, got strides ",
              weight.strides());
  TORCH_CHECK(weight.size(1) == x.size(1), op, ": weight ", weight.sizes(), " expects ",
              weight.size(1), " input channels, x ", x.sizes(), " has ", x.size(1),
              " (groups are not supported)");
  TORCH_CHECK(weight.size(2) >= 1 && weight.size(3) >= 1, op, ": weight has an empty kernel ",
              weight.sizes());
}

inline void check_conv2d_bias(const char* op, const std::optional<at::Tensor>& bias,
                              const at::Tensor& x, int64_t K) {
  if (!bias.has_value() || !bias->defined()) return;
  const at::Tensor& b = *bias;
  TORCH_CHECK(b.device() == x.device(), op, ": bias must be on x's device ", x.device(), ", got ",
              b.device());
  TORCH_CHECK(b.scalar_type() == at::kFloat, op, ": bias must be float32, got ", b.scalar_type());
  TORCH_CHECK(b.dim() == 1 && b.size(0) == K, op, ": bias must have shape (", K,
              ",) (one per output channel), got ", b.sizes());
  TORCH_CHECK(b.is_contiguous(), op, ": bias must be contiguous, got strides ", b.strides());
}

inline void check_conv2d_residual(const char* op, const std::optional<at::Tensor>& residual,
                                  const at::Tensor& x, const Conv2dGeometry& g) {
  if (!residual.has_value() || !residual->defined()) return;
  const at::Tensor& r = *residual;
  const auto sizes = g.out_sizes();
  TORCH_CHECK(r.device() == x.device(), op, ": residual must be on x's device ", x.device(),
              ", got ", r.device());
  TORCH_CHECK(r.scalar_type() == x.scalar_type(), op, ": residual must have x's dtype ",
              x.scalar_type(), ", got ", r.scalar_type());
  TORCH_CHECK(r.sizes() == at::IntArrayRef(sizes.data(), sizes.size()), op,
              ": residual must have the output's shape ", at::IntArrayRef(sizes.data(), sizes.size()),
              ", got ", r.sizes());
  const auto strides = g.out_strides();
  TORCH_CHECK(r.numel() == 0 || conv2d_has_strides(r, strides), op,
              ": residual must have the output's strides ",
              at::IntArrayRef(strides.data(), strides.size()), " (",
              g.channels_last ? "channels-last" : "contiguous", "), got ", r.strides());
}

// Checks every precondition of conv2d_fwd_<backend> for tensors on
// `device_type` and returns the call's geometry. Ho = (H + pad_t + pad_b - R)
// / stride_h + 1 and likewise Wo (F.conv2d of x padded by F.pad(x, (pad_l,
// pad_r, pad_t, pad_b))).
inline Conv2dGeometry check_conv2d_fwd(const char* op, c10::DeviceType device_type,
                                       const at::Tensor& x, const at::Tensor& weight,
                                       const std::optional<at::Tensor>& bias,
                                       const std::optional<at::Tensor>& residual,
                                       int64_t stride_h, int64_t stride_w, int64_t pad_t,
                                       int64_t pad_b, int64_t pad_l, int64_t pad_r) {
  check_conv2d_x(op, x, device_type);
  check_conv2d_weight(op, weight, x);
  TORCH_CHECK(stride_h >= 1 && stride_w >= 1, op, ": strides must be positive, got (", stride_h,
              ", ", stride_w, ")");
  TORCH_CHECK(pad_t >= 0 && pad_b >= 0 && pad_l >= 0 && pad_r >= 0, op,
              ": padding must be non-negative, got (top ", pad_t, ", bottom ", pad_b, ", left ",
              pad_l, ", right ", pad_r, ")");
  Conv2dGeometry g;
  g.N = x.size(0);
  g.C = x.size(1);
  g.H = x.size(2);
  g.W = x.size(3);
  g.K = weight.size(0);
  g.R = weight.size(2);
  g.S = weight.size(3);
  g.stride_h = stride_h;
  g.stride_w = stride_w;
  g.pad_t = pad_t;
  g.pad_b = pad_b;
  g.pad_l = pad_l;
  g.pad_r = pad_r;
  const int64_t hp = g.H + pad_t + pad_b, wp = g.W + pad_l + pad_r;
  TORCH_CHECK(hp >= g.R && wp >= g.S, op, ": the ", g.R, "x", g.S,
              " kernel does not fit x's padded ", hp, "x", wp, " image");
  g.Ho = (hp - g.R) / stride_h + 1;
  g.Wo = (wp - g.S) / stride_w + 1;
  g.channels_last = !x.is_contiguous();
  check_conv2d_bias(op, bias, x, g.K);
  check_conv2d_residual(op, residual, x, g);
  return g;
}

}  // namespace fastgen
