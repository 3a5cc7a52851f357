"""k-diffusion-style sampler functions: ``sample_*(denoiser, x, sigmas, extra_args=None, callback=None,
generator=None, **options)``.

``x`` is the initial noise scaled to ``sigmas[0]`` (VE space: ``x = x0 + sigma * eps``), ``sigmas`` the
descending noise levels ending at the final one (usually 0). ``denoiser(x, sigma, **extra_args)`` returns
x0; a denoiser with ``.predict`` (the adapters in :mod:`.denoisers`) lets the step kernel fuse the
eps/v-to-x0 map, clipping and classifier-free guidance. ``callback`` gets a dict with ``x`` (before the
update), ``i``, ``sigma``, ``sigma_hat`` and ``denoised``. ``generator``: see :mod:`.noise`.

Each step is one call of the shared step functions in :mod:`.steps` (the same ones the scheduler classes
use), i.e. one fused kernel call per model evaluation.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from .denoisers import predict
from .noise import GeneratorLike, NoiseSource
from .steps import (
    ancestral_sigmas,
    churn,
    ddim_step,
    ddpm_step,
    dpm_solver_order,
    dpmpp_2s_correct_step,
    dpmpp_step,
    euler_ancestral_step,
    euler_step,
    heun_correct_step,
    ve_level,
)

__all__ = [
    "sample_ddpm",
    "sample_ddim",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "sample_dpmpp_2m",
    "sample_dpmpp_3m",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_2s_ancestral",
]


def _setup(x, sigmas, extra_args):
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if isinstance(sigmas, Tensor):
        sig = sigmas.detach().double().flatten().cpu().tolist()
    else:
        sig = [float(s) for s in sigmas]
    if len(sig) < 2:
        raise ValueError(f"sigmas needs at least 2 noise levels (start and end), got {len(sig)}")
    if any(b > a for a, b in zip(sig, sig[1:])) or sig[-1] < 0:
        raise ValueError("sigmas must be non-negative and non-increasing")
    return sig, dict(extra_args or {})


def _clip(denoiser):
    return getattr(denoiser, "clip", None) if hasattr(denoiser, "predict") else None


def _report(callback, x, i, sigma, sigma_hat, denoised):
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma_hat, "denoised": denoised})


@torch.no_grad()
def sample_ddpm(denoiser, x: Tensor, sigmas, extra_args=None, callback: Optional[Callable] = None,
                generator: GeneratorLike = None, *, variance_type: str = "fixed_small") -> Tensor:
    """DDPM ancestral sampling (Ho et al. 2020)."""
    sig, extra = _setup(x, sigmas, extra_args)
    noise, clip = NoiseSource(generator), _clip(denoiser)
    for i in range(len(sig) - 1):
        pred = predict(denoiser, x, sig[i], extra)
        z = noise.randn(x.shape, x.device, x.dtype) if sig[i + 1] > 0 else None
        x_next, x0 = ddpm_step(pred, x, ve_level(sig[i]), ve_level(sig[i + 1]), variance_type=variance_type, noise=z,
                               clip=clip, return_x0=callback is not None)
        _report(callback, x, i, sig[i], sig[i], x0)
        x = x_next
    return x


@torch.no_grad()
def sample_ddim(denoiser, x: Tensor, sigmas, extra_args=None, callback: Optional[Callable] = None,
                generator: GeneratorLike = None, *, eta: float = 0.0, use_clipped_model_output: bool = False) -> Tensor:
    """DDIM (Song et al. 2021), stochastic for eta > 0."""
    sig, extra = _setup(x, sigmas, extra_args)
    noise, clip = NoiseSource(generator), _clip(denoiser)
    for i in range(len(sig) - 1):
        pred = predict(denoiser, x, sig[i], extra)
        # like diffusers, draw at every step when eta > 0 so generator states line up with the scheduler
        z = noise.randn(x.shape, x.device, x.dtype) if eta > 0 else None
        x_next, x0 = ddim_step(pred, x, ve_level(sig[i]), ve_level(sig[i + 1]), eta=eta, noise=z, clip=clip,
                               eps_from_clipped=use_clipped_model_output, return_x0=callback is not None)
        _report(callback, x, i, sig[i], sig[i], x0)
        x = x_next
    return x


@torch.no_grad()
def sample_euler(denoiser, x: Tensor, sigmas, extra_args=None, callback: Optional[Callable] = None,
                 generator: GeneratorLike = None, *, s_churn: float = 0.0, s_tmin: float = 0.0,
                 s_tmax: float = float("inf"), s_noise: float = 1.0) -> Tensor:
    """Euler method (Karras et al. 2022, Algorithm 2)."""
    sig, extra = _setup(x, sigmas, extra_args)
    noise, clip, n = NoiseSource(generator), _clip(denoiser), len(sig) - 1
    for i in range(n):
        x, sigma_hat = churn(x, sig[i], n, lambda: noise.randn(x.shape, x.device, x.dtype), s_churn=s_churn,
                             s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise)
        pred = predict(denoiser, x, sigma_hat, extra)
        x_next, x0 = euler_step(pred, x, sigma_hat, sig[i + 1], clip=clip, return_x0=callback is not None)
        _report(callback, x, i, sig[i], sigma_hat, x0)
        x = x_next
    return x


@torch.no_grad()
def sample_euler_ancestral(denoiser, x: Tensor, sigmas, extra_args=None, callback: Optional[Callable] = None,
                           generator: GeneratorLike = None, *, eta: float = 1.0, s_noise: float = 1.0) -> Tensor:
    """Ancestral sampling with Euler method steps."""
    sig, extra = _setup(x, sigmas, extra_args)
    noise = NoiseSource(generator)
    for i in range(len(sig) - 1):
        pred = predict(denoiser, x, sig[i], extra)
        # diffusers draws at every step (the last one has sigma_up = 0), so the generator states line up
        z = noise.randn(x.shape, x.device, x.dtype)
        x_next, x0 = euler_ancestral_step(pred, x, sig[i], sig[i + 1], eta=eta, noise=z, s_noise=s_noise,
                                          return_x0=callback is not None)
        _report(callback, x, i, sig[i], sig[i], x0)
        x = x_next
    return x


@torch.no_grad()
def sample_heun(denoiser, x: Tensor, sigmas, extra_args=None, callback: Optional[Callable] = None,
                generator: GeneratorLike = None, *, s_churn: float = 0.0, s_tmin: float = 0.0,
                s_tmax: float = float("inf"), s_noise: float = 1.0) -> Tensor:
    """Heun's method (Karras et al. 2022, Algorithm 2), Euler on the step to sigma = 0."""
    sig, extra = _setup(x, sigmas, extra_args)
    noise, clip, n = NoiseSource(generator), _clip(denoiser), len(sig) - 1
    for i in range(n):
        x, sigma_hat = churn(x, sig[i], n, lambda: noise.randn(x.shape, x.device, x.dtype), s_churn=s_churn,
                             s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise)
        pred = predict(denoiser, x, sigma_hat, extra)
        x_mid, x0 = euler_step(pred, x, sigma_hat, sig[i + 1], clip=clip, return_x0=True)
        _report(callback, x, i, sig[i], sigma_hat, x0)
        if sig[i + 1] == 0:
            x = x_mid
            continue
        pred2 = predict(denoiser, x_mid, sig[i + 1], extra)
        x = heun_correct_step(pred2, x_mid, x, x0, sigma_hat, sig[i + 1], clip=clip)[0]
    return x


