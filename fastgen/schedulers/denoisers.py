"""Adapters that turn a network trained on discrete timesteps into a k-diffusion denoiser ``D(x, sigma) -> x0``.

Like k-diffusion's ``external.py`` wrappers, the network sees the VP-scaled input ``x / sqrt(sigma^2 + 1)``
at the timestep ``t(sigma)``, and its eps / v / x0 output is mapped to x0 in VE space. Besides ``__call__``
(a plain x0 tensor, usable by any k-diffusion sampler), each adapter has ``predict`` which returns the raw
output with the affine map to x0 (:class:`~fastgen.schedulers.steps.Prediction`); fastgen's sampler
functions use it to fuse that map, clipping and classifier-free guidance into the step kernel.

The network is called as ``model(x_in, t, **extra_args)``; a returned object with ``.sample`` (diffusers'
``UNet2DOutput``) or a tuple is unwrapped to its first tensor.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..ops.sampling import StepUpdate, X0From, sampling_step
from .schedules import DiscreteSchedule
from .steps import Prediction, check_prediction_type, predict as predict_x0, ve_level, x0_coeffs

__all__ = ["DiscreteDenoiser", "EpsDenoiser", "VDenoiser", "X0Denoiser", "CFGDenoiser", "predict"]


def _as_schedule(schedule) -> DiscreteSchedule:
    if isinstance(schedule, DiscreteSchedule):
        return schedule
    if hasattr(schedule, "schedule") and isinstance(schedule.schedule, DiscreteSchedule):
        return schedule.schedule  # a fastgen scheduler
    if hasattr(schedule, "alphas_cumprod"):
        return DiscreteSchedule(schedule.alphas_cumprod)  # e.g. a diffusers scheduler
    if isinstance(schedule, Tensor) or hasattr(schedule, "__len__"):
        return DiscreteSchedule(schedule)
    raise TypeError(f"schedule must be a DiscreteSchedule, a scheduler or an alphas_cumprod table, got {type(schedule).__name__}")


def _unwrap(out) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)):
        return out[0]
    raise TypeError(f"model returned {type(out).__name__}; expected a tensor, an object with .sample, or a tuple")


def _sigma_value(sigma) -> float:
    """The single noise level of a step (samplers pass one sigma per step, possibly expanded per sample)."""
    if isinstance(sigma, Tensor):
        flat = sigma.detach().flatten()
        if flat.numel() == 0:
            raise ValueError("sigma is empty")
        if flat.numel() > 1 and not bool((flat == flat[0]).all()):
            raise ValueError("predict() needs one sigma for the whole batch; call the denoiser itself for per-sample sigmas")
        return float(flat[0])
    return float(sigma)


class DiscreteDenoiser:
    """k-diffusion denoiser around a discrete-timestep network predicting ``prediction_type``.

    ``schedule``: a :class:`DiscreteSchedule`, a (fastgen or diffusers) scheduler, or an alphas_cumprod table.
    ``quantize``: call the network at the nearest trained timestep (what DPM-Solver with Karras sigmas does).
    ``clip``: optional clamp of x0 to [-clip, clip], fused into the step.
    """

    def __init__(self, model, schedule, prediction_type: str = "epsilon", *, quantize: bool = False,
                 clip: Optional[float] = None):
        self.model = model
        self.schedule = _as_schedule(schedule)
        self.prediction_type = check_prediction_type(prediction_type)
        self.quantize = quantize
        self.clip = clip

    # sigma <-> t
    def sigma_to_t(self, sigma) -> Tensor:
        return self.schedule.sigma_to_t(sigma, quantize=self.quantize)

    def t_to_sigma(self, t) -> Tensor:
        return self.schedule.t_to_sigma(t)

    @property
    def sigmas(self) -> Tensor:
        return self.schedule.sigmas

    @property
    def sigma_min(self) -> float:
        return self.schedule.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.schedule.sigma_max

    def model_input(self, x: Tensor, sigma: float) -> tuple[Tensor, Tensor]:
        """The network's input (VP-scaled x) and timestep batch for one noise level."""
        x_in = x / ((sigma**2 + 1) ** 0.5)
        t = float(self.sigma_to_t(torch.tensor(sigma, dtype=torch.float64)))
        return x_in, torch.full((x.shape[0],), t, dtype=torch.float32, device=x.device)

    def predict(self, x: Tensor, sigma, **extra_args) -> Prediction:
        """Raw network output at one noise level, with its affine map to x0 (VE space)."""
        s = _sigma_value(sigma)
        x_in, t = self.model_input(x, s)
        out = _unwrap(self.model(x_in, t, **extra_args))
        return predict_x0(out, self.prediction_type, ve_level(s))

    def __call__(self, x: Tensor, sigma, **extra_args) -> Tensor:
        """x0 prediction ``D(x, sigma)`` (sigma: a float, or one per sample)."""
        if not isinstance(sigma, Tensor) or sigma.numel() == 1 or bool((sigma == sigma.flatten()[0]).all()):
            return to_x0(self.predict(x, sigma, **extra_args), x, clip=self.clip)
        # per-sample sigmas: one model call on the batch, one coefficient row per sample
        sig = sigma.detach().double().flatten().cpu()
        if sig.numel() != x.shape[0]:
            raise ValueError(f"sigma must be a scalar or have one entry per sample ({x.shape[0]}), got {sig.numel()}")
        view = (-1,) + (1,) * (x.dim() - 1)
        x_in = x / (sig**2 + 1).sqrt().to(x).reshape(view)
        t = self.sigma_to_t(sig).to(device=x.device, dtype=torch.float32)
        out = _unwrap(self.model(x_in, t, **extra_args))
        # one x0 map per sample: X0From with (N,) coefficient tensors
        c0, c1 = torch.tensor([x0_coeffs(self.prediction_type, ve_level(s)) for s in sig.tolist()], dtype=torch.float64).unbind(1)
        return sampling_step(x, out, StepUpdate(X0From(c0, c1), x0=1.0), clip=self.clip)


