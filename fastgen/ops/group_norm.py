"""Fused GroupNorm -> optional SiLU -> optional residual add.

``silu(group_norm(x)) + skip`` is the ResNet-block pattern of every U-Net and
VAE in diffusers. Eager PyTorch runs it as three passes over memory (norm,
activation, add) plus the statistics pass; the fused kernels read ``x`` (and
``residual``) once for the statistics and once to write ``y``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._checks import check_dtype, check_same_device, check_tensor
from ._dispatch import declare_op
from ._layout import kernel_layout, match_layout

OP = "group_norm"
ACTIVATIONS = (None, "silu")


# ------------------------------------------------------------------ reference


def group_norm_reference(
    x: Tensor,
    num_groups: int,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    *,
    activation: Optional[str] = None,
    residual: Optional[Tensor] = None,
) -> Tensor:
    """Plain PyTorch, computed in fp32 and cast back to ``x.dtype``."""
    y, _, _ = _reference_fwd(x, _param(weight, x, 1.0), _param(bias, x, 0.0), residual, num_groups, eps, activation == "silu")
    return y


def _reference_fwd(
    x: Tensor, weight: Tensor, bias: Tensor, residual: Optional[Tensor], num_groups: int, eps: float, silu: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """The kernel contract: ``(y, mean, rstd)`` with fp32 (C,) ``weight``/``bias`` and (N, G) fp32 statistics;
    ``y`` (and ``residual``) have x's strides."""
    n, c = x.shape[:2]
    xf = x.float().reshape(n, num_groups, (c // num_groups) * _spatial(x))
    if xf.numel() == 0:  # (an empty group has no statistics; var_mean would warn about it)
        var = mean = xf.new_full(xf.shape[:2], float("nan"))
    else:
        # torch.var_mean is two-pass, so a large mean does not cancel the variance away.
        var, mean = torch.var_mean(xf, dim=-1, unbiased=False)
    rstd = torch.rsqrt(var + eps)
    xhat = ((xf - mean[..., None]) * rstd[..., None]).reshape(n, c, _spatial(x))
    z = xhat * weight.float()[None, :, None] + bias.float()[None, :, None]
    if silu:
        z = torch.nn.functional.silu(z)
    z = z.reshape(x.shape)
    if residual is not None:
        z = z + residual.float()
    y = torch.empty_like(x).copy_(z)
    return y, mean, rstd


def _spatial(x: Tensor) -> int:
    s = 1
    for size in x.shape[2:]:
        s *= size
    return s


def _reference_bwd(
    dy: Tensor, x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, rstd: Tensor, num_groups: int, silu: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dweight, dbias)``; dy has x's strides, dweight/dbias are fp32."""
    n, c = x.shape[:2]
    shape = (n, num_groups, c // num_groups, _spatial(x))
    w = weight.float().reshape(1, num_groups, -1, 1)
    xhat = (x.float().reshape(shape) - mean[..., None, None]) * rstd[..., None, None]
    dz = dy.float().reshape(shape)
    if silu:
        z = xhat * w + bias.float().reshape(1, num_groups, -1, 1)
        sig = torch.sigmoid(z)
        dz = dz * sig * (1 + z * (1 - sig))
    dweight = (dz * xhat).sum(dim=(0, 3)).reshape(c)
    dbias = dz.sum(dim=(0, 3)).reshape(c)
    g = dz * w
    dx = rstd[..., None, None] * (
        g - g.mean(dim=(2, 3), keepdim=True) - xhat * (g * xhat).mean(dim=(2, 3), keepdim=True)
    )
    return torch.empty_like(x).copy_(dx.reshape(x.shape)), dweight, dbias


# ---------------------------------------------------------------- declaration


def _param(p: Optional[Tensor], x: Tensor, fill: float) -> Tensor:
    if p is None:
        return torch.full((x.shape[1],), fill, dtype=torch.float32, device=x.device)
    return p.float().contiguous()  # a no-op for an fp32 parameter


def _save(ctx, inputs, output):
    x, weight, bias, residual, num_groups, eps, silu = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.num_groups, ctx.silu = num_groups, silu
    ctx.has_residual = residual is not None
    ctx.mark_non_differentiable(mean, rstd)


def _grads(ctx, dy, _dmean, _drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    dy = match_layout(dy, x)
    dx, dweight, dbias = _op.backward(ctx, dy, x, weight, bias, mean, rstd, ctx.num_groups, ctx.silu)
    return dx, dweight, dbias, (dy if ctx.has_residual else None), None, None, None


_op = declare_op(
    OP,
    reference=_reference_fwd,
    reference_backward=_reference_bwd,
    kernels="group_norm_fwd",
    backward_kernels="group_norm_bwd",
    save=_save,
    grads=_grads,
)


# ------------------------------------------------------------------ public op


def group_norm(
    x: Tensor,
    num_groups: int,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    *,
    activation: Optional[str] = None,
    residual: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """``act(group_norm(x, num_groups, weight, bias, eps)) + residual``, fused.

    Args:
        x: (N, C) or (N, C, *spatial) with 1-3 spatial dims; float32, float16 or
            bfloat16; contiguous, channels-last or any strides (others are copied).
        num_groups: number of groups G; C must be divisible by G.
        weight, bias: optional per-channel affine parameters of shape (C,).
        eps: added to the variance.
        activation: None or ``"silu"``, applied after the affine transform.
        residual: optional tensor of x's shape and dtype, added after the activation.
        backend: ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"torch"``; None chooses.

    Statistics are computed in fp32; the output has x's dtype and layout.
    """
    _check_inputs(x, num_groups, weight, bias, activation, residual)
    chosen = _op.resolve(x.device, backend, dtype=x.dtype)
    if x.numel() == 0:
        chosen = "torch"
    x = kernel_layout(x)
    if residual is not None:
        residual = match_layout(residual, x)
    # The kernels take fp32 (C,) parameters; the cast is part of the autograd graph, so a half-precision
    # weight still gets its gradient (in its own dtype).
    w, b = _param(weight, x, 1.0), _param(bias, x, 0.0)
    y, _, _ = _op(x, w, b, residual, int(num_groups), float(eps), activation == "silu", chosen)
    return y


def _check_inputs(x, num_groups, weight, bias, activation, residual) -> None:
    check_tensor("x", x)
    check_dtype("x", x, (torch.float32, torch.float16, torch.bfloat16))
    if not 2 <= x.dim() <= 5:
        raise ValueError(
            f"group_norm: expected x of shape (N, C) or (N, C, *spatial) with 1-3 spatial dims, "
            f"got a {x.dim()}-D tensor of shape {tuple(x.shape)}"
        )
    c = x.shape[1]
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0:
        raise ValueError(f"group_norm: num_groups must be a positive int, got {num_groups!r}")
    if c % num_groups != 0:
        raise ValueError(f"group_norm: channels ({c}) must be divisible by num_groups ({num_groups})")
    if activation not in ACTIVATIONS:
        raise ValueError(f"group_norm: activation must be None or 'silu', got {activation!r}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        check_tensor(name, p)
        check_dtype(name, p, (torch.float32, torch.float16, torch.bfloat16))
        if tuple(p.shape) != (c,):
            raise ValueError(f"group_norm: {name} must have shape ({c},) to match x's channels, got {tuple(p.shape)}")
    if residual is not None:
        check_tensor("residual", residual)
        if residual.shape != x.shape:
            raise ValueError(
                f"group_norm: residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}"
            )
        if residual.dtype != x.dtype:
            raise TypeError(f"group_norm: residual must have x's dtype {x.dtype}, got {residual.dtype}")
    check_same_device(x=x, weight=weight, bias=bias, residual=residual)
