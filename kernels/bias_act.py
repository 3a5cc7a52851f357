"""Triton bias_act: ``clamp(act(x + b) * gain, -clamp, clamp)`` and its first and second derivatives.

Same contract as bias_act_{fwd,grad}_{cpu,cuda} in csrc/ops.h (reference:
fastgen/ops/bias_act.py, _reference_fwd / _reference_grad):

    bias_act_fwd(x, b, dim, act, alpha, gain, clamp) -> y
    bias_act_grad(dy, x, b, dim, act, alpha, gain, clamp, order) -> (dx, db)

x is dense in any dim order (contiguous, channels-last, permuted); y and dx are
empty_like(x), so they share x's strides, and dy has them too (db is dx summed
over every dim but dim, in fp32, by a torch reduction after the kernel). The
kernels therefore never look at shapes: they walk memory offsets 0..numel-1 of every
tensor at once. The bias index of offset o is (o // inner) % C with
inner = x.stride(dim) (csrc/bias_act_args.h says why that holds for any dense
layout); the gather hits a tiny vector that stays in L1/L2. The public op
makes the layout dense and b a contiguous fp32 (C,) vector; the launchers only
assert it and never copy. act is an index into ACTIVATIONS (0..9: linear,
relu, lrelu, tanh, sigmoid, silu, gelu, elu, selu, softplus); clamp < 0 means
no clamp.

Design: 1-D blocks over numel. The activation, the bias, the clamp and the
derivative order are constexpr, so each specialisation is a straight-line
kernel with no dead math. Offsets are int32 unless the last block's could
pass 2**31 (IDX64; an int64 divide is several times dearer than an int32 one
on a GPU), and channels-last (inner == 1, INNER1) skips the divide.

Numerics: all math in fp32 whatever the storage dtype, one rounding on store.
Triton's libdevice (expm1, log1p, tanh) does not run under TRITON_INTERPRET,
so the functions that cancel are built from exp, erf and polynomials that
both the interpreter and the GPU compiler accept:
  * sigmoid through e = exp(-|z|) <= 1: s = 1/(1+e) or e/(1+e), and
    s(1-s) = e/(1+e)^2, with no overflow and no 1 - s cancellation;
  * expm1(u) for u <= 0 (elu, selu, tanh): a degree-8 Taylor polynomial for
    u > -0.5 (truncation < 1.1e-8 relative), exp(u) - 1 below it, where the
    result is at most -0.39 and the subtraction costs at most a bit;
  * tanh(z) = -m / (m + 2) with m = expm1(-2|z|) in (-1, 0], sign restored:
    accurate at small |z| (no 1 - 2/(e+1) cancellation) and saturating
    cleanly; 1 - tanh^2 is (1-|t|)(1+|t|) with 1-|t| = 2 exp(-2|z|)/(m+2);
  * softplus = max(z, 0) + log1p(e), e = exp(-|z|), with
    log1p(e) = 2 atanh(s), s = e/(2+e) in (0, 1/3], as an odd series in s
    (truncation < 1.5e-8 relative): no log of a rounded 1 + e, which would
    lose everything for e < 2**-24; identity above z = 20 like F.softplus;
  * gelu exact with tl.math.erf (libdevice erff on a GPU). 0.5 * (1 + erf)
    cancels in the far negative tail, as PyTorch's own formula does; the
    CUDA kernel uses normcdff there.
On a GPU tl.exp compiles to ex2.approx and fp32 division to div.full (a few
ulp each, denormals flushed); in the interpreter, against the fp64 reference,
fp32 results are within 2.4e-6 absolute (values up to ~20) and fp16 / bf16
ones are one rounding (<= half an ulp) from the exact value. The
interpreter's fp32 -> bf16 cast truncates, so there (only) bf16 results are
first rounded to nearest even with integer ops (ROUND_BF16, as in
kernels/sampling.py). The clamp keeps NaN (torch.clamp does) and its gradient
mask is torch.clamp's inclusive one, with NaN masked to 0.

On a GPU BLOCK and num_warps are autotuned per specialisation. Under
TRITON_INTERPRET=1 autotuning would run every config, so one fixed large
block is used: the interpreter pays per program and per op, hardly per element.
"""

import os

import torch
import triton
import triton.language as tl

from fastgen.ops._layout import _dense_any_order

from .sampling import _rne_bf16

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_N_ACTS = 10

