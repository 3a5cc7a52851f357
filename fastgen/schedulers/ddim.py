"""``DDIMScheduler``: diffusers-compatible DDIM in VP space (math in :func:`.steps.ddim_step`)."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ._base import SchedulerOutput
from ._config import register_to_config
from ._vp import VPScheduler, zero_snr_step_error
from .schedules import check_num_inference_steps, spaced_timesteps
from .steps import Level, ddim_step, predict, vp_level

__all__ = ["DDIMScheduler"]


class DDIMScheduler(VPScheduler):
    """Denoising diffusion implicit models (Song et al. 2021), with diffusers' config keys.

    As in diffusers, the step from timestep t lands on ``t - num_train_timesteps // num_inference_steps``
    whatever the spacing (with ``linspace`` or an uneven ``trailing`` spacing that is not the next timestep).
    """

    order = 1
    _unsupported = {"thresholding": False}

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
    ):
        self._init_schedule(zero_snr_floor=False)
        # the level after the last step: clean (abar = 1) or the first trained level
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self._alphas_cumprod[0]
        self._final_abar = float(self.final_alpha_cumprod)
        self.init_noise_sigma = 1.0
        self.timesteps = torch.from_numpy(np.arange(0, num_train_timesteps)[::-1].copy().astype(np.int64))
        self._step_tables()

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """Pick the inference timesteps (``timestep_spacing`` with ``steps_offset``)."""
        T = self.config.num_train_timesteps
        check_num_inference_steps(num_inference_steps, T)
        ts = spaced_timesteps(num_inference_steps, T, self.config.timestep_spacing, self.config.steps_offset)
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.from_numpy(ts).to(device)
        self._step_tables()

    def previous_timestep(self, timestep) -> int:
        """``timestep - num_train_timesteps // num_inference_steps``, the level DDIM's step lands on."""
        self._require_timesteps()
        return self._trained_timestep(timestep) - self.config.num_train_timesteps // self.num_inference_steps

    def _trained_timestep(self, timestep) -> int:
        """Any trained timestep: as in diffusers, a DDIM step from a timestep off the schedule is the well-defined
        jump from its level to ``t - num_train_timesteps // num_inference_steps``."""
        t = self._timestep_value(timestep)
        T = self.config.num_train_timesteps
        if t != int(t) or not 0 <= t < T:
            raise ValueError(f"DDIMScheduler: timestep {t:g} is not in the schedule: DDIM steps from an integer "
                             f"timestep in [0, {T - 1}] (normally one of scheduler.timesteps)")
        return int(t)

    def _levels(self, t: int, tables) -> tuple[Level, Level]:
        prev = t - self.config.num_train_timesteps // self.num_inference_steps
        prev_ac = tables.abar[prev] if prev >= 0 else self._final_abar
        if prev_ac == 0:
            raise ValueError(zero_snr_step_error(self, t, prev, tables.abar))
        return vp_level(tables.abar[t]), vp_level(prev_ac)

    def step(self, model_output: Tensor, timestep, sample: Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator=None, variance_noise: Optional[Tensor] = None,
             return_dict: bool = True, *, guidance_scale: Optional[float] = None):
        """One DDIM step; ``eta`` > 0 adds ``eta`` times the DDPM posterior noise.

        With ``guidance_scale``, ``model_output`` is the ``[uncond; cond]`` batch and the kernel combines it.
        """
        self._require_timesteps()
        self._check_step_inputs(model_output, sample)
        tables = self._step_tables()
        t = self._trained_timestep(timestep)
        cur, nxt = self._levels(t, tables)
        clip = float(self.config.clip_sample_range) if self.config.clip_sample else None
        pred = predict(model_output, self.config.prediction_type, cur, guidance_scale, clip=clip)
        noise = None
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError("pass either generator or variance_noise, not both")
            if variance_noise is not None:
                if variance_noise.shape != sample.shape:
                    raise ValueError(f"variance_noise shape {tuple(variance_noise.shape)} does not match sample {tuple(sample.shape)}")
                noise = variance_noise.to(sample.device)
            else:
                noise = self._noise_for(generator).randn(sample.shape, sample.device, model_output.dtype)
        prev_sample, x0 = ddim_step(pred, sample, cur, nxt, eta=eta, noise=noise, clip=clip,
                                    eps_from_clipped=use_clipped_model_output, return_x0=True)
        if not return_dict:
            return prev_sample, x0
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
