"""Triton fused sampler step (DDPM / DDIM / Euler / Heun / DPM-Solver++ / q_sample).

Same contract as sampling_step_{cpu,cuda} in csrc/ops.h and as the torch
reference ``_reference_step`` in fastgen/ops/sampling.py:

    sampling_step(sample, model_output, coeffs, extra1, extra2, noise,
                  guidance_scale, clip, return_x0) -> (out, x0 or None)

    e   = model_output                  or  u + g * (c - u)  with model_output = [u; c] (2N, ...)
    x0  = c0 * sample + c1 * e          (clamped to [-clip, clip] when clip is not None)
    out = c2 * sample + c3 * x0 + c4 * extra1 + c5 * extra2 + c6 * noise

coeffs: float32 (N, 7) on the tensors' device, one row per sample ((7,) or
(1, 7) is broadcast). Every tensor may be float32, float16 or bfloat16
independently; the math is fp32 and out / x0 have sample's dtype and layout.

Layout: the kernel walks memory linearly, so sample must be dense with the
batch dim outermost (contiguous or channels-last), and model_output, extra1,
extra2 and noise must have sample's strides (model_output with a 2N batch
under CFG). The public op (fastgen/ops/sampling.py) checks the inputs and
arranges the layouts; this launcher only asserts those preconditions and
never copies. out and x0 are allocated with sample's strides.

Grid: one program per (sample n, block of BLOCK elements of that sample),
flattened into axis 0 (so N is not limited by the 65535 of grid axis 1).
The program loads its sample's coefficients as scalars once. Absent inputs,
CFG, clipping and the x0 output are constexpr flags, so a variant without
them has neither the loads nor the arithmetic. The multiply-adds are not
fused into FMAs (enable_fp_fusion=False on a GPU), so the results are
bit-identical to the torch reference, as with the C++ and CUDA kernels; the
op is memory-bound, so FMAs would buy nothing.

Interpreter (TRITON_INTERPRET=1): its fp32 -> bf16 cast truncates instead of
rounding to nearest even, so bf16 outputs are rounded explicitly with integer
ops first (ROUND_BF16, interpreter only), which keeps them bit-identical too.
"""

import os

import torch
import triton
import triton.language as tl

from fastgen.ops._layout import has_layout_of, is_batch_outer_dense

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Elements per program. On a GPU 1024 elements over 4 warps is 8 per thread:
# 128-bit accesses for 16-bit dtypes, two for fp32. The interpreter pays per
# program, not per element, so it gets big blocks.
_BLOCK = 16384 if _INTERPRET else 1024
_NUM_WARPS = 4
_NUM_COEFFS = 7
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _rne_bf16(v):
    """fp32 ``v`` rounded to the nearest-even bfloat16 value, still as fp32.

    Only for the interpreter, whose fp32 -> bf16 cast truncates; after this the
    cast is exact. (Compiled Triton's cast already rounds to nearest even.)
    """
    u = v.to(tl.uint32, bitcast=True)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return tl.where(v != v, v, u.to(tl.float32, bitcast=True))


