// Fused attention forward for CUDA: o = softmax(q k^T * scale) v, plus the
// fp32 natural-log log-sum-exp of every query row (for the backward).
//
// Design (FlashAttention-2 style forward, one CTA per 64 query rows of one
// (batch, head)):
//   * 4 warps x 16 query rows = BLOCK_M 64; key/value tiles of BLOCK_N 64 rows
//     (32 for D = 160, to stay within registers and 48 KB of shared memory).
//   * Tensor cores through inline PTX mma.sync.aligned.m16n8k16 (fp16 or bf16
//     inputs, fp32 accumulators); operands come out of shared memory with
//     ldmatrix (.trans for V). The Q fragments stay in registers for the
//     whole CTA.
//   * K/V tiles are double-buffered in shared memory with cp.async: tile j+1
//     is in flight while tile j is multiplied.
//   * Online softmax in fp32 registers: scores are multiplied by
//     scale*log2(e) once, so every exponential is a bare exp2f; running max
//     and running sum per row; the output is rescaled by exp2(m_old - m_new).
//
// Head dims without padding to a power of two. The head-dim loop steps in
// units of the MMA, not of a power-of-two tile:
//   * S = Q K^T: D is the MMA k-dimension, stepped 16 at a time. D = 80 and
//     D = 160 are 5 and 10 exact steps. D = 40 is not a multiple of 16: it is
//     run as 48 (3 steps), the 8 extra columns of the Q and K tiles being
//     zero-filled in shared memory (cp.async with src-size 0), so they add
//     exactly 0 to every score.
//   * O += P V: D is the MMA n-dimension, stepped 8 at a time, and every
//     supported D is a multiple of 8 (40 = 5 x 8), so P V does no padded work
//     at all (pairs of n-tiles use ldmatrix.x4.trans, an odd last one .x2).
//   Matrix work per (query, key) pair, relative to the true 2*D MACs:
//     D   this kernel (QK^T + PV)   FlashAttention (pads to 64/96/192)
//     40  (48 + 40) / 80  = 1.10x   (64 + 64) / 80   = 1.60x
//     80  (80 + 80) / 160 = 1.00x   (96 + 96) / 160  = 1.20x
//     160 (160+160) / 320 = 1.00x   (192+192) / 320  = 1.20x
//   Global memory traffic is never padded: only the D real columns are read
//   and written.
//
// Masking: rows of the last K/V tile beyond Nk are zero-filled in shared
// memory and their scores forced to -inf, so any Nk >= 1 works (e.g. the 77
// tokens of a text encoder). Query rows beyond Nq are zero-filled and never
// stored. A row whose scores are all -inf gives o = 0 and lse = -inf, never
// NaN; large logits are safe since exponents are always <= 0.
//
// Requires sm_80+ (cp.async, bf16 mma); device code for older targets traps.
// Supported head dims: 32, 40, 64, 80, 96, 128, 160.

#include "cuda/prelude.cuh"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>

namespace fastgen {
// Device side in a named namespace rather than an anonymous one: in device
// passes for pre-sm_80 targets the kernel body is compiled out, and unused
// internal-linkage helpers would draw nvcc warning #177 there.
namespace attention_detail {

constexpr int kBlockM = 64;   // query rows per CTA (kWarps x 16)
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
static_assert(kBlockM == kWarps * 16, "one m16 MMA row block per warp");

template <int D>
struct AttnCfg {
  static_assert(D % 8 == 0, "head dim must be a multiple of 8");
  // k-extent of Q K^T: D rounded up to the MMA k of 16 (only D = 40 -> 48).
  static constexpr int kDk = (D + 15) / 16 * 16;
  // Shared-memory row stride in elements: +8 (16 bytes) so that the row
  // stride is an odd number of 16-byte chunks and the 8 row addresses of
  // every ldmatrix phase hit 8 different bank groups.
  static constexpr int kLds = kDk + 8;
  static_assert((kLds * 2 / 16) % 2 == 1, "row stride must be an odd number of 16B chunks");
  // Key/value rows per tile: 64, except 32 for D = 160. There the 80 fp32
  // output accumulators plus 40 registers of Q fragments leave no room for a
  // 16 x 64 score tile (ptxas spilled), and keeping Q in shared memory instead
  // would need 105 KB per block, more than sm_86/sm_89 allow (99 KB).
  static constexpr int kBlockN = D > 128 ? 32 : 64;
  static_assert(kBlockN % 16 == 0 && kBlockN >= kBlockM / 2, "tile shape");
  static constexpr int kTileElems = kBlockN * kLds;
  // Buffers, adjacent in this order: K0, V0, K1, V1 (each kBlockN x kLds).
  // The 64 x kLds Q tile is staged at K1 before the loop (K1, or K1 + V1 when
  // kBlockN = 32); the 64 x kLds output tile is staged at K0 after it.
  static constexpr int kSmemBytes = 4 * kTileElems * 2;
  static_assert(kBlockM * kLds <= 2 * kTileElems, "Q/O staging must fit in two buffers");
  static constexpr int kKSteps = kDk / 16;   // MMA k-steps of Q K^T
  static constexpr int kDTiles = D / 8;      // MMA n-tiles of P V
  static constexpr int kSChunks = kDk / 8;   // 16-byte chunks per smem row filled
  static constexpr int kGChunks = D / 8;     // 16-byte chunks per global row
};

// ---------------------------------------------------------------------------
// PTX wrappers

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy global -> shared; when !pred, writes 16 zero bytes and
// reads nothing (src-size 0). gptr must still be a valid global address.
__device__ __forceinline__ void cp_async_16(uint32_t saddr, const void* gptr, bool pred) {
  const int src_bytes = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(saddr), "l"(gptr),
               "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t saddr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(saddr)
               : "memory");
}

__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], uint32_t saddr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(saddr)
               : "memory");
}

