"""``EulerDiscreteScheduler`` and the sigma-table machinery it shares with Euler ancestral and Heun.

These schedulers keep the sample in VE space (``x = x0 + sigma * eps``, started at ``init_noise_sigma``) and
scale the model input by ``1 / sqrt(sigma^2 + 1)``; the step math is :mod:`.steps` (Euler is DDIM with eta=0
in VE space).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ..ops.sampling import q_sample
from ._base import SchedulerOutput, SigmaSchedulerBase, register_to_config
from .schedules import check_num_inference_steps, exponential_sigmas, karras_sigmas, spaced_timesteps
from .steps import Prediction, churn, euler_step, ve_level, x0_coeffs

__all__ = ["EulerDiscreteScheduler"]


class SigmaTableScheduler(SigmaSchedulerBase):
    """Shared by Euler, Euler ancestral and Heun: timesteps, the float64 sigma table, input scaling, add_noise."""

    _prediction_aliases = {"original_sample": "sample"}

    def _init_tables(self) -> None:
        T = self.config.num_train_timesteps
        self._init_schedule(zero_snr_floor=True)
        self.timesteps = torch.from_numpy(np.linspace(0, T - 1, T, dtype=float)[::-1].copy()).to(torch.float32)
        self.sigmas = torch.cat([self.schedule.sigmas.flip(0), torch.zeros(1, dtype=torch.float64)])
        self._reset_index()

    def _prediction_type(self) -> str:
        p = self.config.prediction_type
        return self._prediction_aliases.get(p, p)

    def _x0(self, model_output: Tensor, level_sigma: float, guidance_scale) -> Prediction:
        c0, c1 = x0_coeffs(self._prediction_type(), ve_level(level_sigma))
        return Prediction(model_output, c0, c1, guidance_scale)

    def _spaced_sigmas(self, num_inference_steps: int) -> tuple[np.ndarray, np.ndarray]:
        """(timesteps, sigmas) before the final sigma, as diffusers' Euler family builds them."""
        cfg = self.config
        T = cfg.num_train_timesteps
        check_num_inference_steps(num_inference_steps, T)
        ts = spaced_timesteps(num_inference_steps, T, cfg.timestep_spacing, cfg.steps_offset, integer=False)
        sigmas = self.schedule.t_to_sigma(torch.from_numpy(ts.astype(np.float64))).numpy()
        kind = "karras" if cfg.get("use_karras_sigmas") else "exponential" if cfg.get("use_exponential_sigmas") else None
        if kind is not None:
            lo = cfg.get("sigma_min") if cfg.get("sigma_min") is not None else float(sigmas[-1])
            hi = cfg.get("sigma_max") if cfg.get("sigma_max") is not None else float(sigmas[0])
            respace = karras_sigmas if kind == "karras" else exponential_sigmas
            sigmas = respace(num_inference_steps, lo, hi)
            ts = self.schedule.sigma_to_t(sigmas).numpy()
        return ts, sigmas

    def _final_sigma(self) -> float:
        kind = self.config.get("final_sigmas_type", "zero")
        if kind == "zero":
            return 0.0
        if kind == "sigma_min":
            return float(self.schedule.sigmas[0])
        raise ValueError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {kind!r}")

    @property
    def init_noise_sigma(self) -> float:
        """Std of the initial noise: sigma_max (VE), or sqrt(sigma_max^2 + 1) with ``leading`` spacing as diffusers."""
        m = float(self.sigmas.max())
        return m if self.config.timestep_spacing in ("linspace", "trailing") else math.sqrt(m * m + 1)

    def scale_model_input(self, sample: Tensor, timestep) -> Tensor:
        """The model sees the VP sample ``x / sqrt(sigma^2 + 1)``."""
        if self._step_index is None:
            self._init_step_index(timestep)
        sigma = self._floats("sigmas")[self._step_index]
        self.is_scale_input_called = True
        return sample / math.sqrt(sigma * sigma + 1)

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps) -> Tensor:
        """``x0 + sigma(t) * noise`` for timesteps of the schedule (or at the begin index when it is set)."""
        ts = torch.as_tensor(timesteps).reshape(-1)
        idx = self._sigma_indices(ts, original_samples.shape[0])
        if len(idx) == 1:
            idx = idx * original_samples.shape[0]
        if len(idx) != original_samples.shape[0]:
            raise ValueError(f"need one timestep or one per sample ({original_samples.shape[0]}), got {len(idx)}")
        sigma = self.sigmas[idx].to(original_samples.device)
        return q_sample(original_samples, noise, torch.ones_like(sigma), sigma)

    @staticmethod
    def _reject_integer_timestep(timestep, name: str) -> None:
        # diffusers refuses integers here: they are usually enumerate() indices, not timesteps
        if isinstance(timestep, (int, np.integer)) and not isinstance(timestep, bool) or (
            isinstance(timestep, Tensor) and not timestep.is_floating_point()
        ):
            raise ValueError(
                f"Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to `{name}.step()` is not "
                "supported. Make sure to pass one of the `scheduler.timesteps` as a timestep."
            )


