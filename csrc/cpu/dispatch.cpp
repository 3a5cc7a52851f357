// Run-time choice of the CPU kernels' ISA variant; see dispatch.h.
#include "cpu/dispatch.h"

#include <ATen/Parallel.h>

#include <atomic>
#include <cstdlib>
#include <stdexcept>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#define FASTGEN_X86 1
#endif

namespace fastgen {
namespace cpu {
namespace {

enum Isa : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3, kNumIsas = 4 };

const KernelTable* built_table(int isa) {
  switch (isa) {
#ifdef FASTGEN_CPU_HAVE_PORTABLE
    case kPortable: return &portable::kTable;
#endif
#ifdef FASTGEN_CPU_HAVE_AVX2
    case kAvx2: return &avx2::kTable;
#endif
#ifdef FASTGEN_CPU_HAVE_AVX512
    case kAvx512: return &avx512::kTable;
#endif
#ifdef FASTGEN_CPU_HAVE_AVX512_BF16
    case kAvx512Bf16: return &avx512_bf16::kTable;
#endif
    default: return nullptr;
  }
}

#ifdef FASTGEN_X86
struct CpuFeatures {
  bool avx2 = false, avx512 = false, avx512_bf16 = false;
};

CpuFeatures detect() {
  CpuFeatures f;
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool fma = c & (1u << 12), osxsave = c & (1u << 27), avx = c & (1u << 28),
             f16c = c & (1u << 29);
  if (!osxsave || !avx) return f;
  unsigned xlo, xhi;
  __asm__ volatile("xgetbv" : "=a"(xlo), "=d"(xhi) : "c"(0));
  const bool os_ymm = (xlo & 0x6u) == 0x6u;     // SSE and AVX state
  const bool os_zmm = (xlo & 0xe6u) == 0xe6u;   // + opmask, ZMM_Hi256, Hi16_ZMM
  if (!os_ymm || !__get_cpuid_count(7, 0, &a, &b, &c, &d)) return f;
  const bool avx2 = b & (1u << 5), avx512f = b & (1u << 16), avx512dq = b & (1u << 17),
             avx512bw = b & (1u << 30), avx512vl = b & (1u << 31);
  const unsigned max_sub = a;
  f.avx2 = avx2 && fma && f16c;
  f.avx512 = f.avx2 && os_zmm && avx512f && avx512dq && avx512bw && avx512vl;
  if (f.avx512 && max_sub >= 1 && __get_cpuid_count(7, 1, &a, &b, &c, &d))
    f.avx512_bf16 = a & (1u << 5);
  return f;
}
#endif

bool cpu_runs(int isa) {
#ifdef FASTGEN_X86
  static const CpuFeatures f = detect();
  switch (isa) {
    case kPortable: return true;
    case kAvx2: return f.avx2;
    case kAvx512: return f.avx512;
    case kAvx512Bf16: return f.avx512_bf16;
    default: return false;
  }
#else
  return isa == kPortable;
#endif
}

bool usable(int isa) { return built_table(isa) != nullptr && cpu_runs(isa); }

// Highest usable variant <= limit (the portable one is always built).
int best_at_most(int limit) {
  for (int i = limit; i >= 0; --i)
    if (usable(i)) return i;
  return kPortable;
}

int index_of(const std::string& name) {
  const auto& names = isa_names();
  for (int i = 0; i < kNumIsas; ++i)
    if (names[i] == name) return i;
  return -1;
}

std::string valid_values() {
  std::string s;
  for (const auto& n : isa_names()) s += (s.empty() ? "" : ", ") + n;
  return s;
}

std::atomic<int> g_current{-1};

int current_index() {
  int cur = g_current.load(std::memory_order_relaxed);
  if (cur < 0) {  // init_from_env() was not called (not from Python): the default
    cur = best_at_most(kNumIsas - 1);
    g_current.store(cur, std::memory_order_relaxed);
  }
  return cur;
}

void run_parallel(int64_t begin, int64_t end, int64_t grain, void* ctx, ParallelBody body) {
  at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) { body(ctx, b, e); });
}

}  // namespace

