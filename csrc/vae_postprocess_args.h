// Preconditions shared by the CPU and CUDA entry points of vae_postprocess,
// so both backends refuse bad input with the same message. The public op
// (fastgen/ops/vae_postprocess.py) validates arguments with clear errors and
// hands over x contiguous or channels-last dense (any other strides are copied
// there, fastgen/ops/_layout.py kernel_layout) and dy with x's strides; these
// cheap checks only keep a direct call in bounds. Nothing here copies.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "layout.h"

namespace fastgen {

inline void check_vae_postprocess_x(const char* op, const at::Tensor& x, c10::DeviceType device_type) {
  TORCH_CHECK(x.device().type() == device_type, op, ": x must be a ",
              c10::DeviceTypeName(device_type), " tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D (B, C, H, W), got ", x.dim(), " dims");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
              ": x must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(x.numel() == 0 || x.is_contiguous() || layout::is_channels_last_dense(x), op,
              ": x must be contiguous or channels-last dense, got strides ", x.strides());
}

inline void check_vae_postprocess_dy(const char* op, const at::Tensor& dy, const at::Tensor& x) {
  TORCH_CHECK(dy.device() == x.device(), op, ": dy must be on x's device ", x.device(), ", got ",
              dy.device());
  TORCH_CHECK(dy.scalar_type() == x.scalar_type(), op, ": dy must have x's dtype ",
              x.scalar_type(), ", got ", dy.scalar_type());
  TORCH_CHECK(dy.sizes() == x.sizes(), op, ": dy must have x's shape ", x.sizes(), ", got ",
              dy.sizes());
  TORCH_CHECK(x.numel() == 0 || layout::same_strides(dy, x), op, ": dy must have x's strides ",
              x.strides(), ", got ", dy.strides());
}

// The uint8 output's (B, H, W, C) sizes.
inline std::vector<int64_t> vae_postprocess_nhwc_sizes(const at::Tensor& x) {
  return {x.size(0), x.size(2), x.size(3), x.size(1)};
}

}  // namespace fastgen
