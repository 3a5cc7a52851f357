// CPU attention entry points: softmax(q k^T * scale) v, FlashAttention-style.
// This file (compiled once, for the baseline ISA) holds the preconditions and
// the outputs; the kernels are compiled per ISA variant in csrc/cpu/kernels/:
//   attention_fwd.h / attention_bwd.h   drivers: block sizes, scheduling, loops
//   attention_fwd.cpp / attention_bwd.cpp   fp32 path (fp16, and bf16 without
//                                       AVX512_BF16, converted on load)
//   attention_bf16.cpp                  bf16 on vdpbf16ps (the avx512_bf16
//                                       variant, even D >= 16); the entry points
//   attention_gemm.h, attention_pack.h, attention_simd.h, attention_common.h
//
// Contract (see ops.h): q (B,H,Nq,D), k and v (B,H,Nk,D), contiguous, one dtype
// (fp32 / fp16 / bf16). attention_fwd_cpu returns o (q's dtype) and the fp32
// natural-log logsumexp lse (B,H,Nq); attention_bwd_cpu recomputes the
// probabilities from q, k and lse and returns dq, dk, dv. The Nq x Nk matrix is
// never materialised: every thread owns scratch of a few (query block x key
// block) tiles only, with fp32 accumulation and fp32 softmax statistics.
#include <ATen/ATen.h>

#include "cpu/dispatch.h"
#include "ops.h"

namespace fastgen {
namespace {

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const char* fn) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, fn,
              ": q, k, v must be 4-D (B, H, N, D); got q ", q.sizes(), ", k ", k.sizes(), ", v ",
              v.sizes());
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), fn,
              ": q, k, v must be CPU tensors");
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, fn,
              ": dtype must be float32, float16 or bfloat16; got ", dt);
  TORCH_CHECK(k.scalar_type() == dt && v.scalar_type() == dt, fn,
              ": q, k, v must have one dtype; got ", dt, ", ", k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(), fn,
              ": q, k, v must be contiguous");
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0) && k.size(1) == q.size(1) &&
                  v.size(1) == q.size(1),
              fn, ": batch and head sizes must match; got q ", q.sizes(), ", k ", k.sizes(), ", v ",
              v.sizes());
  TORCH_CHECK(k.size(3) == q.size(3) && v.size(3) == q.size(3), fn,
              ": head dim D must match (and v's D must equal q's); got q ", q.sizes(), ", k ",
              k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(k.size(2) == v.size(2), fn, ": k and v must have the same number of keys; got k ",
              k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(q.size(3) >= 1, fn, ": head dim must be >= 1");
  TORCH_CHECK(k.size(2) >= 1 || q.size(2) == 0, fn, ": need at least one key (Nk >= 1)");
}

cpu::AttentionArgs make_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             double scale, const char* fn) {
  cpu::AttentionArgs a{};
  a.dtype = cpu::to_dtype(q.scalar_type(), fn);
  a.BH = q.size(0) * q.size(1);
  a.Nq = q.size(2);
  a.Nk = k.size(2);
  a.D = q.size(3);
  a.scale = static_cast<float>(scale);
  a.q = q.const_data_ptr();
  a.k = k.const_data_ptr();
  a.v = v.const_data_ptr();
  a.par = cpu::parallel();
  return a;
}

}  // namespace

Tensor2 attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          double scale) {
  check_qkv(q, k, v, "attention_fwd_cpu");
  at::Tensor o = at::empty_like(q);
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {o, lse};
  cpu::AttentionArgs a = make_args(q, k, v, scale, "attention_fwd_cpu");
  a.o_out = o.mutable_data_ptr();
  a.lse_out = lse.mutable_data_ptr<float>();
  cpu::kernels().attention_fwd(a);
  return {o, lse};
}

Tensor3 attention_bwd_cpu(const at::Tensor& do_, const at::Tensor& q, const at::Tensor& k,
                          const at::Tensor& v, const at::Tensor& o, const at::Tensor& lse,
                          double scale) {
  check_qkv(q, k, v, "attention_bwd_cpu");
  TORCH_CHECK(do_.sizes() == q.sizes() && o.sizes() == q.sizes(),
              "attention_bwd_cpu: do and o must have q's shape ", q.sizes(), "; got do ",
              do_.sizes(), ", o ", o.sizes());
  TORCH_CHECK(do_.scalar_type() == q.scalar_type() && o.scalar_type() == q.scalar_type(),
              "attention_bwd_cpu: do and o must have q's dtype ", q.scalar_type(), "; got do ",
              do_.scalar_type(), ", o ", o.scalar_type());
  TORCH_CHECK(do_.is_contiguous() && o.is_contiguous(),
              "attention_bwd_cpu: do and o must be contiguous");
  TORCH_CHECK(do_.device().is_cpu() && o.device().is_cpu() && lse.device().is_cpu(),
              "attention_bwd_cpu: all tensors must be CPU tensors");
  TORCH_CHECK(lse.scalar_type() == at::kFloat, "attention_bwd_cpu: lse must be float32; got ",
              lse.scalar_type());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) &&
                  lse.size(2) == q.size(2),
              "attention_bwd_cpu: lse must have shape (B, H, Nq) = (", q.size(0), ", ", q.size(1),
              ", ", q.size(2), "); got ", lse.sizes());
  TORCH_CHECK(lse.is_contiguous(), "attention_bwd_cpu: lse must be contiguous");
  at::Tensor dq = at::empty_like(q);
  at::Tensor dk = at::empty_like(k);
  at::Tensor dv = at::empty_like(v);
  if (q.size(0) * q.size(1) == 0) return {dq, dk, dv};
  if (q.size(2) == 0 || k.size(2) == 0) {  // nothing flows
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  cpu::AttentionArgs a = make_args(q, k, v, scale, "attention_bwd_cpu");
  a.dout = do_.const_data_ptr();
  a.o = o.const_data_ptr();
  a.lse_in = lse.const_data_ptr<float>();
  a.dq = dq.mutable_data_ptr();
  a.dk = dk.mutable_data_ptr();
  a.dv = dv.mutable_data_ptr();
  cpu::kernels().attention_bwd(a);
  return {dq, dk, dv};
}

}  // namespace fastgen
