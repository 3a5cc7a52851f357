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
batch dim outermost (contiguous or channels-last; anything else is made
contiguous here), and every other tensor is used in place when it has
sample's strides and copied into them otherwise. No layout precondition is
left to the caller.

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


# ------------------------------------------------------------------ layout


def _non_overlapping_and_dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill ``numel`` consecutive memory slots (any dim order)."""
    dims = sorted((st, size) for size, st in zip(t.shape, t.stride()) if size != 1)
    expected = 1
    for st, size in dims:
        if st != expected:
            return False
        expected *= size
    return True


def _batch_outer_dense(t: torch.Tensor, S: int) -> bool:
    """Dense with the batch dim outermost: sample n is memory [n*S, (n+1)*S)."""
    return _non_overlapping_and_dense(t) and (t.shape[0] <= 1 or t.stride(0) == S)


def _in_layout(t: torch.Tensor, ref: torch.Tensor, S: int) -> torch.Tensor:
    """``t`` when its memory order is ``ref``'s (dim 0 may differ in size), else a copy in that order."""
    same = (t.shape[0] <= 1 or t.stride(0) == S) and all(
        size <= 1 or st == want for size, st, want in zip(t.shape[1:], t.stride()[1:], ref.stride()[1:])
    )
    if same:
        return t
    out = torch.empty_strided(t.shape, (S, *ref.stride()[1:]), dtype=t.dtype, device=t.device)
    return out.copy_(t)


def _check(name, t, device):
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"sampling_step (triton): {name} must be float32, float16 or bfloat16, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"sampling_step (triton): {name} is on {t.device}, sample on {device}")


# ------------------------------------------------------------------ launcher


def sampling_step(sample, model_output, coeffs, extra1, extra2, noise, guidance_scale, clip, return_x0):
    """Fused sampler step; returns ``(out, x0)`` with ``x0`` None unless ``return_x0``."""
    if sample.dim() < 1:
        raise ValueError("sampling_step (triton): sample needs a batch dimension")
    device = sample.device
    _check("sample", sample, device)
    _check("model_output", model_output, device)
    n = sample.shape[0]
    cfg = guidance_scale is not None
    want = (2 * n if cfg else n, *sample.shape[1:])
    if tuple(model_output.shape) != want:
        raise ValueError(
            f"sampling_step (triton): model_output must have shape {want}, got {tuple(model_output.shape)}"
        )
    if coeffs.dtype != torch.float32 or coeffs.device != device:
        raise ValueError(f"sampling_step (triton): coeffs must be float32 on {device}, got {coeffs.dtype} on {coeffs.device}")
    if tuple(coeffs.shape) == (n, _NUM_COEFFS):
        coeff_stride = _NUM_COEFFS if n > 1 else 0
    elif tuple(coeffs.shape) in ((_NUM_COEFFS,), (1, _NUM_COEFFS)):
        coeff_stride = 0
    else:
        raise ValueError(f"sampling_step (triton): coeffs must have shape ({n}, 7), got {tuple(coeffs.shape)}")
    coeffs = coeffs.contiguous()

    numel = sample.numel()
    S = numel // n if n > 0 else 0
    if not _batch_outer_dense(sample, S):
        sample = sample.contiguous()
    model_output = _in_layout(model_output, sample, S)
    extras = []
    for name, t in (("extra1", extra1), ("extra2", extra2), ("noise", noise)):
        if t is not None:
            _check(name, t, device)
            if t.shape != sample.shape:
                raise ValueError(
                    f"sampling_step (triton): {name} must have shape {tuple(sample.shape)}, got {tuple(t.shape)}"
                )
            t = _in_layout(t, sample, S)
        extras.append(t)

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
