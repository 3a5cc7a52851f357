"""Attention ``softmax(q k^T * scale) v`` for U-Net self- and cross-attention.

Backends: ``triton`` (FlashAttention-2-style forward and backward), ``cuda``
(tensor-core forward whose head-dim loop steps in 16s, so D=40/80/160 are not
padded to 64/96/192; its backward is the Triton one), ``cpu`` (tiled
online-softmax C++ kernel, forward and backward) and ``torch``.

For this op the ``torch`` backend is PyTorch's fused
``scaled_dot_product_attention``, not the reference: the reference
(:func:`attention_reference`) materialises the Nq x Nk score matrix, which no
backend may do (a 16k-token self-attention would need 8 GiB for it). The
automatic choice on CPU takes whichever of the C++ kernel and SDPA was measured
faster for the shape, never assuming: the measurements are data
(fastgen/data/attention_cpu_choice.json, or the user's own from
``fastgen bench attention --tune``), overridden by ``FASTGEN_ATTENTION_CPU``;
see fastgen/ops/_attention_cpu_choice.py.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _backend
from ._attention_cpu_choice import cpu_kernel_is_faster
from ._checks import check_dtype, check_same_device, check_tensor
from ._dispatch import declare_op

OP = "attention"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Head dims the tiled kernels are built and tested for (SD1.x 40/80/160, SDXL 64,
# the SD VAE mid-block's single 512-wide head).
HEAD_DIMS = (32, 40, 64, 80, 96, 128, 160, 512)
CUDA_HEAD_DIMS = (32, 40, 64, 80, 96, 128, 160)
TRITON_MAX_HEAD_DIM = 160
TRITON_MAX_BATCH_HEADS = 65535  # the launch grid's y dimension


# ------------------------------------------------------------------ reference


def attention_reference(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None) -> Tensor:
    """Plain ``softmax(q k^T * scale) v`` in fp32, cast back to q's dtype."""
    scale = _default_scale(q, scale)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    return torch.matmul(torch.softmax(scores, dim=-1), v.float()).to(q.dtype)


def _default_scale(q: Tensor, scale: Optional[float]) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def _sdpa_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """The kernel contract: contiguous (B, H, N, D) q, k, v -> ``(o, lse)``, lse fp32 (B, H, Nq)."""
    o = F.scaled_dot_product_attention(q, k, v, scale=scale)
    # SDPA keeps its log-sum-exp private and the torch backward recomputes through
    # SDPA, so this output is never read; zeros keep the op deterministic.
    lse = q.new_zeros(q.shape[:-1], dtype=torch.float32)
    return o, lse


def _sdpa_bwd(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` for contiguous ``do``."""
    with torch.enable_grad():
        qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
        out = F.scaled_dot_product_attention(qq, kk, vv, scale=scale)
        return torch.autograd.grad(out, (qq, kk, vv), do)


# ---------------------------------------------------------------- declaration


def _backward_kernels(backend: str):
    # The CUDA kernel is forward-only: its backward runs on the Triton kernels, which recompute from the
    # same (o, lse) contract.
    return _backend.native_kernel(OP, "attention_bwd", "triton" if backend == "cuda" else backend)


def _fake(q, k, v, scale):
    return torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=torch.float32)


def _backward_fake(do, q, k, v, o, lse, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _save(ctx, inputs, output):
    q, k, v, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _grads(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    if ctx.backend == "torch":
        # SDPA's backward is autograd itself, which is switched off inside a custom op.
        dq, dk, dv = _sdpa_bwd(do, q, k, v, o, lse, ctx.scale)
    else:
        dq, dk, dv = _op.backward(ctx, do.contiguous(), q, k, v, o, lse, ctx.scale)
    return dq, dk, dv, None


# For this op the torch backend is SDPA, not the reference (see the module docstring).
_op = declare_op(
    OP,
    reference=_sdpa_fwd,
    reference_backward=_sdpa_bwd,
    kernels="attention_fwd",
    backward_kernels=_backward_kernels,
    fake=_fake,
    backward_fake=_backward_fake,
    save=_save,
    grads=_grads,
)


# ------------------------------------------------------------------ public op


def attention(q: Tensor, k: Tensor, v: Tensor, *, scale: Optional[float] = None, backend: Optional[str] = None) -> Tensor:
    """``softmax(q k^T * scale) v`` without an Nq x Nk matrix in memory.

    Args:
        q: (B, H, Nq, D); k, v: (B, H, Nk, D); one float dtype (fp32/fp16/bf16).
        scale: multiplies the logits; default ``1/sqrt(D)``.
        backend: ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"torch"`` (PyTorch
            SDPA); None picks the fastest for the device and shape.
    Returns (B, H, Nq, D) in q's dtype; differentiable in q, k and v.
    """
    _check_inputs(q, k, v)
    scale = _default_scale(q, scale)
    requested = _backend.requested_backend(backend)
    chosen = _op.resolve(
        q.device,
        requested,
        # the measured CPU choice decides only an automatic choice (a named backend never reads it)
        preference=_preference(q, k, v) if requested is None else None,
        unsupported_reason=_unsupported(q),
        dtype=q.dtype,
    )
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    o, _ = _op(q, k, v, scale, chosen)
    return o


def _unsupported(q: Tensor) -> dict[str, str]:
    d, why = q.shape[-1], {}
    if d not in CUDA_HEAD_DIMS:
        why["cuda"] = f"the CUDA kernel has head dims {CUDA_HEAD_DIMS}, got {d}"
    elif q.dtype == torch.float32:
        why["cuda"] = "the CUDA kernel takes fp16/bf16 (tensor cores); fp32 goes to Triton"
    if d > TRITON_MAX_HEAD_DIM:
        why["triton"] = f"the Triton kernel handles head dims up to {TRITON_MAX_HEAD_DIM}, got {d}"
    elif q.shape[0] * q.shape[1] > TRITON_MAX_BATCH_HEADS:
        why["triton"] = (f"the Triton kernel's grid takes batch x heads up to {TRITON_MAX_BATCH_HEADS}, "
                         f"got {q.shape[0] * q.shape[1]}")
    return why


def _preference(q: Tensor, k: Tensor, v: Tensor) -> Optional[tuple[str, ...]]:
    if q.device.type != "cpu":
        return None
    training = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if cpu_kernel_is_faster(q.shape[-2], k.shape[-2], q.shape[-1], q.dtype, training):
        return ("cpu", "torch")
    return ("torch",)


def _check_inputs(q: Tensor, k: Tensor, v: Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t)
        check_dtype(name, t, FLOAT_DTYPES)
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must be 4-D (batch, heads, tokens, head_dim), got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"attention: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2]:
        raise ValueError(
            f"attention: q and k must agree in batch and heads, got q {tuple(q.shape)} and k {tuple(k.shape)}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention: q and k must have the same head dim, got {q.shape[-1]} and {k.shape[-1]}")
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"attention: head dim {q.shape[-1]} is not supported; expected one of {HEAD_DIMS}")
    if q.shape[-2] == 0 or k.shape[-2] == 0:
        raise ValueError(f"attention: q and k need at least one token, got Nq={q.shape[-2]}, Nk={k.shape[-2]}")
    check_same_device(q=q, k=k, v=v)
