// Fused GroupNorm (+ optional SiLU, + optional residual add) forward and
// backward on CUDA. Same contract as the CPU and Triton kernels (csrc/ops.h).
//
// x is viewed as (N, C, S): contiguous (n, c, s) -> n*C*S + c*S + s, or
// channels-last (n, c, s) -> n*S*C + s*C + c. All math is fp32.
//
// Forward (2 launches)
//  1. gn_fwd_stats_kernel: one block per (n, g, chunk) tile of the group. Each
//     thread folds whole packs into a running (mean, M2, count) -- exact
//     two-pass statistics of each pack in registers, merged with Chan's
//     formula -- then the block merges its threads (warp shuffles, then one
//     warp over the warp results) and writes one partial per tile.
//  2. gn_fwd_apply_kernel: same tiles. Its prologue merges the group's K
//     partials (one warp, fixed order, so every tile of a group gets bitwise
//     the same mean/rstd) while the other warps load the group's (w, b) into
//     shared memory; then y = act((x - mean) * rstd * w + b) (+ residual),
//     rounded once to x's dtype. The second read of x mostly hits L2 (SD's
//     largest group-norm input is a few MB; L2 is 40-50 MB).
//  One block per (n, g) would give only N*G blocks (64 for (2, 320, 64, 64)
//  with 32 groups), too few for 132 SMs; K chunks per group bring the grid to
//  about kMinBlocks (4) blocks per SM, one wave.
//
// Backward (3 launches)
//  1. Per-channel partial sums of dz and dz*xhat over a range of pixels,
//     written to part[(n*Kb + k)*C + c] exactly once each (no atomics):
//     contiguous: gn_bwd_reduce_rows_kernel, a team of lanes per (n, c, row
//     segment); channels-last: gn_bwd_reduce_cols_kernel, a block of channel
//     columns x pixel rows (its packs need C % VEC == 0, not (C/G) % VEC).
//  2. gn_bwd_finalize_kernel: dbias/dweight per channel and, per (n, g), the
//     sums of dz*w and dz*w*xhat.
//  3. gn_bwd_apply_kernel: (n, g, chunk) tiles as in the forward,
//     dx = rstd*w*dz + ca*xhat + cb.
//  Deterministic: no atomics, every reduction has a fixed order.
//
// Vectorisation: Pack<T, VEC> moves VEC elements (up to 16 bytes) with one
// instruction. VEC is the widest width that divides the unit-stride run (S for
// contiguous tiles, C/G for channels-last group tiles, C for the channels-last
// reduction) and that every pointer involved is aligned to; otherwise it drops
// to 8, 4, 2 bytes and finally to scalar.
//
// Deliberate deviation from a precomputed per-channel scale/shift
// (y = x*scale + shift, scale = rstd*w, shift = b - mean*scale):
//  * x*scale + shift loses log2(|mean|/std) bits when the input has a large
//    mean; (x - mean)*rstd*w + b does not (same choice as the CPU kernel).
//  * the table holds (w, b), which do not depend on the statistics, so it is
//    filled while the statistics are merged (see gn_fwd_apply_kernel).
//  The price is one FSUB and one FMUL per element, free in a kernel that is
//  bound by memory.

#include "cuda/prelude.cuh"
#include "layout.h"

#include <ATen/Dispatch.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <type_traits>

namespace fastgen {
namespace {

constexpr int kThreads = 256;             // every kernel's block size
constexpr int kWarps = kThreads / 32;
// Resident blocks per SM the heavy kernels are compiled for (<= 64 registers):
// the grids are sized to kMinBlocks per SM so that they run in one wave.
constexpr int kMinBlocks = 4;
// Packs per thread and tensor in flight: 4 small packs, or 2 packs of 8 or
// 16 bytes (2 tensors x 2 x 16 B per thread, 1024 threads per SM, is plenty
// of bytes in flight; more would cost registers, i.e. occupancy).
template <typename T, int VEC>
constexpr int kUnroll = VEC * sizeof(T) >= 8 ? 2 : 4;
constexpr unsigned kFullMask = 0xffffffffu;

// ---------------------------------------------------------------------------
// Device helpers
// ---------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ T dmin(T a, T b) { return a < b ? a : b; }

// VEC elements moved by one load/store instruction (the alignment makes the
// compiler emit ld/st.v2/v4 for 8- and 16-byte packs).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, VEC>*>(p);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, VEC>& v) {
  *reinterpret_cast<Pack<T, VEC>*>(p) = v;
}

// __expf + fast reciprocal: 2 MUFU ops. For z << 0, 1 + exp(-z) = inf and the
// result is 0, the correct limit.
__device__ __forceinline__ float sigmoid_fast(float z) {
  return __fdividef(1.f, 1.f + __expf(-z));
}

// d/dz [z * sigmoid(z)] = sig * (1 + z * (1 - sig))
__device__ __forceinline__ float silu_grad(float dy, float z) {
  const float s = sigmoid_fast(z);
  return dy * s * (1.f + z * (1.f - s));
}

struct Welford {
  float mean, m2, count;
};

// Chan et al.'s pairwise merge. Empty sides are handled without branches:
// b empty -> a unchanged; a empty -> exactly b (ratio is exactly 1).
__device__ __forceinline__ Welford welford_merge(const Welford& a, const Welford& b) {
  const float count = a.count + b.count;
  const float ratio = count > 0.f ? b.count / count : 0.f;
  const float delta = b.mean - a.mean;
  return {a.mean + delta * ratio, a.m2 + b.m2 + delta * delta * a.count * ratio, count};
}

// Exact two-pass statistics of one pack: it is in registers anyway, and a
// per-element Welford update would cost a division per element.
template <typename T, int VEC>
__device__ __forceinline__ Welford pack_stats(const Pack<T, VEC>& p) {
  float v[VEC];
  float sum = 0.f;
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    v[e] = static_cast<float>(p.v[e]);
    sum += v[e];
  }
  const float mean = sum * (1.f / VEC);
  float m2 = 0.f;
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    const float d = v[e] - mean;
    m2 = fmaf(d, d, m2);
  }
  return {mean, m2, static_cast<float>(VEC)};
}

