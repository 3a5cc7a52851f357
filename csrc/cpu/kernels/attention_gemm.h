// The small GEMMs of the attention kernels: one register-blocked micro-kernel
//   C[i][j] (+)= sum_k A[i*ars + k*aks] * B[k*ldb + j],  j < N (N % G == 0)
// MODE 0: C = AB; MODE 1: C += AB; MODE 2: C = diag(rs) C + AB.
// A micro-tile is MR rows x (NV full vectors + H half vector) of C, held in
// registers for the whole K loop; A values are broadcast, B rows loaded.
// A is read through arbitrary (row, k) strides so that it may be a transposed
// view for free; the half vector serves row lengths that are an odd multiple
// of 8 (e.g. D = 40) at half the cost of padding them to a full vector.
//
// BF = true (bf16 dot-product path, AVX512_BF16 only): A and B hold pairs of
// bf16 packed in 32-bit words, K counts pairs, and each step is one
// vdpbf16ps: C += A[.][2k] * B[2k][.] + A[.][2k+1] * B[2k+1][.] in fp32.
#pragma once
#include <cstdint>

#include "cpu/kernels/attention_simd.h"

FG_ISA_BEGIN
namespace cpu_attn {

template <bool BF>
struct Elem {
  using type = float;
};
template <>
struct Elem<true> {
  using type = uint32_t;
};

template <bool BF>
inline vf bcast(const typename Elem<BF>::type* p) {
#if defined(FASTGEN_BF16_DOT)
  if constexpr (BF) return _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(*p)));
#endif
  return vset1(static_cast<float>(*p));
}
template <bool BF>
inline vf bload(const typename Elem<BF>::type* p) {
  return vload(reinterpret_cast<const float*>(p));
}
template <bool BF>
inline vh bloadh(const typename Elem<BF>::type* p) {
  return hload(reinterpret_cast<const float*>(p));
}
template <bool BF>
inline vf dot(vf x, vf b, vf acc) {
#if defined(FASTGEN_BF16_DOT)
  if constexpr (BF) return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_castps_si512(x), (__m512bh)_mm512_castps_si512(b));
#endif
  return vfma(x, b, acc);
}
template <bool BF>
inline vh doth(vf x, vh b, vh acc) {
#if defined(FASTGEN_BF16_DOT)
  if constexpr (BF)
    return _mm256_dpbf16_ps(acc, (__m256bh)_mm256_castps_si256(hlow(x)), (__m256bh)_mm256_castps_si256(b));
#endif
  return hfma(hlow(x), b, acc);
}

template <bool BF, int MR, int NV, int H, int MODE>
inline void ukernel(int64_t K, const typename Elem<BF>::type* __restrict A, int64_t ars, int64_t aks,
                    const typename Elem<BF>::type* __restrict B, int64_t ldb, float* __restrict C,
                    int64_t ldc, const float* __restrict rs) {
  using E = typename Elem<BF>::type;
  constexpr int NVA = NV > 0 ? NV : 1;
  constexpr int HA = H > 0 ? H : 1;
  vf acc[MR][NVA];
  vh acch[MR][HA];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    if constexpr (MODE == 0) {
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = vzero();
      if constexpr (H) acch[r][0] = hzero();
    } else if constexpr (MODE == 1) {
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = vload(C + r * ldc + v * W);
      if constexpr (H) acch[r][0] = hload(C + r * ldc + NV * W);
    } else {
      const vf s = vset1(rs[r]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = vmul(vload(C + r * ldc + v * W), s);
      if constexpr (H) acch[r][0] = hmul(hload(C + r * ldc + NV * W), hlow(s));
    }
  }
  const E* a[MR];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) a[r] = A + r * ars;
#pragma GCC unroll 2
  for (int64_t k = 0; k < K; ++k) {
    vf b[NVA];
    vh bh[HA];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) b[v] = bload<BF>(B + k * ldb + v * W);
    if constexpr (H) bh[0] = bloadh<BF>(B + k * ldb + NV * W);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const vf x = bcast<BF>(a[r] + k * aks);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = dot<BF>(x, b[v], acc[r][v]);
      if constexpr (H) acch[r][0] = doth<BF>(x, bh[0], acch[r][0]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) vstore(C + r * ldc + v * W, acc[r][v]);
    if constexpr (H) hstore(C + r * ldc + NV * W, acch[r][0]);
  }
}

