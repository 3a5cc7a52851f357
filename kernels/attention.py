"""Triton attention, FlashAttention-2 style: softmax(q k^T * scale) v without
ever materialising the Nq x Nk score matrix.

Same contract as attention_{fwd,bwd}_{cpu,cuda} in csrc/ops.h:

    attention_fwd(q, k, v, scale) -> (o, lse)
    attention_bwd(do, q, k, v, o, lse, scale) -> (dq, dk, dv)

q, o, do: (B, H, Nq, D); k, v: (B, H, Nk, D); all contiguous, one dtype
(fp32 / fp16 / bf16): the public op (fastgen/ops/attention.py) guarantees it
and the launchers only assert it, never copy. lse is the fp32 (B, H, Nq) natural-log log-sum-exp of
the scaled scores. Any Nq, Nk >= 1 (tails are masked); Nk = 0 gives o = 0 and
lse = -inf rather than NaN.

Head dim
  A tile spans BLOCK_D = next_power_of_2(D) columns of d (tl.arange needs a
  power of two), masked to the real D, so D = 40, 80, 160 waste 37.5% of the
  d-lanes; the CUDA kernel in csrc/cuda handles those without padding. Tiles
  never get wider than 256 along d (128 for fp32, whose 3xTF32 dots need about
  twice the shared memory): for a larger D (512, the VAE's single-head
  mid-block attention) the d axis is cut into D_CHUNKS slices of BLOCK_D. Dot
  products over d (q k^T, do v^T) loop over the slices, and the output's d
  slices go to separate programs (grid axis 2), each keeping only a
  [rows, BLOCK_D] fp32 accumulator. Every such program recomputes the scores,
  so D = 512 costs ~1.5-1.7x the FLOPs of an unsplit kernel, in exchange for a
  register footprint no larger than D = 256. For one slice the slice loops
  disappear at compile time. The one combination left out is the fp32
  backward with D > 256 on a GPU: even 32 x 32 tiles need ~270 KiB of shared
  memory there, so attention_bwd raises NotImplementedError and the caller
  should fall back (the fp32 forward and every fp16/bf16 case are supported).

forward (_attn_fwd_kernel), grid (cdiv(Nq, BLOCK_M), B*H, D_CHUNKS)
  One program owns BLOCK_M query rows and streams over the keys in blocks of
  BLOCK_N with the online softmax: running max m and running sum l in fp32,
  rescaling the fp32 accumulator whenever m grows. The exponentials are exp2
  with scale * log2(e) folded into one multiply, exp2((s - m) * scale*log2(e)),
  where s are the raw dot products and m is kept on raw scores too (the
  launcher makes scale positive). lse = scale * m + ln(l) is stored in
  natural log.

backward
  1. _attn_bwd_delta_kernel: delta = rowsum(do * o) in fp32, per query row.
  2. _attn_bwd_dkdv_kernel, grid (cdiv(Nk, BLOCK_N), B*H, D_CHUNKS): one
     program owns BLOCK_N keys, streams over the queries and rebuilds
     P^T = exp2((scale * k q^T - lse) * log2(e)) from the saved lse, then
     dv += P^T do, dP^T = v do^T, dS^T = P^T (dP^T - delta), dk += dS^T q.
  3. _attn_bwd_dq_kernel, grid (cdiv(Nq, BLOCK_M), B*H, D_CHUNKS): one program
     owns BLOCK_M queries, streams over the keys and accumulates dq += dS k.
     Recomputing P and dP here instead of atomically adding dq from step 2
     costs two more dots per tile but is deterministic and needs no fp32 dq
     scratch.
  All accumulators are fp32; P and dS are cast to the input dtype only as
  tensor-core operands, as in FlashAttention-2.

Masking
  Query rows >= Nq and key rows >= Nk are loaded as zeros. Out-of-range keys
  get score -inf in the forward (so they add nothing to the softmax) and P = 0
  in the dq kernel; out-of-range queries get lse = +inf in the dk/dv kernel
  (so their P^T is exactly 0). The -inf masking cannot make NaN: the running
  max used for the exponent is replaced by 0 while it is still -inf, and a row
  whose sum stays 0 is divided by 1.

Large logits (scale * |q.k| ~ 1e4)
  Scores are scaled in fp32 after the dot, never by pre-scaling q in fp16, so
  nothing overflows. Subtracting the max before scaling rounds the exponents
  that matter once, at a small magnitude, instead of twice at ~1e4 (where an
  fp32 ulp is ~1e-3). The backward works in natural-log units so that
  scale * s is rounded exactly as the forward rounded scale * m for lse: a
  one-hot row recomputes P = 1 exactly. What remains is the fp32 rounding of
  the stored lse itself (~ulp(|lse|) relative error in P), inherent to the
  contract, and in fp16 the usual FlashAttention-2 error of delta computed
  from the rounded o (torch's fp16 SDPA backward has the same).

Tuning
  On a GPU every kernel is autotuned over BLOCK_M in {64, 128}, BLOCK_N in
  {32, 64, 128}, num_warps in {4, 8} and num_stages in {2, 3, 4}, keyed on
  (Nq, Nk, D bucket); a sliced head dim uses its own smaller set (BLOCK_M in
  {32, 64}, BLOCK_N = 32, num_stages in {1, 2}). Configs whose estimated
  shared memory exceeds the device's limit (Ampere ~163 KiB, Hopper ~227 KiB)
  or whose register tiles would spill heavily are pruned first. Under
  TRITON_INTERPRET=1 autotuning would run every config, so one fixed config
  is used there.

fp32 inputs use 3xTF32 dots (input_precision="tf32x3": each operand split
into a TF32 high and low part, three tensor-core products). Triton's default
for fp32, plain TF32, has ~1e-3 relative error, which would defeat the point
of an fp32 path; exact "ieee" dots run on FMA units, spill heavily at these
tile sizes and take minutes to compile per config. 3xTF32 products are
accurate to ~1e-6 relative (only the low x low term is dropped).
"""

