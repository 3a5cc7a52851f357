"""One fused update for every diffusion sampler step (and the forward process).

Every step of DDPM, DDIM, Euler (ancestral), Heun and DPM-Solver++ is, per
sample, a linear combination of a few tensors once the model output has been
turned into a prediction of the clean image x0. So one kernel serves them all:

    e   = model_output                                   (N, ...)
        or uncond + g * (cond - uncond)                  model_output = [uncond; cond], (2N, ...)
    x0  = c0 * sample + c1 * e                           (clamped to [-clip, clip] when clip is set)
    out = c2 * sample + c3 * x0 + c4 * extra1 + c5 * extra2 + c6 * noise

``coeffs`` holds (c0..c6), either one row for the whole batch or one row per
sample (a per-sample timestep, as in training). The schedulers compute the
coefficients in float64 and the kernel applies them in float32, reading each
input once and writing ``out`` (and optionally ``x0``) once — the guided
prediction of a classifier-free-guidance pipeline is never materialised.

``q_sample`` (diffusers' ``add_noise``) and the v-prediction target are the same
combination with ``sample=x0, model_output=noise``.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .. import _backend
from ._checks import check_dtype, check_same_device, check_tensor

OP = "sampling"
NUM_COEFFS = 7
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

Coeffs = Union[Tensor, Sequence[float]]


# ------------------------------------------------------------------ reference


def _reference_step(sample, model_output, coeffs, extra1, extra2, noise, guidance_scale, clip, return_x0):
    """Plain PyTorch in fp32; ``coeffs`` is an fp32 (N, 7) tensor."""
    n = sample.shape[0]
    c = coeffs.reshape(n, NUM_COEFFS, *([1] * (sample.dim() - 1))).unbind(1)
    e = model_output.float()
    if guidance_scale is not None:
        uncond, cond = e[:n], e[n:]
        e = uncond + guidance_scale * (cond - uncond)
    x = sample.float()
    x0 = c[0] * x + c[1] * e
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    out = c[2] * x + c[3] * x0
    for coef, t in ((c[4], extra1), (c[5], extra2), (c[6], noise)):
        if t is not None:
            out = out + coef * t.float()
    out = out.to(sample.dtype)
    return out, (x0.to(sample.dtype) if return_x0 else None)


# ------------------------------------------------------------------ public op


def sampling_step(
    sample: Tensor,
    model_output: Tensor,
    coeffs: Coeffs,
    *,
    extra1: Optional[Tensor] = None,
    extra2: Optional[Tensor] = None,
    noise: Optional[Tensor] = None,
    guidance_scale: Optional[float] = None,
    clip: Optional[float] = None,
    return_x0: bool = False,
    backend: Optional[str] = None,
):
    """Fused sampler update (see the module docstring for the formula).

    Returns ``out``, or ``(out, x0)`` with ``return_x0=True``; both have
    ``sample``'s dtype and shape.
    """
    coeffs = _coeff_rows(coeffs, sample)
    _check_step(sample, model_output, extra1, extra2, noise, guidance_scale)
    chosen = _backend.resolve(OP, sample.device, backend, supported=_supported_backends())
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (sample, model_output, extra1, extra2, noise)
    ):
        # The fused kernels have no backward; the reference is differentiable.
        chosen = "torch"
    impl = _reference_step if chosen == "torch" else _backend.native_kernel(OP, "sampling_step", chosen)
    g = None if guidance_scale is None else float(guidance_scale)
    cl = None if clip is None else float(clip)
    out, x0 = impl(sample, model_output, coeffs, extra1, extra2, noise, g, cl, return_x0)
    return (out, x0) if return_x0 else out


def q_sample(x0: Tensor, noise: Tensor, sqrt_alpha: Tensor, sqrt_one_minus_alpha: Tensor, *, backend=None) -> Tensor:
    """Forward process ``sqrt(a_t) * x0 + sqrt(1 - a_t) * noise`` with per-sample (N,) coefficients."""
    n = x0.shape[0]
    coeffs = torch.zeros(n, NUM_COEFFS, dtype=torch.float32, device=x0.device)
    # x0-slot = sqrt(1-a) * noise, out = sqrt(a) * x0 + that: two reads, one write.
    coeffs[:, 1] = sqrt_one_minus_alpha.to(torch.float32).reshape(n)
    coeffs[:, 2] = sqrt_alpha.to(torch.float32).reshape(n)
    coeffs[:, 3] = 1.0
    return sampling_step(x0, noise, coeffs, backend=backend)


def v_target(x0: Tensor, noise: Tensor, sqrt_alpha: Tensor, sqrt_one_minus_alpha: Tensor, *, backend=None) -> Tensor:
    """The v-prediction target ``sqrt(a_t) * noise - sqrt(1 - a_t) * x0``, per-sample coefficients."""
    n = x0.shape[0]
    coeffs = torch.zeros(n, NUM_COEFFS, dtype=torch.float32, device=x0.device)
    coeffs[:, 1] = sqrt_alpha.to(torch.float32).reshape(n)
    coeffs[:, 2] = -sqrt_one_minus_alpha.to(torch.float32).reshape(n)
    coeffs[:, 3] = 1.0
    return sampling_step(x0, noise, coeffs, backend=backend)


def _supported_backends() -> tuple[str, ...]:
    return ("triton", "cuda", "cpu", "torch")


def _coeff_rows(coeffs: Coeffs, sample: Tensor) -> Tensor:
    n = sample.shape[0] if isinstance(sample, Tensor) and sample.dim() > 0 else 1
    if isinstance(coeffs, (list, tuple)) and len(coeffs) == NUM_COEFFS and all(type(v) is float for v in coeffs):
        # The schedulers' per-step row: one float32 tensor built straight from the Python floats (the same
        # rounding as the general path below, at a fifth of its cost).
        return torch.tensor((coeffs,) * n, dtype=torch.float32, device=sample.device)
    c = torch.as_tensor(coeffs, dtype=torch.float64 if not isinstance(coeffs, Tensor) else None)
    if not c.is_floating_point():
        raise TypeError(f"sampling_step: coeffs must be floating point, got {c.dtype}")
    if c.shape == (NUM_COEFFS,):
        c = c.expand(n, NUM_COEFFS)
    if c.shape != (n, NUM_COEFFS):
        raise ValueError(
            f"sampling_step: coeffs must have shape ({NUM_COEFFS},) or (N, {NUM_COEFFS}) with N={n}, got {tuple(c.shape)}"
        )
    return c.to(device=sample.device, dtype=torch.float32).contiguous()


def _check_step(sample, model_output, extra1, extra2, noise, guidance_scale) -> None:
    check_tensor("sample", sample)
    check_tensor("model_output", model_output)
    check_dtype("sample", sample, FLOAT_DTYPES)
    check_dtype("model_output", model_output, FLOAT_DTYPES)
    if sample.dim() < 1:
        raise ValueError("sampling_step: sample must have a batch dimension")
    want = sample.shape
    if guidance_scale is not None:
        want = torch.Size([2 * sample.shape[0], *sample.shape[1:]])
        if model_output.shape != want:
            raise ValueError(
                f"sampling_step: with guidance_scale, model_output must be the [uncond; cond] batch of shape "
                f"{tuple(want)} for sample {tuple(sample.shape)}, got {tuple(model_output.shape)}"
            )
    elif model_output.shape != sample.shape:
        raise ValueError(
            f"sampling_step: model_output shape {tuple(model_output.shape)} does not match sample shape {tuple(sample.shape)}"
        )
    for name, t in (("extra1", extra1), ("extra2", extra2), ("noise", noise)):
        if t is None:
            continue
        check_tensor(name, t)
        check_dtype(name, t, FLOAT_DTYPES)
        if t.shape != sample.shape:
            raise ValueError(f"sampling_step: {name} shape {tuple(t.shape)} does not match sample shape {tuple(sample.shape)}")
    check_same_device(sample=sample, model_output=model_output, extra1=extra1, extra2=extra2, noise=noise)
