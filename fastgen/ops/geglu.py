"""Fused GEGLU: ``hidden * gelu(gate)`` with ``hidden, gate = x.chunk(2, dim=-1)``.

This is the feed-forward gate of every transformer block in diffusers' U-Nets
(``diffusers.models.activations.GEGLU``: a ``proj`` Linear to 2H features, then
``hidden_states * F.gelu(gate)``). Eager PyTorch runs it as a gelu pass over the
gate and a multiply, materialising ``gelu(gate)``; its backward takes several
more passes. The fused kernels read ``x`` once and write ``out`` once in the
forward, and read ``x`` and ``dout`` once and write ``dx`` once in the backward:

    d_hidden = dout * gelu(gate)
    d_gate   = dout * hidden * gelu'(gate)

All math is fp32 whatever the input dtype.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _backend
from ._checks import check_dtype, check_tensor
from ._dispatch import OpRoute, backward_kernel

OP = "geglu"
APPROXIMATIONS = ("none", "tanh")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ------------------------------------------------------------------ reference


def geglu_reference(x: Tensor, *, approximate: str = "none") -> Tensor:
    """Plain PyTorch, computed in fp32 and cast back to ``x.dtype``."""
    return _reference_fwd(x, approximate == "tanh")


def _approx(approximate_tanh: bool) -> str:
    return "tanh" if approximate_tanh else "none"


def _reference_fwd(x: Tensor, approximate_tanh: bool) -> Tensor:
    hidden, gate = x.float().chunk(2, dim=-1)
    out = hidden * F.gelu(gate, approximate=_approx(approximate_tanh))
    return out.to(x.dtype)


def _reference_bwd(dout: Tensor, x: Tensor, approximate_tanh: bool) -> Tensor:
    hidden, gate = x.float().chunk(2, dim=-1)
    d = dout.float()
    approximate = _approx(approximate_tanh)
    d_hidden = d * F.gelu(gate, approximate=approximate)
    # aten's own derivative of gelu: grad * gelu'(gate)
    d_gate = torch.ops.aten.gelu_backward(d * hidden, gate, approximate=approximate)
    return torch.cat([d_hidden, d_gate], dim=-1).to(x.dtype)


# ---------------------------------------------------------------- custom ops


def _forward_impl(backend: str):
    return _reference_fwd if backend == "torch" else _backend.native_kernel(OP, "geglu_fwd", backend)


def _backward_impl(backend: str):
    return _reference_bwd if backend == "torch" else _backend.native_kernel(OP, "geglu_bwd", backend)


def _half_shape(x: Tensor) -> tuple[int, ...]:
    return (*x.shape[:-1], x.shape[-1] // 2)


def _geglu_impl(x: Tensor, approximate_tanh: bool, backend: str) -> Tensor:
    # The kernels view x as (M, 2H) rows: make it so (a no-op when it already is).
    return _forward_impl(backend)(x.contiguous(), approximate_tanh)


_geglu_op = torch.library.custom_op("fastgen::geglu", _geglu_impl, mutates_args=())


@_geglu_op.register_fake
def _(x, approximate_tanh, backend):
    return x.new_empty(_half_shape(x))


def _geglu_backward_impl(dout: Tensor, x: Tensor, approximate_tanh: bool, backend: str) -> Tensor:
    # dout may be broadcast (stride 0, e.g. from out.sum()) or otherwise strided.
    return _backward_impl(backend)(dout.contiguous(), x.contiguous(), approximate_tanh)


_geglu_backward_op = torch.library.custom_op("fastgen::geglu_backward", _geglu_backward_impl, mutates_args=())


@_geglu_backward_op.register_fake
def _(dout, x, approximate_tanh, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    x, approximate_tanh, backend = inputs
    ctx.save_for_backward(x)
    ctx.approximate_tanh, ctx.backend = approximate_tanh, backend


def _backward(ctx, dout):
    (x,) = ctx.saved_tensors
    dx = backward_kernel(_geglu_backward_op, _geglu_backward_impl, dout, x, ctx.approximate_tanh, ctx.backend)
    return dx, None, None


_geglu_route = OpRoute(_geglu_op, _geglu_impl, _setup_context, _backward)


# ------------------------------------------------------------------ public op


def geglu(x: Tensor, *, approximate: str = "none", backend: Optional[str] = None) -> Tensor:
    """``hidden * gelu(gate)`` where ``hidden, gate = x.chunk(2, dim=-1)``, fused.

    Args:
        x: (..., 2H), at least 1-D, with an even last dim; float32, float16 or
            bfloat16; any strides (non-contiguous inputs are copied).
        approximate: ``"none"`` (exact erf gelu, what diffusers uses) or
            ``"tanh"``, as in ``F.gelu``.
        backend: ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"torch"``; None chooses.

    Returns a contiguous (..., H) tensor of x's dtype. Math is fp32.
    """
    _check_inputs(x, approximate)
    chosen = _backend.resolve(OP, x.device, backend)
    if x.numel() == 0:
        chosen = "torch"
    return _geglu_route(x.contiguous(), approximate == "tanh", chosen)


def _check_inputs(x, approximate) -> None:
    check_tensor("x", x)
    check_dtype("x", x, DTYPES)
    if x.dim() == 0:
        raise ValueError("geglu: expected x of shape (..., 2H) with at least one dim, got a 0-D tensor")
    if x.shape[-1] % 2 != 0:
        raise ValueError(
            f"geglu: the last dim of x must be even (hidden and gate halves of 2H features), "
            f"got shape {tuple(x.shape)} with last dim {x.shape[-1]}"
        )
    if not isinstance(approximate, str) or approximate not in APPROXIMATIONS:
        raise ValueError(f"geglu: approximate must be 'none' or 'tanh', got {approximate!r}")