import math
import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Widest tile along the head dim, by element size; larger D is split into
# slices (see above).
_MAX_BLOCK_D = {2: 256, 4: 128}

_LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): exp(x) == exp2(x * log2(e))
_LN2 = tl.constexpr(0.6931471805599453)  # ln(2): converts log2 back to natural log

if _INTERPRET:
    # The interpreter pays per program and per op, hardly per element, so
    # the tiles are as large as possible while typical test sizes (77, 333)
    # still span several blocks, which exercises the online-softmax rescaling
    # and the masked tails. 64 x 64 runs ~3x faster than 32 x 32.
    _CONFIGS = [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=1)]
    _SLICED_D_CONFIGS = []
else:
    _CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=nw, num_stages=ns)
        for bm in (64, 128)
        for bn in (32, 64, 128)
        for nw in (4, 8)
        for ns in (2, 3, 4)
    ]
    # A sliced head dim (D_CHUNKS > 1) streams several d slices per tile, so
    # even the smallest config above needs more shared memory than an A100
    # has (the dk/dv kernel: ~260 KiB at 64 x 32, 2 stages, D = 512). These
    # smaller / shallower configs are used instead, and only there.
    _SLICED_D_CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": 32}, num_warps=nw, num_stages=ns)
        for bm in (32, 64)
        for nw in (4, 8)
        for ns in (1, 2)
    ]
_SLICED_D_IDS = {id(c) for c in _SLICED_D_CONFIGS}

# D bucket = (BLOCK_D, D_CHUNKS), i.e. next_power_of_2(D): head dims sharing a
# padded tile width share a tuned config. Triton adds the tensor dtypes itself.
_TUNE_KEY = ["Nq", "Nk", "BLOCK_D", "D_CHUNKS"]


# ----------------------------------------------------------------------------
# Config pruning (GPU only; the interpreter has a single config)
#
# The footprint models below were calibrated against Triton 3.9 compiles
# (ptxas -v) for sm80 and sm90 at fp16/bf16: the shared-memory estimates land
# within ~20% of the real allocation, and configs whose register tiles come
# to more than _MAX_TILE_REGS per thread were exactly the ones that spilled.
# fp32 (3xTF32) compiles need up to ~1.3x the estimate, so it is scaled up
# for them. The models only save tuning time: a config that still does not
# fit fails to compile and the autotuner skips it.
# ----------------------------------------------------------------------------

_MAX_TILE_REGS = 192


def _device_limits(device):
    """(max shared memory per block in bytes, is Hopper or newer)."""
    try:
        idx = device.index if device.index is not None else torch.cuda.current_device()
        smem = triton.runtime.driver.active.utils.get_device_properties(idx)["max_shared_mem"]
        return smem, torch.cuda.get_device_capability(idx)[0] >= 9
    except Exception:  # unknown driver: assume the smaller of the targets (A100)
        return 163 * 1024, False


