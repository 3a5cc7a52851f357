"""Triton VAE output post-processing: ``clamp(x * 0.5 + 0.5, 0, 1)``, optionally a uint8 NHWC image.

Same contract as vae_postprocess_{fwd,bwd}_{cpu,cuda} in csrc/ops.h and as the torch reference
``_reference_fwd`` / ``_reference_bwd`` in fastgen/ops/vae_postprocess.py:

    vae_postprocess_fwd(x, to_uint8) -> y (x's dtype and strides) or img (contiguous (B, H, W, C) uint8)
    vae_postprocess_bwd(dy, x) -> dx = 0.5 * dy where 0 <= x * 0.5 + 0.5 <= 1, else 0

x is (B, C, H, W), contiguous or channels-last dense; dy has x's strides. The public op arranges both; the
launchers only assert it and never copy.

Kernels: y, dx and the image of a channels-last x (or of C == 1 or H * W == 1, where both orders coincide)
are linear walks over memory, BLOCK elements a program. The image of a channels-first x is the NCHW ->
NHWC transpose: a program takes BLOCK_P pixels of one image and all its channels as a [BLOCK_P, BLOCK_C]
tile, loads it along pixels (coalesced per channel plane) and stores it along (pixel, channel), which is
contiguous in the image.

Rounding: ``y * 255`` is one rounded fp32 multiply, then round half to even (numpy's ``.round()``) written
out with integer ops: i = trunc(t) (t >= 0), d = t - i (exact), round up when d > 0.5 or d == 0.5 and i is
odd. Multiply-adds are not fused (``enable_fp_fusion=False``): ``t - i`` contracted with the multiply into
an FMA would see the unrounded product and break the ties. NaN gives 0 in the image and passes through y.

Interpreter (TRITON_INTERPRET=1): its fp32 -> bf16 cast truncates, so bf16 y is rounded to nearest even
with integer ops first (ROUND_BF16, kernels/sampling.py's ``_rne_bf16``). The interpreter pays per program,
not per element, so it gets big blocks.
"""

import os

import torch
import triton
import triton.language as tl

from fastgen.ops._layout import is_channels_last_dense

from .sampling import _rne_bf16

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_BLOCK = 65536 if _INTERPRET else 1024
_TILE = 65536 if _INTERPRET else 1024  # elements of a transposing program's tile
_NUM_WARPS = 4
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _denorm(x):
    """clamp(x * 0.5 + 0.5, 0, 1) in fp32; NaN passes through, as in torch.clamp."""
    u = x * 0.5 + 0.5
    u = tl.where(u < 0.0, 0.0, u)
    return tl.where(u > 1.0, 1.0, u)


@triton.jit
def _to_u8(y):
    """round_half_to_even(y * 255) as uint8 for y in [0, 1]; NaN -> 0."""
    t = y * 255.0
    t = tl.where(t > 0.0, t, 0.0)
    i = t.to(tl.int32)  # truncation, = floor for t >= 0
    d = t - i.to(tl.float32)  # exact
    up = (d > 0.5) | ((d == 0.5) & ((i & 1) == 1))
    return (i + up.to(tl.int32)).to(tl.uint8)


@triton.jit
def _vae_postprocess_fwd_kernel(X, OUT, total, BLOCK: tl.constexpr, TO_UINT8: tl.constexpr,
                                ROUND_BF16: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    y = _denorm(tl.load(X + offs, mask=mask, other=0.0).to(tl.float32))
    if TO_UINT8:
        tl.store(OUT + offs, _to_u8(y), mask=mask)
    else:
        if ROUND_BF16:
            y = _rne_bf16(y)
        tl.store(OUT + offs, y.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _vae_postprocess_nhwc_kernel(X, OUT, C, P, blocks_per_image,
                                 BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // blocks_per_image
    p = (pid - b * blocks_per_image) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.arange(0, BLOCK_C)
    mask = (p < P)[:, None] & (c < C)[None, :]
    base = b.to(tl.int64) * C * P
    p64 = p.to(tl.int64)[:, None]
    c64 = c.to(tl.int64)[None, :]
    x = tl.load(X + base + c64 * P + p64, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + base + p64 * C + c64, _to_u8(_denorm(x)), mask=mask)


@triton.jit
def _vae_postprocess_bwd_kernel(X, DY, DX, total, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    u = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32) * 0.5 + 0.5
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    # torch.clamp's gradient: passed where min <= u <= max (NaN: not passed). 0.5 * dy is exact.
    dx = tl.where((u >= 0.0) & (u <= 1.0), dy * 0.5, 0.0)
    tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


def _check_x(x: torch.Tensor) -> None:
    assert x.dim() == 4 and x.dtype in _DTYPES and (
        x.numel() == 0 or x.is_contiguous() or is_channels_last_dense(x)), \
        f"vae_postprocess (triton): x must be a contiguous or channels-last (B, C, H, W) float tensor, " \
        f"got {x.dtype} {tuple(x.shape)} strides {x.stride()}"


def vae_postprocess_fwd(x: torch.Tensor, to_uint8: bool) -> torch.Tensor:
    """y = clamp(x * 0.5 + 0.5, 0, 1) like x, or the (B, H, W, C) uint8 image of it."""
    _check_x(x)
    B, C, H, W = x.shape
    if to_uint8:
        out = torch.empty((B, H, W, C), dtype=torch.uint8, device=x.device)
    else:
        out = torch.empty_like(x)
    total = x.numel()
    if total == 0:
        return out
    P = H * W
    if to_uint8 and x.is_contiguous() and C > 1 and P > 1:
        block_c = triton.next_power_of_2(C)
        block_p = max(1, min(triton.next_power_of_2(P), _TILE // block_c))
        blocks = triton.cdiv(P, block_p)
        _vae_postprocess_nhwc_kernel[(B * blocks,)](
            x, out, C, P, blocks, BLOCK_P=block_p, BLOCK_C=block_c,
            num_warps=_NUM_WARPS, enable_fp_fusion=False)
    else:
        _vae_postprocess_fwd_kernel[(triton.cdiv(total, _BLOCK),)](
            x, out, total, BLOCK=_BLOCK, TO_UINT8=bool(to_uint8),
            ROUND_BF16=_INTERPRET and x.dtype == torch.bfloat16,
            num_warps=_NUM_WARPS, enable_fp_fusion=False)
    return out


def vae_postprocess_bwd(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dx = 0.5 * dy where 0 <= x * 0.5 + 0.5 <= 1, else 0; dy with x's strides and dtype."""
    _check_x(x)
    assert dy.dtype == x.dtype and dy.shape == x.shape and all(
        s <= 1 or a == b for s, a, b in zip(x.shape, dy.stride(), x.stride())), \
        f"vae_postprocess (triton): dy must have x's dtype, shape and strides, got {dy.dtype} " \
        f"{tuple(dy.shape)} strides {dy.stride()}"
    dx = torch.empty_like(x)
    total = x.numel()
    if total == 0:
        return dx
    _vae_postprocess_bwd_kernel[(triton.cdiv(total, _BLOCK),)](
        x, dy, dx, total, BLOCK=_BLOCK, num_warps=_NUM_WARPS, enable_fp_fusion=False)
    return dx