__device__ __forceinline__ Welford shfl_down_welford(const Welford& a, int offset) {
  return {__shfl_down_sync(kFullMask, a.mean, offset), __shfl_down_sync(kFullMask, a.m2, offset),
          __shfl_down_sync(kFullMask, a.count, offset)};
}

// Tree over shfl_down (not xor): lane 0 gets the result, and the merge order
// is fixed, so the result is deterministic. Other lanes hold garbage.
__device__ __forceinline__ Welford warp_reduce_welford(Welford a) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) a = welford_merge(a, shfl_down_welford(a, offset));
  return a;
}

// Result valid in thread 0. Must be called by all threads of the block.
__device__ __forceinline__ Welford block_reduce_welford(Welford a, Welford* smem /* [kWarps] */) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  a = warp_reduce_welford(a);
  if (lane == 0) smem[warp] = a;
  __syncthreads();
  if (warp == 0) {
    a = lane < kWarps ? smem[lane] : Welford{0.f, 0.f, 0.f};
    a = warp_reduce_welford(a);
  }
  return a;
}

// Per-channel table (w[c], b[c]) of the group's channels, read by every pack
// of the apply kernels. Dynamic shared memory: C/G float2s.
__device__ __forceinline__ float2* channel_table() {
  extern __shared__ float2 gn_channel_table[];
  return gn_channel_table;
}

// ---------------------------------------------------------------------------
// (n, g, chunk) tiles, shared by the forward kernels and the dx kernel
// ---------------------------------------------------------------------------

// A group is cpg*S elements = `vecs` packs of VEC. Pack i of the group:
//   contiguous:    offset base + i*VEC, all VEC elements in channel i / div
//                  (div = S/VEC packs per channel; VEC divides S);
//   channels-last: pixel s = i / div, channel-pack jv = i % div
//                  (div = cpg/VEC packs per pixel; VEC divides cpg),
//                  offset base + s*C + jv*VEC, channels jv*VEC + e.
// The group's packs are split into K chunks of `chunk` packs (last shorter).
struct TileGeom {
  int64_t C, S;
  int G, cpg;
  uint32_t vecs;   // packs per group (< 2^31, checked on the host)
  uint32_t div;    // see above
  uint32_t chunk;  // packs per chunk
  int K;           // chunks per group
};

struct TileId {
  int64_t n, ng;   // sample, n*G + g
  int g, k;        // group, chunk
  int64_t base;    // element offset of the group's first element
  uint32_t begin, end;  // pack range of this tile within the group
};

template <bool CL>
__device__ __forceinline__ TileId decode_tile(const TileGeom& t) {
  // blockIdx.x = (n*K + k)*G + g: g varies fastest, so blocks that run
  // together cover all groups of the same pixels. In channels-last a group
  // owns only cpg*sizeof(T) bytes (e.g. 20) of each pixel; the other groups'
  // blocks consume the rest of each DRAM sector while it is still in L2.
  const uint32_t b = blockIdx.x;
  const uint32_t G = static_cast<uint32_t>(t.G), K = static_cast<uint32_t>(t.K);
  TileId id;
  id.g = static_cast<int>(b % G);
  const uint32_t rest = b / G;
  id.k = static_cast<int>(rest % K);
  id.n = static_cast<int64_t>(rest / K);
  id.ng = id.n * t.G + id.g;
  id.base = CL ? id.n * t.S * t.C + static_cast<int64_t>(id.g) * t.cpg
               : (id.n * t.C + static_cast<int64_t>(id.g) * t.cpg) * t.S;
  id.begin = static_cast<uint32_t>(id.k) * t.chunk;
  id.end = dmin(t.vecs, id.begin + t.chunk);
  return id;
}

struct VecLoc {
  int64_t off;  // element offset of the pack
  uint32_t j;   // channel (within the group) of the pack's first element
};

template <bool CL, int VEC>
__device__ __forceinline__ VecLoc locate(const TileGeom& t, int64_t base, uint32_t i) {
  if constexpr (CL) {
    const uint32_t s = i / t.div;
    const uint32_t jv = i - s * t.div;
    return {base + static_cast<int64_t>(s) * t.C + static_cast<int64_t>(jv) * VEC, jv * VEC};
  } else {
    return {base + static_cast<int64_t>(i) * VEC, i / t.div};
  }
}

// Loads the packs i0 + u*kThreads (u < U) that lie in the tile, from a and,
// when b is not null, from b at the same offsets.
template <typename T, int VEC, bool CL, int U>
__device__ __forceinline__ void load_batch(const TileGeom& t, const TileId& id, uint32_t i0,
                                           const T* __restrict__ a, const T* __restrict__ b,
                                           Pack<T, VEC> (&va)[U], Pack<T, VEC> (&vb)[U],
                                           VecLoc (&loc)[U]) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const uint32_t i = i0 + u * kThreads;
    if (i < id.end) {
      loc[u] = locate<CL, VEC>(t, id.base, i);
      va[u] = load_pack<T, VEC>(a + loc[u].off);
      if (b != nullptr) vb[u] = load_pack<T, VEC>(b + loc[u].off);
    }
  }
}

// ---------------------------------------------------------------------------
// Forward kernels
// ---------------------------------------------------------------------------