def _make_prune(footprint):
    """Build an early_config_prune hook from a footprint(bm, bn, bd, chunks,
    esize, ns, hopper) -> (shared-memory bytes, 32-bit registers of tiles)."""

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        q = args["Q"]
        bd, chunks = args["BLOCK_D"], args["D_CHUNKS"]
        smem_limit, hopper = _device_limits(q.device)
        kept, costs = [], []
        for cfg in configs:
            if (id(cfg) in _SLICED_D_IDS) != (chunks > 1):
                continue
            bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
            smem, regs = footprint(bm, bn, bd, chunks, q.element_size(), cfg.num_stages, hopper)
            if q.element_size() == 4:
                smem *= 1.3  # 3xTF32 stages extra operand copies
            regs_per_thread = regs / (32 * cfg.num_warps)
            costs.append((smem + 1024 * regs_per_thread, cfg))
            if smem <= smem_limit and regs_per_thread <= _MAX_TILE_REGS:
                kept.append(cfg)
        # The autotuner needs at least one config; fall back to the leanest.
        return kept or [min(costs, key=lambda c: c[0])[1]]

    return prune


# Shared memory = (pipeline depth) x (tiles streamed per loop iteration) +
# tiles kept resident as dot operands. On Hopper the forward and dq loads are
# buffered num_stages deep, elsewhere num_stages - 1 (as observed in the
# compiles above); with d slices (chunks > 1) every slice is streamed.
# Registers = fp32 accumulators + resident operands + score tiles.


def _fwd_footprint(bm, bn, bd, chunks, es, ns, hopper):
    depth = max(ns if hopper else ns - 1, 1)
    streamed = (chunks * bn + (chunks - 1) * bm + bn) * bd  # k slices, extra q slices, v
    smem = (depth * streamed + bm * bd + bm * bn) * es
    regs = bm * bd + bm * bd * es / 4 + bm * bn  # acc, q, s
    return smem, regs


def _dkdv_footprint(bm, bn, bd, chunks, es, ns, hopper):
    depth = max(ns - 1, 1)
    extra = 2 * bm if chunks > 1 else 0  # the q, do slices of this program's output
    streamed = (2 * chunks * bm + extra + 2 * (chunks - 1) * bn) * bd
    smem = (depth * streamed + 2 * bn * bd + bm * bn) * es
    regs = 2 * bn * bd + 2 * bn * bd * es / 4 + 2 * bm * bn  # dk, dv, k, v, p, dp
    return smem, regs


def _dq_footprint(bm, bn, bd, chunks, es, ns, hopper):
    depth = max(ns if hopper else ns - 1, 1)
    extra = bn if chunks > 1 else 0  # the k slice of this program's output
    streamed = (2 * chunks * bn + extra + 2 * (chunks - 1) * bm) * bd
    smem = (depth * streamed + 2 * bm * bd + bm * bn) * es
    regs = bm * bd + 2 * bm * bd * es / 4 + 2 * bm * bn  # dq, q, do, p, dp
    return smem, regs


def _even_n(args):
    # No key tail: the per-tile score masking is compiled out (self-attention
    # at 64x64 / 32x32 latents has Nk = 4096 / 1024).
    return args["Nk"] % args["BLOCK_N"] == 0


# ----------------------------------------------------------------------------
# Shared helpers. Compiled, they are inlined. Under the interpreter each call
# costs ~0.3 ms (it re-patches triton.language), about a fifth of these
# kernels' interpreted run time: the price of defining each piece once.
# ----------------------------------------------------------------------------


