// Memory-layout predicates shared by the CPU and CUDA entry points. They only
// *check* layouts: choosing and making a layout is the Python op's job
// (fastgen/ops/_layout.py), and the kernels never copy an input into another
// layout. The rules here are exactly the Python ones.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace fastgen {
namespace layout {

// fastgen/ops/_layout.py is_channels_last_dense: an (N, C, *spatial) tensor
// (3 dims or more) whose memory order is (N, *spatial, C) without gaps.
// Strides of size-1 dims are ignored (they never matter for addressing).
inline bool is_channels_last_dense(const at::Tensor& t) {
  if (t.dim() < 3) return false;
  int64_t expected = 1;
  auto step = [&](int64_t d) {
    if (t.size(d) != 1 && t.stride(d) != expected) return false;
    expected *= t.size(d);
    return true;
  };
  if (!step(1)) return false;
  for (int64_t d = t.dim() - 1; d >= 2; --d)
    if (!step(d)) return false;
  return step(0);
}

// Whether t and ref (same sizes) address memory alike: equal strides on
// every dim of size > 1.
inline bool same_strides(const at::Tensor& t, const at::Tensor& ref) {
  if (t.dim() != ref.dim()) return false;
  for (int64_t d = 0; d < t.dim(); ++d)
    if (t.size(d) > 1 && t.stride(d) != ref.stride(d)) return false;
  return true;
}

// Dense (no gaps, no overlap) with the batch dim outermost: sample n of a
// tensor with S elements per sample occupies elements [n*S, (n+1)*S).
// Contiguous and channels-last tensors are; a batch-transposed one is not.
// An empty tensor addresses no memory and always is.
inline bool is_batch_outer_dense(const at::Tensor& t) {
  if (t.dim() == 0) return false;
  if (t.numel() == 0) return true;
  if (!t.is_non_overlapping_and_dense()) return false;
  const int64_t n = t.size(0);
  return n <= 1 || t.stride(0) == t.numel() / n;
}

// Like same_strides, except that dim 0 may have a different size (the
// doubled batch of [uncond; cond] under guidance): dims >= 1 match ref's
// strides and samples follow each other at ref's sample size.
inline bool same_sample_layout(const at::Tensor& t, const at::Tensor& ref) {
  if (t.dim() != ref.dim() || t.dim() == 0) return false;
  const int64_t S = ref.size(0) > 0 ? ref.numel() / ref.size(0) : 0;
  if (t.size(0) > 1 && t.stride(0) != S) return false;
  for (int64_t d = 1; d < t.dim(); ++d)
    if (t.size(d) > 1 && t.stride(d) != ref.stride(d)) return false;
  return true;
}

}  // namespace layout
}  // namespace fastgen
