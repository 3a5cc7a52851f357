"""Triton GroupNorm (+ optional SiLU, + optional residual add after the activation).

Same contract as group_norm_{fwd,bwd}_{cpu,cuda} in csrc/ops.h:

    group_norm_fwd(x, weight, bias, residual, num_groups, eps, silu) -> (y, mean, rstd)
    group_norm_bwd(dy, x, weight, bias, mean, rstd, num_groups, silu) -> (dx, dweight, dbias)

x is viewed as (N, C, S) with S the product of the spatial dims, and is either
contiguous (element (n, c, s) at n*C*S + c*S + s) or channels-last dense (at
n*S*C + s*C + c, per fastgen/ops/_layout.py). The layout is a constexpr, so
each layout compiles to its own kernel and the compiler knows which tile axis
is unit-stride.

Preconditions (checked, with clear errors, and arranged by the public op in
fastgen/ops/group_norm.py; the launchers only assert them and never copy or
change a layout): x has 2-5 dims and one of the two layouts; weight and bias
are contiguous float32 (C,) tensors; residual and dy have exactly x's strides;
mean and rstd are the forward's contiguous float32 (N, G) tensors. y and dx
are allocated with x's strides.

Tiles are 3-D, [BLOCK_G, BLOCK_S, BLOCK_C]: BLOCK_G consecutive groups of one
sample, BLOCK_S spatial positions and BLOCK_C channels of each group (masked
by the channels per group, which need not be a power of two). Normally
BLOCK_G == 1 and a group is split over many tiles; only when whole groups are
smaller than a tile are several packed into one (late UNet layers, tiny test
shapes), which also keeps the interpreter's program count low.

One program per (n, g) would give only N*G programs (64 for SD's
(2, 320, 64, 64) with 32 groups), far too few to fill a GPU, so both passes
are split:

forward
  1. _gn_fwd_stats_kernel: one program per (n, group block, chunk); a chunk is
     BLOCK_C channels times a run of spatial tiles. Each tile's (count, mean,
     M2) is computed two-pass in registers and folded into the chunk's running
     statistics with Chan's formula; the result goes to a small fp32 buffer of
     shape (3, N*G, P), P partials per group. Statistics are of x minus a
     per-group pivot (the group's first element), so partial means are O(std)
     and fp32 merging stays accurate even for x = 1000 + randn.
  2. _gn_fwd_apply_kernel: one program per tile. Its prologue merges the
     group's P partials with the closed form of Chan's formula (P is at most a
     few hundred), then it normalises the tile, applies SiLU and the residual.
     On a GPU the second read of x mostly hits L2. Merging in the prologue
     instead of in a third kernel saves a launch, which matters at these sizes
     (SD's (2, 320, 64, 64) fp16 moves only ~10 MB).

backward
  1. _gn_bwd_partial_kernel: per chunk, per-channel partial sums of dz and
     dz*xhat into a (2, N, n_chunks, C) fp32 buffer. Each element is written by
     exactly one program: no atomics, deterministic results.
  2. torch reduces the partials to dbias, dweight and the two per-group sums
     that dx needs (tiny tensors).
  3. _gn_bwd_apply_kernel: one program per tile computes dx.

The apply kernels are autotuned over tile size and warps on a GPU. The
partials' layout must be known before launch, so the statistics kernels'
chunking (and BLOCK_G, BLOCK_C) is chosen in Python, not by the autotuner.
Under TRITON_INTERPRET=1 autotuning would run every config, so one fixed
config with large tiles is used there: the interpreter pays per program and
per op, hardly per element. For the same reason the kernels call their
shared @jit helpers (inlined when compiled) once per program or per tile:
under the interpreter every such call re-patches triton.language (~0.3 ms).
"""

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from fastgen.ops._layout import is_channels_last_dense

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Nominal tile size in elements: fixes BLOCK_G, BLOCK_C and the statistics tile.
_TILE = 65536 if _INTERPRET else 4096
# Channels-last tiles hold at most this many channels of a group.
_MAX_BLOCK_C_CL = 64
# Contiguous tiles only get many channels when S is tiny; cap them.
_MAX_BLOCK_C = 512
# Bound on statistics partials per group (every apply program merges them).
_MAX_PARTIALS = 256

