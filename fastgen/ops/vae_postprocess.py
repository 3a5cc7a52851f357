"""VAE output post-processing: ``clamp(x / 2 + 0.5, 0, 1)``, optionally as a uint8 NHWC image.

This is what diffusers' ``VaeImageProcessor.postprocess`` does after a VAE decode: ``denormalize`` maps the
decoder's [-1, 1] output to [0, 1] with ``(x / 2 + 0.5).clamp(0, 1)``; for PIL / numpy output it then
permutes to NHWC and ``numpy_to_pil`` takes ``(images * 255).round().astype("uint8")``. Eager PyTorch runs
that as three passes for the float image and six (with the NHWC copy) for the uint8 one; the fused kernels
read x once and write the output once:

    y   = clamp(x * 0.5 + 0.5, 0, 1)                                   (x's dtype, shape and layout)
    img = round_half_to_even(y * 255) as uint8, (B, H, W, C), contiguous

All math is fp32 whatever the input dtype; y is rounded once to x's dtype. ``x * 0.5`` is exact, so
``x * 0.5 + 0.5`` is bit-identical to diffusers' ``x / 2 + 0.5``, and ``y * 255`` is one rounded fp32
multiply followed by round-half-to-even — numpy's float32 ``(images * 255).round()`` — so the uint8 image is
exactly diffusers' for an fp32 x. NaN passes through the clamp of y (as ``torch.clamp``) and becomes 0 in
the uint8 image.

The float output is differentiable: ``dx = 0.5 * dy`` where ``0 <= x * 0.5 + 0.5 <= 1`` (computed in fp32,
boundaries included: ``torch.clamp`` passes the gradient at the bounds), else 0 — exactly autograd of
:func:`vae_postprocess_reference`. (In fp32 that is ``-1 <= x <= 1`` plus the next float above 1, whose
``x * 0.5 + 0.5`` rounds to 1.)
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._checks import check_dtype, check_tensor
from ._dispatch import declare_op
from ._layout import kernel_layout, match_layout

OP = "vae_postprocess"
OUTPUTS = ("float", "uint8")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ------------------------------------------------------------------ reference


def vae_postprocess_reference(x: Tensor, *, output: str = "float") -> Tensor:
    """Plain PyTorch, computed in fp32 (see :func:`vae_postprocess` for the outputs)."""
    return _reference_fwd(x, output == "uint8")


def _reference_fwd(x: Tensor, to_uint8: bool) -> Tensor:
    """The kernel contract: (B, C, H, W) x, contiguous or channels-last dense -> y with x's dtype and strides,
    or (to_uint8) a contiguous (B, H, W, C) uint8 image."""
    y = (x.float() * 0.5 + 0.5).clamp(0.0, 1.0)
    if to_uint8:
        img = torch.round(torch.nan_to_num(y * 255.0, nan=0.0)).to(torch.uint8)
        return img.permute(0, 2, 3, 1).clone(memory_format=torch.contiguous_format)
    return torch.empty_like(x).copy_(y)


def _reference_bwd(dy: Tensor, x: Tensor) -> Tensor:
    """dx for dy with x's strides: torch.clamp's gradient (bounds included) times d(x * 0.5)/dx."""
    u = x.float() * 0.5 + 0.5
    dx = torch.where((u >= 0.0) & (u <= 1.0), dy.float() * 0.5, 0.0)
    return torch.empty_like(x).copy_(dx)


# ---------------------------------------------------------------- declaration


def _save(ctx, inputs, output):
    x, to_uint8 = inputs
    ctx.save_for_backward(x)
    ctx.to_uint8 = to_uint8


def _grads(ctx, dy):
    (x,) = ctx.saved_tensors
    if ctx.to_uint8 or dy is None:  # the uint8 image carries no gradient
        return None, None
    # dy may be broadcast (stride 0, e.g. from y.sum()) or in another memory order.
    return _op.backward(ctx, match_layout(dy.to(x.dtype), x), x), None


_op = declare_op(
    OP,
    reference=_reference_fwd,
    reference_backward=_reference_bwd,
    kernels="vae_postprocess_fwd",
    backward_kernels="vae_postprocess_bwd",
    save=_save,
    grads=_grads,
)


# ------------------------------------------------------------------ public op


def vae_postprocess(x: Tensor, *, output: str = "float", backend: Optional[str] = None) -> Tensor:
    """A VAE decoder's [-1, 1] output as an image: ``clamp(x / 2 + 0.5, 0, 1)``, fused.

    Args:
        x: (B, C, H, W), float32, float16 or bfloat16, any strides (contiguous and channels-last tensors go to
            the kernels as they are; others are copied to contiguous once).
        output: ``"float"``: ``clamp(x * 0.5 + 0.5, 0, 1)`` in x's dtype, shape (B, C, H, W) and memory format
            (contiguous or channels-last), differentiable (see the module docstring for the gradient).
            ``"uint8"``: a contiguous (B, H, W, C) ``torch.uint8`` tensor
            ``round_half_to_even(clamp(x * 0.5 + 0.5, 0, 1) * 255)`` — diffusers'
            ``VaeImageProcessor.postprocess(x, output_type="np")`` followed by its
            ``(images * 255).round().astype("uint8")``; NaN gives 0. It carries no gradient: with
            ``x.requires_grad`` the result is a plain uint8 tensor outside the autograd graph.
        backend: ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"torch"``; None chooses.

    Math is fp32; the float output is rounded once to x's dtype.
    """
    _check_inputs(x, output)
    chosen = _op.resolve(x.device, backend, dtype=x.dtype)
    if x.numel() == 0:
        chosen = "torch"
    to_uint8 = output == "uint8"
    if to_uint8:
        x = x.detach()  # an integer image has no gradient
    return _op(kernel_layout(x), to_uint8, chosen)


def _check_inputs(x, output) -> None:
    check_tensor("x", x)
    check_dtype("x", x, DTYPES)
    if x.dim() != 4:
        raise ValueError(
            f"vae_postprocess: expected x of shape (B, C, H, W), a 4-D tensor, got {x.dim()}-D shape {tuple(x.shape)}"
        )
    if not isinstance(output, str) or output not in OUTPUTS:
        raise ValueError(f"vae_postprocess: output must be 'float' or 'uint8', got {output!r}")
