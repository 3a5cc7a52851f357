// Forward of the CPU attention on fp32 GEMMs: fp32 inputs are read in place
// where their layout allows, fp16 and bf16 blocks are converted to fp32 on
// load (bf16 with AVX512_BF16 takes attention_bf16.cpp instead). The scale
// (times log2(e)) is folded into the packed Q^T, so S^T comes out in base-2
// units and P overwrites it in place.

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cpu/kernels/attention_common.h"
#include "cpu/kernels/attention_fwd.h"
#include "cpu/kernels/attention_gemm.h"
#include "cpu/kernels/attention_pack.h"
#include "cpu/kernels/attention_simd.h"

FG_ISA_BEGIN
namespace cpu_attn {
namespace {

template <typename T>
class Fp32FwdTile {
  static constexpr bool kF32 = std::is_same_v<T, float>;

 public:
  explicit Fp32FwdTile(const FwdPlan<T>& p)
      : p_(p),
        buf_({{Qt_, p.D * p.ldq},                            // Q^T (scaled), D x BQ
              {S_, p.BK * p.ldq},                            // S^T then P^T, BK x BQ
              {O, p.BQ * p.Dp},                              // O accumulator
              {Kb_, kF32 ? 0 : std::max(p.BK, p.BQ) * p.D},  // converted K (and Q) block
              {Vb_, p.rows_as_stored ? 0 : p.BK * p.Dp},     // converted / padded V block
              {m, p.ldq},
              {l, p.ldq},
              {alpha_, p.ldq}}) {}

  // Q^T * scale * log2(e), zero columns past nq.
  void load_queries(const T* qb, int64_t nq) {
    if constexpr (kF32) {
      pack_transposed(reinterpret_cast<const float*>(qb), p_.D, nq, p_.D, Qt_, p_.ldq, p_.c);
    } else {
      cvt_to_f32(qb, Kb_, nq * p_.D);
      pack_transposed(Kb_, p_.D, nq, p_.D, Qt_, p_.ldq, p_.c);
    }
  }

  void key_block(const T* kb, const T* vb, int64_t nk, int64_t nq, int64_t nqp, bool first) {
    const int64_t D = p_.D, Dp = p_.Dp, ldq = p_.ldq;
    float* const S = S_;
    const float* Kf;
    if constexpr (kF32) {
      Kf = reinterpret_cast<const float*>(kb);
    } else {
      cvt_to_f32(kb, Kb_, nk * D);
      Kf = Kb_;
    }
    const float* Vf;
    if (p_.rows_as_stored) {
      Vf = reinterpret_cast<const float*>(vb);
    } else {
      for (int64_t j = 0; j < nk; ++j) load_row(vb + j * D, Vb_ + j * Dp, D, Dp);
      Vf = Vb_;
    }
    // S^T (nk x nqp) = K_blk (nk x D) * Q^T (D x nqp).
    gemm<0>(nk, nqp, D, Kf, D, 1, Qt_, ldq, S, ldq);
    for (int64_t i = 0; i < nqp; i += W) {
      vf mx = vload(m + i);
      const vf mold = mx;
      {
        vf mx1 = mx;
        int64_t j = 0;
        for (; j + 2 <= nk; j += 2) {
          mx = vmax(mx, vload(S + j * ldq + i));
          mx1 = vmax(mx1, vload(S + (j + 1) * ldq + i));
        }
        if (j < nk) mx = vmax(mx, vload(S + j * ldq + i));
        mx = vmax(mx, mx1);
      }
      const vf a = vexp2(vsub(mold, mx));  // exp2(-inf) -> 0 on the first block
      vf s0 = vzero(), s1 = vzero();
      int64_t j = 0;
      for (; j + 2 <= nk; j += 2) {
        const vf p0 = vexp2_finite(vsub(vload(S + j * ldq + i), mx));
        const vf p1 = vexp2_finite(vsub(vload(S + (j + 1) * ldq + i), mx));
        vstore(S + j * ldq + i, p0);
        vstore(S + (j + 1) * ldq + i, p1);
        s0 = vadd(s0, p0);
        s1 = vadd(s1, p1);
      }
      if (j < nk) {
        const vf p0 = vexp2_finite(vsub(vload(S + j * ldq + i), mx));
        vstore(S + j * ldq + i, p0);
        s0 = vadd(s0, p0);
      }
      update_column_stats(m, l, alpha_, i, mx, a, vadd(s0, s1));
    }
    accumulate_pv<false>(first, nq, Dp, nk, S, ldq, Vf, p_.rows_as_stored ? D : Dp, O, alpha_);
  }

  float *O, *m, *l;

 private:
  const FwdPlan<T>& p_;
  float *Qt_, *S_, *Kb_, *Vb_, *alpha_;
  Scratch buf_;  // last: its constructor sets the pointers above
};

}  // namespace

template <typename T>
void fwd_fp32(const AttentionArgs& a) {
  run_fwd<Fp32FwdTile<T>>(FwdPlan<T>(a, /*pairs=*/false));
}

template void fwd_fp32<float>(const AttentionArgs&);
template void fwd_fp32<Half>(const AttentionArgs&);
template void fwd_fp32<BFloat16>(const AttentionArgs&);

}  // namespace cpu_attn
FG_ISA_END