@triton.jit
def _d_slices(dc, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
    """(offs_d, d_ok, offs_dc, dc_ok): the columns of the first head-dim slice,
    where dot products over d start, and of slice dc, the one this program
    writes, each masked to the real D."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_dc = dc * BLOCK_D + offs_d
    return offs_d, offs_d < HEAD_DIM, offs_dc, offs_dc < HEAD_DIM


@triton.jit
def _at_head(bh, Q, DO, K, V, LSE, DELTA, Nq, Nk, HEAD_DIM: tl.constexpr):
    """The backward kernels' inputs, moved to head bh."""
    return (Q + bh * Nq * HEAD_DIM, DO + bh * Nq * HEAD_DIM, K + bh * Nk * HEAD_DIM,
            V + bh * Nk * HEAD_DIM, LSE + bh * Nq, DELTA + bh * Nq)


@triton.jit
def _load_pair(a_ptrs, b_ptrs, rows_ok, cols_ok):
    """The tiles at a_ptrs and b_ptrs (same shape), zero outside rows_ok x cols_ok."""
    mask = rows_ok[:, None] & cols_ok[None, :]
    return tl.load(a_ptrs, mask=mask, other=0.0), tl.load(b_ptrs, mask=mask, other=0.0)


@triton.jit
def _dot_nt(a0, b0, a_ptrs, b_ptrs, a_ok, b_ok, offs_d, HEAD_DIM: tl.constexpr,
            BLOCK_D: tl.constexpr, D_CHUNKS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """a @ b^T over the whole head dim, for the row tiles at a_ptrs, b_ptrs
    (rows a_ok, b_ok) whose first d slices a0, b0 the caller already holds.

    Only the first slice of each operand stays in registers across the
    caller's loop; later slices (D wider than one tile) are re-read from
    L1/L2 here to bound the register footprint. For D_CHUNKS == 1 the loop
    disappears at compile time."""
    acc = tl.dot(a0, tl.trans(b0), input_precision=DOT_PRECISION)
    for c in tl.static_range(1, D_CHUNKS):
        d_ok = (c * BLOCK_D + offs_d) < HEAD_DIM
        a = tl.load(a_ptrs + c * BLOCK_D, mask=a_ok[:, None] & d_ok[None, :], other=0.0)
        b = tl.load(b_ptrs + c * BLOCK_D, mask=b_ok[:, None] & d_ok[None, :], other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PRECISION)
    return acc


# ----------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------


@triton.autotune(configs=_CONFIGS + _SLICED_D_CONFIGS, key=_TUNE_KEY,
                 prune_configs_by={"early_config_prune": _make_prune(_fwd_footprint)})
@triton.heuristics({"EVEN_N": _even_n})
@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE,
    Nq, Nk, scale, qk_scale,  # scale > 0 here; qk_scale = scale * log2(e)
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, D_CHUNKS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # int64: B*H*N*D may exceed 2**31
    dc = tl.program_id(2)  # which BLOCK_D-wide slice of o this program writes
    Q += bh * Nq * HEAD_DIM
    O += bh * Nq * HEAD_DIM
    K += bh * Nk * HEAD_DIM
    V += bh * Nk * HEAD_DIM
    LSE += bh * Nq

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d, d_ok, offs_dv, dv_ok = _d_slices(dc, BLOCK_D, HEAD_DIM)
    m_ok = offs_m < Nq

    q_ptrs = Q + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    q0 = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)

    # Pointers are advanced by one block per iteration rather than rebuilt
    # from indices: fewer integer ops, which the interpreter pays dearly for.
    k_ptrs = K + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    v_ptrs = V + offs_n[:, None] * HEAD_DIM + offs_dv[None, :]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, Nk, BLOCK_N):
        n_ok = offs_n < Nk - start_n
        k0 = tl.load(k_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        # Raw (unscaled) scores; the running max m_i is kept on them too.
        s = _dot_nt(q0, k0, q_ptrs, k_ptrs, m_ok, n_ok, offs_d,
                    HEAD_DIM, BLOCK_D, D_CHUNKS, DOT_PRECISION)
        if not EVEN_N:
            s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # While a row has seen only masked keys its max is -inf, and
        # -inf - -inf would be NaN; subtracting 0 instead gives exp2(-inf) = 0.
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        # Subtract, then scale: near the max, s - m is exact, so the exponents
        # that matter are rounded once at a small magnitude, not twice at
        # |scale * s| (~1e4 for large logits, where an fp32 ulp is ~1e-3).
        # Scaling after the dot, in fp32, also means q is never pre-scaled in
        # fp16, which could overflow.
        p = tl.exp2((s - m_sub[:, None]) * qk_scale)
        alpha = tl.exp2((m_i - m_sub) * qk_scale)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptrs, mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
        k_ptrs += BLOCK_N * HEAD_DIM
        v_ptrs += BLOCK_N * HEAD_DIM

    # l_i == 0 only for a row that saw no key at all (Nk == 0): o = 0, lse = -inf.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    tl.store(O + offs_m[:, None] * HEAD_DIM + offs_dv[None, :], o.to(O.dtype.element_ty),
             mask=m_ok[:, None] & dv_ok[None, :])
    if dc == 0:
        # scale * m_i is rounded exactly as the backward rounds scale * s, so a
        # one-hot row (l_i == 1) recomputes P = exp(scale * s - lse) = 1 exactly.
        tl.store(LSE + offs_m, m_i * scale + tl.log2(l_i) * _LN2, mask=m_ok)


