"""``VPScheduler``: the base of the schedulers whose state is the VP sample itself (DDPM, DDIM)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..ops.sampling import q_sample, v_target
from ._base import BaseScheduler, float_list


def zero_snr_step_error(scheduler, t: int, prev: int, abar: list) -> str:
    """Why a step to a level with alphas_cumprod = 0 has no result (diffusers returns NaN there)."""
    zeros = sum(1 for a in abar if a == 0)
    return (
        f"{type(scheduler).__name__}: the step from timestep {t} lands on timestep {prev}, where alphas_cumprod is 0: "
        f"{zeros} of the {len(abar)} levels of this schedule underflow to zero SNR in float32 (beta_end too close "
        "to 1?), and a step between two of them is undefined (diffusers returns NaN). Use a smaller beta_end, or "
        "rescale_betas_zero_snr=True, which makes only the last level zero"
    )


class VPTables(NamedTuple):
    """What a DDPM/DDIM step reads: alphas_cumprod, the schedule's timesteps and each one's index."""

    abar: list
    timesteps: list
    index: dict


class VPScheduler(BaseScheduler):
    """Schedulers whose state is the VP sample (DDPM, DDIM): no input scaling, abar-based forward process and
    integer timesteps that must be in the schedule."""

    def _build_tables(self) -> VPTables:
        ts = [int(t) for t in float_list(self._timesteps)]
        return VPTables(float_list(self._alphas_cumprod), ts, {t: i for i, t in enumerate(ts)})

    def scale_model_input(self, sample: Tensor, timestep=None) -> Tensor:
        """The sample goes to the model unscaled."""
        return sample

    def _integer_timestep(self, timestep, tables: VPTables) -> int:
        """A DDPM/DDIM timestep: an integer-valued number or one-element tensor that is in the schedule."""
        t = self._timestep_value(timestep)
        if t != int(t) or int(t) not in tables.index:
            raise self._not_in_schedule(t)
        return int(t)

    def _sqrt_alphas(self, timesteps, ref: Tensor) -> tuple[Tensor, Tensor]:
        ts = torch.as_tensor(timesteps).to("cpu").long().flatten()
        T = self.config.num_train_timesteps
        if ts.numel() == 0 or bool((ts < 0).any()) or bool((ts >= T).any()):
            raise ValueError(f"timesteps must lie in [0, {T - 1}], got {ts.tolist()}")
        if ts.numel() == 1:
            ts = ts.expand(ref.shape[0])
        if ts.numel() != ref.shape[0]:
            raise ValueError(f"need one timestep or one per sample ({ref.shape[0]}), got {ts.numel()}")
        ac = self._alphas_cumprod[ts].double()
        return ac.sqrt().to(ref.device), (1 - ac).sqrt().to(ref.device)

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps) -> Tensor:
        """Forward process ``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` with per-sample timesteps."""
        a, s = self._sqrt_alphas(timesteps, original_samples)
        return q_sample(original_samples, noise, a, s)

    def get_velocity(self, sample: Tensor, noise: Tensor, timesteps) -> Tensor:
        """The v-prediction target ``sqrt(abar_t) noise - sqrt(1 - abar_t) x0``."""
        a, s = self._sqrt_alphas(timesteps, sample)
        return v_target(sample, noise, a, s)
