"""``DDPMScheduler``: diffusers-compatible DDPM ancestral sampling in VP space (math in :func:`.steps.ddpm_step`)."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ._base import SchedulerOutput
from ._config import register_to_config
from ._vp import VPScheduler, zero_snr_step_error
from .schedules import check_num_inference_steps, spaced_timesteps
from .steps import DDPM_VARIANCE_TYPES, Level, ddpm_step, predict, vp_level

__all__ = ["DDPMScheduler", "VPScheduler"]


class DDPMScheduler(VPScheduler):
    """Denoising diffusion probabilistic models (Ho et al. 2020), with diffusers' config keys."""

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
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        if variance_type is None:  # e.g. a DPM-Solver config's default; diffusers' DDPM then uses fixed_small
            variance_type = "fixed_small"
        if variance_type not in DDPM_VARIANCE_TYPES:
            raise ValueError(f"unknown variance_type {variance_type!r}: expected one of {', '.join(DDPM_VARIANCE_TYPES)}")
        self._init_schedule(zero_snr_floor=False)
        self.one = torch.tensor(1.0)
        self.init_noise_sigma = 1.0
        self.custom_timesteps = False
        self.variance_type = variance_type
        # the full schedule, as diffusers: step() works before set_timesteps (each step to t - 1)
        self.timesteps = torch.from_numpy(np.arange(0, num_train_timesteps)[::-1].copy())
        self._step_tables()

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None, timesteps=None) -> None:
        """Pick the inference timesteps (``timestep_spacing``), or take custom descending ``timesteps``."""
        T = self.config.num_train_timesteps
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("pass either num_inference_steps or timesteps, not both")
        if timesteps is not None:
            ts = np.asarray(timesteps, dtype=np.int64).flatten()
            if ts.size == 0 or np.any(ts[1:] >= ts[:-1]):
                raise ValueError("custom timesteps must be a non-empty, strictly descending sequence")
            if ts[0] >= T or ts[-1] < 0:
                raise ValueError(f"custom timesteps must lie in [0, {T - 1}]")
            self.custom_timesteps = True
            self.num_inference_steps = len(ts)
        else:
            if num_inference_steps is None:
                raise ValueError("pass num_inference_steps or timesteps")
            check_num_inference_steps(num_inference_steps, T)
            ts = spaced_timesteps(num_inference_steps, T, self.config.timestep_spacing, self.config.steps_offset)
            self.custom_timesteps = False
            self.num_inference_steps = num_inference_steps
        self.timesteps = torch.from_numpy(ts).to(device)
        self._step_tables()

    def previous_timestep(self, timestep):
        """The timestep after ``timestep``: the next one of the schedule (a tensor, -1 after the last), or
        ``timestep - 1`` before ``set_timesteps`` (the constructor's full schedule), as diffusers returns them."""
        tables = self._step_tables()
        t = self._integer_timestep(timestep, tables)
        if not (self.custom_timesteps or self.num_inference_steps):
            return timestep - 1
        i = tables.index[t]
        return self._timesteps[i + 1] if i + 1 < len(tables.timesteps) else torch.tensor(-1)

    def _levels(self, t: int, tables) -> tuple[Level, Level]:
        i = tables.index[t]
        prev = tables.timesteps[i + 1] if i + 1 < len(tables.timesteps) else -1
        nxt = vp_level(tables.abar[prev]) if prev >= 0 else Level(1.0, 0.0)
        if nxt.alpha == 0:
            raise ValueError(zero_snr_step_error(self, t, prev, tables.abar))
        return vp_level(tables.abar[t]), nxt

    def step(self, model_output: Tensor, timestep, sample: Tensor, generator=None, return_dict: bool = True, *,
             guidance_scale: Optional[float] = None):
        """One ancestral step from ``timestep`` to the next timestep of the schedule.

        With ``guidance_scale``, ``model_output`` is the ``[uncond; cond]`` batch and the kernel combines it.
        A model with learned variance returns ``2C`` channels; the variance half (of the cond half under
        guidance) sets the noise.
        """
        learned = self.variance_type in ("learned", "learned_range")
        self._check_step_inputs(model_output, sample)
        tables = self._step_tables()
        t = self._integer_timestep(timestep, tables)
        cur, nxt = self._levels(t, tables)
        predicted_variance = None
        if learned and model_output.shape[1] == 2 * sample.shape[1]:
            c = sample.shape[1]
            predicted_variance = model_output[sample.shape[0]:, c:] if guidance_scale is not None else model_output[:, c:]
            model_output = model_output[:, :c].contiguous()
        clip = float(self.config.clip_sample_range) if self.config.clip_sample else None
        pred = predict(model_output, self.config.prediction_type, cur, guidance_scale, clip=clip)
        noise = None
        if t > 0:  # diffusers draws for every t > 0 (the noise is ~1e-10 on a last step to abar = 1)
            noise = self._noise_for(generator).randn(sample.shape, sample.device, model_output.dtype)
        prev_sample, x0 = ddpm_step(pred, sample, cur, nxt, variance_type=self.variance_type, noise=noise,
                                    predicted_variance=predicted_variance, clip=clip, return_x0=True)
        if not return_dict:
            return prev_sample, x0
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