__device__ __forceinline__ void ldsm_x2_trans(uint32_t (&r)[2], uint32_t saddr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(saddr)
               : "memory");
}

// Per-dtype MMA and fp32 -> packed 2 x 16-bit conversion (low half = first
// argument = lower column index, as the MMA fragments expect).
template <typename T>
struct MmaOps;

template <>
struct MmaOps<__half> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);
    uint32_t u;
    memcpy(&u, &h, sizeof(u));
    return u;
  }
  // c += a * b, m16n8k16, A row-major 16x16, B "col" 16x8, fp32 accumulate.
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <>
struct MmaOps<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    uint32_t u;
    memcpy(&u, &h, sizeof(u));
    return u;
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// Copies rows [row0, row0 + ROWS) of a contiguous (nrows, D) matrix into a
// ROWS x kLds shared tile at saddr. Rows >= nrows and columns in [D, kDk) are
// zero-filled; columns [kDk, kLds) are never touched (nor read).
template <int D, int ROWS, typename T>
__device__ __forceinline__ void load_tile_async(uint32_t saddr, const T* __restrict__ gbase,
                                                int row0, int nrows, int tid) {
  using Cfg = AttnCfg<D>;
  constexpr int kTotal = ROWS * Cfg::kSChunks;
  constexpr int kIters = (kTotal + kThreads - 1) / kThreads;
#pragma unroll
  for (int i = 0; i < kIters; ++i) {
    const int idx = tid + i * kThreads;
    if (kTotal % kThreads == 0 || idx < kTotal) {
      const int r = idx / Cfg::kSChunks;
      const int c = idx % Cfg::kSChunks;
      const bool ok = (row0 + r < nrows) && (c < Cfg::kGChunks);
      const T* src = ok ? gbase + (static_cast<int64_t>(row0 + r) * D + c * 8) : gbase;
      cp_async_16(saddr + static_cast<uint32_t>((r * Cfg::kLds + c * 8) * 2), src, ok);
    }
  }
}