# ----------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------


@triton.jit
def _attn_bwd_delta_kernel(
    O, DO, DELTA, Nq,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, D_CHUNKS: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    # delta_i = sum_j P_ij dP_ij = do_i . o_i: the softmax-backward term that
    # would otherwise need a full row of P.
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Nq
    base = bh * Nq * HEAD_DIM + offs_m[:, None] * HEAD_DIM
    delta = tl.zeros([BLOCK_M], dtype=tl.float32)
    for c in tl.static_range(D_CHUNKS):
        d = c * BLOCK_D + offs_d
        mask = m_ok[:, None] & (d < HEAD_DIM)[None, :]
        o = tl.load(O + base + d[None, :], mask=mask, other=0.0).to(tl.float32)
        do = tl.load(DO + base + d[None, :], mask=mask, other=0.0).to(tl.float32)
        delta += tl.sum(o * do, 1)
    tl.store(DELTA + bh * Nq + offs_m, delta, mask=m_ok)


@triton.autotune(configs=_CONFIGS + _SLICED_D_CONFIGS, key=_TUNE_KEY,
                 prune_configs_by={"early_config_prune": _make_prune(_dkdv_footprint)})
@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    Nq, Nk, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, D_CHUNKS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    dc = tl.program_id(2)  # which BLOCK_D-wide slice of dk, dv this program writes
    Q, DO, K, V, LSE, DELTA = _at_head(bh, Q, DO, K, V, LSE, DELTA, Nq, Nk, HEAD_DIM)
    DK += bh * Nk * HEAD_DIM
    DV += bh * Nk * HEAD_DIM

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d, d_ok, offs_dc, dc_ok = _d_slices(dc, BLOCK_D, HEAD_DIM)
    n_ok = offs_n < Nk

    # Key rows >= Nk are zeros; their P^T may be anything, but each key row of
    # dk/dv only sums over queries, so it cannot leak into stored rows.
    k_ptrs = K + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    v_ptrs = V + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    k0, v0 = _load_pair(k_ptrs, v_ptrs, n_ok, d_ok)

    q_ptrs = Q + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    do_ptrs = DO + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, Nq, BLOCK_M):
        m_ok = offs_m < Nq - start_m
        q0, do0 = _load_pair(q_ptrs, do_ptrs, m_ok, d_ok)
        # lse = +inf for query rows >= Nq makes their P^T exactly 0.
        lse = tl.load(LSE + offs_m, mask=m_ok, other=float("inf"))
        delta = tl.load(DELTA + offs_m, mask=m_ok, other=0.0)

        s_t = _dot_nt(k0, q0, k_ptrs, q_ptrs, n_ok, m_ok, offs_d,
                      HEAD_DIM, BLOCK_D, D_CHUNKS, DOT_PRECISION)
        # Natural-log units here, matching how the forward rounded lse.
        p_t = tl.exp2((s_t * scale - lse[None, :]) * _LOG2E)
        if D_CHUNKS == 1:
            q_c = q0
            do_c = do0
        else:
            q_c, do_c = _load_pair(q_ptrs + dc * BLOCK_D, do_ptrs + dc * BLOCK_D, m_ok, dc_ok)
        dv = tl.dot(p_t.to(do_c.dtype), do_c, dv, input_precision=DOT_PRECISION)
        dp_t = _dot_nt(v0, do0, v_ptrs, do_ptrs, n_ok, m_ok, offs_d,
                       HEAD_DIM, BLOCK_D, D_CHUNKS, DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q_c.dtype), q_c, dk, input_precision=DOT_PRECISION)
        q_ptrs += BLOCK_M * HEAD_DIM
        do_ptrs += BLOCK_M * HEAD_DIM
        LSE += BLOCK_M
        DELTA += BLOCK_M

    # ds is the gradient w.r.t. the scaled scores; d(scale * q.k)/dk = scale * q.
    dk *= scale
    out = offs_n[:, None] * HEAD_DIM + offs_dc[None, :]
    mask = n_ok[:, None] & dc_ok[None, :]
    tl.store(DK + out, dk.to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=mask)


