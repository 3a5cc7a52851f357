// GEGLU entry points on CPU: preconditions, allocation, and the call into the
// ISA variant's kernel (csrc/cpu/kernels/geglu.cpp has the design notes; the
// reference is fastgen/ops/geglu.py). Compiled once, for the baseline ISA.
#include "ops.h"
#include "cpu/dispatch.h"
#include "geglu_args.h"

namespace fastgen {
namespace {

constexpr const char* kName = "fastgen geglu (cpu)";

cpu::GegluArgs make_args(const at::Tensor& x, bool approximate_tanh) {
  cpu::GegluArgs a{};
  a.dtype = cpu::to_dtype(x.scalar_type(), kName);
  a.approximate_tanh = approximate_tanh;
  a.H = x.size(-1) / 2;
  a.M = a.H > 0 ? x.numel() / (2 * a.H) : 0;
  a.x = x.const_data_ptr();
  a.par = cpu::parallel();
  return a;
}

}  // namespace

at::Tensor geglu_fwd_cpu(const at::Tensor& x, bool approximate_tanh) {
  check_geglu_x(kName, x, c10::DeviceType::CPU);
  at::Tensor out = at::empty(geglu_half_sizes(x), x.options());
  if (out.numel() == 0) return out;
  cpu::GegluArgs a = make_args(x, approximate_tanh);
  a.out = out.mutable_data_ptr();
  cpu::kernels().geglu_fwd(a);
  return out;
}

at::Tensor geglu_bwd_cpu(const at::Tensor& dout, const at::Tensor& x, bool approximate_tanh) {
  check_geglu_x(kName, x, c10::DeviceType::CPU);
  check_geglu_dout(kName, dout, x);
  at::Tensor dx = at::empty(x.sizes(), x.options());
  if (dout.numel() == 0) return dx;
  cpu::GegluArgs a = make_args(x, approximate_tanh);
  a.dout = dout.const_data_ptr();
  a.out = dx.mutable_data_ptr();
  cpu::kernels().geglu_bwd(a);
  return dx;
}

}  // namespace fastgen
