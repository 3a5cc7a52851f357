"""``EulerDiscreteScheduler``: Euler steps of the probability-flow ODE in VE space (the sigma-table machinery
it shares with Euler ancestral and Heun is :mod:`._sigma_table`; the step math is :func:`.steps.euler_step`,
i.e. DDIM with eta=0 in VE space)."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ._base import SchedulerOutput
from ._config import register_to_config
from ._sigma_table import SigmaTableScheduler
from .steps import churn, euler_step

__all__ = ["EulerDiscreteScheduler"]


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

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None, timesteps=None, sigmas=None) -> None:
        """Timesteps (float32) and sigmas (float64, with the final sigma appended) for ``num_inference_steps``,
        or from custom ``timesteps`` or ``sigmas`` (the latter including the final sigma), as diffusers'."""
        if num_inference_steps is None and timesteps is None and sigmas is None:
            raise ValueError("Must pass exactly one of `num_inference_steps` or `timesteps` or `sigmas.")
        if num_inference_steps is not None and (timesteps is not None or sigmas is not None):
            raise ValueError("Can only pass one of `num_inference_steps` or `timesteps` or `sigmas`.")
        if timesteps is not None and self._continuous():
            raise ValueError("Cannot set `timesteps` with `config.timestep_type = 'continuous'` and "
                             "`config.prediction_type = 'v_prediction'`.")
        if num_inference_steps is not None:
            ts, sig = self._spaced_sigmas(num_inference_steps)
            sig = np.append(sig, self._final_sigma())
        else:
            ts, sig = self._custom_schedule(timesteps, sigmas)
        sig = torch.from_numpy(np.asarray(sig, dtype=np.float64))
        if self._continuous():
            ts = (0.25 * sig[:-1].log()).numpy()
        self.num_inference_steps = len(ts)
        self.timesteps = torch.from_numpy(np.asarray(ts, dtype=np.float32)).to(device)
        self.sigmas = sig
        self._reset_index()
        self._step_tables()

    def step(self, model_output: Tensor, timestep, sample: Tensor, s_churn: float = 0.0, s_tmin: float = 0.0,
             s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None, return_dict: bool = True, *,
             guidance_scale: Optional[float] = None):
        """One Euler step to the next sigma (with optional churn, as diffusers applies it after the model call)."""
        self._reject_integer_timestep(timestep, type(self).__name__)
        self._check_step_inputs(model_output, sample)
        i, tables = self._enter_step(timestep)
        sigmas = tables.sigmas
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
