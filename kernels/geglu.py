"""Triton GEGLU: ``hidden * gelu(gate)`` with ``hidden, gate = x.chunk(2, -1)``.

Same contract as geglu_{fwd,bwd}_{cpu,cuda} in csrc/ops.h:

    geglu_fwd(x, approximate_tanh) -> out          out: (..., H)
    geglu_bwd(dout, x, approximate_tanh) -> dx     dx:  (..., 2H)

x is contiguous and viewed as M rows of 2H values (hidden = columns [0, H),
gate = columns [H, 2H)); dout and out are M rows of H values. The public op
(fastgen/ops/geglu.py) makes x and dout contiguous (and dout of x's dtype);
the launchers only assert it and never copy.

Tiles are 2-D, [BLOCK_M rows, BLOCK_H columns]. BLOCK_H is a power of two
chosen by the launcher to waste the fewest masked lanes on H (H = 1280 -> 256:
five full tiles per row, where 2048 would idle 37.5% of the lanes); BLOCK_M
fills the tile up to TILE elements. Each program handles one tile and reads
its hidden and gate halves once; the forward writes out once, the backward
writes both halves of dx once. H is a plain integer argument, so Triton
specialises it when divisible by 16 and the row offsets (r * 2H, r * H + H)
are then known to be aligned for vector loads.

Math is fp32: exact gelu uses tl.math.erf (libdevice erff on a GPU, accurate
in the interpreter too: max abs error 3e-8 measured there); the tanh form is
computed as g * sigmoid(2u) through e = exp(-|2u|) <= 1, which neither
overflows nor cancels (see csrc/cpu/geglu.cpp).

On a GPU the tile size and warps are autotuned per (H, BLOCK_H). Under
TRITON_INTERPRET=1 autotuning would run every config, so one fixed large tile
is used: the interpreter pays per program and per op, hardly per element.
"""

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Globals read inside @triton.jit functions must be constexpr on a GPU (the
# interpreter would accept plain floats).
_SQRT1_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
_TWO_BETA = tl.constexpr(2.0 * 0.7978845608028654)  # 2 * sqrt(2 / pi)
_KAPPA = tl.constexpr(0.044715)

if _INTERPRET:
    _CONFIGS = [triton.Config({"TILE": 65536}, num_warps=4)]
else:
    _CONFIGS = [
        triton.Config({"TILE": 1024}, num_warps=4),
        triton.Config({"TILE": 2048}, num_warps=4),
        triton.Config({"TILE": 4096}, num_warps=8),
        triton.Config({"TILE": 8192}, num_warps=8),
    ]

_KEY = ["H", "BLOCK_H", "APPROX_TANH"]


def _block_m(args):
    return max(1, min(triton.next_power_of_2(args["M"]), args["TILE"] // args["BLOCK_H"]))


def _grid(meta):
    return (triton.cdiv(meta["M"], meta["BLOCK_M"]), triton.cdiv(meta["H"], meta["BLOCK_H"]))


@triton.jit
def _tile(M, H, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
    """(rows, cols, mask) of this program's tile, broadcastable to
    [BLOCK_M, BLOCK_H]; rows are int64 since M * 2H may exceed 2**31."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (rows < M)[:, None] & (cols < H)[None, :]
    return rows.to(tl.int64)[:, None], cols[None, :], mask


@triton.jit
def _load_halves(X, rows, cols, mask, H):
    """(hidden, gate) of the tile in fp32, and the offsets in x of its hidden
    half (the gate's are + H)."""
    x_offs = rows * (2 * H) + cols
    h = tl.load(X + x_offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(X + x_offs + H, mask=mask, other=0.0).to(tl.float32)
    return h, g, x_offs


@triton.autotune(configs=_CONFIGS, key=_KEY)
@triton.heuristics({"BLOCK_M": _block_m})
@triton.jit
def _geglu_fwd_kernel(
    X, OUT, M, H,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, APPROX_TANH: tl.constexpr,
):
    rows, cols, mask = _tile(M, H, BLOCK_M, BLOCK_H)
    h, g, _ = _load_halves(X, rows, cols, mask, H)
    if APPROX_TANH:
        two_u = _TWO_BETA * g * (1.0 + _KAPPA * g * g)
        e = tl.exp(-tl.abs(two_u))
        r = 1.0 / (1.0 + e)
        gelu = g * tl.where(two_u >= 0, r, e * r)
    else:
        gelu = g * (0.5 + 0.5 * tl.math.erf(g * _SQRT1_2))
    out = h * gelu
    tl.store(OUT + rows * H + cols, out.to(OUT.dtype.element_ty), mask=mask)


@triton.autotune(configs=_CONFIGS, key=_KEY)
@triton.heuristics({"BLOCK_M": _block_m})
@triton.jit
def _geglu_bwd_kernel(
    DOUT, X, DX, M, H,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, APPROX_TANH: tl.constexpr,
):
    rows, cols, mask = _tile(M, H, BLOCK_M, BLOCK_H)
    d = tl.load(DOUT + rows * H + cols, mask=mask, other=0.0).to(tl.float32)
    h, g, x_offs = _load_halves(X, rows, cols, mask, H)
    if APPROX_TANH:
        g2 = g * g
        two_u = _TWO_BETA * g * (1.0 + _KAPPA * g2)
        e = tl.exp(-tl.abs(two_u))
        r = 1.0 / (1.0 + e)  # sigmoid(|2u|)
        er = e * r  # 1 - sigmoid(|2u|)
        sig = tl.where(two_u >= 0, r, er)
        gelu = g * sig
        dgelu = sig + g * (r * er) * (_TWO_BETA * (1.0 + 3.0 * _KAPPA * g2))
    else:
        cdf = 0.5 + 0.5 * tl.math.erf(g * _SQRT1_2)
        gelu = g * cdf
        dgelu = cdf + g * _INV_SQRT_2PI * tl.exp(-0.5 * g * g)
    dty = DX.dtype.element_ty
    tl.store(DX + x_offs, (d * gelu).to(dty), mask=mask)
    tl.store(DX + x_offs + H, (d * h * dgelu).to(dty), mask=mask)


def _block_h(H: int) -> int:
    """The power of two in [16, 1024] with the fewest masked lanes over H (ties: larger)."""
    best, best_cost = 16, None
    b = 16
    while b <= 1024:
        cost = triton.cdiv(H, b) * b
        if best_cost is None or cost <= best_cost:
            best, best_cost = b, cost
        b *= 2
    return best


def _rows(x: torch.Tensor) -> tuple[int, int]:
    H = x.shape[-1] // 2
    return (x.numel() // (2 * H) if H else 0), H


def geglu_fwd(x: torch.Tensor, approximate_tanh: bool) -> torch.Tensor:
    """out = hidden * gelu(gate) for contiguous x of shape (..., 2H)."""
    assert x.is_contiguous() and x.dim() >= 1 and x.shape[-1] % 2 == 0, \
        f"geglu (triton): x must be contiguous (..., 2H), got shape {tuple(x.shape)}, strides {x.stride()}"
    out = torch.empty((*x.shape[:-1], x.shape[-1] // 2), device=x.device, dtype=x.dtype)
    M, H = _rows(x)
    if out.numel() == 0:
        return out
    _geglu_fwd_kernel[_grid](x, out, M, H, BLOCK_H=_block_h(H), APPROX_TANH=bool(approximate_tanh))
    return out


def geglu_bwd(dout: torch.Tensor, x: torch.Tensor, approximate_tanh: bool) -> torch.Tensor:
    """dx = [dout * gelu(gate), dout * hidden * gelu'(gate)] for contiguous dout, x."""
    assert x.is_contiguous() and x.dim() >= 1 and x.shape[-1] % 2 == 0, \
        f"geglu (triton): x must be contiguous (..., 2H), got shape {tuple(x.shape)}, strides {x.stride()}"
    half = (*x.shape[:-1], x.shape[-1] // 2)
    assert dout.is_contiguous() and dout.dtype == x.dtype and dout.shape == half, \
        f"geglu (triton): dout must be contiguous, of x's dtype and shape (..., H), got {dout.dtype} {tuple(dout.shape)}"
    dx = torch.empty_like(x)
    M, H = _rows(x)
    if dx.numel() == 0:
        return dx
    _geglu_bwd_kernel[_grid](dout, x, dx, M, H, BLOCK_H=_block_h(H), APPROX_TANH=bool(approximate_tanh))
    return dx