// part: [N*G][K][3] = (mean, M2, count) of each tile.
template <typename T, int VEC, bool CL>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
gn_fwd_stats_kernel(const T* __restrict__ x, float* __restrict__ part, TileGeom t) {
  constexpr int U = 4;  // one tensor only: registers to spare
  const TileId id = decode_tile<CL>(t);
  Welford acc{0.f, 0.f, 0.f};
  for (uint32_t i0 = id.begin + threadIdx.x; i0 < id.end; i0 += kThreads * U) {
    Pack<T, VEC> v[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const uint32_t i = i0 + u * kThreads;
      if (i < id.end) v[u] = load_pack<T, VEC>(x + locate<CL, VEC>(t, id.base, i).off);
    }
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (i0 + u * kThreads < id.end) acc = welford_merge(acc, pack_stats(v[u]));
  }
  __shared__ Welford red[kWarps];
  acc = block_reduce_welford(acc, red);
  if (threadIdx.x == 0) {
    float* p = part + 3 * (id.ng * t.K + id.k);
    p[0] = acc.mean;
    p[1] = acc.m2;
    p[2] = acc.count;
  }
}

// Merges the group's K partials; called by warp 0 only, result in lane 0.
// Fixed order (lane-strided sequential merge, then a shfl_down tree), so all
// tiles of a group compute bitwise the same statistics.
__device__ __forceinline__ Welford merge_partials(const float* __restrict__ part, int K) {
  Welford a{0.f, 0.f, 0.f};
  for (int p = threadIdx.x; p < K; p += 32)
    a = welford_merge(a, Welford{part[3 * p], part[3 * p + 1], part[3 * p + 2]});
  return warp_reduce_welford(a);
}

template <typename T, int VEC, bool CL>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
gn_fwd_apply_kernel(const T* __restrict__ x, const T* __restrict__ res, T* __restrict__ y,
                    const float* __restrict__ w, const float* __restrict__ b,
                    const float* __restrict__ part, float* __restrict__ mean_out,
                    float* __restrict__ rstd_out, TileGeom t, float eps, bool silu) {
  float2* table = channel_table();  // (w[c], b[c]) per channel of the group
  __shared__ float2 stats;          // (mean, rstd)
  const TileId id = decode_tile<CL>(t);

  // Nothing before the merge result depends on it, so the prologue is one
  // round of memory latency, not three: every thread first issues its first
  // batch of x (+ residual), warp 0 merges the partials while warps 1..7 fill
  // the channel table, and a single barrier publishes both.
  constexpr int U = kUnroll<T, VEC>;
  Pack<T, VEC> xv[U], rv[U];
  VecLoc loc[U];
  uint32_t i0 = id.begin + threadIdx.x;
  load_batch<T, VEC, CL, U>(t, id, i0, x, res, xv, rv, loc);

  if (threadIdx.x < 32) {
    const Welford a = merge_partials(part + 3 * id.ng * t.K, t.K);
    if (threadIdx.x == 0) {
      // Biased variance; a.count >= 1 because S > 0 (checked on the host).
      const float rstd = 1.f / sqrtf(a.m2 / a.count + eps);
      stats = make_float2(a.mean, rstd);
      if (id.k == 0) {
        mean_out[id.ng] = a.mean;
        rstd_out[id.ng] = rstd;
      }
    }
  } else {
    for (int j = threadIdx.x - 32; j < t.cpg; j += kThreads - 32) {
      const int64_t c = static_cast<int64_t>(id.g) * t.cpg + j;
      table[j] = make_float2(w[c], b[c]);
    }
  }
  __syncthreads();
  const float mean = stats.x;
  const float rstd = stats.y;

  for (; i0 < id.end; i0 += kThreads * U) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (i0 + u * kThreads >= id.end) break;
      Pack<T, VEC> out;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        // Channels-last packs run along channels; contiguous packs are one channel.
        const float2 wb = table[loc[u].j + (CL ? e : 0)];
        const float xhat = (static_cast<float>(xv[u].v[e]) - mean) * rstd;
        float z = fmaf(xhat, wb.x, wb.y);
        if (silu) z *= sigmoid_fast(z);
        if (res != nullptr) z += static_cast<float>(rv[u].v[e]);
        out.v[e] = static_cast<T>(z);
      }
      store_pack<T, VEC>(y + loc[u].off, out);
    }
    const uint32_t next = i0 + kThreads * U;
    if (next < id.end) load_batch<T, VEC, CL, U>(t, id, next, x, res, xv, rv, loc);
  }
}

// ---------------------------------------------------------------------------
// Backward kernels
// ---------------------------------------------------------------------------

// Adds one element's dz and dz*xhat to the running sums.
__device__ __forceinline__ void bwd_accumulate(float dy, float x, float mean, float rstd, float w,
                                               float b, bool silu, float& s_dz, float& s_dzx) {
  const float xhat = (x - mean) * rstd;
  const float dz = silu ? silu_grad(dy, fmaf(xhat, w, b)) : dy;
  s_dz += dz;
  s_dzx = fmaf(dz, xhat, s_dzx);
}