# Globals read inside @triton.jit functions must be constexpr on a GPU.
_SQRT1_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
_SELU_LAMBDA = tl.constexpr(1.0507009873554805)
_SELU_ALPHA = tl.constexpr(1.6732632423543772)
_SOFTPLUS_THRESHOLD = tl.constexpr(20.0)

if _INTERPRET:
    _CONFIGS = [triton.Config({"BLOCK": 65536}, num_warps=4)]
else:
    _CONFIGS = [
        triton.Config({"BLOCK": 1024}, num_warps=4),
        triton.Config({"BLOCK": 2048}, num_warps=4),
        triton.Config({"BLOCK": 4096}, num_warps=8),
        triton.Config({"BLOCK": 8192}, num_warps=8),
    ]


# ------------------------------------------------------------------ math


@triton.jit
def _expm1_neg(u):
    """exp(u) - 1 for u <= 0 without cancellation near 0."""
    p = 1.0 / 40320.0
    p = p * u + 1.0 / 5040.0
    p = p * u + 1.0 / 720.0
    p = p * u + 1.0 / 120.0
    p = p * u + 1.0 / 24.0
    p = p * u + 1.0 / 6.0
    p = p * u + 0.5
    p = p * u + 1.0
    return tl.where(u > -0.5, p * u, tl.exp(u) - 1.0)


@triton.jit
def _log1p_unit(e):
    """log(1 + e) for e in [0, 1] as 2 atanh(e / (2 + e)), no rounded 1 + e."""
    s = e / (2.0 + e)
    s2 = s * s
    p = 1.0 / 13.0
    p = p * s2 + 1.0 / 11.0
    p = p * s2 + 1.0 / 9.0
    p = p * s2 + 1.0 / 7.0
    p = p * s2 + 1.0 / 5.0
    p = p * s2 + 1.0 / 3.0
    p = p * s2 + 1.0
    return 2.0 * s * p


@triton.jit
def _sigmoid_parts(z):
    """(s, 1 - s), each computed without cancellation, and e = exp(-|z|)."""
    e = tl.exp(-tl.abs(z))
    r = 1.0 / (1.0 + e)
    er = e * r
    pos = z >= 0
    return tl.where(pos, r, er), tl.where(pos, er, r), e


@triton.jit
def _tanh_parts(z):
    """(tanh(z), 1 - |tanh(z)|) accurate for small and large |z|."""
    a = tl.abs(z)
    m = _expm1_neg(-2.0 * a)
    d = m + 2.0
    t = -m / d
    one_minus = 2.0 * tl.exp(-2.0 * a) / d
    return tl.where(z < 0, -t, t), one_minus


@triton.jit
def _act(z, alpha, ACT: tl.constexpr):
    if ACT == 0:  # linear
        y = z
    elif ACT == 1:  # relu; z < 0 rather than z > 0 keeps NaN, as F.relu does
        y = tl.where(z < 0, 0.0, z)
    elif ACT == 2:  # lrelu
        y = tl.where(z < 0, z * alpha, z)
    elif ACT == 3:  # tanh
        y, _ = _tanh_parts(z)
    elif ACT == 4:  # sigmoid
        y, _, _ = _sigmoid_parts(z)
    elif ACT == 5:  # silu
        s, _, _ = _sigmoid_parts(z)
        y = z * s
    elif ACT == 6:  # gelu
        y = z * (0.5 + 0.5 * tl.math.erf(z * _SQRT1_2))
    elif ACT == 7:  # elu; where, not minimum (which would turn NaN into 0)
        y = tl.where(z > 0, z, alpha * _expm1_neg(tl.where(z > 0, 0.0, z)))
    elif ACT == 8:  # selu
        y = _SELU_LAMBDA * tl.where(z > 0, z, _SELU_ALPHA * _expm1_neg(tl.where(z > 0, 0.0, z)))
    else:  # softplus
        e = tl.exp(-tl.abs(z))
        y = tl.where(z > _SOFTPLUS_THRESHOLD, z, tl.maximum(z, 0.0) + _log1p_unit(e))
    return y