class EpsDenoiser(DiscreteDenoiser):
    """Denoiser around an eps-predicting network (k-diffusion's ``DiscreteEpsDDPMDenoiser``)."""

    def __init__(self, model, schedule, **kwargs):
        super().__init__(model, schedule, "epsilon", **kwargs)


class VDenoiser(DiscreteDenoiser):
    """Denoiser around a v-predicting network (k-diffusion's ``DiscreteVDDPMDenoiser``)."""

    def __init__(self, model, schedule, **kwargs):
        super().__init__(model, schedule, "v_prediction", **kwargs)


class X0Denoiser(DiscreteDenoiser):
    """Denoiser around a network that predicts x0 directly."""

    def __init__(self, model, schedule, **kwargs):
        super().__init__(model, schedule, "sample", **kwargs)


class CFGDenoiser:
    """Classifier-free guidance around a denoiser: one network call on ``[x; x]`` with ``[uncond; cond]``.

    ``predict(x, sigma, cond=..., uncond=..., **extra)`` passes ``cat([uncond, cond])`` as ``cond_key`` and
    leaves the combination ``uncond + g * (cond - uncond)`` to the step kernel (never materialised).
    """

    def __init__(self, denoiser: DiscreteDenoiser, guidance_scale: float, cond_key: str = "encoder_hidden_states"):
        if not hasattr(denoiser, "predict"):
            raise TypeError("CFGDenoiser needs a denoiser with .predict (e.g. EpsDenoiser)")
        self.inner = denoiser
        self.guidance_scale = float(guidance_scale)
        self.cond_key = cond_key
        self.clip = getattr(denoiser, "clip", None)

    def predict(self, x: Tensor, sigma, *, cond: Tensor, uncond: Tensor, **extra_args) -> Prediction:
        if uncond.shape != cond.shape:
            raise ValueError(f"uncond shape {tuple(uncond.shape)} does not match cond shape {tuple(cond.shape)}")
        extra_args = {**extra_args, self.cond_key: torch.cat([uncond, cond])}
        p = self.inner.predict(torch.cat([x, x]), sigma, **extra_args)
        return p._replace(guidance_scale=self.guidance_scale)

    def __call__(self, x: Tensor, sigma, **extra_args) -> Tensor:
        return to_x0(self.predict(x, sigma, **extra_args), x, clip=self.clip)


def to_x0(pred: Prediction, x: Tensor, clip: Optional[float] = None) -> Tensor:
    """Materialise the x0 of a prediction (one kernel call: out = x0)."""
    return sampling_step(x, pred.output, StepUpdate(pred.x0_from, x0=1.0), guidance_scale=pred.guidance_scale, clip=clip)


def predict(denoiser, x: Tensor, sigma: float, extra_args: dict) -> Prediction:
    """A :class:`Prediction` from any denoiser: fused (``.predict``) or a plain k-diffusion callable (x0)."""
    if hasattr(denoiser, "predict"):
        return denoiser.predict(x, sigma, **extra_args)
    out = denoiser(x, x.new_full((x.shape[0],), sigma), **extra_args)
    if not isinstance(out, Tensor) or out.shape != x.shape:
        raise ValueError(f"denoiser must return an x0 tensor of shape {tuple(x.shape)}, got "
                         f"{tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}")
    return Prediction(out, X0From(sample=0.0, output=1.0))