// ---------------------------------------------------------------------------
// The kernel. Grid: (ceil(Nq / 64), min(BH, 65535), ceil(BH / 65535)).
//
// MMA fragment layout (PTX m16n8k16, lane = 4 * g + t, g = lane / 4, t = lane % 4):
//   A (16x16): a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..)
//   B (16x8, k x n): b0 = (k 2t..2t+1, n g), b1 = (k 2t+8..2t+9, n g)
//   C (16x8): c0,c1 = (g, 2t..2t+1), c2,c3 = (g+8, 2t..2t+1)
// ldmatrix.x4: lane l gives the address of row l % 8 of 8x8 matrix l / 8;
// register i receives matrix i, lane (4r + w) holding row r, cols 2w..2w+1
// (with .trans: col r, rows 2w..2w+1).
template <int D, typename T>
__global__ void __launch_bounds__(kThreads)
    attention_fwd_kernel(const T* __restrict__ q, const T* __restrict__ k,
                         const T* __restrict__ v, T* __restrict__ o, float* __restrict__ lse,
                         int Nq, int Nk, int64_t BH, float scale_log2) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
  using Cfg = AttnCfg<D>;
  using Ops = MmaOps<T>;
  constexpr int kBlockN = Cfg::kBlockN;

  const int64_t bh = static_cast<int64_t>(blockIdx.z) * gridDim.y + blockIdx.y;
  if (bh >= BH) return;  // whole CTA leaves together, before any barrier
  const int m0 = blockIdx.x * kBlockM;
  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int g = lane >> 2;  // MMA group id: fragment row (and row + 8)
  const int t = lane & 3;   // thread in group: fragment column pair

  const T* __restrict__ qb = q + bh * Nq * D;
  const T* __restrict__ kb = k + bh * Nk * D;
  const T* __restrict__ vb = v + bh * Nk * D;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  const uint32_t sbase = smem_u32(smem_raw);
  constexpr uint32_t kTileBytes = Cfg::kTileElems * 2;
  // buffer b: K at sbase + 2b * tile, V at sbase + (2b + 1) * tile
  const uint32_t sK0 = sbase;
  const uint32_t sK1 = sbase + 2 * kTileBytes;
  const uint32_t sQ = sK1;  // Q staged in K1 (+ V1) until its fragments are in registers

  // Prologue: Q tile and K/V tile 0.
  load_tile_async<D, kBlockM>(sQ, qb, m0, Nq, tid);
  load_tile_async<D, kBlockN>(sK0, kb, 0, Nk, tid);
  load_tile_async<D, kBlockN>(sK0 + kTileBytes, vb, 0, Nk, tid);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();

  // Q fragments (A operand) for this warp's 16 rows, every k-step.
  // Matrices: 0 = rows 0-7/cols 0-7 (a0), 1 = rows 8-15/cols 0-7 (a1),
  //           2 = rows 0-7/cols 8-15 (a2), 3 = rows 8-15/cols 8-15 (a3).
  const uint32_t q_addr =
      sQ + static_cast<uint32_t>(((warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * Cfg::kLds +
                                  (lane >> 4) * 8) * 2);
  uint32_t qf[Cfg::kKSteps][4];
#pragma unroll
  for (int ks = 0; ks < Cfg::kKSteps; ++ks) ldsm_x4(qf[ks], q_addr + ks * 16 * 2);
  __syncthreads();  // every warp has its Q before K1/V1 are overwritten by tile 1

  // Per-lane ldmatrix offsets inside a 16 x 16 block.
  // K (B of Q K^T, stored [key][d], no transpose): matrices 0 = keys 0-7/d 0-7
  // (b0 of n-tile 2p), 1 = keys 0-7/d 8-15 (b1 of 2p), 2 = keys 8-15/d 0-7
  // (b0 of 2p+1), 3 = keys 8-15/d 8-15 (b1 of 2p+1).
  const int k_row = (lane & 7) + (lane >> 4) * 8;
  const int k_col = ((lane >> 3) & 1) * 8;
  // V (B of P V, stored [key][d], transposed load): matrices 0 = keys 0-7/d 0-7
  // (b0 of n-tile 2p), 1 = keys 8-15/d 0-7 (b1 of 2p), 2 = keys 0-7/d 8-15
  // (b0 of 2p+1), 3 = keys 8-15/d 8-15 (b1 of 2p+1). For .x2 only matrices 0, 1.
  const int v_row = (lane & 7) + ((lane >> 3) & 1) * 8;
  const int v_col = (lane >> 4) * 8;

  float acc[Cfg::kDTiles][4];
#pragma unroll
  for (int dt = 0; dt < Cfg::kDTiles; ++dt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[dt][e] = 0.f;
  }
  // Running max (in scaled log2 units) and this thread's partial running sum
  // for rows g (index 0) and g + 8 (index 1) of the warp's 16.
  float row_m[2] = {-INFINITY, -INFINITY};
  float row_l[2] = {0.f, 0.f};

  const int n_blocks = (Nk + kBlockN - 1) / kBlockN;
  for (int j = 0; j < n_blocks; ++j) {
    const int buf = j & 1;
    if (j + 1 < n_blocks) {
      // Buffer buf ^ 1 was last read in iteration j - 1 (or held Q), and every
      // warp has passed the barrier at the end of that iteration.
      const uint32_t nK = sbase + static_cast<uint32_t>(2 * (buf ^ 1)) * kTileBytes;
      load_tile_async<D, kBlockN>(nK, kb, (j + 1) * kBlockN, Nk, tid);
      load_tile_async<D, kBlockN>(nK + kTileBytes, vb, (j + 1) * kBlockN, Nk, tid);
      cp_async_commit();
      cp_async_wait<1>();  // tile j landed (for this thread's copies)
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // ... and for every thread's copies

    const uint32_t cK = sbase + static_cast<uint32_t>(2 * buf) * kTileBytes;
    const uint32_t cV = cK + kTileBytes;

    // ---- S = Q K^T for the warp's 16 rows x kBlockN keys: n-tiles of 8 keys.
    float s[kBlockN / 8][4];
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = 0.f;
    }
#pragma unroll
    for (int ks = 0; ks < Cfg::kKSteps; ++ks) {
#pragma unroll
      for (int np = 0; np < kBlockN / 16; ++np) {
        uint32_t b[4];
        ldsm_x4(b, cK + static_cast<uint32_t>(((np * 16 + k_row) * Cfg::kLds + ks * 16 + k_col) * 2));
        Ops::mma(s[2 * np], qf[ks], b[0], b[1]);
        Ops::mma(s[2 * np + 1], qf[ks], b[2], b[3]);
      }
    }

    // ---- scale into log2 units; mask keys >= Nk (only the last tile can have any).
    const int kv0 = j * kBlockN;
    const bool tail = kv0 + kBlockN > Nk;
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = kv0 + nt * 8 + 2 * t + (e & 1);
        float x = s[nt][e] * scale_log2;
        if (tail && key >= Nk) x = -INFINITY;
        s[nt][e] = x;
      }
    }

    // ---- online softmax; s becomes P (unnormalised probabilities).
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < kBlockN / 8; ++nt) {
        mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
      }
      // the 4 threads of a group hold the kBlockN columns of the same row
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(row_m[r], mx);
      // All -inf so far: use 0 as the reference so that no (-inf) - (-inf)
      // = NaN appears; every p and alpha is then exp2(-inf) = 0.
      const float m_ref = (m_new == -INFINITY) ? 0.f : m_new;
      const float alpha = exp2f(row_m[r] - m_ref);  // 0 when row_m was -inf
      row_m[r] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < kBlockN / 8; ++nt) {
        const float p0 = exp2f(s[nt][2 * r] - m_ref);
        const float p1 = exp2f(s[nt][2 * r + 1] - m_ref);
        s[nt][2 * r] = p0;
        s[nt][2 * r + 1] = p1;
        sum += p0 + p1;
      }
      row_l[r] = row_l[r] * alpha + sum;
