// Run-time choice of the CPU kernels' instruction-set variant.
//
// Build: every source in csrc/cpu/kernels/ is compiled once per variant
// (portable x86-64 / SSE2, avx2 = AVX2+FMA+F16C, avx512 = AVX-512
// F/BW/VL/DQ, avx512_bf16 = avx512 + AVX512_BF16; only portable off x86-64)
// into namespace fastgen::cpu::<variant>, each exporting a KernelTable
// (kernels/api.h). Everything else (argument checks, allocation, the thread
// pool) is compiled once, for the baseline, and calls the kernels through the
// table chosen here.
//
// Run time: the default is the highest variant that was built and that the
// CPU (cpuid, with the OS's XSAVE support for the wider registers) can run.
// FASTGEN_CPU_ISA=<variant> read at import asks for a lower one: an unknown
// value is an error (import of fastgen._C fails, naming the valid values); a
// variant the CPU cannot run, or one not built, falls back to the highest
// usable variant below it, with a RuntimeWarning. set_cpu_isa() changes the
// choice at run time (tests use it to run every variant).
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "cpu/kernels/api.h"

namespace fastgen {
namespace cpu {

// Names of all variants, lowest first.
const std::vector<std::string>& isa_names();
std::vector<std::string> isas_built();
// Built and runnable on this CPU, lowest first.
std::vector<std::string> isas_supported();
std::string current_isa();
// Reads FASTGEN_CPU_ISA. Throws std::invalid_argument for an unknown value;
// returns a warning text (empty when none) when it had to fall back.
std::string init_from_env();
// name: a variant, or "auto" / "" for the default (FASTGEN_CPU_ISA is not
// re-read). Throws std::invalid_argument when unknown, not built or not
// runnable here. Returns the variant now in use.
std::string set_isa(const std::string& name);

// Whether the current variant's kernel for `op` (geglu, group_norm,
// attention, sampling_step) and `dtype` (float32, float16, bfloat16) was
// measured at least as fast as eager PyTorch on the same CPU; the automatic
// backend choice takes eager where it was not. From fastgen bench runs
// (2026-12-01, AMD EPYC AVX2 with FASTGEN_CPU_ISA=portable and avx2; the
// avx512 numbers from benchmarks/results/): every kernel of the avx2 /
// avx512 / avx512_bf16 variants holds; of the portable (SSE2) one only
// sampling_step does (geglu 0.4-0.65x, group_norm bf16 0.3-0.4x, attention
// 0.1x, against torch's own vectorised kernels), and vae_postprocess for
// float32 (measured 2026-12-01 on the AVX2 EPYC, 2 threads, 1x3x512x512 and
// 1x3x1024x1024: avx2 2.8-4.8x eager for the float output and 10-15x for
// the uint8 image in every dtype; portable fp32 2.5-2.7x / 4.6-6.5x, but the
// float output 0.1-0.2x in fp16 (software conversion) and 0.6-0.9x in bf16).
// Throws std::invalid_argument for an unknown op or dtype.
bool kernel_is_fast(const std::string& op, const std::string& dtype);

// The kernels of the current variant.
const KernelTable& kernels();
// The thread pool, for the kernels (at::parallel_for, at::get_num_threads()).
Parallel parallel();
// x's dtype as the kernels see it; a TORCH_CHECK error names op otherwise.
Dtype to_dtype(at::ScalarType dt, const char* op);

}  // namespace cpu
}  // namespace fastgen
