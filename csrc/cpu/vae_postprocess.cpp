// vae_postprocess entry points on CPU: preconditions, allocation, and the call
// into the ISA variant's kernel (csrc/cpu/kernels/vae_postprocess.cpp has the
// design notes; the reference is fastgen/ops/vae_postprocess.py). Compiled
// once, for the baseline ISA.
#include "ops.h"
#include "cpu/dispatch.h"
#include "vae_postprocess_args.h"

namespace fastgen {
namespace {

constexpr const char* kName = "fastgen vae_postprocess (cpu)";

cpu::VaePostprocessArgs make_args(const at::Tensor& x) {
  cpu::VaePostprocessArgs a{};
  a.dtype = cpu::to_dtype(x.scalar_type(), kName);
  a.N = x.size(0);
  a.C = x.size(1);
  a.P = x.size(2) * x.size(3);
  a.x = x.const_data_ptr();
  a.par = cpu::parallel();
  return a;
}

}  // namespace

at::Tensor vae_postprocess_fwd_cpu(const at::Tensor& x, bool to_uint8) {
  check_vae_postprocess_x(kName, x, c10::DeviceType::CPU);
  at::Tensor out = to_uint8 ? at::empty(vae_postprocess_nhwc_sizes(x), x.options().dtype(at::kByte))
                            : at::empty_like(x);
  if (x.numel() == 0) return out;
  cpu::VaePostprocessArgs a = make_args(x);
  a.to_uint8 = to_uint8;
  // A channels-first x whose (N, C, P) order differs from the image's (N, P, C).
  a.transpose = to_uint8 && x.is_contiguous() && a.C > 1 && a.P > 1;
  a.out = out.mutable_data_ptr();
  cpu::kernels().vae_postprocess_fwd(a);
  return out;
}

at::Tensor vae_postprocess_bwd_cpu(const at::Tensor& dy, const at::Tensor& x) {
  check_vae_postprocess_x(kName, x, c10::DeviceType::CPU);
  check_vae_postprocess_dy(kName, dy, x);
  at::Tensor dx = at::empty_like(x);
  if (x.numel() == 0) return dx;
  cpu::VaePostprocessArgs a = make_args(x);
  a.dy = dy.const_data_ptr();
  a.out = dx.mutable_data_ptr();
  cpu::kernels().vae_postprocess_bwd(a);
  return dx;
}

}  // namespace fastgen