// Contiguous layout: each (n, c) row of S elements is split into Kb segments
// of `seg` packs; a team of `team` lanes (a power of two <= 32, so teams never
// straddle warps) reduces one segment. Small S gets small teams instead of
// idle lanes.
struct RowGeom {
  int64_t C, S, rows;  // rows = N*C
  int G, cpg;
  uint32_t nv;         // packs per row, S / VEC
  uint32_t seg;        // packs per segment
  int Kb;              // segments per row
  int team;            // lanes per segment
};

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
gn_bwd_reduce_rows_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                          const float* __restrict__ w, const float* __restrict__ b,
                          const float* __restrict__ mean, const float* __restrict__ rstd,
                          float2* __restrict__ part, RowGeom r, bool silu) {
  const int team = r.team;
  const int lane = threadIdx.x & (team - 1);
  const int64_t unit = static_cast<int64_t>(blockIdx.x) * (kThreads / team) + threadIdx.x / team;
  const bool active = unit < r.rows * r.Kb;
  int64_t row = 0;
  int ks = 0;
  float s_dz = 0.f, s_dzx = 0.f;
  if (active) {
    row = unit / r.Kb;
    ks = static_cast<int>(unit - row * r.Kb);
    const int64_t n = row / r.C;
    const int c = static_cast<int>(row - n * r.C);
    const int64_t ng = n * r.G + c / r.cpg;
    const float mu = mean[ng], rs = rstd[ng], wc = w[c], bc = b[c];
    const T* dyr = dy + row * r.S;
    const T* xr = x + row * r.S;
    const uint32_t vb = static_cast<uint32_t>(ks) * r.seg;
    const uint32_t ve = dmin(r.nv, vb + r.seg);
    constexpr int U = kUnroll<T, VEC>;
    for (uint32_t v0 = vb + lane; v0 < ve; v0 += team * U) {
      Pack<T, VEC> dv[U], xv[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const uint32_t v = v0 + u * team;
        if (v < ve) {
          dv[u] = load_pack<T, VEC>(dyr + static_cast<int64_t>(v) * VEC);
          xv[u] = load_pack<T, VEC>(xr + static_cast<int64_t>(v) * VEC);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (v0 + u * team < ve) {
#pragma unroll
          for (int e = 0; e < VEC; ++e)
            bwd_accumulate(static_cast<float>(dv[u].v[e]), static_cast<float>(xv[u].v[e]), mu, rs,
                           wc, bc, silu, s_dz, s_dzx);
        }
      }
    }
  }
  // Every lane takes part in the shuffles (inactive teams add zeros); width
  // = team keeps each team's tree inside the team. Lane 0 gets the sum.
  for (int offset = team >> 1; offset > 0; offset >>= 1) {
    s_dz += __shfl_down_sync(kFullMask, s_dz, offset, team);
    s_dzx += __shfl_down_sync(kFullMask, s_dzx, offset, team);
  }
  if (active && lane == 0) {
    const int64_t n = row / r.C;
    const int64_t c = row - n * r.C;
    part[(n * r.Kb + ks) * r.C + c] = make_float2(s_dz, s_dzx);
  }
}

// Channels-last layout: sample n is an S x C row-major matrix; the per-channel
// sums are column sums. A block covers TX channel packs x TY pixel rows of
// pixel chunk kp; grid = N * Kb * nct (nct column tiles of TX packs).
struct ColGeom {
  int64_t C, S;
  int G, cpg;
  int Cv;       // channel packs per pixel, C / VEC
  int TX, TY;   // TX * TY <= kThreads
  int nct;      // column tiles
  int64_t P;    // pixels per chunk
  int Kb;       // pixel chunks
};

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
gn_bwd_reduce_cols_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                          const float* __restrict__ w, const float* __restrict__ b,
                          const float* __restrict__ mean, const float* __restrict__ rstd,
                          float2* __restrict__ part, ColGeom q, bool silu) {
  __shared__ float sm_dz[kThreads * VEC];
  __shared__ float sm_dzx[kThreads * VEC];
  const int ct = static_cast<int>(blockIdx.x % static_cast<uint32_t>(q.nct));
  const int64_t nk = blockIdx.x / static_cast<uint32_t>(q.nct);  // n*Kb + kp
  const int64_t n = nk / q.Kb;
  const int64_t kp = nk - n * q.Kb;
  const int tx = threadIdx.x % q.TX;
  const int ty = threadIdx.x / q.TX;
  const int cv = ct * q.TX + tx;

  float acc_dz[VEC], acc_dzx[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) acc_dz[e] = acc_dzx[e] = 0.f;

  if (ty < q.TY && cv < q.Cv) {
    // A pack's VEC channels may belong to different groups (e.g. C/G = 10).
    float mu[VEC], rs[VEC], wc[VEC], bc[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const int c = cv * VEC + e;
      const int64_t ng = n * q.G + c / q.cpg;
      mu[e] = mean[ng];
      rs[e] = rstd[ng];
      wc[e] = w[c];
      bc[e] = b[c];
    }
    const int64_t s_begin = kp * q.P;
    const int64_t s_end = dmin(q.S, s_begin + q.P);
    const int64_t col = n * q.S * q.C + static_cast<int64_t>(cv) * VEC;
    constexpr int U = kUnroll<T, VEC>;
    for (int64_t s0 = s_begin + ty; s0 < s_end; s0 += static_cast<int64_t>(q.TY) * U) {
      Pack<T, VEC> dv[U], xv[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t s = s0 + static_cast<int64_t>(u) * q.TY;
        if (s < s_end) {
          dv[u] = load_pack<T, VEC>(dy + col + s * q.C);
          xv[u] = load_pack<T, VEC>(x + col + s * q.C);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (s0 + static_cast<int64_t>(u) * q.TY < s_end) {
#pragma unroll
          for (int e = 0; e < VEC; ++e)
            bwd_accumulate(static_cast<float>(dv[u].v[e]), static_cast<float>(xv[u].v[e]), mu[e],
                           rs[e], wc[e], bc[e], silu, acc_dz[e], acc_dzx[e]);
        }
      }
    }
  }

  // Column sums over the TY rows, in row order (deterministic).
  const int width = q.TX * VEC;  // channels covered by this block
  if (ty < q.TY) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      sm_dz[ty * width + tx * VEC + e] = acc_dz[e];
      sm_dzx[ty * width + tx * VEC + e] = acc_dzx[e];
    }
  }
  __syncthreads();
  for (int col = threadIdx.x; col < width; col += kThreads) {
    float a = 0.f, bsum = 0.f;
    for (int row = 0; row < q.TY; ++row) {
      a += sm_dz[row * width + col];
      bsum += sm_dzx[row * width + col];
    }
    const int64_t c = static_cast<int64_t>(ct) * width + col;
    if (c < q.C) part[nk * q.C + c] = make_float2(a, bsum);
  }
}