#pragma unroll
      for (int dt = 0; dt < Cfg::kDTiles; ++dt) {
        acc[dt][2 * r] *= alpha;
        acc[dt][2 * r + 1] *= alpha;
      }
    }

    // ---- O += P V. The C fragments of S n-tiles 2kk and 2kk+1 are exactly the
    // A fragment of k-step kk (keys 16kk .. 16kk+15).
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t a[4];
      a[0] = Ops::pack(s[2 * kk][0], s[2 * kk][1]);          // row g,   keys 2t..
      a[1] = Ops::pack(s[2 * kk][2], s[2 * kk][3]);          // row g+8, keys 2t..
      a[2] = Ops::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);  // row g,   keys 2t+8..
      a[3] = Ops::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);  // row g+8, keys 2t+8..
      const uint32_t vrow = cV + static_cast<uint32_t>((kk * 16 + v_row) * Cfg::kLds * 2);
#pragma unroll
      for (int dp = 0; dp < Cfg::kDTiles / 2; ++dp) {
        uint32_t b[4];
        ldsm_x4_trans(b, vrow + static_cast<uint32_t>((dp * 16 + v_col) * 2));
        Ops::mma(acc[2 * dp], a, b[0], b[1]);
        Ops::mma(acc[2 * dp + 1], a, b[2], b[3]);
      }
      if constexpr (Cfg::kDTiles % 2 == 1) {
        // odd last n-tile (D = 40: d 32..39). Lanes 16-31 repeat valid addresses.
        uint32_t b[2];
        ldsm_x2_trans(b, vrow + static_cast<uint32_t>((Cfg::kDTiles - 1) * 8 * 2));
        Ops::mma(acc[Cfg::kDTiles - 1], a, b[0], b[1]);
      }
    }
    __syncthreads();  // buffer buf is free for the prefetch of iteration j + 1
  }

  // ---- epilogue: normalise, write lse, stage O in smem (K0 [+ V0]) for 16-byte stores.
  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = row_l[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    // l >= 1 whenever the row has a finite score; l == 0 only if all were -inf.
    inv[r] = (l == 0.f) ? 0.f : 1.f / l;
    const float lse_r = (l == 0.f) ? -INFINITY : row_m[r] * 0.6931471805599453f + logf(l);
    const int row = m0 + warp * 16 + g + 8 * r;
    if (t == 0 && row < Nq) lse[bh * Nq + row] = lse_r;
  }

  T* sO = reinterpret_cast<T*>(smem_raw);  // K0 (+ V0); the loop ended with a barrier