def _dpmpp_multistep(denoiser, x, sigmas, extra_args, callback, generator, *, order, solver_type, lower_order_final,
                     euler_at_final, sde):
    if order not in (1, 2, 3):
        raise ValueError(f"DPM-Solver++ order must be 1, 2 or 3, got {order}")
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    sig, extra = _setup(x, sigmas, extra_args)
    noise, n = NoiseSource(generator), len(sig) - 1
    levels, history = [], []  # newest first
    for i in range(n):
        pred = predict(denoiser, x, sig[i], extra)
        levels.insert(0, ve_level(sig[i]))
        k = dpm_solver_order(i, n, order, min(i, order), lower_order_final=lower_order_final,
                             euler_at_final=euler_at_final, final_sigma_zero=sig[-1] == 0)
        z = noise.randn(x.shape, x.device, torch.float32).to(x.dtype) if sde else None
        x_next, x0 = dpmpp_step(pred, x, ve_level(sig[i + 1]), levels, history, order=k, solver_type=solver_type,
                                sde=sde, noise=z)
        _report(callback, x, i, sig[i], sig[i], x0)
        history.insert(0, x0)
        del levels[order:], history[order - 1:]  # keep what the next step can use
        x = x_next
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoiser, x: Tensor, sigmas, extra_args=None, callback: Optional[Callable] = None,
                    generator: GeneratorLike = None, *, solver_type: str = "midpoint", lower_order_final: bool = True,
                    euler_at_final: bool = False) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022)."""
    return _dpmpp_multistep(denoiser, x, sigmas, extra_args, callback, generator, order=2, solver_type=solver_type,
                            lower_order_final=lower_order_final, euler_at_final=euler_at_final, sde=False)


@torch.no_grad()
def sample_dpmpp_3m(denoiser, x: Tensor, sigmas, extra_args=None, callback: Optional[Callable] = None,
                    generator: GeneratorLike = None, *, lower_order_final: bool = True,
                    euler_at_final: bool = False) -> Tensor:
    """DPM-Solver++(3M) (Lu et al. 2022)."""
    return _dpmpp_multistep(denoiser, x, sigmas, extra_args, callback, generator, order=3, solver_type="midpoint",
                            lower_order_final=lower_order_final, euler_at_final=euler_at_final, sde=False)


@torch.no_grad()
def sample_dpmpp_2m_sde(denoiser, x: Tensor, sigmas, extra_args=None, callback: Optional[Callable] = None,
                        generator: GeneratorLike = None, *, solver_type: str = "midpoint",
                        lower_order_final: bool = True, euler_at_final: bool = False) -> Tensor:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022; diffusers' ``sde-dpmsolver++``)."""
    return _dpmpp_multistep(denoiser, x, sigmas, extra_args, callback, generator, order=2, solver_type=solver_type,
                            lower_order_final=lower_order_final, euler_at_final=euler_at_final, sde=True)


