// What the CPU and CUDA entry points of sampling_step share: argument checks
// with errors that say what was expected, and every input brought into
// sample's memory order, so that both kernels walk one flat index per sample.
//
// Layout: sample must be dense with the batch dim outermost (contiguous,
// channels-last, ...; anything else is made contiguous), so sample n occupies
// elements [n*S, (n+1)*S). The other tensors are used in place when their
// strides match sample's and are copied into that order otherwise.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace fastgen {

constexpr int kSamplingNumCoeffs = 7;

struct SamplingStepArgs {
  at::Tensor sample;        // dense, batch dim outermost
  at::Tensor model_output;  // sample's order; 2N samples with CFG ([uncond; cond])
  at::Tensor coeffs;        // float32, contiguous, (N, 7) or one row of 7
  at::Tensor extra[3];      // extra1, extra2, noise in sample's order; undefined when absent
  int64_t N = 0;            // batch
  int64_t S = 0;            // elements per sample
  int64_t coeff_stride = 0; // 7 for a row per sample, 0 for one row for the batch
  bool cfg = false;
};

namespace sampling_args_detail {

inline bool batch_outer_dense(const at::Tensor& t, int64_t S) {
  return t.is_non_overlapping_and_dense() && (t.size(0) <= 1 || t.stride(0) == S);
}

// Whether t (sizes as ref except possibly dim 0) has ref's memory order.
inline bool same_layout(const at::Tensor& t, const at::Tensor& ref, int64_t S) {
  if (t.size(0) > 1 && t.stride(0) != S) return false;
  for (int64_t d = 1; d < t.dim(); ++d)
    if (t.size(d) > 1 && t.stride(d) != ref.stride(d)) return false;
  return true;
}

// t itself when it has ref's memory order, else a copy in that order.
inline at::Tensor in_layout(const at::Tensor& t, const at::Tensor& ref, int64_t S) {
  if (same_layout(t, ref, S)) return t;
  std::vector<int64_t> strides(ref.strides().begin(), ref.strides().end());
  strides[0] = S;
  at::Tensor copy = at::empty_strided(t.sizes(), strides, t.options());
  copy.copy_(t);
  return copy;
}

inline void check_float_on(const char* op, const at::Tensor& t, const char* name,
                           const at::Tensor& sample) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op, ": expected ", name,
              " of dtype float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(t.device() == sample.device(), op, ": expected ", name, " on ", sample.device(),
              " (sample's device), got ", t.device());
}

}  // namespace sampling_args_detail

// Checks the arguments of sampling_step for a backend whose tensors live on
// `device_type`, and returns them in the layout the kernels read.
inline SamplingStepArgs prepare_sampling_step(
    const char* op, c10::DeviceType device_type, const at::Tensor& sample_in,
    const at::Tensor& model_output, const at::Tensor& coeffs_in,
    const std::optional<at::Tensor>& extra1, const std::optional<at::Tensor>& extra2,
    const std::optional<at::Tensor>& noise, bool cfg) {
  using namespace sampling_args_detail;
  TORCH_CHECK(sample_in.device().type() == device_type, op, ": expected sample on ",
              c10::DeviceTypeName(device_type, /*lower_case=*/true), ", got ", sample_in.device());
  check_float_on(op, sample_in, "sample", sample_in);
  check_float_on(op, model_output, "model_output", sample_in);
  TORCH_CHECK(sample_in.dim() >= 1, op, ": sample needs a batch dimension");
  SamplingStepArgs a;
  a.cfg = cfg;
  a.N = sample_in.size(0);
  {
    std::vector<int64_t> want(sample_in.sizes().begin(), sample_in.sizes().end());
    if (cfg) want[0] *= 2;
    TORCH_CHECK(model_output.sizes() == at::IntArrayRef(want), op,
                ": expected model_output of shape ", at::IntArrayRef(want),
                cfg ? " ([uncond; cond])" : "", ", got ", model_output.sizes());
  }
  TORCH_CHECK(coeffs_in.scalar_type() == at::kFloat && coeffs_in.device() == sample_in.device(), op,
              ": expected float32 coeffs on ", sample_in.device(), ", got ",
              coeffs_in.scalar_type(), " on ", coeffs_in.device());
  const bool per_sample = coeffs_in.dim() == 2 && coeffs_in.size(0) == a.N &&
                          coeffs_in.size(1) == kSamplingNumCoeffs;
  const bool shared = coeffs_in.numel() == kSamplingNumCoeffs && coeffs_in.dim() <= 2 &&
                      coeffs_in.size(-1) == kSamplingNumCoeffs;
  TORCH_CHECK(per_sample || shared, op, ": expected coeffs of shape (N, 7) with N=", a.N,
              " (or (7,) / (1, 7)), got ", coeffs_in.sizes());
  a.coeffs = coeffs_in.contiguous();
  a.coeff_stride = per_sample && a.N > 1 ? kSamplingNumCoeffs : 0;

  a.S = a.N > 0 ? sample_in.numel() / a.N : 0;
  a.sample = batch_outer_dense(sample_in, a.S) ? sample_in : sample_in.contiguous();
  a.model_output = in_layout(model_output, a.sample, a.S);

  const std::optional<at::Tensor>* opt[3] = {&extra1, &extra2, &noise};
  const char* names[3] = {"extra1", "extra2", "noise"};
  for (int k = 0; k < 3; ++k) {
    if (!opt[k]->has_value() || !(*opt[k])->defined()) continue;
    const at::Tensor& t = **opt[k];
    check_float_on(op, t, names[k], a.sample);
    TORCH_CHECK(t.sizes() == a.sample.sizes(), op, ": expected ", names[k], " of shape ",
                a.sample.sizes(), ", got ", t.sizes());
    a.extra[k] = in_layout(t, a.sample, a.S);
  }
  return a;
}

}  // namespace fastgen