#pragma unroll
  for (int dt = 0; dt < Cfg::kDTiles; ++dt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = warp * 16 + g + 8 * r;
      const int col = dt * 8 + 2 * t;
      *reinterpret_cast<uint32_t*>(sO + row * Cfg::kLds + col) =
          Ops::pack(acc[dt][2 * r] * inv[r], acc[dt][2 * r + 1] * inv[r]);
    }
  }
  __syncthreads();

  T* __restrict__ ob = o + bh * Nq * D;
  constexpr int kOut = kBlockM * Cfg::kGChunks;
#pragma unroll
  for (int i = 0; i < (kOut + kThreads - 1) / kThreads; ++i) {
    const int idx = tid + i * kThreads;
    if (kOut % kThreads == 0 || idx < kOut) {
      const int r = idx / Cfg::kGChunks;
      const int c = idx % Cfg::kGChunks;
      if (m0 + r < Nq) {
        *reinterpret_cast<uint4*>(ob + static_cast<int64_t>(m0 + r) * D + c * 8) =
            *reinterpret_cast<const uint4*>(sO + r * Cfg::kLds + c * 8);
      }
    }
  }
#else
  // Built for a pre-Ampere target: the host refuses such devices first.
  __trap();
#endif
}

}  // namespace attention_detail

// ---------------------------------------------------------------------------
// Host side

namespace {

using attention_detail::AttnCfg;
using attention_detail::attention_fwd_kernel;
using attention_detail::kBlockM;
using attention_detail::kThreads;

template <int D, typename T>
void launch_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      at::Tensor& o, at::Tensor& lse, int64_t BH, int Nq, int Nk,
                      float scale_log2, cudaStream_t stream) {
  using Cfg = AttnCfg<D>;
  auto kernel = attention_fwd_kernel<D, T>;
  constexpr int smem = Cfg::kSmemBytes;
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  }
  constexpr int64_t kMaxGridY = 65535;
  const int64_t gy = std::min<int64_t>(BH, kMaxGridY);
  const int64_t gz = (BH + gy - 1) / gy;
  TORCH_CHECK(gz <= kMaxGridY, "attention_fwd_cuda: batch * heads = ", BH, " is too large");
  const dim3 grid(static_cast<unsigned>((Nq + kBlockM - 1) / kBlockM),
                  static_cast<unsigned>(gy), static_cast<unsigned>(gz));
  kernel<<<grid, kThreads, smem, stream>>>(
      reinterpret_cast<const T*>(q.data_ptr()), reinterpret_cast<const T*>(k.data_ptr()),
      reinterpret_cast<const T*>(v.data_ptr()), reinterpret_cast<T*>(o.data_ptr()),
      lse.data_ptr<float>(), Nq, Nk, BH, scale_log2);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void dispatch_head_dim(int64_t D, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       at::Tensor& o, at::Tensor& lse, int64_t BH, int Nq, int Nk,
                       float scale_log2, cudaStream_t stream) {
  switch (D) {
    case 32: launch_attention<32, T>(q, k, v, o, lse, BH, Nq, Nk, scale_log2, stream); break;
    case 40: launch_attention<40, T>(q, k, v, o, lse, BH, Nq, Nk, scale_log2, stream); break;
    case 64: launch_attention<64, T>(q, k, v, o, lse, BH, Nq, Nk, scale_log2, stream); break;
    case 80: launch_attention<80, T>(q, k, v, o, lse, BH, Nq, Nk, scale_log2, stream); break;
    case 96: launch_attention<96, T>(q, k, v, o, lse, BH, Nq, Nk, scale_log2, stream); break;
    case 128: launch_attention<128, T>(q, k, v, o, lse, BH, Nq, Nk, scale_log2, stream); break;
    case 160: launch_attention<160, T>(q, k, v, o, lse, BH, Nq, Nk, scale_log2, stream); break;
    default:
      TORCH_CHECK(false, "attention_fwd_cuda: unsupported head dim ", D,
                  " (supported: 32, 40, 64, 80, 96, 128, 160)");
  }
}

