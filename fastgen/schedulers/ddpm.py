"""``DDPMScheduler``: diffusers-compatible DDPM ancestral sampling in VP space (math in :func:`.steps.ddpm_step`)."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ..ops.sampling import q_sample, v_target
from ._base import BaseScheduler, SchedulerOutput, register_to_config
from .schedules import check_num_inference_steps, spaced_timesteps
from .steps import DDPM_VARIANCE_TYPES, Level, Prediction, ddpm_step, vp_level, x0_coeffs

__all__ = ["DDPMScheduler"]


class VPScheduler(BaseScheduler):
    """Schedulers whose state is the VP sample itself (DDPM, DDIM): no input scaling, abar-based forward process."""

    def scale_model_input(self, sample: Tensor, timestep=None) -> Tensor:
        """The sample goes to the model unscaled."""
        return sample

    def _sqrt_alphas(self, timesteps, ref: Tensor) -> tuple[Tensor, Tensor]:
        ts = torch.as_tensor(timesteps).to("cpu").long().flatten()
        T = self.config.num_train_timesteps
        if ts.numel() == 0 or bool((ts < 0).any()) or bool((ts >= T).any()):
            raise ValueError(f"timesteps must lie in [0, {T - 1}], got {ts.tolist()}")
        if ts.numel() == 1:
            ts = ts.expand(ref.shape[0])
        if ts.numel() != ref.shape[0]:
            raise ValueError(f"need one timestep or one per sample ({ref.shape[0]}), got {ts.numel()}")
        ac = self.alphas_cumprod[ts].double()
        return ac.sqrt().to(ref.device), (1 - ac).sqrt().to(ref.device)

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps) -> Tensor:
        """Forward process ``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` with per-sample timesteps."""
        a, s = self._sqrt_alphas(timesteps, original_samples)
        return q_sample(original_samples, noise, a, s)

    def get_velocity(self, sample: Tensor, noise: Tensor, timesteps) -> Tensor:
        """The v-prediction target ``sqrt(abar_t) noise - sqrt(1 - abar_t) x0``."""
        a, s = self._sqrt_alphas(timesteps, sample)
        return v_target(sample, noise, a, s)


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
        self.timesteps = torch.from_numpy(np.arange(0, num_train_timesteps)[::-1].copy())
        self._index = {}

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
        self._index = {int(t): i for i, t in enumerate(ts.tolist())}

    def previous_timestep(self, timestep) -> int:
        """The timestep after ``timestep`` in the schedule (-1 after the last)."""
        t = self._integer_timestep(timestep)
        i = self._index[t]
        ts = self._floats("timesteps")
        return int(ts[i + 1]) if i + 1 < len(ts) else -1

    def _levels(self, t: int) -> tuple[Level, Level]:
        prev = self.previous_timestep(t)
        abar = self._floats("alphas_cumprod")
        nxt = vp_level(abar[prev]) if prev >= 0 else Level(1.0, 0.0)
        return vp_level(abar[t]), nxt

    def step(self, model_output: Tensor, timestep, sample: Tensor, generator=None, return_dict: bool = True, *,
             guidance_scale: Optional[float] = None):
        """One ancestral step from ``timestep`` to the next timestep of the schedule.

        With ``guidance_scale``, ``model_output`` is the ``[uncond; cond]`` batch and the kernel combines it.
        A model with learned variance returns ``2C`` channels; the variance half (of the cond half under
        guidance) sets the noise.
        """
        self._require_timesteps()
        learned = self.variance_type in ("learned", "learned_range")
        self._check_step_inputs(model_output, sample, guidance_scale, extra_channels=learned)
        t = self._integer_timestep(timestep)
        cur, nxt = self._levels(t)
        predicted_variance = None
        if learned and model_output.shape[1] == 2 * sample.shape[1]:
            c = sample.shape[1]
            predicted_variance = model_output[sample.shape[0]:, c:] if guidance_scale is not None else model_output[:, c:]
            model_output = model_output[:, :c].contiguous()
        c0, c1 = x0_coeffs(self.config.prediction_type, cur)
        pred = Prediction(model_output, c0, c1, guidance_scale)
        noise = None
        if t > 0:  # diffusers draws for every t > 0 (the noise is ~1e-10 on a last step to abar = 1)
            noise = self._noise_for(generator).randn(sample.shape, sample.device, model_output.dtype)
        clip = float(self.config.clip_sample_range) if self.config.clip_sample else None
        prev_sample, x0 = ddpm_step(pred, sample, cur, nxt, variance_type=self.variance_type, noise=noise,
                                    predicted_variance=predicted_variance, clip=clip, return_x0=True)
        if not return_dict:
            return prev_sample, x0
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