// Blocks [0, chan_blocks): 32 channels x 8 slices of the N*Kb partial rows
// each -> dbias, dweight. Remaining blocks: one warp per (n, g) -> gsum[n*G+g]
// = (sum dz*w, sum dz*w*xhat) over the group.
__global__ void __launch_bounds__(kThreads)
gn_bwd_finalize_kernel(const float2* __restrict__ part, const float* __restrict__ w,
                       float* __restrict__ dweight, float* __restrict__ dbias,
                       float2* __restrict__ gsum, int64_t N, int64_t C, int G, int cpg, int Kb,
                       int chan_blocks) {
  if (static_cast<int>(blockIdx.x) < chan_blocks) {
    __shared__ float2 sm[kWarps][32];
    const int tx = threadIdx.x & 31;
    const int ty = threadIdx.x >> 5;
    const int64_t c = static_cast<int64_t>(blockIdx.x) * 32 + tx;
    const int64_t rows = N * Kb;
    float2 acc = make_float2(0.f, 0.f);
    if (c < C) {
      for (int64_t r = ty; r < rows; r += kWarps) {
        const float2 v = part[r * C + c];
        acc.x += v.x;
        acc.y += v.y;
      }
    }
    sm[ty][tx] = acc;
    __syncthreads();
    if (ty == 0 && c < C) {
      float2 s = sm[0][tx];
      for (int r = 1; r < kWarps; ++r) {
        s.x += sm[r][tx].x;
        s.y += sm[r][tx].y;
      }
      dbias[c] = s.x;
      dweight[c] = s.y;
    }
    return;
  }
  const int lane = threadIdx.x & 31;
  const int64_t ng =
      static_cast<int64_t>(static_cast<int>(blockIdx.x) - chan_blocks) * kWarps + (threadIdx.x >> 5);
  if (ng >= N * G) return;  // whole warp leaves together
  const int64_t n = ng / G;
  const int g = static_cast<int>(ng - n * G);
  float s1 = 0.f, s2 = 0.f;
  for (int j = lane; j < cpg; j += 32) {
    const int64_t c = static_cast<int64_t>(g) * cpg + j;
    float t0 = 0.f, t1 = 0.f;
    for (int k = 0; k < Kb; ++k) {
      const float2 v = part[(n * Kb + k) * C + c];
      t0 += v.x;
      t1 += v.y;
    }
    s1 = fmaf(w[c], t0, s1);
    s2 = fmaf(w[c], t1, s2);
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    s1 += __shfl_down_sync(kFullMask, s1, offset);
    s2 += __shfl_down_sync(kFullMask, s2, offset);
  }
  if (lane == 0) gsum[ng] = make_float2(s1, s2);
}

// dx = rstd * (dz*w - mean_g(dz*w) - xhat * mean_g(dz*w*xhat))
//    = (rstd*w) * dz + (ca * xhat + cb),  ca = -rstd*m2, cb = -rstd*m1.
template <typename T, int VEC, bool CL>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
gn_bwd_apply_kernel(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
                    const float* __restrict__ w, const float* __restrict__ b,
                    const float* __restrict__ mean, const float* __restrict__ rstd,
                    const float2* __restrict__ gsum, TileGeom t, float inv_m, bool silu) {
  float2* table = channel_table();  // (w[c], b[c]) per channel of the group
  const TileId id = decode_tile<CL>(t);

  constexpr int U = kUnroll<T, VEC>;
  Pack<T, VEC> xv[U], dv[U];
  VecLoc loc[U];
  uint32_t i0 = id.begin + threadIdx.x;
  load_batch<T, VEC, CL, U>(t, id, i0, x, dy, xv, dv, loc);

  const float mu = mean[id.ng];
  const float rs = rstd[id.ng];
  const float2 gs = gsum[id.ng];
  const float ca = -rs * (gs.y * inv_m);
  const float cb = -rs * (gs.x * inv_m);
  for (int j = threadIdx.x; j < t.cpg; j += kThreads) {
    const int64_t c = static_cast<int64_t>(id.g) * t.cpg + j;
    table[j] = make_float2(w[c], b[c]);
  }
  __syncthreads();

  for (; i0 < id.end; i0 += kThreads * U) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (i0 + u * kThreads >= id.end) break;
      Pack<T, VEC> out;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float2 wb = table[loc[u].j + (CL ? e : 0)];
        const float xhat = (static_cast<float>(xv[u].v[e]) - mu) * rs;
        const float d = static_cast<float>(dv[u].v[e]);
        const float dz = silu ? silu_grad(d, fmaf(xhat, wb.x, wb.y)) : d;
        out.v[e] = static_cast<T>(fmaf(rs * wb.x, dz, fmaf(ca, xhat, cb)));
      }
      store_pack<T, VEC>(dx + loc[u].off, out);
    }
    const uint32_t next = i0 + kThreads * U;
    if (next < id.end) load_batch<T, VEC, CL, U>(t, id, next, x, dy, xv, dv, loc);
  }
}

// ---------------------------------------------------------------------------
// Host helpers
// ---------------------------------------------------------------------------

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int sm_count(int device) {
  // Queried once per device: the attribute query is cheap but not free, and
  // these ops run at microsecond scale.
  static std::atomic<int> cache[64];
  if (device >= 0 && device < 64) {
    const int cached = cache[device].load(std::memory_order_relaxed);
    if (cached > 0) return cached;
  }
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, cudaDevAttrMultiProcessorCount, device));
  if (device >= 0 && device < 64) cache[device].store(value, std::memory_order_relaxed);
  return value;
}

