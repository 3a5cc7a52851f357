"""Noise schedules: beta tables, alphas_cumprod, sigma tables and step spacings.

The beta and alphas_cumprod tables are built in float32 exactly as diffusers
builds them, because those are the tables the released models were trained
with; everything derived from them (sigma tables, log-sigmas, spacings) is
float64, and step coefficients are computed from the float64 values.

Conventions: a discrete model is trained on timesteps ``t = 0 .. T-1`` with
``x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps``; its sigma (the "VE"
noise level of k-diffusion) is ``sigma_t = sqrt((1 - abar_t) / abar_t)``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace", "exp")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")

ArrayLike = Union[Tensor, np.ndarray, Sequence[float]]


# ------------------------------------------------------------------ betas


def betas_for_alpha_bar(num_diffusion_timesteps: int, max_beta: float = 0.999, alpha_transform_type: str = "cosine") -> Tensor:
    """Betas that discretise a continuous ``alpha_bar(t)``, t in [0, 1] (``squaredcos_cap_v2`` is the cosine one)."""
    if alpha_transform_type == "cosine":
        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    elif alpha_transform_type == "laplace":
        def alpha_bar(t):
            lmb = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
            snr = math.exp(lmb)
            return math.sqrt(snr / (1 + snr))
    elif alpha_transform_type == "exp":
        def alpha_bar(t):
            return math.exp(t * -12.0)
    else:
        raise ValueError(f"alpha_transform_type must be one of cosine, laplace, exp; got {alpha_transform_type!r}")
    n = num_diffusion_timesteps
    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return torch.tensor(betas, dtype=torch.float32)


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Rescale betas so the last timestep has zero SNR (Lin et al. 2023, "Common Diffusion Noise Schedules and
    Sample Steps are Flawed", Algorithm 1): shift and scale sqrt(abar) so it ends at exactly 0."""
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def make_betas(
    num_train_timesteps: int = 1000,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
    beta_schedule: str = "linear",
    trained_betas: Optional[ArrayLike] = None,
    rescale_betas_zero_snr: bool = False,
) -> Tensor:
    """The float32 beta table of a discrete diffusion model, built the way diffusers builds it."""
    _check_int("num_train_timesteps", num_train_timesteps, minimum=1)
    T = num_train_timesteps
    if trained_betas is not None:
        betas = torch.as_tensor(np.asarray(trained_betas, dtype=np.float64), dtype=torch.float32).flatten()
        if betas.numel() != T:
            raise ValueError(f"trained_betas must have num_train_timesteps={T} entries, got {betas.numel()}")
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float32)
    elif beta_schedule == "scaled_linear":
        # Stable Diffusion's schedule: linear in sqrt(beta).
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float32) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        betas = betas_for_alpha_bar(T, alpha_transform_type="cosine")
    elif beta_schedule == "laplace":
        betas = betas_for_alpha_bar(T, alpha_transform_type="laplace")
    elif beta_schedule == "exp":
        betas = betas_for_alpha_bar(T, alpha_transform_type="exp")
    elif beta_schedule == "sigmoid":
        betas = torch.sigmoid(torch.linspace(-6, 6, T)) * (beta_end - beta_start) + beta_start
    else:
        raise ValueError(f"unknown beta_schedule {beta_schedule!r}: expected one of {', '.join(BETA_SCHEDULES)} (or trained_betas)")
    if rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas


def alphas_cumprod_from_betas(betas: Tensor) -> Tensor:
    """``abar_t = prod_{s<=t} (1 - beta_s)``, cumulated in float32 like the training code did."""
    return torch.cumprod(1.0 - betas.to(torch.float32), dim=0)


# ------------------------------------------------------------------ the discrete schedule


class DiscreteSchedule:
    """The noise levels of a model trained on discrete timesteps: ``alphas_cumprod`` (float32, as trained)
    and the float64 sigma table, with the maps between sigmas and (fractional) timesteps."""

    def __init__(self, alphas_cumprod: ArrayLike):
        ac = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float32).flatten()
        if ac.numel() < 2:
            raise ValueError("alphas_cumprod needs at least 2 entries")
        self.alphas_cumprod = ac
        ac64 = ac.double()
        self.sigmas = ((1 - ac64) / ac64).sqrt()  # ascending in t; inf where abar == 0 (zero terminal SNR)
        self.log_sigmas = self.sigmas.log()
        # The sigma -> timestep map inverts diffusers' own float32 log-sigma table: timesteps are the model's
        # conditioning (and diffusers truncates or rounds them), so they must match diffusers bit for bit.
        # The step math uses the float64 sigmas above.
        self._t_log_sigmas = np.log((((1 - ac) / ac) ** 0.5).numpy())

    @classmethod
    def from_betas(cls, betas: Tensor) -> "DiscreteSchedule":
        return cls(alphas_cumprod_from_betas(betas))

    @classmethod
    def from_config(cls, **kwargs) -> "DiscreteSchedule":
        """Build from beta-schedule keys (``num_train_timesteps``, ``beta_start``, ``beta_end``, ``beta_schedule``,
        ``trained_betas``, ``rescale_betas_zero_snr``)."""
        return cls.from_betas(make_betas(**kwargs))

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.numel()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def t_to_sigma(self, t: ArrayLike) -> Tensor:
        """Sigma at (fractional) timesteps, interpolated linearly in sigma as diffusers does (float64)."""
        t = np.asarray(torch.as_tensor(t).double().cpu(), dtype=np.float64)
        grid = np.arange(self.num_train_timesteps, dtype=np.float64)
        return torch.from_numpy(np.interp(t, grid, self.sigmas.numpy()))

    def sigma_to_t(self, sigma: ArrayLike, quantize: bool = False) -> Tensor:
        """Fractional timestep of each sigma by linear interpolation in log-sigma (k-diffusion, diffusers' Karras
        path). ``quantize=True`` rounds to the nearest trained timestep. Returns float64."""
        t = sigma_to_t(np.asarray(torch.as_tensor(sigma).double().cpu()), self._t_log_sigmas, quantize)
        return torch.from_numpy(np.asarray(t, dtype=np.float64))


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray, quantize: bool = False) -> np.ndarray:
    """Invert a log-sigma table by piecewise-linear interpolation (float64 result; clamps outside the table)."""
    sigma = np.asarray(sigma, dtype=np.float64)
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    # last table entry at or below log_sigma, kept one short of the end so high_idx exists
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    t = ((1 - w) * low_idx + w * high_idx).reshape(sigma.shape)
    # rounding the interpolated t is what diffusers' DPM-Solver does with Karras sigmas
    return np.round(t) if quantize else t


