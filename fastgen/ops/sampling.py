"""One fused update for every diffusion sampler step (and the forward process).

Every step of DDPM, DDIM, Euler (ancestral), Heun and DPM-Solver++ is, per
sample, a linear combination of a few tensors once the model output has been
turned into a prediction of the clean image x0. So one kernel serves them all:

    e   = model_output                                   (N, ...)
        or uncond + g * (cond - uncond)                  model_output = [uncond; cond], (2N, ...)
    x0  = c0 * sample + c1 * e                           (clamped to [-clip, clip] when clip is set)
    out = c2 * sample + c3 * x0 + c4 * extra1 + c5 * extra2 + c6 * noise

Callers never see those slots: a step is a :class:`StepUpdate` (how x0 is formed, the coefficients of the
state and of x0, at most two ``(coefficient, tensor)`` terms, the noise coefficient), and only
:func:`sampling_step` flattens it into the kernel's ``(c0..c6)`` row — one row for the whole batch or one
per sample (per-sample timesteps, as in training). The schedulers compute the coefficients in float64 and
the kernel applies them in float32, reading each input once and writing ``out`` (and optionally ``x0``)
once — the guided prediction of a classifier-free-guidance pipeline is never materialised.

The step is differentiable in every tensor (training backpropagates through ``q_sample``-style calls); the
coefficients are constants. The backward is the same kernel again (see :func:`_step_backward`).

``q_sample`` (diffusers' ``add_noise``) and the v-prediction target are the same
combination with ``sample=x0, model_output=noise``.
"""

from __future__ import annotations

import array
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

from .. import _backend
from ._checks import check_dtype, check_same_device, check_tensor
from ._dispatch import declare_op
from ._layout import batch_outer_layout, in_layout_of

OP = "sampling_step"
NUM_COEFFS = 7
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# A coefficient: one float for the whole batch, or an (N,) tensor with one value per sample (training's
# per-sample timesteps).
Coef = Union[float, Tensor]


class X0From(NamedTuple):
    """How the step forms its x0 prediction: ``x0 = sample * x + output * e``, where ``e`` is the model
    output (the guided ``uncond + g * (cond - uncond)`` when the step has a guidance scale)."""

    sample: Coef
    output: Coef


class StepUpdate(NamedTuple):
    """One sampler update, written as the math it is::

        x0  = x0_from.sample * x + x0_from.output * e        (clamped to [-clip, clip] when clip is set)
        out = sample * x + x0 * x0 + sum(c * t for c, t in terms) + noise * z

    ``terms`` holds at most two ``(coefficient, tensor)`` pairs (earlier x0 predictions, the previous state,
    a raw model-output term); ``noise`` multiplies the ``noise`` tensor passed to :func:`sampling_step`.
    """

    x0_from: X0From
    sample: Coef = 0.0
    x0: Coef = 0.0
    terms: tuple = ()
    noise: Coef = 0.0


# ------------------------------------------------------------------ reference


def _reference_step(
    sample: Tensor,
    model_output: Tensor,
    coeffs: Tensor,
    extra1: Optional[Tensor],
    extra2: Optional[Tensor],
    noise: Optional[Tensor],
    guidance_scale: Optional[float],
    clip: Optional[float],
    return_x0: bool,
) -> tuple[Tensor, Tensor]:
    """The kernel contract, in plain PyTorch (fp32 math): ``(out, x0)``, x0 empty unless ``return_x0``.

    ``coeffs`` is fp32, an (N, 7) row per sample or one (7,) row for all; the other tensors share sample's memory order (batch-outer
    dense), ``model_output`` with a doubled batch under guidance.
    """
    n = sample.shape[0]
    c = coeffs.reshape(-1, NUM_COEFFS, *([1] * (sample.dim() - 1))).unbind(1)  # (7,) is shared by the batch
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
    out = torch.empty_like(sample).copy_(out)
    x0_out = torch.empty_like(sample).copy_(x0) if return_x0 else sample.new_empty(0)
    return out, x0_out


def _step_backward(step, dout, dx0, sample, model_output, coeffs, guidance_scale, clip):
    """``(d_sample, d_e)`` of one step, where ``d_e`` is the gradient of the (guided) model output ``e``.

    With ``g = c3 * dout + dx0`` the gradient reaching x0 (masked where the clamp was active),
    ``d_sample = c2 * dout + c0 * g`` and ``d_e = c1 * g``. Without a clamp the first two are one more call
    of the step kernel ``step`` itself — ``x0' = c3 * dout + dx0`` and ``out' = c2 * dout + c0 * x0'`` — and
    ``d_e`` is a scale of its x0 output.
    """
    n = sample.shape[0]
    c = coeffs.reshape(-1, NUM_COEFFS).expand(n, NUM_COEFFS)
    zero, one = torch.zeros_like(c[:, 0]), torch.ones_like(c[:, 0])
    view = (n, *([1] * (sample.dim() - 1)))
    if clip is None:
        rows = torch.stack([c[:, 3], one if dx0 is not None else zero, c[:, 2], c[:, 0], zero, zero, zero], 1)
        d_sample, g = step(dout, dx0 if dx0 is not None else dout, rows, None, None, None, None, None, True)
    else:
        # The clamp's mask needs the unclamped x0: one forward call that writes it as ``out``.
        rows = torch.stack([c[:, 0], c[:, 1], zero, one, zero, zero, zero], 1)
        x0_raw, _ = step(sample, model_output, rows, None, None, None, guidance_scale, None, False)
        g = c[:, 3].reshape(view) * dout.float()
        if dx0 is not None:
            g = g + dx0.float()
        g = torch.where((x0_raw >= -clip) & (x0_raw <= clip), g, 0.0)
        d_sample = torch.empty_like(sample).copy_(c[:, 2].reshape(view) * dout.float() + c[:, 0].reshape(view) * g)
    return d_sample, torch.empty_like(sample).copy_(c[:, 1].reshape(view) * g.float())


