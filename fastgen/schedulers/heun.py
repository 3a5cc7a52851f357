"""``HeunDiscreteScheduler``: diffusers-compatible Heun (2nd order) in VE space.

Each Heun step takes two ``step`` calls (``order = 2``): the timesteps and sigmas after the first are listed
twice. The first call is an Euler step (:func:`.steps.euler_step`) that keeps the sample and its x0; the
second corrects with the average slope (:func:`.steps.heun_correct_step`). The step to sigma = 0 is Euler.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ._base import SchedulerOutput
from ._config import register_to_config
from ._sigma_table import SigmaTableScheduler
from .steps import euler_step, heun_correct_step

__all__ = ["HeunDiscreteScheduler"]


class HeunDiscreteScheduler(SigmaTableScheduler):
    """Heun's method (Karras et al. 2022, Algorithm 1), with diffusers' config keys."""

    order = 2
    _unsupported = {"use_beta_sigmas": False}

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "linear",
        trained_betas=None,
        prediction_type: str = "epsilon",
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ):
        if sum(bool(v) for v in (use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas)) > 1:
            raise ValueError("Only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas can be used.")
        self._init_tables()
        self.use_karras_sigmas = use_karras_sigmas
        self._clear_state()

    def _clear_state(self) -> None:
        self.sample = None  # the sample at the start of the current Heun step
        self._x0_first = None  # its x0 prediction (clipped if clip_sample)
        self.dt = None

    @property
    def state_in_first_order(self) -> bool:
        return self.dt is None

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None,
                      num_train_timesteps: Optional[int] = None, timesteps=None, sigmas=None) -> None:
        """Timesteps (float32) and sigmas (float64, ending at 0), every entry after the first listed twice.

        As diffusers', custom ``timesteps`` replace ``num_inference_steps`` and ``num_train_timesteps`` sets the
        range they are spaced over; custom ``sigmas`` (with the final one) are a fastgen extension, as Euler's.
        """
        if num_inference_steps is None and timesteps is None and sigmas is None:
            raise ValueError("Must pass exactly one of `num_inference_steps` or `custom_timesteps`.")
        if num_inference_steps is not None and (timesteps is not None or sigmas is not None):
            raise ValueError("Can only pass one of `num_inference_steps` or `custom_timesteps`.")
        if num_inference_steps is not None:
            ts, sig = self._spaced_sigmas(num_inference_steps, num_train_timesteps)
            sig = np.append(sig, 0.0)
        else:
            ts, sig = self._custom_schedule(timesteps, sigmas)
        self.num_inference_steps = len(ts)
        sig = torch.from_numpy(np.asarray(sig, dtype=np.float64))
        self.sigmas = torch.cat([sig[:1], sig[1:-1].repeat_interleave(2), sig[-1:]])
        ts = torch.from_numpy(np.asarray(ts, dtype=np.float32))
        self.timesteps = torch.cat([ts[:1], ts[1:].repeat_interleave(2)]).to(device)
        self._reset_index()
        self._clear_state()
        self._step_tables()

    def step(self, model_output: Tensor, timestep, sample: Tensor, return_dict: bool = True, *,
             guidance_scale: Optional[float] = None):
        """First call: Euler predictor. Second call (same sigma pair): Heun corrector back from the stored sample."""
        self._check_step_inputs(model_output, sample)
        i, tables = self._enter_step(timestep)
        clip = float(self.config.clip_sample_range) if self.config.clip_sample else None
        if self.state_in_first_order:
            sigma, sigma_next = tables.sigmas[i : i + 2]
            pred = self._x0(model_output, sigma, guidance_scale)
            prev_sample, x0 = euler_step(pred, sample, sigma, sigma_next, clip=clip, return_x0=True)
            self.sample, self._x0_first, self.dt = sample, x0, sigma_next - sigma
        else:
            sigma, sigma_next = tables.sigmas[i - 1 : i + 1]
            pred = self._x0(model_output, sigma_next, guidance_scale)
            prev_sample, x0 = heun_correct_step(pred, sample, self.sample, self._x0_first, sigma, sigma_next,
                                                clip=clip, return_x0=True)
            self._clear_state()
        self._step_index += 1
        if not return_dict:
            return prev_sample, x0
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