@triton.autotune(configs=_CONFIGS + _SLICED_D_CONFIGS, key=_TUNE_KEY,
                 prune_configs_by={"early_config_prune": _make_prune(_dq_footprint)})
@triton.heuristics({"EVEN_N": _even_n})
@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    Nq, Nk, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, D_CHUNKS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    dc = tl.program_id(2)  # which BLOCK_D-wide slice of dq this program writes
    Q, DO, K, V, LSE, DELTA = _at_head(bh, Q, DO, K, V, LSE, DELTA, Nq, Nk, HEAD_DIM)
    DQ += bh * Nq * HEAD_DIM

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d, d_ok, offs_dc, dc_ok = _d_slices(dc, BLOCK_D, HEAD_DIM)
    m_ok = offs_m < Nq

    q_ptrs = Q + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    do_ptrs = DO + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    q0, do0 = _load_pair(q_ptrs, do_ptrs, m_ok, d_ok)
    # Query rows >= Nq are never stored; lse = 0 just keeps them finite.
    lse = tl.load(LSE + offs_m, mask=m_ok, other=0.0)
    delta = tl.load(DELTA + offs_m, mask=m_ok, other=0.0)

    k_ptrs = K + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    v_ptrs = V + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, Nk, BLOCK_N):
        n_ok = offs_n < Nk - start_n
        k0, v0 = _load_pair(k_ptrs, v_ptrs, n_ok, d_ok)

        s = _dot_nt(q0, k0, q_ptrs, k_ptrs, m_ok, n_ok, offs_d,
                    HEAD_DIM, BLOCK_D, D_CHUNKS, DOT_PRECISION)
        p = tl.exp2((s * scale - lse[:, None]) * _LOG2E)
        if not EVEN_N:
            # A zero key row scores 0, and exp2(0 - lse) overflows when the real
            # scores are very negative; inf * 0 in the dot below would be NaN.
            p = tl.where(n_ok[None, :], p, 0.0)
        dp = _dot_nt(do0, v0, do_ptrs, v_ptrs, m_ok, n_ok, offs_d,
                     HEAD_DIM, BLOCK_D, D_CHUNKS, DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        if D_CHUNKS == 1:
            k_c = k0
        else:
            k_c = tl.load(k_ptrs + dc * BLOCK_D, mask=n_ok[:, None] & dc_ok[None, :], other=0.0)
        dq = tl.dot(ds.to(k_c.dtype), k_c, dq, input_precision=DOT_PRECISION)
        k_ptrs += BLOCK_N * HEAD_DIM
        v_ptrs += BLOCK_N * HEAD_DIM

    dq *= scale
    tl.store(DQ + offs_m[:, None] * HEAD_DIM + offs_dc[None, :], dq.to(DQ.dtype.element_ty),
             mask=m_ok[:, None] & dc_ok[None, :])


# ----------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Rows per program of the elementwise delta kernel; the interpreter pays per
# program, not per element, so it gets bigger tiles.
_DELTA_BLOCK_M = 128 if _INTERPRET else 64


def _d_tiling(D, dtype):
    """(BLOCK_D, D_CHUNKS): the padded head dim as slices of at most _MAX_BLOCK_D."""
    padded = triton.next_power_of_2(D)
    block_d = min(padded, _MAX_BLOCK_D[dtype.itemsize])
    return block_d, padded // block_d


def _grid(rows, block, bh, d_chunks):
    """Grid of a kernel whose programs each own meta[block] of the rows, for
    every head and every d slice of the output."""
    return lambda meta: (triton.cdiv(rows, meta[block]), bh, d_chunks)


def _dot_precision(dtype):
    # Only meaningful for fp32 operands (see the module docstring); fp16/bf16
    # dots are exact products with fp32 accumulation either way.
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _check(q, k, v):
    # Preconditions the public op (fastgen/ops/attention.py) guarantees; asserted, never fixed here.
    assert q.dim() == 4 and k.dim() == 4 and v.dim() == 4, "attention (triton): q, k, v must be 4-D (B, H, N, D)"
    assert q.dtype in _DTYPES and k.dtype == q.dtype and v.dtype == q.dtype, \
        f"attention (triton): q, k, v must share one float dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
    assert q.is_contiguous() and k.is_contiguous() and v.is_contiguous(), \
        "attention (triton): q, k, v must be contiguous"
    B, H, _, D = q.shape
    assert k.shape[:2] == (B, H) and k.shape[3] == D and v.shape == k.shape, \
        f"attention (triton): shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if B * H > 65535:  # a limit of this kernel's grid, not an input error
        raise NotImplementedError(f"Triton attention: B*H = {B * H} exceeds the grid's y limit (65535); "
                                  "use another backend")


def attention_fwd(q, k, v, scale: float):
    """o = softmax(q k^T * scale) v; returns (o, lse), lse fp32 (B, H, Nq), natural log."""
    _check(q, k, v)
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    o = torch.empty_like(q)
    lse = torch.empty((B, H, Nq), device=q.device, dtype=torch.float32)
    if o.numel() == 0:
        return o, lse
    if Nk == 0:  # softmax over nothing: define it as 0 rather than NaN
        return o.zero_(), lse.fill_(float("-inf"))
    block_d, d_chunks = _d_tiling(D, q.dtype)
    scale = float(scale)
    # The kernel keeps its running max on unscaled scores, which needs
    # scale > 0: softmax(q k^T * scale) == softmax(q (-k)^T * -scale), and
    # scale == 0 (a plain average) is matched by the smallest normal-ish scale.
    if scale < 0:
        k, scale = -k, -scale
    scale = max(scale, 1e-30)

    _attn_fwd_kernel[_grid(Nq, "BLOCK_M", B * H, d_chunks)](
        q, k, v, o, lse, Nq, Nk, scale, scale * math.log2(math.e),
        HEAD_DIM=D, BLOCK_D=block_d, D_CHUNKS=d_chunks,
        DOT_PRECISION=_dot_precision(q.dtype),
    )
    return o, lse


def attention_bwd(do, q, k, v, o, lse, scale: float):
    """Gradients of attention_fwd w.r.t. q, k, v, given do = dL/do."""
    _check(q, k, v)
    assert do.shape == q.shape and o.shape == q.shape and do.dtype == q.dtype and o.dtype == q.dtype, \
        f"attention (triton): do {tuple(do.shape)} {do.dtype} and o {tuple(o.shape)} {o.dtype} must match q"
    assert do.is_contiguous() and o.is_contiguous(), "attention (triton): do and o must be contiguous"
    assert lse.dtype == torch.float32 and lse.is_contiguous() and lse.shape == q.shape[:3], \
        "attention (triton): lse must be the forward's contiguous float32 (B, H, Nq) tensor"
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    if Nq == 0 or Nk == 0 or B * H * D == 0:  # empty sums: all gradients are 0
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if q.dtype == torch.float32 and D > 256 and not _INTERPRET:
        # No config fits in shared memory (see the module docstring); failing
        # here beats an out-of-resources error after a full autotuning sweep.
        raise NotImplementedError(
            "Triton attention backward: fp32 with head dim > 256 is not supported on GPU; "
            "use fp16/bf16 or another backend")
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    block_d, d_chunks = _d_tiling(D, q.dtype)
    precision = _dot_precision(q.dtype)

    delta = torch.empty((B, H, Nq), device=q.device, dtype=torch.float32)
    _attn_bwd_delta_kernel[(triton.cdiv(Nq, _DELTA_BLOCK_M), B * H)](
        o, do, delta, Nq,
        HEAD_DIM=D, BLOCK_D=block_d, D_CHUNKS=d_chunks, BLOCK_M=_DELTA_BLOCK_M,
    )

    _attn_bwd_dkdv_kernel[_grid(Nk, "BLOCK_N", B * H, d_chunks)](
        q, k, v, do, lse, delta, dk, dv, Nq, Nk, float(scale),
        HEAD_DIM=D, BLOCK_D=block_d, D_CHUNKS=d_chunks, DOT_PRECISION=precision,
    )

    _attn_bwd_dq_kernel[_grid(Nq, "BLOCK_M", B * H, d_chunks)](
        q, k, v, do, lse, delta, dq, Nq, Nk, float(scale),
        HEAD_DIM=D, BLOCK_D=block_d, D_CHUNKS=d_chunks, DOT_PRECISION=precision,
    )
    return dq, dk, dv
