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

from ._checks import check_dtype, check_tensor
from ._dispatch import declare_op

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
    """The kernel contract: contiguous (..., 2H) x -> contiguous (..., H)."""
    hidden, gate = x.float().chunk(2, dim=-1)
    out = hidden * F.gelu(gate, approximate=_approx(approximate_tanh))
    return out.to(x.dtype)


def _reference_bwd(dout: Tensor, x: Tensor, approximate_tanh: bool) -> Tensor:
    """dx for contiguous dout and x."""
    hidden, gate = x.float().chunk(2, dim=-1)
    d = dout.float()
    approximate = _approx(approximate_tanh)
    d_hidden = d * F.gelu(gate, approximate=approximate)
    # aten's own derivative of gelu: grad * gelu'(gate)
    d_gate = torch.ops.aten.gelu_backward(d * hidden, gate, approximate=approximate)
    return torch.cat([d_hidden, d_gate], dim=-1).to(x.dtype)


# ---------------------------------------------------------------- declaration


def _save(ctx, inputs, output):
    x, approximate_tanh = inputs
    ctx.save_for_backward(x)
    ctx.approximate_tanh = approximate_tanh


def _grads(ctx, dout):
    (x,) = ctx.saved_tensors
    # dout may be broadcast (stride 0, e.g. from out.sum()) or otherwise strided.
    return _op.backward(ctx, dout.contiguous(), x, ctx.approximate_tanh), None


_op = declare_op(
    OP,
    reference=_reference_fwd,
    reference_backward=_reference_bwd,
    kernels="geglu_fwd",
    backward_kernels="geglu_bwd",
    save=_save,
    grads=_grads,
)


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
    chosen = _op.resolve(x.device, backend, dtype=x.dtype)
    if x.numel() == 0:
        chosen = "torch"
    return _op(x.contiguous(), approximate == "tanh", chosen)


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