def _reference_step_backward(
    dout: Tensor,
    dx0: Optional[Tensor],
    sample: Tensor,
    model_output: Tensor,
    coeffs: Tensor,
    guidance_scale: Optional[float],
    clip: Optional[float],
) -> tuple[Tensor, Tensor]:
    """The backward contract: ``(d_sample, d_e)`` (see :func:`_step_backward`)."""
    return _step_backward(_reference_step, dout, dx0, sample, model_output, coeffs, guidance_scale, clip)


# ---------------------------------------------------------------- declaration


def _native_step(backend: str):
    kernel = _backend.native_kernel("sampling", "sampling_step", backend)

    def step(sample, model_output, coeffs, extra1, extra2, noise, guidance_scale, clip, return_x0):
        out, x0 = kernel(sample, model_output, coeffs, extra1, extra2, noise, guidance_scale, clip, return_x0)
        return out, (x0 if x0 is not None else sample.new_empty(0))  # a custom op returns tensors only

    return step


def _native_step_backward(backend: str):
    step = _op.kernel(backend)
    return lambda *args: _step_backward(step, *args)


def _save(ctx, inputs, output):
    sample, model_output, coeffs, extra1, extra2, noise, guidance_scale, clip, return_x0 = inputs
    ctx.save_for_backward(sample, model_output, coeffs)
    ctx.guidance_scale, ctx.clip, ctx.return_x0 = guidance_scale, clip, return_x0
    ctx.dtypes = tuple(None if t is None else t.dtype for t in (extra1, extra2, noise))


def _grads(ctx, dout, dx0):
    sample, model_output, coeffs = ctx.saved_tensors
    n, g = sample.shape[0], ctx.guidance_scale
    dout = in_layout_of(dout, sample)
    dx0 = in_layout_of(dx0, sample) if ctx.return_x0 and dx0 is not None else None
    d_sample, d_e = _op.backward(ctx, dout, dx0, sample, model_output, coeffs, g, ctx.clip)
    d_output = d_e if g is None else torch.cat([(1.0 - g) * d_e, g * d_e])
    view = (n, *([1] * (sample.dim() - 1)))
    rows = coeffs.reshape(-1, NUM_COEFFS)
    d_terms = [None if dt is None else (rows[:, j].reshape(-1, *view[1:]) * dout.float()).to(dt)
               for j, dt in zip((4, 5, 6), ctx.dtypes)]
    return (d_sample, d_output.to(model_output.dtype), None, *d_terms, None, None, None)


_op = declare_op(
    OP,
    reference=_reference_step,
    reference_backward=_reference_step_backward,
    kernels=_native_step,
    backward_kernels=_native_step_backward,
    save=_save,
    grads=_grads,
)


# ------------------------------------------------------------------ public op


def sampling_step(
    sample: Tensor,
    model_output: Tensor,
    update: StepUpdate,
    *,
    noise: Optional[Tensor] = None,
    guidance_scale: Optional[float] = None,
    clip: Optional[float] = None,
    return_x0: bool = False,
    backend: Optional[str] = None,
):
    """Apply one sampler :class:`StepUpdate` in one fused pass (see the module docstring).

    Args:
        sample: the state ``x``, (N, ...), float32/float16/bfloat16, any layout.
        model_output: ``e``, sample's shape, or the ``[uncond; cond]`` batch (2N, ...) with ``guidance_scale``.
        update: the step; its coefficients are floats or (N,) per-sample tensors, its terms tensors of
            sample's shape.
        noise: the tensor ``update.noise`` multiplies, sample's shape.
        guidance_scale: classifier-free guidance ``e = uncond + g * (cond - uncond)``.
        clip: clamp x0 to ``[-clip, clip]``.
        return_x0: also return the (clamped) x0.
        backend: ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"torch"``; None chooses.

    Returns ``out``, or ``(out, x0)`` with ``return_x0=True``; both have ``sample``'s dtype, shape and layout.
    """
    coeffs, extra1, extra2 = _flatten(update, sample)
    _check_step(sample, model_output, extra1, extra2, noise, guidance_scale)
    chosen = _op.resolve(sample.device, backend, dtype=sample.dtype)
    g = None if guidance_scale is None else float(guidance_scale)
    cl = None if clip is None else float(clip)
    # One memory order for all: sample's if the kernels can walk it, every other tensor in it.
    sample = batch_outer_layout(sample)
    model_output = in_layout_of(model_output, sample)
    extra1, extra2, noise = (None if t is None else in_layout_of(t, sample) for t in (extra1, extra2, noise))
    out, x0 = _op(sample, model_output, coeffs, extra1, extra2, noise, g, cl, bool(return_x0), chosen)
    return (out, x0) if return_x0 else out