const std::vector<std::string>& isa_names() {
  static const std::vector<std::string> names = {"portable", "avx2", "avx512", "avx512_bf16"};
  return names;
}

std::vector<std::string> isas_built() {
  std::vector<std::string> out;
  for (int i = 0; i < kNumIsas; ++i)
    if (built_table(i)) out.push_back(isa_names()[i]);
  return out;
}

std::vector<std::string> isas_supported() {
  std::vector<std::string> out;
  for (int i = 0; i < kNumIsas; ++i)
    if (usable(i)) out.push_back(isa_names()[i]);
  return out;
}

std::string current_isa() { return isa_names()[current_index()]; }

std::string init_from_env() {
  const char* env = std::getenv("FASTGEN_CPU_ISA");
  const std::string want = env ? env : "";
  std::string warning;
  int choice = best_at_most(kNumIsas - 1);
  if (!want.empty() && want != "auto") {
    const int asked = index_of(want);
    if (asked < 0)
      throw std::invalid_argument("FASTGEN_CPU_ISA=" + want + " is not a CPU ISA variant; use one of " +
                                  valid_values() + " (or unset it / 'auto' for the best this CPU runs)");
    choice = best_at_most(asked);
    if (choice != asked)
      warning = "FASTGEN_CPU_ISA=" + want + ": " +
                (built_table(asked) ? "this CPU cannot run it" : "this build of fastgen._C does not have it") +
                "; using " + isa_names()[choice];
  }
  g_current.store(choice);
  return warning;
}

std::string set_isa(const std::string& name) {
  if (name.empty() || name == "auto") {
    g_current.store(best_at_most(kNumIsas - 1));
    return current_isa();
  }
  const int i = index_of(name);
  if (i < 0) throw std::invalid_argument("unknown CPU ISA variant '" + name + "'; use one of " + valid_values());
  if (!built_table(i))
    throw std::invalid_argument("CPU ISA variant '" + name + "' was not built into fastgen._C (built: " +
                                [] { std::string s; for (auto& n : isas_built()) s += (s.empty() ? "" : ", ") + n; return s; }() + ")");
  if (!cpu_runs(i)) throw std::invalid_argument("this CPU cannot run the '" + name + "' variant");
  g_current.store(i);
  return current_isa();
}

bool kernel_is_fast(const std::string& op, const std::string& dtype) {
  if (op != "geglu" && op != "group_norm" && op != "attention" && op != "sampling_step" &&
      op != "vae_postprocess" && op != "conv2d" && op != "bias_act")
    throw std::invalid_argument("unknown op '" + op +
                                "'; use geglu, group_norm, attention, sampling_step, vae_postprocess, conv2d "
                                "or bias_act");
  if (dtype != "float32" && dtype != "float16" && dtype != "bfloat16")
    throw std::invalid_argument("unknown dtype '" + dtype + "'; use float32, float16 or bfloat16");
  if (current_index() == kPortable) {
    // The portable vae_postprocess converts fp16 in software (0.1-0.2x eager's float output) and its
    // bf16 float output is 0.6-0.9x eager; fp32 is 2.5-2.7x (float) and 4.6-6.5x (uint8).
    if (op == "vae_postprocess") return dtype == "float32";
    // conv2d's time is in BLAS GEMMs and oneDNN, which pick their own ISA; its transforms are a small part.
    return op == "sampling_step" || op == "conv2d";
  }
  return true;
}

const KernelTable& kernels() { return *built_table(current_index()); }

Parallel parallel() { return Parallel{&run_parallel, at::get_num_threads()}; }

Dtype to_dtype(at::ScalarType dt, const char* op) {
  switch (dt) {
    case at::kFloat: return Dtype::kFloat;
    case at::kHalf: return Dtype::kHalf;
    case at::kBFloat16: return Dtype::kBFloat16;
    default: TORCH_CHECK(false, op, ": expected float32, float16 or bfloat16, got ", dt);
  }
}

}  // namespace cpu
}  // namespace fastgen