@triton.jit
def _sampling_step_kernel(
    x_ptr, mo_ptr, c_ptr, e1_ptr, e2_ptr, nz_ptr, out_ptr, x0_ptr,
    S, cond_off, coeff_stride, blocks_per_sample, g, clip,
    BLOCK: tl.constexpr,
    CFG: tl.constexpr, CLIP: tl.constexpr, X0: tl.constexpr,
    HAS_E1: tl.constexpr, HAS_E2: tl.constexpr, HAS_NOISE: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    pid = tl.program_id(0)
    n = pid // blocks_per_sample
    blk = pid - n * blocks_per_sample
    idx = blk * BLOCK + tl.arange(0, BLOCK)
    mask = idx < S
    offs = n.to(tl.int64) * S + idx

    cp = c_ptr + n * coeff_stride
    c0 = tl.load(cp + 0)
    c1 = tl.load(cp + 1)
    c2 = tl.load(cp + 2)
    c3 = tl.load(cp + 3)

    x = tl.load(x_ptr + offs, mask=mask, eviction_policy="evict_first").to(tl.float32)
    e = tl.load(mo_ptr + offs, mask=mask, eviction_policy="evict_first").to(tl.float32)
    if CFG:
        cond = tl.load(mo_ptr + cond_off + offs, mask=mask, eviction_policy="evict_first").to(tl.float32)
        e = e + g * (cond - e)
    x0 = c0 * x + c1 * e
    if CLIP:
        # torch.clamp(x0, -clip, clip) = min(max(x0, -clip), clip); NaN passes through.
        lo = -clip
        x0 = tl.where(x0 < lo, lo, x0)
        x0 = tl.where(x0 > clip, clip, x0)
    out = c2 * x + c3 * x0
    if HAS_E1:
        c4 = tl.load(cp + 4)
        out = out + c4 * tl.load(e1_ptr + offs, mask=mask, eviction_policy="evict_first").to(tl.float32)
    if HAS_E2:
        c5 = tl.load(cp + 5)
        out = out + c5 * tl.load(e2_ptr + offs, mask=mask, eviction_policy="evict_first").to(tl.float32)
    if HAS_NOISE:
        c6 = tl.load(cp + 6)
        out = out + c6 * tl.load(nz_ptr + offs, mask=mask, eviction_policy="evict_first").to(tl.float32)
    if ROUND_BF16:
        out = _rne_bf16(out)
        x0 = _rne_bf16(x0)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)
    if X0:
        tl.store(x0_ptr + offs, x0.to(x0_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------ launcher


def sampling_step(sample, model_output, coeffs, extra1, extra2, noise, guidance_scale, clip, return_x0):
    """Fused sampler step; returns ``(out, x0)`` with ``x0`` None unless ``return_x0``."""
    assert sample.dim() >= 1 and sample.dtype in _FLOAT_DTYPES, "sampling_step (triton): sample"
    n = sample.shape[0]
    numel = sample.numel()
    S = numel // n if n > 0 else 0
    cfg = guidance_scale is not None
    dense = numel == 0 or is_batch_outer_dense(sample)  # (strides of empty tensors don't matter)
    assert dense, f"sampling_step (triton): sample must be dense with the batch outermost, got strides {sample.stride()}"
    mo_shape = (2 * n if cfg else n, *sample.shape[1:])
    assert model_output.dtype in _FLOAT_DTYPES and model_output.shape == mo_shape \
        and (numel == 0 or has_layout_of(model_output, sample)), \
        "sampling_step (triton): model_output must have sample's shape (2N batch under CFG) and layout"
    for t in (extra1, extra2, noise):
        assert t is None or (t.dtype in _FLOAT_DTYPES and t.shape == sample.shape
                             and (numel == 0 or has_layout_of(t, sample))), \
            "sampling_step (triton): extra1, extra2 and noise must have sample's shape and layout"
    assert coeffs.dtype == torch.float32 and coeffs.is_contiguous() and coeffs.device == sample.device, \
        "sampling_step (triton): coeffs must be contiguous float32 on sample's device"
    if tuple(coeffs.shape) == (n, _NUM_COEFFS):
        coeff_stride = _NUM_COEFFS if n > 1 else 0
    else:
        assert tuple(coeffs.shape) in ((_NUM_COEFFS,), (1, _NUM_COEFFS)), \
            f"sampling_step (triton): coeffs must have shape ({n}, 7), (1, 7) or (7,), got {tuple(coeffs.shape)}"
        coeff_stride = 0
    extras = (extra1, extra2, noise)

    out = torch.empty_like(sample)
    x0 = torch.empty_like(sample) if return_x0 else None
    if numel == 0:
        return out, x0

    blocks_per_sample = triton.cdiv(S, _BLOCK)
    grid = (n * blocks_per_sample,)
    # Absent tensors are never loaded (constexpr flags); any pointer fills their slot.
    e1, e2, nz = (t if t is not None else sample for t in extras)
    _sampling_step_kernel[grid](
        sample, model_output, coeffs, e1, e2, nz, out, x0 if return_x0 else out,
        S, n * S, coeff_stride, blocks_per_sample,
        float(guidance_scale) if cfg else 0.0,
        float(clip) if clip is not None else 0.0,
        BLOCK=_BLOCK,
        CFG=cfg, CLIP=clip is not None, X0=bool(return_x0),
        HAS_E1=extras[0] is not None, HAS_E2=extras[1] is not None, HAS_NOISE=extras[2] is not None,
        ROUND_BF16=_INTERPRET and sample.dtype == torch.bfloat16,
        num_warps=_NUM_WARPS,
        enable_fp_fusion=False,  # (the interpreter ignores it)
    )
    return out, x0