bool is_aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

}  // namespace

Tensor2 attention_fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                           const at::Tensor& v_in, double scale) {
  TORCH_CHECK(q_in.is_cuda() && k_in.is_cuda() && v_in.is_cuda(),
              "attention_fwd_cuda: q, k and v must be CUDA tensors");
  TORCH_CHECK(k_in.device() == q_in.device() && v_in.device() == q_in.device(),
              "attention_fwd_cuda: q, k and v must be on one device");
  const auto dtype = q_in.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16,
              "attention_fwd_cuda: the cuda attention kernel takes fp16/bf16 inputs, got ", dtype,
              " (fp32 attention runs on another backend)");
  TORCH_CHECK(k_in.scalar_type() == dtype && v_in.scalar_type() == dtype,
              "attention_fwd_cuda: q, k and v must share one dtype, got ", dtype, ", ",
              k_in.scalar_type(), ", ", v_in.scalar_type());
  TORCH_CHECK(q_in.dim() == 4 && k_in.dim() == 4 && v_in.dim() == 4,
              "attention_fwd_cuda: q, k and v must be 4-D (B, H, N, D), got ", q_in.sizes(),
              ", ", k_in.sizes(), ", ", v_in.sizes());
  TORCH_CHECK(k_in.sizes() == v_in.sizes(), "attention_fwd_cuda: k and v shapes differ: ",
              k_in.sizes(), " vs ", v_in.sizes());
  TORCH_CHECK(q_in.size(0) == k_in.size(0) && q_in.size(1) == k_in.size(1) &&
                  q_in.size(3) == k_in.size(3),
              "attention_fwd_cuda: q ", q_in.sizes(), " and k ", k_in.sizes(),
              " must agree in B, H and D");
  TORCH_CHECK(q_in.is_contiguous() && k_in.is_contiguous() && v_in.is_contiguous(),
              "attention_fwd_cuda: q, k and v must be contiguous");
  const int64_t B = q_in.size(0), H = q_in.size(1), Nq = q_in.size(2), D = q_in.size(3);
  const int64_t Nk = k_in.size(2);
  TORCH_CHECK(D == 32 || D == 40 || D == 64 || D == 80 || D == 96 || D == 128 || D == 160,
              "attention_fwd_cuda: unsupported head dim ", D,
              " (supported: 32, 40, 64, 80, 96, 128, 160)");
  TORCH_CHECK(Nq <= INT32_MAX - 256 && Nk <= INT32_MAX - 256,
              "attention_fwd_cuda: sequence too long");

  c10::cuda::CUDAGuard guard(q_in.device());

  auto o = at::empty({B, H, Nq, D}, q_in.options());
  auto lse = at::empty({B, H, Nq}, q_in.options().dtype(at::kFloat));
  const int64_t BH = B * H;
  if (BH == 0 || Nq == 0) return {o, lse};
  if (Nk == 0) {  // softmax over no keys: empty sum, as torch's math path gives
    o.zero_();
    lse.fill_(-INFINITY);
    return {o, lse};
  }

  int dev = 0, major = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  TORCH_CHECK(major >= 8, "attention_fwd_cuda: needs an sm_80 or newer GPU (compute capability ",
              major, ".x found)");

  // cp.async moves 16-byte chunks: the base pointers must be 16-byte aligned
  // (row starts are then aligned too, D being a multiple of 8). A contiguous
  // view with an odd storage offset is copied; fresh allocations always pass.
  const at::Tensor q = is_aligned16(q_in) ? q_in : q_in.clone();
  const at::Tensor k = is_aligned16(k_in) ? k_in : k_in.clone();
  const at::Tensor v = is_aligned16(v_in) ? v_in : v_in.clone();

  const float scale_log2 = static_cast<float>(scale * 1.4426950408889634);  // log2(e)
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (dtype == at::kHalf) {
    dispatch_head_dim<__half>(D, q, k, v, o, lse, BH, static_cast<int>(Nq), static_cast<int>(Nk),
                              scale_log2, stream);
  } else {
    dispatch_head_dim<__nv_bfloat16>(D, q, k, v, o, lse, BH, static_cast<int>(Nq),
                                     static_cast<int>(Nk), scale_log2, stream);
  }
  return {o, lse};
}

}  // namespace fastgen
