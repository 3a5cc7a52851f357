"""Fused bias + activation + gain + clamp: StyleGAN's ``bias_act``, with first and second derivatives.

    z = x + b (b broadcast along ``dim``)
    y = clamp(act(z) * gain, -clamp, clamp)

A GAN layer is a convolution followed by this chain; eager PyTorch runs it as three or four elementwise passes
(``x + b``, the activation, ``* gain``, ``clamp``), each reading and writing the whole activation, and autograd
keeps one tensor per pass. The fused kernels read x once and write y once; the backward reads dy and x once and
writes dx once (the bias gradient is dx summed over every dim but ``dim``).

Second derivatives (R1 and path-length penalties differentiate through D's input gradient) come from a second
op, ``bias_act_grad``, the first derivative as its own kernel:

    bias_act_grad(dy, x, b, ..., order) = dy * gain * act^(order)(z) * [|act(z) * gain| <= clamp]

Its backward is again ``bias_act_grad``: with respect to dy it is the same order (the gradient is linear in dy),
with respect to x and b it is order 2. Third derivatives raise (no fastgen model needs them).

Activations, their default ``alpha`` and ``gain`` follow StyleGAN2-ADA's table (gelu, which StyleGAN lacks, has
gain 1). Math is fp32 whatever the storage dtype (fp64 runs on the torch backend in fp64, for gradcheck); the
result is rounded once. The clamp gradient mask is torch.clamp's (inclusive bounds).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _backend
from .._backend import BackendUnavailable
from ._checks import check_dtype, check_same_device, check_tensor
from ._dispatch import declare_op
from ._layout import _dense_any_order

OP = "bias_act"
GRAD_OP = "bias_act_grad"
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPES = (*KERNEL_DTYPES, torch.float64)

SELU_LAMBDA = 1.0507009873554804934193349852946
SELU_ALPHA = 1.6732632423543772848170429916717
SOFTPLUS_THRESHOLD = 20.0  # F.softplus's default: z above it returns z


class Activation(NamedTuple):
    name: str
    default_alpha: float
    default_gain: float


# The index is the activation's code in the kernel contract (csrc/bias_act_args.h, kernels/bias_act.py).
ACTIVATIONS = (
    Activation("linear", 0.0, 1.0),
    Activation("relu", 0.0, math.sqrt(2)),
    Activation("lrelu", 0.2, math.sqrt(2)),
    Activation("tanh", 0.0, 1.0),
    Activation("sigmoid", 0.0, 1.0),
    Activation("silu", 0.0, math.sqrt(2)),
    Activation("gelu", 0.0, 1.0),
    Activation("elu", 1.0, 1.0),
    Activation("selu", 0.0, 1.0),
    Activation("softplus", 0.0, 1.0),
)
ACT_CODES = {a.name: i for i, a in enumerate(ACTIVATIONS)}
ACT_CODES["swish"] = ACT_CODES["silu"]  # StyleGAN's name for it


# ------------------------------------------------------------------ reference


def _bias_view(b: Tensor, ndim: int, dim: int) -> Tensor:
    shape = [1] * ndim
    shape[dim] = -1
    return b.view(shape)


def _preact(x: Tensor, b: Optional[Tensor], dim: int) -> Tensor:
    """z = x + b in the math dtype (fp32, or fp64 for fp64 x)."""
    z = x.to(torch.promote_types(x.dtype, torch.float32))
    return z if b is None else z + _bias_view(b.to(z.dtype), z.dim(), dim)


def act_reference(z: Tensor, act: int, alpha: float) -> Tensor:
    """act(z), as the PyTorch functions compute it."""
    name = ACTIVATIONS[act].name
    if name == "linear":
        return z
    if name == "relu":
        return F.relu(z)
    if name == "lrelu":
        return F.leaky_relu(z, alpha)
    if name == "tanh":
        return torch.tanh(z)
    if name == "sigmoid":
        return torch.sigmoid(z)
    if name == "silu":
        return F.silu(z)
    if name == "gelu":
        return F.gelu(z)
    if name == "elu":
        return F.elu(z, alpha)
    if name == "selu":
        return F.selu(z)
    return F.softplus(z)


def act_derivative_reference(z: Tensor, act: int, alpha: float, order: int) -> Tensor:
    """act'(z) (order 1) or act''(z) (order 2), written out; tests check them against autograd."""
    name = ACTIVATIONS[act].name
    one, zero = torch.ones_like(z), torch.zeros_like(z)
    if name == "linear":
        return one if order == 1 else zero
    if name == "relu":
        return (z > 0).to(z.dtype) if order == 1 else zero
    if name == "lrelu":
        return torch.where(z > 0, one, one * alpha) if order == 1 else zero
    if name == "tanh":
        t = torch.tanh(z)
        return 1 - t * t if order == 1 else -2 * t * (1 - t * t)
    if name == "sigmoid":
        s = torch.sigmoid(z)
        return s * (1 - s) if order == 1 else s * (1 - s) * (1 - 2 * s)
    if name == "softplus":
        s = torch.sigmoid(z)
        d = s if order == 1 else s * (1 - s)
        # F.softplus is the identity above its threshold
        return torch.where(z > SOFTPLUS_THRESHOLD, one if order == 1 else zero, d)
    if name == "silu":
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s)) if order == 1 else s * (1 - s) * (2 + z * (1 - 2 * s))
    if name == "gelu":
        pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
        if order == 1:
            return 0.5 * (1 + torch.erf(z / math.sqrt(2))) + z * pdf
        return pdf * (2 - z * z)
    if name in ("elu", "selu"):
        a, scale = (alpha, 1.0) if name == "elu" else (SELU_ALPHA, SELU_LAMBDA)
        neg = a * torch.exp(torch.clamp(z, max=0))
        return scale * torch.where(z > 0, one if order == 1 else zero, neg)
    raise AssertionError(name)


