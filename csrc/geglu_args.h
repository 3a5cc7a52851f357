// Preconditions shared by the CPU and CUDA entry points of geglu, so both
// backends refuse bad input with the same message. The public op
// (fastgen/ops/geglu.py) validates arguments with clear errors and makes x
// and dout contiguous; these cheap checks only keep a direct call in bounds.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace fastgen {

// x.shape[:-1] + (x.shape[-1] // 2,): the shape of the output and of dout.
inline std::vector<int64_t> geglu_half_sizes(const at::Tensor& x) {
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  sizes.back() /= 2;
  return sizes;
}

inline void check_geglu_x(const char* op, const at::Tensor& x, c10::DeviceType device_type) {
  TORCH_CHECK(x.device().type() == device_type, op, ": x must be a ",
              c10::DeviceTypeName(device_type), " tensor, got ", x.device());
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dim");
  TORCH_CHECK(x.size(-1) % 2 == 0, op, ": the last dim of x must be even (2 * H), got ",
              x.size(-1));
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
              ": x must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(x.is_contiguous(), op, ": x must be contiguous");
}

inline void check_geglu_dout(const char* op, const at::Tensor& dout, const at::Tensor& x) {
  TORCH_CHECK(dout.device() == x.device(), op, ": dout must be on x's device ", x.device(),
              ", got ", dout.device());
  TORCH_CHECK(dout.scalar_type() == x.scalar_type(), op, ": dout must have x's dtype ",
              x.scalar_type(), ", got ", dout.scalar_type());
  TORCH_CHECK(dout.sizes() == at::IntArrayRef(geglu_half_sizes(x)), op,
              ": dout must have shape x.shape[:-1] + (x.shape[-1] // 2,), got ", dout.sizes(),
              " for x of shape ", x.sizes());
  TORCH_CHECK(dout.is_contiguous(), op, ": dout must be contiguous");
}

}  // namespace fastgen
