// The pybind11 module fastgen._C: binds every native kernel declared in ops.h.
#include <torch/extension.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "ops.h"

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

  m.def("group_norm_fwd_cpu", &fastgen::group_norm_fwd_cpu);
  m.def("group_norm_bwd_cpu", &fastgen::group_norm_bwd_cpu);
  m.def("sampling_step_cpu", &fastgen::sampling_step_cpu);
  m.def("attention_fwd_cpu", &fastgen::attention_fwd_cpu);
  m.def("attention_bwd_cpu", &fastgen::attention_bwd_cpu);
  m.def("geglu_fwd_cpu", &fastgen::geglu_fwd_cpu);
  m.def("geglu_bwd_cpu", &fastgen::geglu_bwd_cpu);
#ifdef FASTGEN_WITH_CUDA
  m.def("group_norm_fwd_cuda", &fastgen::group_norm_fwd_cuda);
  m.def("group_norm_bwd_cuda", &fastgen::group_norm_bwd_cuda);
  m.def("sampling_step_cuda", &fastgen::sampling_step_cuda);
  m.def("attention_fwd_cuda", &fastgen::attention_fwd_cuda);
  m.def("geglu_fwd_cuda", &fastgen::geglu_fwd_cuda);
  m.def("geglu_bwd_cuda", &fastgen::geglu_bwd_cuda);
#endif
}