# ------------------------------------------------------------------ timestep spacings


def spaced_timesteps(
    num_inference_steps: int,
    num_train_timesteps: int,
    spacing: str = "leading",
    steps_offset: int = 0,
    *,
    integer: bool = True,
) -> np.ndarray:
    """Descending inference timesteps (Table 2 of Lin et al. 2023).

    ``integer=True`` gives the int64 timesteps of DDPM/DDIM (``linspace`` rounded); ``integer=False`` the
    float32 ones of the sigma-based schedulers (``linspace`` left fractional, as diffusers' Euler does).
    """
    check_num_inference_steps(num_inference_steps, num_train_timesteps)
    n, T = num_inference_steps, num_train_timesteps
    if spacing == "linspace":
        if integer:
            ts = np.linspace(0, T - 1, n).round()[::-1].copy().astype(np.int64)
        else:
            ts = np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
    elif spacing == "leading":
        ratio = T // n
        ts = (np.arange(0, n) * ratio).round()[::-1].copy()
        ts = ts.astype(np.int64 if integer else np.float32) + steps_offset
    elif spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / n)).astype(np.int64 if integer else np.float32) - 1
    else:
        raise ValueError(f"unknown timestep_spacing {spacing!r}: expected one of {', '.join(TIMESTEP_SPACINGS)}")
    return ts


def check_num_inference_steps(num_inference_steps, num_train_timesteps: int) -> None:
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
        raise TypeError(f"num_inference_steps must be an int, got {type(num_inference_steps).__name__}")
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise ValueError(
            f"num_inference_steps must be between 1 and num_train_timesteps={num_train_timesteps}, got {num_inference_steps}"
        )


# ------------------------------------------------------------------ sigma spacings (k-diffusion)


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) spacing: uniform in sigma^(1/rho), float64, descending, no final zero."""
    ramp = np.linspace(0, 1, n)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv + ramp * (min_inv - max_inv)) ** rho


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> np.ndarray:
    """Uniform in log-sigma, float64, descending, no final zero."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def polyexponential_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> np.ndarray:
    """k-diffusion's polyexponential spacing: log-sigma follows ramp^rho (rho=1 is exponential)."""
    ramp = np.linspace(1, 0, n) ** rho
    return np.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min))


def _append_zero(s: np.ndarray, append_zero: bool, device) -> Tensor:
    t = torch.from_numpy(np.ascontiguousarray(s, dtype=np.float64))
    if append_zero:
        t = torch.cat([t, t.new_zeros(1)])
    return t.to(device)


def get_sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0, append_zero: bool = True, device="cpu") -> Tensor:
    """Karras et al. (2022) noise levels for a sampler function (float64, with a final 0 by default)."""
    _check_sigma_range(n, sigma_min, sigma_max)
    return _append_zero(karras_sigmas(n, sigma_min, sigma_max, rho), append_zero, device)


def get_sigmas_exponential(n: int, sigma_min: float, sigma_max: float, append_zero: bool = True, device="cpu") -> Tensor:
    """Noise levels uniform in log-sigma (float64, with a final 0 by default)."""
    _check_sigma_range(n, sigma_min, sigma_max)
    return _append_zero(exponential_sigmas(n, sigma_min, sigma_max), append_zero, device)


def get_sigmas_polyexponential(
    n: int, sigma_min: float, sigma_max: float, rho: float = 1.0, append_zero: bool = True, device="cpu"
) -> Tensor:
    """k-diffusion's polyexponential noise levels (float64, with a final 0 by default)."""
    _check_sigma_range(n, sigma_min, sigma_max)
    return _append_zero(polyexponential_sigmas(n, sigma_min, sigma_max, rho), append_zero, device)


def _check_sigma_range(n, sigma_min, sigma_max) -> None:
    _check_int("n", n, minimum=1)
    if not (0 < sigma_min <= sigma_max and math.isfinite(sigma_max)):
        raise ValueError(f"need 0 < sigma_min <= sigma_max < inf, got sigma_min={sigma_min}, sigma_max={sigma_max}")


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