// kMinBlocks (4) resident 256-thread blocks per SM: 1024 threads with 32-64
// bytes of loads in flight each saturate HBM, and the kernels are compiled to
// fit, so such a grid runs in a single wave.
int64_t target_blocks(int device) { return kMinBlocks * static_cast<int64_t>(sm_count(device)); }

// Widest pack (elements) such that `unit` is a multiple of it and every
// pointer is aligned to it; 16 bytes at most.
int pick_vec(int64_t unit, int64_t elem_size, std::initializer_list<const void*> ptrs,
             int64_t max_bytes = 16) {
  for (int vec = static_cast<int>(max_bytes / elem_size); vec > 1; vec /= 2) {
    if (unit % vec != 0) continue;
    bool aligned = true;
    for (const void* p : ptrs)
      if (p != nullptr && reinterpret_cast<uintptr_t>(p) % (vec * elem_size) != 0) aligned = false;
    if (aligned) return vec;
  }
  return 1;
}

// Chunks per (n, g): as many as keep the grid within target_blocks (floor, so
// a grid never spills a few blocks into a second wave), but at least one pack
// per thread.
TileGeom make_tile_geom(int64_t N, int64_t C, int64_t S, int G, bool cl, int vec, int device) {
  TileGeom t;
  t.C = C;
  t.S = S;
  t.G = G;
  t.cpg = static_cast<int>(C / G);
  const int64_t vecs = C / G * S / vec;
  t.vecs = static_cast<uint32_t>(vecs);
  t.div = static_cast<uint32_t>(cl ? t.cpg / vec : S / vec);
  int64_t k = target_blocks(device) / (N * G);
  k = std::min<int64_t>(k, vecs / kThreads);
  k = std::max<int64_t>(k, 1);
  const int64_t chunk = ceil_div(vecs, k);
  t.chunk = static_cast<uint32_t>(chunk);
  t.K = static_cast<int>(ceil_div(vecs, chunk));  // no empty chunk
  return t;
}

// Same sizes and the same memory order (strides of size-1 dims do not matter).
bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  return a.sizes() == b.sizes() && (a.numel() == 0 || layout::same_strides(a, b));
}

void check_data(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "group_norm (cuda): ", name, " must be a CUDA tensor");
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, "group_norm (cuda): ", name,
              " must be float32, float16 or bfloat16, got ", st);
}

void check_param(const at::Tensor& p, const at::Tensor& x, const char* name) {
  TORCH_CHECK(p.device() == x.device(), "group_norm (cuda): ", name, " must be on ", x.device(),
              ", got ", p.device());
  TORCH_CHECK(p.scalar_type() == at::kFloat, "group_norm (cuda): ", name, " must be float32, got ",
              p.scalar_type());
  TORCH_CHECK(p.dim() == 1 && p.size(0) == x.size(1) && p.is_contiguous(), "group_norm (cuda): ",
              name, " must be a contiguous (C,) = (", x.size(1), ",) tensor, got ", p.sizes());
}

struct Geometry {
  int64_t N, C, S;
  int G;
  bool cl;  // channels-last
};

Geometry check_x(const at::Tensor& x, int64_t num_groups) {
  check_data(x, "x");
  TORCH_CHECK(x.dim() >= 2 && x.dim() <= 5, "group_norm (cuda): x must be (N, C, *spatial) with 0-3 ",
              "spatial dims, got ", x.sizes());
  Geometry geo;
  geo.N = x.size(0);
  geo.C = x.size(1);
  geo.S = 1;
  for (int64_t d = 2; d < x.dim(); ++d) geo.S *= x.size(d);
  TORCH_CHECK(num_groups > 0 && geo.C % num_groups == 0, "group_norm (cuda): channels (", geo.C,
              ") must be divisible by num_groups (", num_groups, ")");
  geo.G = static_cast<int>(num_groups);
  geo.cl = !x.is_contiguous();
  TORCH_CHECK(!geo.cl || layout::is_channels_last_dense(x), "group_norm (cuda): x must be contiguous or ",
              "dense channels-last, got strides ", x.strides());
  // Pack indices within a group are 32-bit.
  TORCH_CHECK(geo.C / geo.G * geo.S <= std::numeric_limits<int32_t>::max(),
              "group_norm (cuda): a group has more than 2^31 - 1 elements");
  return geo;
}

