// The torch and CUDA headers every .cu file of the extension starts with.
#pragma once

// A CPU-only torch wheel (used for the compile-only checks on machines without
// a GPU) ships the c10/cuda headers but not the CMake-generated
// c10/cuda/impl/cuda_cmake_macros.h, which only carries a Windows DLL-export
// macro; skip it where it is missing. A CUDA build of torch has it.
#if defined(__has_include)
#if !__has_include(<c10/cuda/impl/cuda_cmake_macros.h>) && \
    !defined(C10_CUDA_NO_CMAKE_CONFIGURE_FILE)
#define C10_CUDA_NO_CMAKE_CONFIGURE_FILE
#endif
#endif

#include "ops.h"

// Streams, guards and launch checks come from c10/cuda directly:
// ATen/cuda/CUDAContext.h would also pull in the cuBLAS/cuSPARSE/cuSOLVER
// headers, which these kernels do not need (and a bare toolkit may lack).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace fastgen {

// Calls f with a value of the CUDA element type of a float32 / float16 / bfloat16 tensor dtype (the kernels'
// template argument); any other dtype is a RuntimeError naming the op.
template <typename F>
void dispatch_float_dtype(const char* op_name, at::ScalarType dt, F&& f) {
  switch (dt) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(__half{}); break;
    case at::kBFloat16: f(__nv_bfloat16{}); break;
    default: TORCH_CHECK(false, op_name, ": expected float32, float16 or bfloat16, got ", dt);
  }
}

// fp32 <-> the kernels' element types (fp32 math, one rounding to nearest even on the way out).
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// V elements of T moved as one access (16 bytes for the vector paths).
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// V elements of T at p (aligned to the pack) as fp32, and back with one rounding each.
template <typename T, int V>
__device__ __forceinline__ void load(const T* p, float (&out)[V]) {
  const Pack<T, V> pk = *reinterpret_cast<const Pack<T, V>*>(p);
#pragma unroll
  for (int k = 0; k < V; ++k) out[k] = to_float(pk.v[k]);
}

template <typename T, int V>
__device__ __forceinline__ void store(T* p, const float (&in)[V]) {
  Pack<T, V> pk;
#pragma unroll
  for (int k = 0; k < V; ++k) pk.v[k] = from_float<T>(in[k]);
  *reinterpret_cast<Pack<T, V>*>(p) = pk;
}

}  // namespace fastgen