class EulerDiscreteScheduler(SigmaTableScheduler):
    """Euler steps of the probability-flow ODE (Karras et al. 2022, Algorithm 2), with diffusers' config keys."""

    order = 1
    _unsupported = {"use_beta_sigmas": False, "interpolation_type": "linear"}

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        prediction_type: str = "epsilon",
        interpolation_type: str = "linear",
        use_karras_sigmas: Optional[bool] = False,
        use_exponential_sigmas: Optional[bool] = False,
        use_beta_sigmas: Optional[bool] = False,
        sigma_min: Optional[float] = None,
        sigma_max: Optional[float] = None,
        timestep_spacing: str = "linspace",
        timestep_type: str = "discrete",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        final_sigmas_type: str = "zero",
    ):
        if sum(bool(v) for v in (use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas)) > 1:
            raise ValueError("Only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas can be used.")
        if timestep_type not in ("discrete", "continuous"):
            raise ValueError(f"timestep_type must be 'discrete' or 'continuous', got {timestep_type!r}")
        self._init_tables()
        if self._continuous():
            self.timesteps = (0.25 * self.schedule.sigmas.flip(0).log()).to(torch.float32)
        self.is_scale_input_called = False
        self.use_karras_sigmas = use_karras_sigmas

    def _continuous(self) -> bool:
        return self.config.timestep_type == "continuous" and self.config.prediction_type == "v_prediction"

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """Timesteps (float32) and sigmas (float64, with the final sigma appended) for ``num_inference_steps``."""
        ts, sigmas = self._spaced_sigmas(num_inference_steps)
        self.num_inference_steps = num_inference_steps
        sigmas = torch.from_numpy(np.append(sigmas, self._final_sigma()).astype(np.float64))
        if self._continuous():
            ts = (0.25 * sigmas[:-1].log()).numpy()
        self.timesteps = torch.from_numpy(np.asarray(ts, dtype=np.float32)).to(device)
        self.sigmas = sigmas
        self._reset_index()

    def step(self, model_output: Tensor, timestep, sample: Tensor, s_churn: float = 0.0, s_tmin: float = 0.0,
             s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None, return_dict: bool = True, *,
             guidance_scale: Optional[float] = None):
        """One Euler step to the next sigma (with optional churn, as diffusers applies it after the model call)."""
        self._reject_integer_timestep(timestep, type(self).__name__)
        self._check_step_inputs(model_output, sample, guidance_scale)
        i = self._enter_step(timestep)
        sigmas = self._floats("sigmas")
        sigma, sigma_next = sigmas[i : i + 2]
        sample, sigma_hat = churn(
            sample, sigma, len(sigmas) - 1,
            lambda: self._noise_for(generator).randn(sample.shape, sample.device, model_output.dtype),
            s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise,
        )
        # eps is scaled by sigma_hat, v by the sigma the model saw (diffusers' choice)
        pred = self._x0(model_output, sigma if self._prediction_type() == "v_prediction" else sigma_hat, guidance_scale)
        prev_sample, x0 = euler_step(pred, sample, sigma_hat, sigma_next, return_x0=True)
        self._step_index += 1
        if not return_dict:
            return prev_sample, x0
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