def _clamp_mask(y: Tensor, clamp: float) -> Optional[Tensor]:
    """torch.clamp's backward mask (inclusive bounds), or None without a clamp."""
    return None if clamp < 0 else (y >= -clamp) & (y <= clamp)


def _reference_fwd(x: Tensor, b: Optional[Tensor], dim: int, act: int, alpha: float, gain: float,
                   clamp: float) -> Tensor:
    """The kernel contract.

    x: dense in any dim order (contiguous, channels-last, ...); float32, float16 or bfloat16 (float64 on the
    torch backend only). b: None or (x.shape[dim],) contiguous float32 (float64 for float64 x). dim: >= 0.
    act: an index into ACTIVATIONS. clamp < 0: no clamp. Returns y with x's dtype and strides.
    """
    y = act_reference(_preact(x, b, dim), act, alpha) * gain
    if clamp >= 0:
        y = y.clamp(-clamp, clamp)
    return torch.empty_like(x).copy_(y)


def _reference_grad(dy: Tensor, x: Tensor, b: Optional[Tensor], dim: int, act: int, alpha: float, gain: float,
                    clamp: float, order: int) -> tuple[Tensor, Tensor]:
    """The gradient kernel contract: dx = dy * gain * act^(order)(z), zero where the clamp cut y; and db.

    dy: x's shape, dtype and strides. order: 1 or 2. Returns dx with x's dtype and strides, and db: dx summed
    over every dim but ``dim`` before it is rounded to x's dtype, (C,) in b's dtype (float32, or float64 for
    float64 x); (0,) without a bias.
    """
    z = _preact(x, b, dim)
    dx = dy.to(z.dtype) * gain * act_derivative_reference(z, act, alpha, order)
    mask = _clamp_mask(act_reference(z, act, alpha) * gain, clamp)
    if mask is not None:
        dx = torch.where(mask, dx, torch.zeros_like(dx))
    if b is None:
        db = dx.new_empty((0,))
    else:
        dims = [d for d in range(dx.dim()) if d != dim]
        db = dx.sum(dim=dims) if dims else dx.clone()
    return torch.empty_like(x).copy_(dx), db


# ---------------------------------------------------------------- declaration


def _save(ctx, inputs, output):
    x, b, dim, act, alpha, gain, clamp = inputs
    ctx.save_for_backward(x, b)
    ctx.args = (dim, act, alpha, gain, clamp)


def _grads(ctx, dy):
    x, b = ctx.saved_tensors
    dx, db = _grad_op(_like(dy, x), x, b, *ctx.args, 1, ctx.backend)
    return (dx, None if b is None else db, None, None, None, None, None)


def _save_grad(ctx, inputs, output):
    dy, x, b, dim, act, alpha, gain, clamp, order = inputs
    ctx.save_for_backward(dy, x, b)
    ctx.args = (dim, act, alpha, gain, clamp)
    ctx.order = order


def _grads_grad(ctx, ddx, ddb):
    dy, x, b = ctx.saved_tensors
    if ctx.order != 1:
        raise NotImplementedError("bias_act: third derivatives are not supported (first and second are)")
    dim = ctx.args[0]
    # db is dx summed over the non-bias dims, so a gradient on db reaches every element of dx.
    total = torch.zeros_like(x) if ddx is None else ddx
    if b is not None and ddb is not None:
        total = total + _bias_view(ddb, x.dim(), dim).to(total.dtype)
    total = _like(total, x)
    ddy, _ = _grad_op(total, x, b, *ctx.args, 1, ctx.backend)
    # d/dz of dy * gain * act'(z): total * dy * gain * act''(z); the clamp mask's derivative is 0 almost
    # everywhere.
    dx, db = _grad_op(_like(total * dy, x), x, b, *ctx.args, 2, ctx.backend)
    return (ddy, dx, None if b is None else db, None, None, None, None, None, None)


def _like(t: Tensor, x: Tensor) -> Tensor:
    """``t`` (a gradient: maybe broadcast, strided or of another dtype) with x's dtype and strides."""
    if t.dtype != x.dtype:
        t = t.to(x.dtype)
    if t.stride() == x.stride():
        return t
    return torch.empty_like(x).copy_(t)