def q_sample(x0: Tensor, noise: Tensor, sqrt_alpha: Tensor, sqrt_one_minus_alpha: Tensor, *, backend=None) -> Tensor:
    """Forward process ``sqrt(a_t) * x0 + sqrt(1 - a_t) * noise`` with per-sample (N,) coefficients."""
    # x0 slot = sqrt(1-a) * noise, out = sqrt(a) * x0 + that: two reads, one write.
    update = StepUpdate(X0From(0.0, sqrt_one_minus_alpha), sample=sqrt_alpha, x0=1.0)
    return sampling_step(x0, noise, update, backend=backend)


def v_target(x0: Tensor, noise: Tensor, sqrt_alpha: Tensor, sqrt_one_minus_alpha: Tensor, *, backend=None) -> Tensor:
    """The v-prediction target ``sqrt(a_t) * noise - sqrt(1 - a_t) * x0``, per-sample coefficients."""
    update = StepUpdate(X0From(0.0, sqrt_alpha), sample=-sqrt_one_minus_alpha, x0=1.0)
    return sampling_step(x0, noise, update, backend=backend)


def _flatten(update: StepUpdate, sample: Tensor):
    """The kernel's fp32 coefficient rows — one shared ``(7,)`` row, or ``(N, 7)`` when a coefficient is per
    sample — and its two extra tensors, from a :class:`StepUpdate`."""
    if not isinstance(update, StepUpdate):
        raise TypeError(
            f"sampling_step: update must be a fastgen.ops.sampling.StepUpdate, got {type(update).__name__}"
        )
    check_tensor("sample", sample)
    if sample.dim() < 1:
        raise ValueError("sampling_step: sample must have a batch dimension")
    try:
        if len(update.terms) > 2:
            raise ValueError
        padded = (*update.terms, (0.0, None), (0.0, None))  # absent terms: coefficient 0, no tensor
        (c4, e1), (c5, e2) = padded[0], padded[1]
    except (TypeError, ValueError):
        raise ValueError(
            f"sampling_step: update.terms must be at most two (coefficient, tensor) pairs, got {update.terms!r}"
        ) from None
    x0_from = update.x0_from
    row = (x0_from[0], x0_from[1], update.sample, update.x0, c4, c5, update.noise)
    if type(row[0]) is type(row[1]) is type(row[2]) is type(row[3]) is type(row[4]) is type(row[5]) is \
            type(row[6]) is float:
        # The schedulers' per-step row, shared by the batch: one (7,) tensor straight from the Python floats,
        # rounded float64 -> float32 to nearest as the general path does. On CPU through a float32 array
        # (1.4 us against torch.tensor's 4 us: this runs once per sampler step).
        if sample.is_cpu:
            return torch.frombuffer(array.array("f", row), dtype=torch.float32), e1, e2
        return torch.tensor(row, dtype=torch.float32, device=sample.device), e1, e2
    n = sample.shape[0]
    cols = []
    for name, v in zip(_COEFF_NAMES, row):
        if isinstance(v, Tensor):
            if not v.is_floating_point() or v.numel() not in (1, n) or v.dim() > 1:
                raise ValueError(
                    f"sampling_step: coefficient {name} must be a float or a floating-point (N,) tensor with N={n}, "
                    f"got {v.dtype} of shape {tuple(v.shape)}"
                )
            cols.append(v.detach().to(device=sample.device, dtype=torch.float64).reshape(-1).expand(n))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            cols.append(torch.full((n,), float(v), dtype=torch.float64, device=sample.device))
        else:
            raise TypeError(f"sampling_step: coefficient {name} must be a float or a tensor, got {type(v).__name__}")
    return torch.stack(cols, dim=1).to(torch.float32), e1, e2


_COEFF_NAMES = ("x0_from.sample", "x0_from.output", "sample", "x0", "terms[0]", "terms[1]", "noise")


def _check_step(sample, model_output, extra1, extra2, noise, guidance_scale) -> None:
    check_tensor("model_output", model_output)
    check_dtype("sample", sample, FLOAT_DTYPES)
    check_dtype("model_output", model_output, FLOAT_DTYPES)
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
    for name, t in (("terms[0]", extra1), ("terms[1]", extra2), ("noise", noise)):
        if t is None:
            continue
        check_tensor(name, t)
        check_dtype(name, t, FLOAT_DTYPES)
        if t.shape != sample.shape:
            raise ValueError(f"sampling_step: {name} shape {tuple(t.shape)} does not match sample shape {tuple(sample.shape)}")
    check_same_device(sample=sample, model_output=model_output, **{"terms[0]": extra1, "terms[1]": extra2}, noise=noise)
