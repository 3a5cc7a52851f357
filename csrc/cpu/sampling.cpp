// Fused sampler step entry point on CPU: preconditions (csrc/sampling_args.h,
// shared with CUDA), allocation in sample's layout, and the call into the ISA
// variant's kernel (csrc/cpu/kernels/sampling.cpp has the design notes; the
// formula and reference are in fastgen/ops/sampling.py). Compiled once, for
// the baseline ISA.
#include "ops.h"
#include "cpu/dispatch.h"
#include "sampling_args.h"

namespace fastgen {

std::tuple<at::Tensor, at::Tensor> sampling_step_cpu(
    const at::Tensor& sample_in, const at::Tensor& model_output, const at::Tensor& coeffs_in,
    const std::optional<at::Tensor>& extra1, const std::optional<at::Tensor>& extra2,
    const std::optional<at::Tensor>& noise, std::optional<double> guidance_scale,
    std::optional<double> clip, bool return_x0) {
  constexpr const char* kName = "fastgen sampling_step (cpu)";
  const SamplingStepArgs p = prepare_sampling_step(kName, c10::DeviceType::CPU, sample_in,
                                                   model_output, coeffs_in, extra1, extra2, noise,
                                                   guidance_scale.has_value());
  const at::Tensor& sample = p.sample;
  at::Tensor out = at::empty_strided(sample.sizes(), sample.strides(), sample.options());
  at::Tensor x0 = return_x0 ? at::empty_strided(sample.sizes(), sample.strides(), sample.options())
                            : at::Tensor();
  if (sample.numel() == 0) return {out, x0};

  cpu::SamplingArgs a{};
  a.N = p.N;
  a.S = p.S;
  a.coeff_stride = p.coeff_stride;
  a.coeffs = p.coeffs.const_data_ptr<float>();
  a.cfg = p.cfg;
  a.clip = clip.has_value();
  a.return_x0 = return_x0;
  a.guidance = p.cfg ? static_cast<float>(*guidance_scale) : 0.0f;
  a.clip_value = clip.has_value() ? static_cast<float>(*clip) : 0.0f;
  a.sample = sample.const_data_ptr();
  a.sample_dtype = cpu::to_dtype(sample.scalar_type(), kName);
  a.model_output = p.model_output.const_data_ptr();
  a.model_output_dtype = cpu::to_dtype(p.model_output.scalar_type(), kName);
  for (int k = 0; k < 3; ++k) {
    a.extra[k] = p.extra[k].defined() ? p.extra[k].const_data_ptr() : nullptr;
    a.extra_dtype[k] = p.extra[k].defined() ? cpu::to_dtype(p.extra[k].scalar_type(), kName)
                                            : a.sample_dtype;
  }
  a.out = out.mutable_data_ptr();
  a.x0 = return_x0 ? x0.mutable_data_ptr() : nullptr;
  a.par = cpu::parallel();
  cpu::kernels().sampling_step(a);
  return {out, x0};
}

}  // namespace fastgen