_op = declare_op(OP, reference=_reference_fwd, kernels="bias_act_fwd", save=_save, grads=_grads)
# The gradient kernels live beside the forward ones (kernels/bias_act.py, csrc/cpu/bias_act.cpp, ...).
_grad_op = declare_op(GRAD_OP, reference=_reference_grad,
                      kernels=lambda backend: _backend.native_kernel(OP, "bias_act_grad", backend),
                      save=_save_grad, grads=_grads_grad)


# ------------------------------------------------------------------ public op


def bias_act(x: Tensor, b: Optional[Tensor] = None, dim: int = 1, act: str = "linear",
             alpha: Optional[float] = None, gain: Optional[float] = None, clamp: Optional[float] = None, *,
             backend: Optional[str] = None) -> Tensor:
    """``clamp(act(x + b) * gain, -clamp, clamp)`` in one pass, differentiable twice.

    Args:
        x: any shape; float32, float16 or bfloat16 (float64 on the torch backend); any strides (dense ones,
            such as channels-last, are kept; others are copied).
        b: None or a 1-D bias of length ``x.shape[dim]``, added along ``dim``; any float dtype (math is fp32).
        dim: the dim ``b`` runs along (negative counts from the end).
        act: ``linear``, ``relu``, ``lrelu``, ``tanh``, ``sigmoid``, ``silu`` (``swish``), ``gelu``, ``elu``,
            ``selu`` or ``softplus``.
        alpha: the slope of ``lrelu`` (default 0.2) or the scale of ``elu`` (default 1.0); others ignore it.
        gain: multiplies the activation; default StyleGAN's: sqrt(2) for relu, lrelu and silu, else 1.
        clamp: None, or clamp the result to [-clamp, clamp].
        backend: ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"torch"``; None chooses.

    Returns a tensor of x's shape, dtype and (dense) strides.
    """
    code, alpha, gain, clamp = _check_inputs(x, b, dim, act, alpha, gain, clamp)
    ndim = max(x.dim(), 1)
    dim = dim % ndim if x.dim() else 0
    if x.dtype == torch.float64:
        if backend not in (None, "torch"):
            raise BackendUnavailable(f"bias_act: backend {backend!r} has no float64 kernel; float64 runs on the "
                                     "torch backend (pass backend='torch' or None)")
        chosen = "torch"
    else:
        chosen = _op.resolve(x.device, backend, dtype=x.dtype)
    if x.numel() == 0:
        chosen = "torch"
    xk = x if _dense_any_order(x) else x.contiguous()
    if xk.dim() == 0:
        xk = xk.reshape(1)
    bk = None if b is None else b.to(torch.promote_types(x.dtype, torch.float32)).contiguous()
    y = _op(xk, bk, dim, code, alpha, gain, clamp, chosen)
    return y.reshape(()) if x.dim() == 0 else y


def _number(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise TypeError(f"bias_act: {name} must be a finite float or None, got {v!r}")
    return float(v)


def _check_inputs(x, b, dim, act, alpha, gain, clamp):
    check_tensor("x", x)
    check_dtype("x", x, DTYPES)
    if not isinstance(act, str) or act not in ACT_CODES:
        raise ValueError(f"bias_act: unknown activation {act!r}; expected one of "
                         f"{', '.join(a.name for a in ACTIVATIONS)}")
    code = ACT_CODES[act]
    spec = ACTIVATIONS[code]
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"bias_act: dim must be an int, got {dim!r}")
    if b is not None:
        check_tensor("b", b)
        check_dtype("b", b, DTYPES)
        check_same_device(x=x, b=b)
        if x.dim() == 0 or not -x.dim() <= dim < x.dim():
            raise ValueError(f"bias_act: dim={dim} is out of range for x of shape {tuple(x.shape)}")
        if b.dim() != 1 or b.shape[0] != x.shape[dim]:
            raise ValueError(f"bias_act: b must be 1-D of length x.shape[{dim}] = {x.shape[dim]} (one value per "
                             f"entry of dim {dim}), got shape {tuple(b.shape)}")
    alpha = spec.default_alpha if alpha is None else _number("alpha", alpha)
    gain = spec.default_gain if gain is None else _number("gain", gain)
    if clamp is None:
        clamp = -1.0
    else:
        clamp = _number("clamp", clamp)
        if clamp < 0:
            raise ValueError(f"bias_act: clamp must be >= 0 or None, got {clamp}")
    return code, alpha, gain, clamp


def bias_act_reference(x: Tensor, b: Optional[Tensor] = None, dim: int = 1, act: str = "linear",
                       alpha: Optional[float] = None, gain: Optional[float] = None,
                       clamp: Optional[float] = None) -> Tensor:
    """The eager chain ``x + b``, activation, ``* gain``, clamp, in x's dtype step by step (what a plain
    PyTorch GAN runs, and what the benchmarks race)."""
    code, alpha, gain, clamp = _check_inputs(x, b, dim, act, alpha, gain, clamp)
    if b is not None:
        x = x + _bias_view(b.to(x.dtype), x.dim(), dim % x.dim())
    y = act_reference(x, code, alpha)
    if gain != 1:
        y = y * gain
    if clamp >= 0:
        y = y.clamp(-clamp, clamp)
    return y
