// What every per-ISA kernel source shares: its namespace, the thread-pool
// wrapper, and scalar fp16 / bf16 types with torch's rounding.
//
// Every file in csrc/cpu/kernels/*.cpp is compiled once per ISA variant with
// that variant's -m flags and -DFASTGEN_CPU_CAPABILITY=<variant>, and puts all
// its code in namespace fastgen::cpu::<variant> (or an anonymous namespace
// inside it). These sources include no ATen / c10 header and take raw
// pointers only (api.h), so they share no inline code with the baseline
// entry points except the few std:: templates they use; for those, setup.py
// links the baseline objects first and the variants in ascending order, and
// ELF linkers keep the first copy of a COMDAT group they meet: a function
// that more than one variant emits resolves to the copy of the lowest one,
// which every caller's CPU can run. (See setup.py, _isa_objects.)
#pragma once

#ifndef FASTGEN_CPU_CAPABILITY
#error "csrc/cpu/kernels/*.cpp are compiled per ISA by setup.py with -DFASTGEN_CPU_CAPABILITY=<variant>"
#endif

#include <cstdint>
#include <cstring>

#include "cpu/kernels/api.h"

#define FG_ISA_BEGIN \
  namespace fastgen { \
  namespace cpu { \
  namespace FASTGEN_CPU_CAPABILITY {
#define FG_ISA_END \
  } \
  } \
  }

FG_ISA_BEGIN

#define FG_ALWAYS_INLINE inline __attribute__((always_inline))

FG_ALWAYS_INLINE float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

FG_ALWAYS_INLINE uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

// fp32 -> bf16, round to nearest even; NaN -> the quiet NaN 0x7fc0 (as c10).
FG_ALWAYS_INLINE uint16_t f32_to_bf16_bits(float f) {
  const uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

FG_ALWAYS_INLINE float bf16_bits_to_f32(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

// IEEE binary16 <-> fp32 in software, round to nearest even (the vector
// loops use F16C / AVX-512 where the variant has them; these serve tails and
// the portable variant).
FG_ALWAYS_INLINE float f16_bits_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;
  if (em >= 0x7c00u) return bits_to_float(sign | 0x7f800000u | ((em & 0x3ffu) << 13));  // inf, NaN
  if (em < 0x0400u) {  // zero or subnormal: em * 2^-24, exact
    const float v = static_cast<float>(em) * 5.9604644775390625e-8f;
    return bits_to_float(float_to_bits(v) | sign);
  }
  return bits_to_float(sign | ((em << 13) + 0x38000000u));  // rebias 15 -> 127
}

FG_ALWAYS_INLINE uint16_t f32_to_f16_bits(float f) {
  const uint32_t u = float_to_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7e00u;   // NaN (quiet)
  if (a >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 rounds to inf
  if (a < 0x38800000u) {
    // Below 2^-14: a half subnormal (or 0). Adding 0.5 puts the value's
    // 2^-24 units in the low mantissa bits, rounded to nearest even.
    const float t = bits_to_float(a) + 0.5f;
    return sign | static_cast<uint16_t>(float_to_bits(t) - 0x3f000000u);
  }
  // Normal: rebias the exponent (127 -> 15) and round the 13 dropped bits.
  const uint32_t odd = (a >> 13) & 1u;
  return sign | static_cast<uint16_t>((a + 0xc8000fffu + odd) >> 13);
}

// Storage types of the kernels' templates: 16 bits, converted like c10's.
struct Half {
  uint16_t x;
  Half() = default;
  explicit Half(float f) : x(f32_to_f16_bits(f)) {}
  explicit operator float() const { return f16_bits_to_f32(x); }
};
struct BFloat16 {
  uint16_t x;
  BFloat16() = default;
  explicit BFloat16(float f) : x(f32_to_bf16_bits(f)) {}
  explicit operator float() const { return bf16_bits_to_f32(x); }
};
static_assert(sizeof(Half) == 2 && sizeof(BFloat16) == 2, "16-bit storage types");

// at::parallel_for through the baseline trampoline (api.h, Parallel).
template <class F>
inline void parallel_for(const Parallel& par, int64_t begin, int64_t end, int64_t grain, const F& f) {
  if (begin >= end) return;
  par.run(begin, end, grain, const_cast<void*>(static_cast<const void*>(&f)),
          [](void* ctx, int64_t b, int64_t e) { (*static_cast<const F*>(ctx))(b, e); });
}

// Calls f(T{}) with the storage type of dt.
template <class F>
inline void with_dtype(Dtype dt, F&& f) {
  switch (dt) {
    case Dtype::kFloat: f(float{}); break;
    case Dtype::kHalf: f(Half{}); break;
    case Dtype::kBFloat16: f(BFloat16{}); break;
  }
}

FG_ISA_END
