// The preconditions of sampling_step shared by the CPU and CUDA entry points.
// The public op (fastgen/ops/sampling.py) validates the arguments with clear
// ValueError / TypeError messages and brings them into the layout below;
// these are the cheap TORCH_CHECKs that keep a direct call from reading out of
// bounds. Nothing here copies or changes a layout.
//
// Layout: sample is dense with the batch dim outermost (contiguous,
// channels-last, ...), so sample n occupies elements [n*S, (n+1)*S);
// model_output (2N samples under guidance, [uncond; cond]), extra1, extra2
// and noise have sample's strides. coeffs is float32, contiguous, (N, 7) or
// one row of 7 ((7,) or (1, 7)).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

#include "layout.h"

namespace fastgen {

constexpr int kSamplingNumCoeffs = 7;

struct SamplingStepArgs {
  at::Tensor sample;        // dense, batch dim outermost
  at::Tensor model_output;  // sample's order; 2N samples with CFG ([uncond; cond])
  at::Tensor coeffs;        // float32, contiguous, (N, 7) or one row of 7
  at::Tensor extra[3];      // extra1, extra2, noise; undefined when absent
  int64_t N = 0;            // batch
  int64_t S = 0;            // elements per sample
  int64_t coeff_stride = 0; // 7 for a row per sample, 0 for one row for the batch
  bool cfg = false;
};

namespace sampling_args_detail {

inline void check_float_on(const char* op, const at::Tensor& t, const char* name,
                           const at::Tensor& sample) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op, ": expected ", name,
              " of dtype float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(t.device() == sample.device(), op, ": expected ", name, " on ", sample.device(),
              " (sample's device), got ", t.device());
}

}  // namespace sampling_args_detail

// Checks the preconditions of sampling_step for a backend whose tensors live
// on `device_type` and returns the arguments as the kernels read them.
inline SamplingStepArgs prepare_sampling_step(
    const char* op, c10::DeviceType device_type, const at::Tensor& sample,
    const at::Tensor& model_output, const at::Tensor& coeffs,
    const std::optional<at::Tensor>& extra1, const std::optional<at::Tensor>& extra2,
    const std::optional<at::Tensor>& noise, bool cfg) {
  using namespace sampling_args_detail;
  TORCH_CHECK(sample.device().type() == device_type, op, ": expected sample on ",
              c10::DeviceTypeName(device_type, /*lower_case=*/true), ", got ", sample.device());
  check_float_on(op, sample, "sample", sample);
  check_float_on(op, model_output, "model_output", sample);
  TORCH_CHECK(sample.dim() >= 1, op, ": sample needs a batch dimension");
  TORCH_CHECK(layout::is_batch_outer_dense(sample), op,
              ": sample must be dense with the batch dim outermost (contiguous or channels-last), "
              "got strides ", sample.strides(), " for sizes ", sample.sizes());
  SamplingStepArgs a;
  a.cfg = cfg;
  a.N = sample.size(0);
  a.S = a.N > 0 ? sample.numel() / a.N : 0;
  TORCH_CHECK(model_output.dim() == sample.dim() &&
                  model_output.size(0) == (cfg ? 2 * a.N : a.N) &&
                  model_output.sizes().slice(1) == sample.sizes().slice(1),
              op, ": expected model_output of sample's shape", cfg ? " with a doubled batch" : "",
              ", got ", model_output.sizes(), " for sample ", sample.sizes());
  const bool empty = sample.numel() == 0;  // no memory is read: any strides do
  TORCH_CHECK(empty || layout::same_sample_layout(model_output, sample), op,
              ": model_output must have sample's strides, got ", model_output.strides(), " for ",
              sample.strides());
  TORCH_CHECK(coeffs.scalar_type() == at::kFloat && coeffs.device() == sample.device() &&
                  coeffs.is_contiguous(),
              op, ": expected contiguous float32 coeffs on ", sample.device(), ", got ",
              coeffs.scalar_type(), " on ", coeffs.device());
  const bool per_sample = coeffs.dim() == 2 && coeffs.size(0) == a.N &&
                          coeffs.size(1) == kSamplingNumCoeffs;
  const bool shared = coeffs.numel() == kSamplingNumCoeffs && coeffs.dim() <= 2 &&
                      coeffs.size(-1) == kSamplingNumCoeffs;
  TORCH_CHECK(per_sample || shared, op, ": expected coeffs of shape (N, 7) with N=", a.N,
              " (or (7,) / (1, 7)), got ", coeffs.sizes());
  a.coeffs = coeffs;
  a.coeff_stride = per_sample && a.N > 1 ? kSamplingNumCoeffs : 0;
  a.sample = sample;
  a.model_output = model_output;

  const std::optional<at::Tensor>* opt[3] = {&extra1, &extra2, &noise};
  const char* names[3] = {"extra1", "extra2", "noise"};
  for (int k = 0; k < 3; ++k) {
    if (!opt[k]->has_value() || !(*opt[k])->defined()) continue;
    const at::Tensor& t = **opt[k];
    check_float_on(op, t, names[k], sample);
    TORCH_CHECK(t.sizes() == sample.sizes() && (empty || layout::same_strides(t, sample)), op, ": expected ",
                names[k], " of sample's shape ", sample.sizes(), " and strides ", sample.strides(),
                ", got ", t.sizes(), " and ", t.strides());
    a.extra[k] = t;
  }
  return a;
}

}  // namespace fastgen
