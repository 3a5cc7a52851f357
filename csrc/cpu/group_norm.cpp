// GroupNorm (+ SiLU, + residual) entry points on CPU: preconditions,
// allocation in x's layout, and the call into the ISA variant's kernel
// (csrc/cpu/kernels/group_norm.cpp has the design notes). Compiled once, for
// the baseline ISA.
//
// The public op (fastgen/ops/group_norm.py) validates the arguments and
// chooses the layout; here only cheap preconditions are checked
// (TORCH_CHECK), and no input is ever copied into another layout: x is
// contiguous or channels-last-dense (csrc/layout.h), residual and dy have
// x's strides, y and dx get them too.
#include "ops.h"
#include "cpu/dispatch.h"
#include "layout.h"

#include <cmath>
#include <vector>

namespace fastgen {
namespace {

constexpr const char* kName = "fastgen group_norm (cpu)";

void check_param(const at::Tensor& p, const char* name, int64_t C) {
  TORCH_CHECK(p.defined() && p.device().is_cpu() && p.scalar_type() == at::kFloat &&
                  p.numel() == C && p.is_contiguous(),
              kName, ": expected ", name, " to be a contiguous float32 CPU tensor of C=", C,
              " elements");
}

void check_like_x(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == x.scalar_type() && t.sizes() == x.sizes() &&
                  (x.numel() == 0 || layout::same_strides(t, x)),
              kName, ": expected ", name, " with x's dtype ", x.scalar_type(), ", sizes ",
              x.sizes(), " and strides ", x.strides(), " on CPU, got ", t.scalar_type(), ", ",
              t.sizes(), " and ", t.strides());
}

// The kernels' view of x; checks x's preconditions.
cpu::GroupNormArgs make_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                             int64_t num_groups, bool silu) {
  TORCH_CHECK(x.device().is_cpu(), kName, ": expected a CPU tensor");
  TORCH_CHECK(x.dim() >= 2 && x.dim() <= 5, kName,
              ": expected x of shape (N, C, *spatial) with 0-3 spatial dims, got ", x.sizes());
  cpu::GroupNormArgs a{};
  a.dtype = cpu::to_dtype(x.scalar_type(), kName);
  a.N = x.size(0);
  a.C = x.size(1);
  a.S = 1;
  for (int64_t d = 2; d < x.dim(); ++d) a.S *= x.size(d);
  TORCH_CHECK(num_groups > 0 && a.C % num_groups == 0, kName,
              ": expected num_groups > 0 dividing C=", a.C, ", got num_groups=", num_groups);
  a.G = num_groups;
  const bool contiguous = x.is_contiguous();
  TORCH_CHECK(contiguous || layout::is_channels_last_dense(x), kName,
              ": x must be contiguous or channels-last dense, got strides ", x.strides(),
              " for sizes ", x.sizes());
  a.channels_last = !contiguous;
  a.silu = silu;
  check_param(weight, "weight", a.C);
  check_param(bias, "bias", a.C);
  a.weight = weight.const_data_ptr<float>();
  a.bias = bias.const_data_ptr<float>();
  a.x = x.const_data_ptr();
  a.par = cpu::parallel();
  return a;
}

at::Tensor empty_like_x(const at::Tensor& x) {
  return at::empty_strided(x.sizes(), x.strides(), x.options());
}

}  // namespace

Tensor3 group_norm_fwd_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                           const std::optional<at::Tensor>& residual, int64_t num_groups,
                           double eps, bool silu) {
  cpu::GroupNormArgs a = make_args(x, weight, bias, num_groups, silu);
  const bool has_res = residual.has_value() && residual->defined();
  if (has_res) check_like_x(*residual, x, "residual");

  at::Tensor y = empty_like_x(x);
  const auto fopts = x.options().dtype(at::kFloat);
  at::Tensor mean = at::empty({a.N, a.G}, fopts);
  at::Tensor rstd = at::empty({a.N, a.G}, fopts);
  if (x.numel() == 0) {
    mean.zero_();
    rstd.fill_(1.0 / std::sqrt(eps));
    return {y, mean, rstd};
  }
  a.eps = eps;
  a.residual = has_res ? residual->const_data_ptr() : nullptr;
  a.y = y.mutable_data_ptr();
  a.mean = mean.mutable_data_ptr<float>();
  a.rstd = rstd.mutable_data_ptr<float>();
  cpu::kernels().group_norm_fwd(a);
  return {y, mean, rstd};
}

Tensor3 group_norm_bwd_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                           const at::Tensor& bias, const at::Tensor& mean, const at::Tensor& rstd,
                           int64_t num_groups, bool silu) {
  cpu::GroupNormArgs a = make_args(x, weight, bias, num_groups, silu);
  check_like_x(dy, x, "dy");
  for (const at::Tensor* t : {&mean, &rstd})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat &&
                    t->numel() == a.N * a.G && t->is_contiguous(),
                kName, ": expected mean and rstd as contiguous float32 (N, G) = (", a.N, ", ", a.G,
                ") CPU tensors");

  at::Tensor dx = empty_like_x(x);
  // Per-(n, c) sums in double; reduced over n below in a fixed order.
  std::vector<double> sum_dz(a.N * a.C, 0.0), sum_dz_xhat(a.N * a.C, 0.0);
  if (x.numel() > 0) {
    a.dy = dy.const_data_ptr();
    a.y = dx.mutable_data_ptr();
    a.mean = const_cast<float*>(mean.const_data_ptr<float>());  // read only in the backward
    a.rstd = const_cast<float*>(rstd.const_data_ptr<float>());
    a.sum_dz = sum_dz.data();
    a.sum_dz_xhat = sum_dz_xhat.data();
    cpu::kernels().group_norm_bwd(a);
  }

  const auto fopts = x.options().dtype(at::kFloat);
  at::Tensor dweight = at::empty({a.C}, fopts), dbias = at::empty({a.C}, fopts);
  float* dwp = dweight.mutable_data_ptr<float>();
  float* dbp = dbias.mutable_data_ptr<float>();
  for (int64_t c = 0; c < a.C; ++c) {
    double dw = 0.0, db = 0.0;
    for (int64_t n = 0; n < a.N; ++n) {
      dw += sum_dz_xhat[n * a.C + c];
      db += sum_dz[n * a.C + c];
    }
    dwp[c] = static_cast<float>(dw);
    dbp[c] = static_cast<float>(db);
  }
  return {dx, dweight, dbias};
}

}  // namespace fastgen