@torch.no_grad()
def sample_dpmpp_2s_ancestral(denoiser, x: Tensor, sigmas, extra_args=None, callback: Optional[Callable] = None,
                              generator: GeneratorLike = None, *, eta: float = 1.0, s_noise: float = 1.0) -> Tensor:
    """Ancestral sampling with DPM-Solver++(2S) second-order steps."""
    sig, extra = _setup(x, sigmas, extra_args)
    noise = NoiseSource(generator)
    for i in range(len(sig) - 1):
        sigma = sig[i]
        pred = predict(denoiser, x, sigma, extra)
        sigma_down, sigma_up = ancestral_sigmas(sigma, sig[i + 1], eta)
        z = noise.randn(x.shape, x.device, x.dtype) if sig[i + 1] > 0 else None
        if sigma_down == 0:  # nothing deterministic left to integrate: x0 plus sigma_up of noise
            x_next, x0 = ddim_step(pred, x, ve_level(sigma), ve_level(sig[i + 1]), eta=eta, noise=z,
                                   noise_std=sigma_up * s_noise, eps_from_clipped=True, return_x0=True)
        else:
            # midpoint in log-sigma (r = 1/2): an Euler (= DDIM) step to sigma_s = sqrt(sigma * sigma_down)
            sigma_s = math.sqrt(sigma * sigma_down)
            x_mid, x0 = euler_step(pred, x, sigma, sigma_s, return_x0=True)
            pred2 = predict(denoiser, x_mid, sigma_s, extra)
            x_next = dpmpp_2s_correct_step(pred2, x_mid, x, sigma, sigma_down, sigma_up * s_noise, noise=z)[0]
        _report(callback, x, i, sigma, sigma, x0)
        x = x_next
    return x