@triton.jit
def _act_deriv(z, alpha, ACT: tl.constexpr, ORDER: tl.constexpr):
    """act'(z) (ORDER 1) or act''(z) (ORDER 2), as act_derivative_reference."""
    if ACT == 0:
        d = tl.full(z.shape, 1.0 if ORDER == 1 else 0.0, tl.float32)
    elif ACT == 1:
        if ORDER == 1:
            d = tl.where(z > 0, 1.0, 0.0)
        else:
            d = tl.zeros(z.shape, tl.float32)
    elif ACT == 2:
        if ORDER == 1:
            d = tl.where(z > 0, 1.0, alpha)
        else:
            d = tl.zeros(z.shape, tl.float32)
    elif ACT == 3:
        t, om = _tanh_parts(z)
        d = om * (1.0 + tl.abs(t))  # 1 - t^2
        if ORDER == 2:
            d = -2.0 * t * d
    elif ACT == 4:
        s, s1, e = _sigmoid_parts(z)
        d = s * s1
        if ORDER == 2:
            d = d * (s1 - s)  # 1 - 2s
    elif ACT == 5:
        s, s1, e = _sigmoid_parts(z)
        if ORDER == 1:
            d = s * (1.0 + z * s1)
        else:
            d = s * s1 * (2.0 + z * (s1 - s))
    elif ACT == 6:
        pdf = _INV_SQRT_2PI * tl.exp(-0.5 * z * z)
        if ORDER == 1:
            d = 0.5 + 0.5 * tl.math.erf(z * _SQRT1_2) + z * pdf
        else:
            d = pdf * (2.0 - z * z)
    elif ACT == 7:
        neg = alpha * tl.exp(tl.where(z > 0, 0.0, z))
        d = tl.where(z > 0, 1.0 if ORDER == 1 else 0.0, neg)
    elif ACT == 8:
        neg = _SELU_ALPHA * tl.exp(tl.where(z > 0, 0.0, z))
        d = _SELU_LAMBDA * tl.where(z > 0, 1.0 if ORDER == 1 else 0.0, neg)
    else:
        s, s1, e = _sigmoid_parts(z)
        dd = s if ORDER == 1 else s * s1
        d = tl.where(z > _SOFTPLUS_THRESHOLD, 1.0 if ORDER == 1 else 0.0, dd)
    return d


# ------------------------------------------------------------------ kernels