// Row tail: t < MR rows.
template <bool BF, int NV, int H, int MODE, int T>
inline void ukernel_tail(int t, int64_t K, const typename Elem<BF>::type* A, int64_t ars, int64_t aks,
                         const typename Elem<BF>::type* B, int64_t ldb, float* C, int64_t ldc,
                         const float* rs) {
  if constexpr (T >= 1) {
    if (t == T) {
      ukernel<BF, T, NV, H, MODE>(K, A, ars, aks, B, ldb, C, ldc, rs);
    } else {
      ukernel_tail<BF, NV, H, MODE, T - 1>(t, K, A, ars, aks, B, ldb, C, ldc, rs);
    }
  }
}

template <bool BF, int NV, int H, int MODE>
void gemm_rows(int64_t M, int64_t K, const typename Elem<BF>::type* A, int64_t ars, int64_t aks,
               const typename Elem<BF>::type* B, int64_t ldb, float* C, int64_t ldc, const float* rs) {
  constexpr int MR = mr_for(NV + H);
  int64_t i = 0;
  for (; i + MR <= M; i += MR)
    ukernel<BF, MR, NV, H, MODE>(K, A + i * ars, ars, aks, B, ldb, C + i * ldc, ldc,
                                 rs ? rs + i : nullptr);
  if (i < M)
    ukernel_tail<BF, NV, H, MODE, MR - 1>(static_cast<int>(M - i), K, A + i * ars, ars, aks, B, ldb,
                                          C + i * ldc, ldc, rs ? rs + i : nullptr);
}

// Dispatch on the panel width: nv full vectors (+ h half vector).
template <bool BF, int MODE, int NV>
inline void gemm_nv(int nv, int h, int64_t M, int64_t K, const typename Elem<BF>::type* A,
                    int64_t ars, int64_t aks, const typename Elem<BF>::type* B, int64_t ldb, float* C,
                    int64_t ldc, const float* rs) {
  if constexpr (NV >= 0) {
    if (nv == NV) {
      if constexpr (G < W && NV < kMaxNV) {
        if (h) {
          gemm_rows<BF, NV, 1, MODE>(M, K, A, ars, aks, B, ldb, C, ldc, rs);
          return;
        }
      }
      if constexpr (NV >= 1) gemm_rows<BF, NV, 0, MODE>(M, K, A, ars, aks, B, ldb, C, ldc, rs);
    } else {
      gemm_nv<BF, MODE, NV - 1>(nv, h, M, K, A, ars, aks, B, ldb, C, ldc, rs);
    }
  }
}

// N must be a multiple of G. Column panels of <= kMaxNV vectors (the half
// vector, if any, counts as one and goes to the last panel), balanced.
template <int MODE, bool BF = false>
void gemm(int64_t M, int64_t N, int64_t K, const typename Elem<BF>::type* A, int64_t ars,
          int64_t aks, const typename Elem<BF>::type* B, int64_t ldb, float* C, int64_t ldc,
          const float* rs = nullptr) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) {
        if constexpr (MODE == 0) C[i * ldc + j] = 0.f;
        if constexpr (MODE == 2) C[i * ldc + j] *= rs[i];
      }
    return;
  }
  const int64_t nfull = N / W;
  const int h = (N % W) ? 1 : 0;
  const int64_t total = nfull + h;
  const int64_t panels = cdiv(total, kMaxNV);
  int64_t col = 0;
  for (int64_t p = 0; p < panels; ++p) {
    const int cnt = static_cast<int>(total / panels + (p < total % panels ? 1 : 0));
    const int ph = (p == panels - 1) ? h : 0;
    gemm_nv<BF, MODE, kMaxNV>(cnt - ph, ph, M, K, A, ars, aks, B + col, ldb, C + col, ldc, rs);
    col += static_cast<int64_t>(cnt - ph) * W;
  }
}

}  // namespace cpu_attn
FG_ISA_END