if _INTERPRET:
    _APPLY_CONFIGS = [triton.Config({"TILE": _TILE}, num_warps=4)]
    _STATS_CONFIGS = [triton.Config({}, num_warps=4)]
else:
    _APPLY_CONFIGS = [
        triton.Config({"TILE": 2048}, num_warps=4),
        triton.Config({"TILE": 4096}, num_warps=4),
        triton.Config({"TILE": 4096}, num_warps=8),
        triton.Config({"TILE": 8192}, num_warps=8),
    ]
    _STATS_CONFIGS = [
        triton.Config({}, num_warps=4),
        triton.Config({}, num_warps=8),
    ]

_TUNE_KEY = ["S", "C_PER_G", "BLOCK_G", "BLOCK_C", "CHANNELS_LAST"]


def _apply_block_s(args):
    # The autotuned TILE sets the tile area; BLOCK_G and BLOCK_C are fixed by the launcher.
    area = args["BLOCK_G"] * args["BLOCK_C"]
    return max(1, min(triton.next_power_of_2(args["S"]), args["TILE"] // area))


# ----------------------------------------------------------------------------
# Shared helpers (inlined by the compiler)
# ----------------------------------------------------------------------------


@triton.jit
def _program_tile(n_sblocks, n_cblocks, n_gblocks, BLOCK_G: tl.constexpr):
    """Program id -> (sample n, its groups g, t, channel block, spatial block),
    t = channel block * n_sblocks + spatial block. A "spatial block" is a
    BLOCK_S tile for the apply kernels and a chunk of tiles for the statistics
    kernels, whose t is then the partial's index."""
    pid = tl.program_id(0)
    t = pid % (n_cblocks * n_sblocks)
    nb = pid // (n_cblocks * n_sblocks)
    n = nb // n_gblocks
    cb = t // n_sblocks
    sb = t % n_sblocks
    g = (nb % n_gblocks) * BLOCK_G + tl.arange(0, BLOCK_G)
    return n, g, t, cb, sb


@triton.jit
def _group_channels(g, g_mask, cb, C_PER_G, BLOCK_C: tl.constexpr):
    """(c, mask): channel block cb of groups g as [BLOCK_G, BLOCK_C] channel
    indices, masked by the real groups and channels per group."""
    c_local = cb * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    c = g[:, None] * C_PER_G + c_local
    return c, g_mask[:, None] & (c_local < C_PER_G)


@triton.jit
def _tile_offsets(s_start, c, gc_mask, C, S, BLOCK_S: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    """Offsets within one sample, and mask, of the [BLOCK_G, BLOCK_S, BLOCK_C]
    tile of channels c at spatial positions s_start .. s_start + BLOCK_S."""
    s = s_start + tl.arange(0, BLOCK_S)[None, :, None]
    if CHANNELS_LAST:
        offs = s * C + c[:, None, :]
    else:
        offs = c[:, None, :] * S + s
    return offs, gc_mask[:, None, :] & (s < S)


@triton.jit
def _load_pivot(X, g, g_mask, C_PER_G, S, CHANNELS_LAST: tl.constexpr):
    """The first element of each group g of the sample at X, in fp32."""
    pivot = tl.load(X + g * C_PER_G * (1 if CHANNELS_LAST else S), mask=g_mask, other=0.0)
    return pivot.to(tl.float32)


@triton.jit
def _silu_backward(dy, z):
    """dy * silu'(z) = dy * sig(z) * (1 + z * (1 - sig(z))), sig via exp(-|z|)
    so that it never overflows."""
    e = tl.exp(-tl.abs(z))
    sig = tl.where(z >= 0, 1.0, e) / (1.0 + e)
    return dy * sig * (1.0 + z * (1.0 - sig))


# ----------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------


@triton.autotune(configs=_STATS_CONFIGS, key=_TUNE_KEY)
@triton.jit
def _gn_fwd_stats_kernel(
    X, PART,  # PART: fp32 (3, N*G, P) = (count, mean - pivot, M2) of each chunk
    C, S, C_PER_G, G, NG, P, TILES_PER_CHUNK, n_chunks_s, n_cblocks, n_gblocks,
    BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
):
    n, g, p, cb, sc = _program_tile(n_chunks_s, n_cblocks, n_gblocks, BLOCK_G)
    s_begin = sc * TILES_PER_CHUNK * BLOCK_S
    n_tiles = tl.minimum(TILES_PER_CHUNK, (S - s_begin + BLOCK_S - 1) // BLOCK_S)
    g_mask = g < G
    c, gc_mask = _group_channels(g, g_mask, cb, C_PER_G, BLOCK_C)
    n_ch = tl.minimum(C_PER_G - cb * BLOCK_C, BLOCK_C)
    X += n.to(tl.int64) * C * S
    # Statistics of x - pivot (the group's first element): partial means are
    # then O(std), not O(mean), so merging them in fp32 loses nothing even
    # when |mean| >> std.
    pivot = _load_pivot(X, g, g_mask, C_PER_G, S, CHANNELS_LAST)[:, None, None]

    count = tl.zeros([BLOCK_G], dtype=tl.float32)
    mean = tl.zeros([BLOCK_G], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_G], dtype=tl.float32)
    for i in range(0, n_tiles):
        offs, mask = _tile_offsets(s_begin + i * BLOCK_S, c, gc_mask, C, S, BLOCK_S, CHANNELS_LAST)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.where(mask, x - pivot, 0.0)
        # Exact two-pass statistics of the tile (it is in registers anyway) ...
        t_count = (tl.minimum(S - s_begin - i * BLOCK_S, BLOCK_S) * n_ch).to(tl.float32)
        t_mean = tl.sum(tl.sum(x, axis=2), axis=1) / t_count
        d = tl.where(mask, x - t_mean[:, None, None], 0.0)
        t_m2 = tl.sum(tl.sum(d * d, axis=2), axis=1)
        # ... merged into the chunk's running statistics (Chan et al.). Never
        # E[x^2] - E[x]^2, which cancels catastrophically for large means.
        new_count = count + t_count
        delta = t_mean - mean
        mean += delta * (t_count / new_count)
        m2 += t_m2 + delta * delta * (count * (t_count / new_count))
        count = new_count

    ptr = PART + (n * G + g) * P + p
    tl.store(ptr, count, mask=g_mask)
    tl.store(ptr + NG * P, mean, mask=g_mask)
    tl.store(ptr + 2 * NG * P, m2, mask=g_mask)


@triton.autotune(configs=_APPLY_CONFIGS, key=_TUNE_KEY + ["SILU", "HAS_RES"])
@triton.heuristics({"BLOCK_S": _apply_block_s})
@triton.jit
def _gn_fwd_apply_kernel(
    X, R, Y, W, B, PART, MEAN, RSTD,
    C, S, C_PER_G, G, NG, P, n_cblocks, n_gblocks, eps,
    TILE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr, CHANNELS_LAST: tl.constexpr, SILU: tl.constexpr,
    HAS_RES: tl.constexpr,
):
    n, g, t, cb, sb = _program_tile((S + BLOCK_S - 1) // BLOCK_S, n_cblocks, n_gblocks, BLOCK_G)
    g_mask = g < G

    # Merge the groups' partial statistics: with M = sum(n_i m_i) / sum(n_i),
    # M2 = sum(M2_i) + sum(n_i (m_i - M)^2) -- Chan's formula for P parts at
    # once. All programs of a group compute identical values.
    p = tl.arange(0, BLOCK_P)[None, :]
    p_mask = g_mask[:, None] & (p < P)
    ptr = PART + (n * G + g)[:, None] * P + p
    p_count = tl.load(ptr, mask=p_mask, other=0.0)
    p_mean = tl.load(ptr + NG * P, mask=p_mask, other=0.0)
    p_m2 = tl.load(ptr + 2 * NG * P, mask=p_mask, other=0.0)
    count = tl.sum(p_count, axis=1)
    count = tl.where(g_mask, count, 1.0)  # padding groups: avoid 0/0
    mean = tl.sum(p_count * p_mean, axis=1) / count  # of x - pivot
    dm = p_mean - mean[:, None]
    var = tl.sum(p_m2 + p_count * dm * dm, axis=1) / count
    rstd = 1.0 / tl.sqrt(var + eps)
    base = n.to(tl.int64) * C * S
    pivot = _load_pivot(X + base, g, g_mask, C_PER_G, S, CHANNELS_LAST)
    if t == 0:
        tl.store(MEAN + n * G + g, pivot + mean, mask=g_mask)
        tl.store(RSTD + n * G + g, rstd, mask=g_mask)

    c, gc_mask = _group_channels(g, g_mask, cb, C_PER_G, BLOCK_C)
    w = tl.load(W + c, mask=gc_mask, other=0.0)
    b = tl.load(B + c, mask=gc_mask, other=0.0)
    scale = (w * rstd[:, None])[:, None, :]

    offs, mask = _tile_offsets(sb * BLOCK_S, c, gc_mask, C, S, BLOCK_S, CHANNELS_LAST)
    x = tl.load(X + base + offs, mask=mask, other=0.0).to(tl.float32)
    # Not x * scale + (b - mean * scale): folding the mean into the shift
    # cancels catastrophically when |mean| >> std.
    y = ((x - pivot[:, None, None]) - mean[:, None, None]) * scale + b[:, None, :]
    if SILU:
        # sigmoid via exp(-|y|): never overflows
        e = tl.exp(-tl.abs(y))
        y = y * tl.where(y >= 0, 1.0, e) / (1.0 + e)
    if HAS_RES:
        y += tl.load(R + base + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + base + offs, y.to(Y.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------


@triton.autotune(configs=_STATS_CONFIGS, key=_TUNE_KEY + ["SILU"])
@triton.jit
def _gn_bwd_partial_kernel(
    X, DY, W, B, MEAN, RSTD, PART,  # PART: fp32 (2, N, n_chunks_s, C)
    N, C, S, C_PER_G, G, TILES_PER_CHUNK, n_chunks_s, n_cblocks, n_gblocks,
    BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, SILU: tl.constexpr,
):
    n, g, _, cb, sc = _program_tile(n_chunks_s, n_cblocks, n_gblocks, BLOCK_G)
    s_begin = sc * TILES_PER_CHUNK * BLOCK_S
    n_tiles = tl.minimum(TILES_PER_CHUNK, (S - s_begin + BLOCK_S - 1) // BLOCK_S)
    g_mask = g < G
    c, gc_mask = _group_channels(g, g_mask, cb, C_PER_G, BLOCK_C)
    mean = tl.load(MEAN + n * G + g, mask=g_mask, other=0.0)[:, None, None]
    rstd = tl.load(RSTD + n * G + g, mask=g_mask, other=0.0)[:, None, None]
    if SILU:
        w = tl.load(W + c, mask=gc_mask, other=0.0)[:, None, :]
        b = tl.load(B + c, mask=gc_mask, other=0.0)[:, None, :]
    base = n.to(tl.int64) * C * S

    acc_dz = tl.zeros([BLOCK_G, BLOCK_C], dtype=tl.float32)
    acc_dzx = tl.zeros([BLOCK_G, BLOCK_C], dtype=tl.float32)
    for i in range(0, n_tiles):
        offs, mask = _tile_offsets(s_begin + i * BLOCK_S, c, gc_mask, C, S, BLOCK_S, CHANNELS_LAST)
        x = tl.load(X + base + offs, mask=mask, other=0.0).to(tl.float32)
        dz = tl.load(DY + base + offs, mask=mask, other=0.0).to(tl.float32)
        xhat = (x - mean) * rstd
        if SILU:
            dz = _silu_backward(dz, xhat * w + b)
        # dz is 0 on masked lanes, so they add nothing.
        acc_dz += tl.sum(dz, axis=1)
        acc_dzx += tl.sum(dz * xhat, axis=1)

    ptr = PART + (n * n_chunks_s + sc) * C + c
    tl.store(ptr, acc_dz, mask=gc_mask)
    tl.store(ptr + N * n_chunks_s * C, acc_dzx, mask=gc_mask)


@triton.autotune(configs=_APPLY_CONFIGS, key=_TUNE_KEY + ["SILU"])
@triton.heuristics({"BLOCK_S": _apply_block_s})
@triton.jit
def _gn_bwd_apply_kernel(
    X, DY, DX, W, B, MEAN, RSTD, COEF,  # COEF: fp32 (2, N*G): group sums of dz*w, dz*w*xhat
    C, S, C_PER_G, G, NG, n_cblocks, n_gblocks, inv_group_size,
    TILE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, SILU: tl.constexpr,
):
    n, g, _, cb, sb = _program_tile((S + BLOCK_S - 1) // BLOCK_S, n_cblocks, n_gblocks, BLOCK_G)
    g_mask = g < G
    ng = n * G + g
    mean = tl.load(MEAN + ng, mask=g_mask, other=0.0)[:, None, None]
    rstd = tl.load(RSTD + ng, mask=g_mask, other=0.0)[:, None, None]
    # group means of dz*w and dz*w*xhat
    c1 = (tl.load(COEF + ng, mask=g_mask, other=0.0) * inv_group_size)[:, None, None]
    c2 = (tl.load(COEF + NG + ng, mask=g_mask, other=0.0) * inv_group_size)[:, None, None]
    c, gc_mask = _group_channels(g, g_mask, cb, C_PER_G, BLOCK_C)
    w = tl.load(W + c, mask=gc_mask, other=0.0)[:, None, :]

    offs, mask = _tile_offsets(sb * BLOCK_S, c, gc_mask, C, S, BLOCK_S, CHANNELS_LAST)
    base = n.to(tl.int64) * C * S
    x = tl.load(X + base + offs, mask=mask, other=0.0).to(tl.float32)
    dz = tl.load(DY + base + offs, mask=mask, other=0.0).to(tl.float32)
    xhat = (x - mean) * rstd
    if SILU:
        b = tl.load(B + c, mask=gc_mask, other=0.0)[:, None, :]
        dz = _silu_backward(dz, xhat * w + b)
    dx = rstd * (dz * w - c1 - xhat * c2)
    tl.store(DX + base + offs, dx.to(DX.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------


def _channels_last(x):
    """Whether the kernels read x channels-last. The op (fastgen/ops/group_norm.py) hands over x
    contiguous or channels-last dense (fastgen/ops/_layout.py); where both hold (S == 1 or C == 1)
    the two memory orders are one and the contiguous kernels run."""
    if x.is_contiguous():
        return False
    assert is_channels_last_dense(x), \
        f"group_norm (triton): x must be contiguous or channels-last dense, got strides {x.stride()}"
    return True


@functools.lru_cache(maxsize=None)
def _sm_count(device_index):
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _target_programs(x):
    if x.is_cuda and not _INTERPRET:
        # Enough statistics programs for several resident per SM.
        return 8 * _sm_count(x.device.index)
    return 1  # interpreter: programs run one after another, fewer is faster


class _Plan(NamedTuple):
    N: int
    C: int
    S: int
    G: int
    cpg: int
    block_g: int
    block_c: int
    block_s: int  # statistics kernels only; the apply kernels autotune theirs
    n_gblocks: int
    n_cblocks: int
    tiles_per_chunk: int
    n_chunks_s: int

    @property
    def n_partials(self):  # statistics partials per group
        return self.n_cblocks * self.n_chunks_s

    @property
    def stats_grid(self):
        return (self.N * self.n_gblocks * self.n_cblocks * self.n_chunks_s,)

    def apply_grid(self, meta):
        n_sblocks = triton.cdiv(self.S, meta["BLOCK_S"])
        return (self.N * self.n_gblocks * self.n_cblocks * n_sblocks,)


@functools.lru_cache(maxsize=1024)
def _make_plan(shape, G, channels_last, target, tile):
    N, C = shape[0], shape[1]
    S = 1
    for d in shape[2:]:
        S *= d
    cpg = C // G
    np2 = triton.next_power_of_2
    if channels_last:
        # Channels are unit-stride: take as many of the group as fit.
        block_c = min(np2(cpg), _MAX_BLOCK_C_CL)
        block_s = min(np2(S), max(1, tile // block_c))
    else:
        # Spatial is unit-stride; lanes past cpg are wasted, so add channels
        # only when S alone cannot fill a tile.
        block_s = min(np2(S), tile)
        block_c = min(np2(cpg), max(1, tile // block_s), _MAX_BLOCK_C)
    # Pack whole groups into one tile only when a group fits in it entirely.
    block_g = 1
    if block_c >= cpg and block_s >= S:
        block_g = min(np2(G), max(1, tile // (block_c * block_s)))
    n_gblocks = triton.cdiv(G, block_g)
    n_cblocks = triton.cdiv(cpg, block_c)
    n_sblocks = triton.cdiv(S, block_s)
    # Beyond the target program count, statistics programs loop over more
    # tiles, which also keeps the number of partials per group small.
    tiles = n_cblocks * n_sblocks  # per group block
    tiles_per_chunk = max(1, (N * n_gblocks * tiles) // target, triton.cdiv(tiles, _MAX_PARTIALS))
    tiles_per_chunk = min(tiles_per_chunk, n_sblocks)
    n_chunks_s = triton.cdiv(n_sblocks, tiles_per_chunk)
    return _Plan(N, C, S, G, cpg, block_g, block_c, block_s, n_gblocks, n_cblocks,
                 tiles_per_chunk, n_chunks_s)


def _plan(x, num_groups, channels_last):
    """Sizes, tile shape and the statistics chunking shared by fwd and bwd."""
    G = int(num_groups)
    assert 2 <= x.dim() <= 5 and G > 0 and x.shape[1] % G == 0, \
        f"group_norm (triton): x of shape {tuple(x.shape)} with num_groups {G}"
    return _make_plan(tuple(x.shape), G, channels_last, _target_programs(x), _TILE)


def _check_param(name, p, C):
    assert p.dtype == torch.float32 and p.is_contiguous() and p.shape == (C,), \
        f"group_norm (triton): {name} must be a contiguous float32 ({C},) tensor"


def _check_like_x(name, t, x):
    assert t.shape == x.shape and t.stride() == x.stride(), \
        f"group_norm (triton): {name} must have x's shape and strides"


def group_norm_fwd(x, weight, bias, residual, num_groups: int, eps: float, silu: bool):
    """y = act(group_norm(x) * weight + bias) (+ residual); returns (y, mean, rstd)."""
    channels_last = _channels_last(x)
    k = _plan(x, num_groups, channels_last)
    _check_param("weight", weight, k.C)
    _check_param("bias", bias, k.C)
    has_res = residual is not None
    if has_res:
        _check_like_x("residual", residual, x)
    y = torch.empty_like(x)  # x is dense, so y gets exactly x's strides
    mean = torch.empty((k.N, k.G), device=x.device, dtype=torch.float32)
    rstd = torch.empty((k.N, k.G), device=x.device, dtype=torch.float32)
    if x.numel() == 0:
        mean.zero_()
        rstd.fill_(float(eps) ** -0.5 if eps > 0 else float("inf"))
        return y, mean, rstd
    r = residual if has_res else x  # dummy pointer when absent

    NG, P = k.N * k.G, k.n_partials
    part = torch.empty((3, NG, P), device=x.device, dtype=torch.float32)
    _gn_fwd_stats_kernel[k.stats_grid](
        x, part, k.C, k.S, k.cpg, k.G, NG, P, k.tiles_per_chunk, k.n_chunks_s,
        k.n_cblocks, k.n_gblocks,
        BLOCK_G=k.block_g, BLOCK_S=k.block_s, BLOCK_C=k.block_c, CHANNELS_LAST=channels_last,
    )
    _gn_fwd_apply_kernel[k.apply_grid](
        x, r, y, weight, bias, part, mean, rstd,
        k.C, k.S, k.cpg, k.G, NG, P, k.n_cblocks, k.n_gblocks, float(eps),
        BLOCK_G=k.block_g, BLOCK_C=k.block_c, BLOCK_P=triton.next_power_of_2(P),
        CHANNELS_LAST=channels_last, SILU=bool(silu), HAS_RES=has_res,
    )
    return y, mean, rstd


def group_norm_bwd(dy, x, weight, bias, mean, rstd, num_groups: int, silu: bool):
    """Gradients of group_norm_fwd w.r.t. x, weight and bias (the residual's is dy)."""
    channels_last = _channels_last(x)
    k = _plan(x, num_groups, channels_last)
    _check_like_x("dy", dy, x)
    _check_param("weight", weight, k.C)
    _check_param("bias", bias, k.C)
    for name, t in (("mean", mean), ("rstd", rstd)):
        assert t.dtype == torch.float32 and t.is_contiguous() and t.numel() == k.N * k.G, \
            f"group_norm (triton): {name} must be the forward's contiguous float32 ({k.N}, {k.G}) tensor"
    dx = torch.empty_like(x)  # x's strides
    if x.numel() == 0:
        dx.zero_()
        zeros = torch.zeros(k.C, device=x.device, dtype=torch.float32)
        return dx, zeros, zeros.clone()

    part = torch.empty((2, k.N, k.n_chunks_s, k.C), device=x.device, dtype=torch.float32)
    _gn_bwd_partial_kernel[k.stats_grid](
        x, dy, weight, bias, mean, rstd, part,
        k.N, k.C, k.S, k.cpg, k.G, k.tiles_per_chunk, k.n_chunks_s, k.n_cblocks, k.n_gblocks,
        BLOCK_G=k.block_g, BLOCK_S=k.block_s, BLOCK_C=k.block_c,
        CHANNELS_LAST=channels_last, SILU=bool(silu),
    )
    # sums[0][n, c] = sum_s dz, sums[1][n, c] = sum_s dz*xhat. Plain torch
    # reductions: deterministic, and tiny next to the passes over x.
    sums = part.sum(dim=2)
    # Separate tensors, not views of one: torch.library custom ops may not
    # return outputs that alias each other.
    dbias = sums[0].sum(dim=0)
    dweight = sums[1].sum(dim=0)
    # Per-group sums of dz*w and dz*w*xhat; the kernel divides by the group size.
    coef = (sums * weight).view(2, k.N, k.G, k.cpg).sum(dim=3)

    _gn_bwd_apply_kernel[k.apply_grid](
        x, dy, dx, weight, bias, mean, rstd, coef,
        k.C, k.S, k.cpg, k.G, k.N * k.G, k.n_cblocks, k.n_gblocks, 1.0 / (k.cpg * k.S),
        BLOCK_G=k.block_g, BLOCK_C=k.block_c, CHANNELS_LAST=channels_last, SILU=bool(silu),
    )
    return dx, dweight, dbias
