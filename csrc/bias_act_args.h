// Preconditions and geometry shared by the CPU and CUDA entry points of
// bias_act (fastgen/ops/bias_act.py: _reference_fwd / _reference_grad are the
// contracts), so both backends refuse bad input with the same message. The
// public op validates arguments with clear errors and hands over x dense in
// some dim order (any other strides are copied there), b as a contiguous fp32
// (C,) vector and dy with x's strides; nothing here copies.
//
// Bias indexing: in a dense tensor every dim with a larger stride than `dim`'s
// has a stride that is a multiple of stride(dim) * size(dim), and the dims with
// smaller strides together span less than stride(dim). So the element at
// memory offset o has index (o / inner) % C along `dim`, inner = stride(dim):
// NCHW with dim 1 gives inner = H * W, channels-last gives inner = 1.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

#include "layout.h"

namespace fastgen {

// The activation codes: the index into fastgen/ops/bias_act.py ACTIVATIONS.
enum class BiasActKind : int {
  kLinear = 0, kRelu = 1, kLrelu = 2, kTanh = 3, kSigmoid = 4,
  kSilu = 5, kGelu = 6, kElu = 7, kSelu = 8, kSoftplus = 9,
};
constexpr int kBiasActKinds = 10;

struct BiasActGeometry {
  int64_t numel;
  int64_t C;      // bias length (1 without a bias)
  int64_t inner;  // memory distance between consecutive bias indices
};

inline BiasActGeometry check_bias_act(const char* op, const at::Tensor& x,
                                      const std::optional<at::Tensor>& b, int64_t dim, int64_t act,
                                      c10::DeviceType device_type) {
  TORCH_CHECK(x.device().type() == device_type, op, ": x must be a ",
              c10::DeviceTypeName(device_type), " tensor, got ", x.device());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
              ": x must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dim");
  TORCH_CHECK(x.numel() == 0 || x.is_non_overlapping_and_dense(), op,
              ": x must be dense (any dim order), got sizes ", x.sizes(), " strides ", x.strides());
  TORCH_CHECK(act >= 0 && act < kBiasActKinds, op, ": unknown activation code ", act);
  BiasActGeometry g{x.numel(), 1, 1};
  if (b.has_value()) {
    TORCH_CHECK(dim >= 0 && dim < x.dim(), op, ": dim ", dim, " out of range for ", x.dim(), "-D x");
    const at::Tensor& bt = *b;
    TORCH_CHECK(bt.device() == x.device(), op, ": b must be on x's device ", x.device(), ", got ",
                bt.device());
    TORCH_CHECK(bt.scalar_type() == at::kFloat, op, ": b must be float32, got ", bt.scalar_type());
    TORCH_CHECK(bt.dim() == 1 && bt.size(0) == x.size(dim) && bt.is_contiguous(), op,
                ": b must be a contiguous (", x.size(dim), ",) vector, got sizes ", bt.sizes());
    g.C = x.size(dim);
    g.inner = g.C > 1 ? x.stride(dim) : 1;
  }
  return g;
}

inline void check_bias_act_dy(const char* op, const at::Tensor& dy, const at::Tensor& x,
                              int64_t order) {
  TORCH_CHECK(order == 1 || order == 2, op, ": order must be 1 or 2, got ", order);
  TORCH_CHECK(dy.device() == x.device(), op, ": dy must be on x's device ", x.device(), ", got ",
              dy.device());
  TORCH_CHECK(dy.scalar_type() == x.scalar_type(), op, ": dy must have x's dtype ",
              x.scalar_type(), ", got ", dy.scalar_type());
  TORCH_CHECK(dy.sizes() == x.sizes(), op, ": dy must have x's shape ", x.sizes(), ", got ",
              dy.sizes());
  TORCH_CHECK(x.numel() == 0 || layout::same_strides(dy, x), op, ": dy must have x's strides ",
              x.strides(), ", got ", dy.strides());
}

}  // namespace fastgen