@triton.jit
def _load_preact(X, B, offs, mask, C, inner, HAS_BIAS: tl.constexpr, INNER1: tl.constexpr):
    z = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        if INNER1:
            c = offs % C
        else:
            c = (offs // inner) % C
        z += tl.load(B + c, mask=mask, other=0.0)
    return z


@triton.jit
def _offsets(numel, BLOCK: tl.constexpr, IDX64: tl.constexpr):
    pid = tl.program_id(0)
    if IDX64:
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    else:
        offs = pid * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < numel


@triton.autotune(configs=_CONFIGS, key=["ACT", "HAS_BIAS", "HAS_CLAMP", "IDX64"])
@triton.jit
def _bias_act_fwd_kernel(
    X, B, Y, numel, C, inner, alpha, gain, clamp,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, INNER1: tl.constexpr, HAS_CLAMP: tl.constexpr,
    IDX64: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK: tl.constexpr,
):
    offs, mask = _offsets(numel, BLOCK, IDX64)
    z = _load_preact(X, B, offs, mask, C, inner, HAS_BIAS, INNER1)
    y = _act(z, alpha, ACT) * gain
    if HAS_CLAMP:
        # comparisons with NaN are false, so NaN passes through like torch.clamp
        y = tl.where(y > clamp, clamp, tl.where(y < -clamp, -clamp, y))
    if ROUND_BF16:
        y = _rne_bf16(y)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.autotune(configs=_CONFIGS, key=["ACT", "HAS_BIAS", "HAS_CLAMP", "ORDER", "IDX64"])
@triton.jit
def _bias_act_grad_kernel(
    DY, X, B, DX, numel, C, inner, alpha, gain, clamp,
    ACT: tl.constexpr, ORDER: tl.constexpr, HAS_BIAS: tl.constexpr, INNER1: tl.constexpr,
    HAS_CLAMP: tl.constexpr, IDX64: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK: tl.constexpr,
):
    offs, mask = _offsets(numel, BLOCK, IDX64)
    z = _load_preact(X, B, offs, mask, C, inner, HAS_BIAS, INNER1)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    dx = dy * gain * _act_deriv(z, alpha, ACT, ORDER)
    if HAS_CLAMP:
        y = _act(z, alpha, ACT) * gain
        dx = tl.where((y >= -clamp) & (y <= clamp), dx, 0.0)
    if ROUND_BF16:
        dx = _rne_bf16(dx)
    tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------ launchers


def _grid(meta):
    return (triton.cdiv(meta["numel"], meta["BLOCK"]),)


def _geometry(x: torch.Tensor, b, dim: int, act: int) -> tuple[int, int]:
    """(C, inner) of the bias gather; asserts the contract without copying."""
    assert x.dtype in _DTYPES and x.dim() >= 1 and (x.numel() == 0 or _dense_any_order(x)), \
        f"bias_act (triton): x must be dense float32/float16/bfloat16, >= 1-D, got {x.dtype} " \
        f"{tuple(x.shape)} strides {x.stride()}"
    assert 0 <= act < _N_ACTS, f"bias_act (triton): unknown activation code {act}"
    if b is None:
        return 1, 1
    assert 0 <= dim < x.dim(), f"bias_act (triton): dim {dim} out of range for {x.dim()}-D x"
    C = x.shape[dim]
    assert b.dtype == torch.float32 and b.dim() == 1 and b.shape[0] == C and b.is_contiguous() \
        and b.device == x.device, \
        f"bias_act (triton): b must be a contiguous float32 ({C},) vector on {x.device}, got {b.dtype} " \
        f"{tuple(b.shape)} on {b.device}"
    return C, (x.stride(dim) if C > 1 else 1)


def _same_strides(t: torch.Tensor, ref: torch.Tensor) -> bool:
    """Same memory order (csrc/layout.h same_strides): size-1 dims' strides never address anything."""
    return all(n == 1 or s == r for n, s, r in zip(ref.shape, t.stride(), ref.stride()))


def _specialisation(x, b, inner, clamp):
    # int32 offsets of the last block run up to numel + BLOCK - 1, and the largest BLOCK is 65536
    return dict(HAS_BIAS=b is not None, INNER1=inner == 1, HAS_CLAMP=clamp >= 0,
                IDX64=x.numel() > 2**31 - 1 - 65536, ROUND_BF16=_INTERPRET and x.dtype == torch.bfloat16)


def bias_act_fwd(x: torch.Tensor, b, dim: int, act: int, alpha: float, gain: float, clamp: float) -> torch.Tensor:
    """y = clamp(act(x + b) * gain, -clamp, clamp) with x's dtype and strides (clamp < 0: none)."""
    C, inner = _geometry(x, b, dim, act)
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    _bias_act_fwd_kernel[_grid](x, x if b is None else b, y, x.numel(), C, inner, float(alpha), float(gain),
                                float(clamp), ACT=int(act), **_specialisation(x, b, inner, clamp))
    return y


def bias_act_grad(dy: torch.Tensor, x: torch.Tensor, b, dim: int, act: int, alpha: float, gain: float,
                  clamp: float, order: int) -> tuple[torch.Tensor, torch.Tensor]:
    """dx = dy * gain * act^(order)(x + b), 0 where the clamp cut y; x's dtype and strides. And db, dx summed
    over every dim but ``dim`` in fp32 ((0,) without a bias): a torch reduction after the kernel, not fused
    (it reads dx once more; the CPU kernel sums while it writes)."""
    C, inner = _geometry(x, b, dim, act)
    assert order in (1, 2), f"bias_act (triton): order must be 1 or 2, got {order}"
    assert dy.dtype == x.dtype and dy.shape == x.shape and dy.device == x.device \
        and (x.numel() == 0 or _same_strides(dy, x)), \
        f"bias_act (triton): dy must have x's dtype, shape and strides {x.dtype} {tuple(x.shape)} " \
        f"{x.stride()}, got {dy.dtype} {tuple(dy.shape)} {dy.stride()}"
    dx = torch.empty_like(x)
    if x.numel() == 0:
        return dx, _bias_grad(dx, b, dim)
    _bias_act_grad_kernel[_grid](dy, x, x if b is None else b, dx, x.numel(), C, inner, float(alpha),
                                 float(gain), float(clamp), ACT=int(act), ORDER=int(order),
                                 **_specialisation(x, b, inner, clamp))
    return dx, _bias_grad(dx, b, dim)


def _bias_grad(dx: torch.Tensor, b, dim: int) -> torch.Tensor:
    if b is None:
        return dx.new_empty((0,), dtype=torch.float32)
    dims = [d for d in range(dx.dim()) if d != dim]
    return dx.sum(dim=dims, dtype=torch.float32) if dims else dx.float()
