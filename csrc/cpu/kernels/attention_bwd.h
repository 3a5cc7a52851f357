// Backward driver of the CPU attention (FlashAttention-2 order), shared by the
// fp32 path (attention_bwd.cpp) and the bf16 dot-product path
// (attention_bf16.cpp).
//
// One task = (batch*head, a range of key blocks): the key block's operands are
// packed once and reused for every query block; dK and dV accumulate in
// per-task fp32 scratch; dQ accumulates in an fp32 (n_split, B*H, Nq, Dp)
// buffer (n_split = number of key ranges per head, 1 unless there are few
// heads per thread), summed at the end. delta = rowsum(dO * O) is a cheap
// pre-pass. The probabilities are recomputed from q, k and lse. A path
// supplies a Tile, which owns the per-thread scratch and does the steps that
// depend on how the inputs are stored:
//   explicit Tile(const BwdPlan<T>&);
//   void load_keys(const T* k_block, const T* v_block, int64_t nk);
//   void query_block(const T* q_block, const T* do_block, const float* lse,
//                    const float* delta, int64_t nq, int64_t nk, float* dq);
//       // dK, dV, dq (nq rows of Dp) += this block's contributions
//   float *dK, *dV;  // nk rows of Dp
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cpu/kernels/attention_common.h"
#include "cpu/kernels/attention_pack.h"
#include "cpu/kernels/attention_simd.h"

FG_ISA_BEGIN
namespace cpu_attn {

template <typename T>
struct BwdPlan : Problem<T> {
  const T *dop, *op;
  const float* lp;
  T *dqp, *dkp, *dvp;
  int64_t BQ, BK;        // query and key blocks (dK / dV accumulators)
  int64_t nkb;           // key blocks per head
  int64_t n_split;       // key ranges per head
  int64_t kb_per_split;  // key blocks per range
  int64_t ldk;           // leading dimension of K^T, V^T, S, dP

  BwdPlan(const AttentionArgs& a, bool pairs)
      : Problem<T>(a), dop(static_cast<const T*>(a.dout)), op(static_cast<const T*>(a.o)),
        lp(a.lse_in), dqp(static_cast<T*>(a.dq)), dkp(static_cast<T*>(a.dk)), dvp(static_cast<T*>(a.dv)) {
    const int64_t BH = this->BH, D = this->D;
    const int nthreads = this->nthreads;
    BQ = D <= 160 ? 128 : 64;
    BK = key_block_size(this->Nk, D <= 160 ? 128 : 64, pairs);
    nkb = cdiv(this->Nk, BK);
    // More than one range only when the heads alone cannot keep the threads
    // evenly busy: each extra range costs one more fp32 dQ partial buffer.
    n_split = 1;
    if (BH < 4 * nthreads && BH % nthreads != 0) n_split = std::min<int64_t>(nkb, cdiv(4 * nthreads, BH));
    kb_per_split = cdiv(nkb, n_split);
    n_split = cdiv(nkb, kb_per_split);
    ldk = pad_ld(BK);
  }
};

// delta[r] = sum_d dO[r][d] * O[r][d] in fp32, for rows r < rows.
template <typename T>
void compute_delta(const Parallel& par, const T* dop, const T* op, float* delta, int64_t rows, int64_t D) {
  parallel_for(par, 0, rows, 64, [&](int64_t r0, int64_t r1) {
    Scratch tmp(2 * D);
    float* a = tmp.p;
    float* b = a + D;
    for (int64_t r = r0; r < r1; ++r) {
      cvt_to_f32(dop + r * D, a, D);
      cvt_to_f32(op + r * D, b, D);
      vf acc = vzero();
      int64_t d = 0;
      for (; d + W <= D; d += W) acc = vfma(vload(a + d), vload(b + d), acc);
      float sum = vhsum(acc);
      for (; d < D; ++d) sum += a[d] * b[d];
      delta[r] = sum;
    }
  });
}

// dq[r] = sum over the n_split partial fp32 accumulators (rows of Dp floats).
template <typename T>
void reduce_dq(const Parallel& par, const float* acc, T* dq, int64_t n_split, int64_t rows, int64_t D,
               int64_t Dp) {
  parallel_for(par, 0, rows, 64, [&](int64_t r0, int64_t r1) {
    Scratch tmp(Dp);
    for (int64_t r = r0; r < r1; ++r) {
      const float* src = acc + r * Dp;
      if (n_split == 1) {
        store_row(src, dq + r * D, D);
      } else {
        std::memcpy(tmp.p, src, sizeof(float) * D);
        for (int64_t sp = 1; sp < n_split; ++sp) {
          const float* x = src + sp * rows * Dp;
          for (int64_t d = 0; d < D; ++d) tmp.p[d] += x[d];
        }
        store_row(tmp.p, dq + r * D, D);
      }
    }
  });
}

template <class Tile, typename T>
void run_bwd(const BwdPlan<T>& p) {
  const int64_t rows = p.BH * p.Nq;
  Scratch delta_buf(rows);
  float* delta = delta_buf.p;
  compute_delta(p.par, p.dop, p.op, delta, rows, p.D);
  const int64_t nacc = p.n_split * p.BH * p.Nq * p.Dp;
  Scratch dqacc_buf(nacc);
  float* dqacc = dqacc_buf.p;
  parallel_for(p.par, 0, nacc, 1 << 16, [&](int64_t b, int64_t e) {
    std::memset(dqacc + b, 0, sizeof(float) * (e - b));
  });

  parallel_for(p.par, 0, p.BH * p.n_split, 1, [&](int64_t t0, int64_t t1) {
    Tile tile(p);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bh = t / p.n_split;
      const int64_t sp = t % p.n_split;
      float* dqa = dqacc + (sp * p.BH + bh) * p.Nq * p.Dp;
      const int64_t kb_end = std::min(p.nkb, (sp + 1) * p.kb_per_split);
      for (int64_t kb = sp * p.kb_per_split; kb < kb_end; ++kb) {
        const int64_t k0 = kb * p.BK;
        const int64_t nk = std::min(p.BK, p.Nk - k0);
        const int64_t krow0 = bh * p.Nk + k0;
        tile.load_keys(p.kp + krow0 * p.D, p.vp + krow0 * p.D, nk);
        std::memset(tile.dK, 0, sizeof(float) * nk * p.Dp);
        std::memset(tile.dV, 0, sizeof(float) * nk * p.Dp);

        for (int64_t q0 = 0; q0 < p.Nq; q0 += p.BQ) {
          const int64_t qrow0 = bh * p.Nq + q0;
          tile.query_block(p.qp + qrow0 * p.D, p.dop + qrow0 * p.D, p.lp + qrow0, delta + qrow0,
                           std::min(p.BQ, p.Nq - q0), nk, dqa + q0 * p.Dp);
        }
        T* dkb = p.dkp + krow0 * p.D;
        T* dvb = p.dvp + krow0 * p.D;
        for (int64_t j = 0; j < nk; ++j) {
          store_row(tile.dK + j * p.Dp, dkb + j * p.D, p.D);
          store_row(tile.dV + j * p.Dp, dvb + j * p.D, p.D);
        }
      }
    }
  });
  reduce_dq(p.par, dqacc, p.dqp, p.n_split, rows, p.D, p.Dp);
}

// The paths, as for the forward (attention_fwd.h).
template <typename T>
void bwd_fp32(const AttentionArgs& a);
bool bwd_bf16_dot(const AttentionArgs& a);

}  // namespace cpu_attn
FG_ISA_END
