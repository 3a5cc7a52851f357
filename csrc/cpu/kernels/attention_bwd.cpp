// Backward of the CPU attention on fp32 GEMMs: fp32 inputs are read in place
// where their layout allows, fp16 and bf16 blocks are converted to fp32 on
// load (bf16 with AVX512_BF16 takes attention_bf16.cpp instead).

#include <cstdint>
#include <type_traits>

#include "cpu/kernels/attention_bwd.h"
#include "cpu/kernels/attention_common.h"
#include "cpu/kernels/attention_gemm.h"
#include "cpu/kernels/attention_pack.h"
#include "cpu/kernels/attention_simd.h"

FG_ISA_BEGIN
namespace cpu_attn {
namespace {

template <typename T>
class Fp32BwdTile {
  static constexpr bool kF32 = std::is_same_v<T, float>;

 public:
  explicit Fp32BwdTile(const BwdPlan<T>& p)
      : p_(p),
        buf_({{Kt_, p.D * p.ldk},                          // K^T
              {Vt_, p.D * p.ldk},                          // V^T
              {Kf_, p.BK * p.Dp},                          // K, padded
              {dK, p.BK * p.Dp},
              {dV, p.BK * p.Dp},
              {S_, p.BQ * p.ldk},                          // S, then P
              {dP_, p.BQ * p.ldk},                         // dP, then dS
              {Qb_, p.rows_as_stored ? 0 : p.BQ * p.Dp},   // converted / padded Q block
              {dOb_, p.rows_as_stored ? 0 : p.BQ * p.Dp},  // converted / padded dO block
              {Vtmp_, kF32 ? 0 : p.BK * p.D}}) {}          // converted V block

  // K^T, V^T (zero columns past nk) and K (zero columns past D).
  void load_keys(const T* kb, const T* vb, int64_t nk) {
    const int64_t D = p_.D, Dp = p_.Dp, ldk = p_.ldk;
    for (int64_t j = 0; j < nk; ++j) load_row(kb + j * D, Kf_ + j * Dp, D, Dp);
    pack_transposed(Kf_, Dp, nk, D, Kt_, ldk, 1.f);
    if constexpr (kF32) {
      pack_transposed(reinterpret_cast<const float*>(vb), D, nk, D, Vt_, ldk, 1.f);
    } else {
      cvt_to_f32(vb, Vtmp_, nk * D);
      pack_transposed(Vtmp_, D, nk, D, Vt_, ldk, 1.f);
    }
  }

  void query_block(const T* qb, const T* dob, const float* lb, const float* db, int64_t nq, int64_t nk,
                   float* dq) {
    const int64_t D = p_.D, Dp = p_.Dp, ldk = p_.ldk;
    const int64_t nkp = round_up(nk, W);
    float* const S = S_;
    float* const dP = dP_;
    const float* Qf;
    const float* dOf;
    if (p_.rows_as_stored) {
      Qf = reinterpret_cast<const float*>(qb);
      dOf = reinterpret_cast<const float*>(dob);
    } else {
      for (int64_t i = 0; i < nq; ++i) {
        load_row(qb + i * D, Qb_ + i * Dp, D, Dp);
        load_row(dob + i * D, dOb_ + i * Dp, D, Dp);
      }
      Qf = Qb_;
      dOf = dOb_;
    }
    // S = Q K^T, dP = dO V^T (nq x nkp).
    gemm<0>(nq, nkp, D, Qf, Dp, 1, Kt_, ldk, S, ldk);
    gemm<0>(nq, nkp, D, dOf, Dp, 1, Vt_, ldk, dP, ldk);
    // P = exp(scale*S - lse); dS = scale * P * (dP - delta).
    const vf vc = vset1(p_.c);
    const vf vscale = vset1(p_.scale);
    for (int64_t i = 0; i < nq; ++i) {
      const vf nl = vset1(-lb[i] * kLog2e);
      const vf dl = vset1(db[i]);
      float* s = S + i * ldk;
      float* g = dP + i * ldk;
      for (int64_t j = 0; j < nkp; j += W) {
        const vf p = vexp2_finite(vfma(vload(s + j), vc, nl));
        vstore(s + j, p);
        vstore(g + j, vmul(vmul(p, vscale), vsub(vload(g + j), dl)));
      }
    }
    // dV += P^T dO, dK += dS^T Q (nk x Dp).
    gemm<1>(nk, Dp, nq, S, 1, ldk, dOf, Dp, dV, Dp);
    gemm<1>(nk, Dp, nq, dP, 1, ldk, Qf, Dp, dK, Dp);
    // dQ += dS K (nq x Dp).
    gemm<1>(nq, Dp, nk, dP, ldk, 1, Kf_, Dp, dq, Dp);
  }

  float *dK, *dV;

 private:
  const BwdPlan<T>& p_;
  float *Kt_, *Vt_, *Kf_, *S_, *dP_, *Qb_, *dOb_, *Vtmp_;
  Scratch buf_;  // last: its constructor sets the pointers above
};

}  // namespace

template <typename T>
void bwd_fp32(const AttentionArgs& a) {
  run_bwd<Fp32BwdTile<T>>(BwdPlan<T>(a, /*pairs=*/false));
}

template void bwd_fp32<float>(const AttentionArgs&);
template void bwd_fp32<Half>(const AttentionArgs&);
template void bwd_fp32<BFloat16>(const AttentionArgs&);

}  // namespace cpu_attn
FG_ISA_END