template <typename Kernel>
void allow_dynamic_smem(Kernel kernel, size_t bytes, int device) {
  if (bytes <= 48 * 1024) return;
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK(bytes + 1024 <= static_cast<size_t>(optin), "group_norm (cuda): ", bytes / 8,
              " channels per group exceed the shared memory of this device");
  C10_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

template <typename F>
void dispatch_layout(bool cl, const F& f) {
  if (cl)
    f(std::true_type());
  else
    f(std::false_type());
}

// Calls f(std::integral_constant<int, vec>()); 8 only exists for 2-byte types.
template <typename T, typename F>
void dispatch_vec(int vec, const F& f) {
  switch (vec) {
    case 1: f(std::integral_constant<int, 1>()); return;
    case 2: f(std::integral_constant<int, 2>()); return;
    case 4: f(std::integral_constant<int, 4>()); return;
    case 8:
      if constexpr (sizeof(T) == 2) {
        f(std::integral_constant<int, 8>());
        return;
      }
      break;
    default: break;
  }
  TORCH_CHECK(false, "group_norm (cuda): internal error, bad vector width ", vec);
}

// ---------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------

template <typename T>
void launch_fwd(const Geometry& geo, const at::Tensor& x, const at::Tensor& weight,
                const at::Tensor& bias, const at::Tensor* residual, at::Tensor& y, at::Tensor& mean,
                at::Tensor& rstd, double eps, bool silu) {
  if constexpr (std::is_same_v<T, double>) {
    TORCH_CHECK(false, "group_norm (cuda): float64 is not supported");
  } else {
    const int device = x.get_device();
    cudaStream_t stream = at::cuda::getCurrentCUDAStream(device).stream();
    const T* xp = x.const_data_ptr<T>();
    const T* rp = residual != nullptr ? residual->const_data_ptr<T>() : nullptr;
    T* yp = y.mutable_data_ptr<T>();
    const int cpg = static_cast<int>(geo.C / geo.G);
    const int vec = pick_vec(geo.cl ? cpg : geo.S, sizeof(T), {xp, rp, yp});
    const TileGeom t = make_tile_geom(geo.N, geo.C, geo.S, geo.G, geo.cl, vec, device);
    const int64_t blocks = geo.N * geo.G * t.K;
    at::Tensor part = at::empty({blocks * 3}, x.options().dtype(at::kFloat));
    const size_t smem = static_cast<size_t>(cpg) * sizeof(float2);

    dispatch_vec<T>(vec, [&](auto vec_c) {
      constexpr int VEC = decltype(vec_c)::value;
      dispatch_layout(geo.cl, [&](auto cl_c) {
        constexpr bool CL = decltype(cl_c)::value;
        gn_fwd_stats_kernel<T, VEC, CL><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
            xp, part.mutable_data_ptr<float>(), t);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        auto apply = gn_fwd_apply_kernel<T, VEC, CL>;
        allow_dynamic_smem(apply, smem, device);
        apply<<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(
            xp, rp, yp, weight.const_data_ptr<float>(), bias.const_data_ptr<float>(),
            part.const_data_ptr<float>(), mean.mutable_data_ptr<float>(),
            rstd.mutable_data_ptr<float>(), t, static_cast<float>(eps), silu);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
}

template <typename T>
void launch_bwd(const Geometry& geo, const at::Tensor& dy, const at::Tensor& x,
                const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& mean,
                const at::Tensor& rstd, at::Tensor& dx, at::Tensor& dweight, at::Tensor& dbias,
                bool silu) {
  if constexpr (std::is_same_v<T, double>) {
    TORCH_CHECK(false, "group_norm (cuda): float64 is not supported");
  } else {
    const int device = x.get_device();
    cudaStream_t stream = at::cuda::getCurrentCUDAStream(device).stream();
    const T* dyp = dy.const_data_ptr<T>();
    const T* xp = x.const_data_ptr<T>();
    T* dxp = dx.mutable_data_ptr<T>();
    const float* wp = weight.const_data_ptr<float>();
    const float* bp = bias.const_data_ptr<float>();
    const float* mp = mean.const_data_ptr<float>();
    const float* rp = rstd.const_data_ptr<float>();
    const int64_t N = geo.N, C = geo.C, S = geo.S;
    const int G = geo.G;
    const int cpg = static_cast<int>(C / G);
    const int64_t target = target_blocks(device);

    // 1. Per-channel partial sums: part[(n*Kb + k)*C + c] = (sum dz, sum dz*xhat).
    // Channels-last threads keep 4 fp32 values of state per channel of their
    // pack, so their packs stop at 8 bytes (16 would spill registers); an
    // 8-byte-per-lane warp access is still fully coalesced.
    const int rvec = pick_vec(geo.cl ? C : S, sizeof(T), {dyp, xp}, geo.cl ? 8 : 16);
    int Kb = 1;
    RowGeom rg{};
    ColGeom cg{};
    int64_t reduce_blocks = 0;
    if (!geo.cl) {
      rg.C = C;
      rg.S = S;
      rg.rows = N * C;
      rg.G = G;
      rg.cpg = cpg;
      rg.nv = static_cast<uint32_t>(S / rvec);
      int team = 1;
      while (team < 32 && team < static_cast<int64_t>(rg.nv)) team *= 2;
      rg.team = team;
      // Enough teams to fill target blocks, each lane with >= 2 packs.
      int64_t kb = target * (kThreads / team) / rg.rows;
      kb = std::min<int64_t>(kb, rg.nv / (2 * team));
      kb = std::max<int64_t>(kb, 1);
      const int64_t seg = ceil_div(rg.nv, kb);
      rg.seg = static_cast<uint32_t>(seg);
      Kb = static_cast<int>(ceil_div(rg.nv, seg));
      rg.Kb = Kb;
      reduce_blocks = ceil_div(rg.rows * Kb, kThreads / team);
    } else {
      cg.C = C;
      cg.S = S;
      cg.G = G;
      cg.cpg = cpg;
      cg.Cv = static_cast<int>(C / rvec);
      cg.nct = static_cast<int>(ceil_div(cg.Cv, 64));
      cg.TX = static_cast<int>(ceil_div(cg.Cv, cg.nct));
      cg.TY = kThreads / cg.TX;
      int64_t kb = target / (N * cg.nct);
      kb = std::min<int64_t>(kb, S / (2 * cg.TY));
      kb = std::max<int64_t>(kb, 1);
      cg.P = ceil_div(S, kb);
      Kb = static_cast<int>(ceil_div(S, cg.P));
      cg.Kb = Kb;
      reduce_blocks = N * Kb * cg.nct;
    }
    at::Tensor part = at::empty({N * Kb * C * 2}, x.options().dtype(at::kFloat));
    float2* partp = reinterpret_cast<float2*>(part.mutable_data_ptr<float>());

    dispatch_vec<T>(rvec, [&](auto vec_c) {
      constexpr int VEC = decltype(vec_c)::value;
      if (!geo.cl) {
        gn_bwd_reduce_rows_kernel<T, VEC><<<static_cast<unsigned>(reduce_blocks), kThreads, 0, stream>>>(
            dyp, xp, wp, bp, mp, rp, partp, rg, silu);
      } else if constexpr (VEC * sizeof(T) <= 8) {  // see rvec
        gn_bwd_reduce_cols_kernel<T, VEC><<<static_cast<unsigned>(reduce_blocks), kThreads, 0, stream>>>(
            dyp, xp, wp, bp, mp, rp, partp, cg, silu);
      } else {
        TORCH_CHECK(false, "group_norm (cuda): internal error, channels-last pack too wide");
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });

    // 2. dbias, dweight and the per-group sums.
    at::Tensor gsum = at::empty({N * G * 2}, x.options().dtype(at::kFloat));
    float2* gsump = reinterpret_cast<float2*>(gsum.mutable_data_ptr<float>());
    const int chan_blocks = static_cast<int>(ceil_div(C, 32));
    const int64_t finalize_blocks = chan_blocks + ceil_div(N * G, kWarps);
    gn_bwd_finalize_kernel<<<static_cast<unsigned>(finalize_blocks), kThreads, 0, stream>>>(
        partp, wp, dweight.mutable_data_ptr<float>(), dbias.mutable_data_ptr<float>(), gsump, N, C,
        G, cpg, Kb, chan_blocks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    // 3. dx.
    const int vec = pick_vec(geo.cl ? cpg : S, sizeof(T), {dyp, xp, dxp});
    const TileGeom t = make_tile_geom(N, C, S, G, geo.cl, vec, device);
    const int64_t blocks = N * G * t.K;
    const size_t smem = static_cast<size_t>(cpg) * sizeof(float2);
    const float inv_m = static_cast<float>(1.0 / (static_cast<double>(cpg) * static_cast<double>(S)));
    dispatch_vec<T>(vec, [&](auto vec_c) {
      constexpr int VEC = decltype(vec_c)::value;
      dispatch_layout(geo.cl, [&](auto cl_c) {
        constexpr bool CL = decltype(cl_c)::value;
        auto apply = gn_bwd_apply_kernel<T, VEC, CL>;
        allow_dynamic_smem(apply, smem, device);
        apply<<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(
            dyp, xp, dxp, wp, bp, mp, rp, gsump, t, inv_m, silu);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
}

}  // namespace

// ---------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------

Tensor3 group_norm_fwd_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                            const std::optional<at::Tensor>& residual, int64_t num_groups,
                            double eps, bool silu) {
  const Geometry geo = check_x(x, num_groups);
  check_param(weight, x, "weight");
  check_param(bias, x, "bias");
  const at::Tensor* res = nullptr;
  if (residual.has_value() && residual->defined()) {
    res = &residual.value();
    TORCH_CHECK(res->device() == x.device(), "group_norm (cuda): residual must be on ", x.device(),
                ", got ", res->device());
    TORCH_CHECK(res->scalar_type() == x.scalar_type(), "group_norm (cuda): residual must have ",
                "x's dtype ", x.scalar_type(), ", got ", res->scalar_type());
    TORCH_CHECK(same_layout(*res, x), "group_norm (cuda): residual must have x's sizes ", x.sizes(),
                " and strides ", x.strides(), ", got ", res->sizes(), " and ", res->strides());
  }

  const c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor y = at::empty_like(x);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor mean = at::empty({geo.N, geo.G}, f32);
  at::Tensor rstd = at::empty({geo.N, geo.G}, f32);
  if (x.numel() == 0) {
    // Same convention as the Triton kernel: empty groups have mean 0, var 0.
    mean.zero_();
    rstd.fill_(eps > 0 ? 1.0 / std::sqrt(eps) : std::numeric_limits<double>::infinity());
    return {y, mean, rstd};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, x.scalar_type(),
                                  "group_norm_fwd_cuda", [&] {
                                    launch_fwd<scalar_t>(geo, x, weight, bias, res, y, mean, rstd,
                                                         eps, silu);
                                  });
  return {y, mean, rstd};
}

Tensor3 group_norm_bwd_cuda(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& bias, const at::Tensor& mean, const at::Tensor& rstd,
                            int64_t num_groups, bool silu) {
  const Geometry geo = check_x(x, num_groups);
  check_param(weight, x, "weight");
  check_param(bias, x, "bias");
  TORCH_CHECK(dy.device() == x.device(), "group_norm (cuda): dy must be on ", x.device(), ", got ",
              dy.device());
  TORCH_CHECK(dy.scalar_type() == x.scalar_type(), "group_norm (cuda): dy must have x's dtype ",
              x.scalar_type(), ", got ", dy.scalar_type());
  TORCH_CHECK(same_layout(dy, x), "group_norm (cuda): dy must have x's sizes ", x.sizes(),
              " and strides ", x.strides(), ", got ", dy.sizes(), " and ", dy.strides());
  for (const at::Tensor* s : {&mean, &rstd}) {
    TORCH_CHECK(s->device() == x.device() && s->scalar_type() == at::kFloat &&
                    s->numel() == geo.N * geo.G && s->is_contiguous(),
                "group_norm (cuda): mean and rstd must be contiguous float32 (N, G) = (", geo.N,
                ", ", geo.G, ") tensors on ", x.device());
  }

  const c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor dx = at::empty_like(x);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor dweight = at::empty({geo.C}, f32);
  at::Tensor dbias = at::empty({geo.C}, f32);
  if (x.numel() == 0) {
    dweight.zero_();
    dbias.zero_();
    return {dx, dweight, dbias};
  }
  const at::Tensor& mean_c = mean;
  const at::Tensor& rstd_c = rstd;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, x.scalar_type(),
                                  "group_norm_bwd_cuda", [&] {
                                    launch_bwd<scalar_t>(geo, dy, x, weight, bias, mean_c, rstd_c,
                                                         dx, dweight, dbias, silu);
                                  });
  return {dx, dweight, dbias};
}

}  // namespace fastgen
