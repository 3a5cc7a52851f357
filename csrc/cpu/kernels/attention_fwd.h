// Forward driver of the CPU attention, shared by the fp32 path
// (attention_fwd.cpp) and the bf16 dot-product path (attention_bf16.cpp).
//
// One task = (batch*head, block of BQ queries), parallel with
// at::parallel_for. The query block is packed once as Q^T (D x BQ); each key
// block of BK keys gives S^T = K_blk Q^T (BK x BQ), so the online softmax
// (running max m and sum l per query, base-2 exponent) runs down columns:
// purely vertical vector ops, no horizontal reductions, no masking. Then
// O = diag(alpha) O + P V. A path supplies a Tile, which owns the per-thread
// scratch and does the steps that depend on how the inputs are stored:
//   explicit Tile(const FwdPlan<T>&);
//   void load_queries(const T* q_block, int64_t nq);
//   void key_block(const T* k_block, const T* v_block, int64_t nk, int64_t nq,
//                  int64_t nqp, bool first);  // S^T, softmax, O update
//   float *O, *m, *l;  // O (nq rows of Dp), running max and sum (base 2)
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "cpu/kernels/attention_common.h"
#include "cpu/kernels/attention_gemm.h"
#include "cpu/kernels/attention_pack.h"
#include "cpu/kernels/attention_simd.h"

FG_ISA_BEGIN
namespace cpu_attn {

template <typename T>
struct FwdPlan : Problem<T> {
  T* op;
  float* lp;
  int64_t BQ, BK;  // query and key blocks
  int64_t nqb;     // query blocks per head
  int64_t ldq;     // leading dimension of Q^T and S^T / P^T

  FwdPlan(const AttentionArgs& a, bool pairs)
      : Problem<T>(a), op(static_cast<T*>(a.o_out)), lp(a.lse_out) {
    const int64_t BH = this->BH, Nq = this->Nq, D = this->D;
    // Large enough to amortise packing, small enough that there are a few
    // tasks per thread and the scratch stays in L2.
    BQ = D <= 128 ? 128 : (D <= 256 ? 96 : 64);
    while (BQ > 32 && BH * cdiv(Nq, BQ) < 4 * this->nthreads) BQ /= 2;
    BQ = round_up(std::min<int64_t>(BQ, round_up(Nq, W)), W);
    BK = key_block_size(this->Nk, D <= 128 ? 128 : 64, pairs);
    nqb = cdiv(Nq, BQ);
    ldq = pad_ld(BQ);
  }
};

template <class Tile, typename T>
void run_fwd(const FwdPlan<T>& p) {
  parallel_for(p.par, 0, p.BH * p.nqb, 1, [&](int64_t t0, int64_t t1) {
    Tile tile(p);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bh = t / p.nqb;
      const int64_t q0 = (t % p.nqb) * p.BQ;
      const int64_t nq = std::min(p.BQ, p.Nq - q0);
      const int64_t nqp = round_up(nq, W);
      const int64_t row0 = bh * p.Nq + q0;
      const T* kbh = p.kp + bh * p.Nk * p.D;
      const T* vbh = p.vp + bh * p.Nk * p.D;

      tile.load_queries(p.qp + row0 * p.D, nq);
      for (int64_t i = 0; i < nqp; ++i) {
        tile.m[i] = -std::numeric_limits<float>::infinity();
        tile.l[i] = 0.f;
      }
      for (int64_t k0 = 0; k0 < p.Nk; k0 += p.BK) {
        const int64_t nk = std::min(p.BK, p.Nk - k0);
        tile.key_block(kbh + k0 * p.D, vbh + k0 * p.D, nk, nq, nqp, k0 == 0);
      }

      T* ob = p.op + row0 * p.D;
      float* lb = p.lp + row0;
      for (int64_t i = 0; i < nq; ++i) {
        store_row_scaled(tile.O + i * p.Dp, 1.f / tile.l[i], ob + i * p.D, p.D);
        lb[i] = (tile.m[i] + std::log2(tile.l[i])) * kLn2;  // m, l are base 2; lse is natural
      }
    }
  });
}

// Statistics of query columns i..i+W after a key block: mx is the new running
// max, a = exp2(old max - mx) rescales what was summed so far, sum is this
// block's sum of exp2(score - mx). alpha keeps a for the O update.
inline void update_column_stats(float* m, float* l, float* alpha, int64_t i, vf mx, vf a, vf sum) {
  vstore(l + i, vfma(vload(l + i), a, sum));
  vstore(m + i, mx);
  vstore(alpha + i, a);
}

// O = P V on the first key block, O = diag(alpha) O + P V after it. P is read
// from P^T (ldp per key), K counts keys (pairs of keys when BF).
template <bool BF>
inline void accumulate_pv(bool first, int64_t nq, int64_t Dp, int64_t K, const typename Elem<BF>::type* Pt,
                          int64_t ldp, const typename Elem<BF>::type* V, int64_t ldv, float* O,
                          const float* alpha) {
  if (first) {
    gemm<0, BF>(nq, Dp, K, Pt, 1, ldp, V, ldv, O, Dp);
  } else {
    gemm<2, BF>(nq, Dp, K, Pt, 1, ldp, V, ldv, O, Dp, alpha);
  }
}

// The paths. fwd_fp32 takes fp32, and fp16 / bf16 converted to fp32 on load;
// fwd_bf16_dot returns false where it does not apply (no AVX512_BF16, or a
// head dim it does not take), leaving the work to fwd_fp32.
template <typename T>
void fwd_fp32(const AttentionArgs& a);
bool fwd_bf16_dot(const AttentionArgs& a);

}  // namespace cpu_attn
FG_ISA_END
