// The pybind11 module fastgen._C: binds every native kernel declared in ops.h.
#include <torch/extension.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "ops.h"
#include "cpu/dispatch.h"

#include <stdexcept>

namespace {

bool has_cuda() {
#ifdef FASTGEN_WITH_CUDA
  return true;
#else
  return false;
#endif
}

int omp_max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastgen native kernels (C++ CPU, and CUDA when built with it)";
  m.def("has_cuda", &has_cuda, "whether the CUDA kernels were compiled in");
  m.def("omp_max_threads", &omp_max_threads, "OpenMP threads available to the CPU kernels");

  // CPU ISA variants (csrc/cpu/dispatch.h). FASTGEN_CPU_ISA is read here, at
  // import: an unknown value fails the import with the list of valid ones.
  {
    const std::string warning = fastgen::cpu::init_from_env();
    if (!warning.empty() && PyErr_WarnEx(PyExc_RuntimeWarning, warning.c_str(), 1) != 0)
      throw pybind11::error_already_set();
  }
  m.def("cpu_isa", &fastgen::cpu::current_isa,
        "the ISA variant the CPU kernels run now (portable, avx2, avx512 or avx512_bf16)");
  m.def("cpu_isas_supported", &fastgen::cpu::isas_supported,
        "the ISA variants that were built and that this CPU can run, lowest first");
  m.def("cpu_isas_built", &fastgen::cpu::isas_built, "the ISA variants compiled into this build");
  m.def(
      "cpu_kernel_is_fast",
      [](const std::string& op, const std::string& dtype) {
        try {
          return fastgen::cpu::kernel_is_fast(op, dtype);
        } catch (const std::invalid_argument& e) {
          throw pybind11::value_error(e.what());
        }
      },
      pybind11::arg("op"), pybind11::arg("dtype"),
      "whether the CPU kernel of op ('geglu', 'group_norm', 'attention', 'sampling_step', "
      "'vae_postprocess') for dtype "
      "('float32', 'float16', 'bfloat16') under the current ISA variant was measured at least as "
      "fast as eager PyTorch (see csrc/cpu/dispatch.h)");
  m.def("cpu_isa_names", &fastgen::cpu::isa_names, "every ISA variant name, lowest first");
  m.def(
      "set_cpu_isa",
      [](const std::string& name) {
        try {
          return fastgen::cpu::set_isa(name);
        } catch (const std::invalid_argument& e) {
          throw pybind11::value_error(e.what());
        }
      },
      pybind11::arg("name"),
      "use the CPU kernels of ISA variant `name` ('auto' for the default, FASTGEN_CPU_ISA "
      "aside); ValueError when unknown, not built or not runnable here. Returns the variant.");

  m.def("group_norm_fwd_cpu", &fastgen::group_norm_fwd_cpu);
  m.def("group_norm_bwd_cpu", &fastgen::group_norm_bwd_cpu);
  m.def("sampling_step_cpu", &fastgen::sampling_step_cpu);
  m.def("attention_fwd_cpu", &fastgen::attention_fwd_cpu);
  m.def("attention_bwd_cpu", &fastgen::attention_bwd_cpu);
  m.def("geglu_fwd_cpu", &fastgen::geglu_fwd_cpu);
  m.def("geglu_bwd_cpu", &fastgen::geglu_bwd_cpu);
  m.def("vae_postprocess_fwd_cpu", &fastgen::vae_postprocess_fwd_cpu);
  m.def("vae_postprocess_bwd_cpu", &fastgen::vae_postprocess_bwd_cpu);
  m.def("conv2d_fwd_cpu", &fastgen::conv2d_fwd_cpu);
  m.def("bias_act_fwd_cpu", &fastgen::bias_act_fwd_cpu);
  m.def("bias_act_grad_cpu", &fastgen::bias_act_grad_cpu);
#ifdef FASTGEN_WITH_CUDA
  m.def("group_norm_fwd_cuda", &fastgen::group_norm_fwd_cuda);
  m.def("group_norm_bwd_cuda", &fastgen::group_norm_bwd_cuda);
  m.def("sampling_step_cuda", &fastgen::sampling_step_cuda);
  m.def("attention_fwd_cuda", &fastgen::attention_fwd_cuda);
  m.def("geglu_fwd_cuda", &fastgen::geglu_fwd_cuda);
  m.def("geglu_bwd_cuda", &fastgen::geglu_bwd_cuda);
  m.def("vae_postprocess_fwd_cuda", &fastgen::vae_postprocess_fwd_cuda);
  m.def("vae_postprocess_bwd_cuda", &fastgen::vae_postprocess_bwd_cuda);
  m.def("conv2d_fwd_cuda", &fastgen::conv2d_fwd_cuda);
  m.def("bias_act_fwd_cuda", &fastgen::bias_act_fwd_cuda);
  m.def("bias_act_grad_cuda", &fastgen::bias_act_grad_cuda);
#endif
}
