// bias_act entry points on CPU: preconditions, allocation, and the call into
// the ISA variant's kernel (csrc/cpu/kernels/bias_act.cpp has the design
// notes; the reference is fastgen/ops/bias_act.py). Compiled once, for the
// baseline ISA.
#include "ops.h"
#include "bias_act_args.h"
#include "cpu/dispatch.h"

#include <algorithm>
#include <tuple>

namespace fastgen {
namespace {

constexpr const char* kName = "fastgen bias_act (cpu)";

cpu::BiasActArgs make_args(const at::Tensor& x, const std::optional<at::Tensor>& b, int64_t dim,
                           int64_t act, double alpha, double gain, double clamp) {
  const BiasActGeometry g = check_bias_act(kName, x, b, dim, act, c10::DeviceType::CPU);
  cpu::BiasActArgs a{};
  a.dtype = cpu::to_dtype(x.scalar_type(), kName);
  a.act = static_cast<int>(act);
  a.numel = g.numel;
  a.C = g.C;
  a.inner = g.inner;
  a.b = b.has_value() ? b->const_data_ptr<float>() : nullptr;
  a.alpha = static_cast<float>(alpha);
  a.gain = static_cast<float>(gain);
  a.clamp = static_cast<float>(clamp);
  a.x = x.const_data_ptr();
  a.par = cpu::parallel();
  return a;
}

}  // namespace

at::Tensor bias_act_fwd_cpu(const at::Tensor& x, const std::optional<at::Tensor>& b, int64_t dim,
                            int64_t act, double alpha, double gain, double clamp) {
  cpu::BiasActArgs a = make_args(x, b, dim, act, alpha, gain, clamp);
  at::Tensor y = at::empty_like(x);
  if (a.numel == 0) return y;
  a.order = 0;
  a.out = y.mutable_data_ptr();
  cpu::kernels().bias_act(a);
  return y;
}

std::tuple<at::Tensor, at::Tensor> bias_act_grad_cpu(const at::Tensor& dy, const at::Tensor& x,
                                                     const std::optional<at::Tensor>& b, int64_t dim,
                                                     int64_t act, double alpha, double gain,
                                                     double clamp, int64_t order) {
  cpu::BiasActArgs a = make_args(x, b, dim, act, alpha, gain, clamp);
  check_bias_act_dy(kName, dy, x, order);
  at::Tensor dx = at::empty_like(x);
  a.order = static_cast<int>(order);
  a.dy = dy.const_data_ptr();
  a.out = dx.mutable_data_ptr();
  if (!b.has_value()) {
    if (a.numel > 0) cpu::kernels().bias_act(a);
    return {dx, at::empty({0}, x.options().dtype(at::kFloat))};
  }
  // Each part of the tensor sums its bias gradient into a row of its own: about 64K elements a part
  // (small tensors stay on one thread) and at most 4 parts a thread, so the rows stay a few KB.
  const int64_t parts = std::max<int64_t>(
      1, std::min<int64_t>(a.numel / 65536, 4 * std::max(1, a.par.num_threads)));
  at::Tensor db_parts = at::zeros({parts, a.C}, x.options().dtype(at::kFloat));
  a.db_parts = db_parts.mutable_data_ptr<float>();
  a.parts = parts;
  if (a.numel > 0) cpu::kernels().bias_act(a);
  return {dx, parts == 1 ? db_parts.view({a.C}) : db_parts.sum(0)};
}

}  // namespace fastgen
