"""``EulerAncestralDiscreteScheduler``: diffusers-compatible ancestral Euler in VE space
(math in :func:`.steps.euler_ancestral_step`, i.e. DDIM with eta=1 in VE space)."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ._base import SchedulerOutput
from ._config import register_to_config
from ._sigma_table import SigmaTableScheduler
from .steps import euler_ancestral_step

__all__ = ["EulerAncestralDiscreteScheduler"]


class EulerAncestralDiscreteScheduler(SigmaTableScheduler):
    """Ancestral sampling with Euler steps (k-diffusion's ``sample_euler_ancestral``), with diffusers' config keys."""

    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        self._init_tables()
        self.is_scale_input_called = False

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """Timesteps (float32) and sigmas (float64, ending at 0) for ``num_inference_steps``."""
        ts, sigmas = self._spaced_sigmas(num_inference_steps)
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.from_numpy(np.asarray(ts, dtype=np.float32)).to(device)
        self.sigmas = torch.from_numpy(np.append(sigmas, 0.0).astype(np.float64))
        self._reset_index()
        self._step_tables()

    def step(self, model_output: Tensor, timestep, sample: Tensor, generator=None, return_dict: bool = True, *,
             guidance_scale: Optional[float] = None):
        """Euler step to sigma_down plus sigma_up of fresh noise (drawn at every step, as diffusers does)."""
        self._reject_integer_timestep(timestep, type(self).__name__)
        self._check_step_inputs(model_output, sample)
        i, tables = self._enter_step(timestep)
        sigma, sigma_next = tables.sigmas[i : i + 2]
        pred = self._x0(model_output, sigma, guidance_scale)
        z = self._noise_for(generator).randn(sample.shape, sample.device, model_output.dtype)
        prev_sample, x0 = euler_ancestral_step(pred, sample, sigma, sigma_next, noise=z, return_x0=True)
        self._step_index += 1
        if not return_dict:
            return prev_sample, x0
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
