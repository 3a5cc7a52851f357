"""The bases of the schedulers that walk a sigma table with an internal step index.

:class:`SigmaSchedulerBase` is the step-index logic (Euler, Euler ancestral, Heun, DPM-Solver);
:class:`SigmaTableScheduler` adds what Euler, Euler ancestral and Heun share: the VE state
(``x = x0 + sigma * eps``, started at ``init_noise_sigma``), input scaling by ``1 / sqrt(sigma^2 + 1)``, the
float64 sigma table built as diffusers builds it, custom ``timesteps`` / ``sigmas`` and ``add_noise``.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor

from ..ops.sampling import q_sample
from ._base import BaseScheduler, TableTensor, float_list
from .schedules import check_num_inference_steps, exponential_sigmas, karras_sigmas, spaced_timesteps
from .steps import Prediction, predict, ve_level


class SigmaTables(NamedTuple):
    """What a step of a sigma-table scheduler reads: the sigmas, the timesteps, and (DPM-Solver) the level of
    every sigma."""

    sigmas: list
    timesteps: list
    levels: Optional[list] = None


class SigmaSchedulerBase(BaseScheduler):
    """Schedulers that walk a sigma table with an internal step index (Euler, Euler ancestral, Heun, DPM-Solver)."""

    sigmas = TableTensor(live=True)

    def _build_tables(self) -> SigmaTables:
        return SigmaTables(float_list(self._sigmas), float_list(self._timesteps))

    def _reset_index(self) -> None:
        self._step_index = None
        self._begin_index = None

    @property
    def step_index(self) -> Optional[int]:
        return self._step_index

    @property
    def begin_index(self) -> Optional[int]:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start at this index of ``timesteps`` (image-to-image pipelines call it before the loop)."""
        self._begin_index = begin_index

    def index_for_timestep(self, timestep, schedule_timesteps: Optional[Tensor] = None) -> int:
        """Index of ``timestep`` in the schedule; the second match when it appears twice (Heun's duplicated
        timesteps, and image-to-image starting mid-schedule), as diffusers does."""
        ts = self._timesteps if schedule_timesteps is None else schedule_timesteps
        t = self._timestep_value(timestep)
        idx = (ts.detach().cpu().double() == t).nonzero().flatten().tolist()
        if not idx:
            raise self._not_in_schedule(t)
        return idx[1] if len(idx) > 1 else idx[0]

    def _init_step_index(self, timestep, tables: SigmaTables) -> None:
        if self._begin_index is not None:
            self._step_index = self._begin_index
        elif self._timestep_value(timestep) == tables.timesteps[0]:
            # the usual start; diffusers would take a second occurrence of a repeated first timestep and run
            # off the end of the schedule (DPM-Solver with Karras sigmas on the cosine schedule)
            self._step_index = 0
        else:
            self._step_index = self.index_for_timestep(timestep)

    def _enter_step(self, timestep) -> tuple[int, SigmaTables]:
        """The index of this call and the tables; checks that ``timestep`` is the one the schedule expects."""
        self._require_timesteps()
        tables = self._step_tables()
        if self._step_index is None:
            self._init_step_index(timestep, tables)
        i = self._step_index
        timesteps = tables.timesteps
        if i >= len(timesteps):
            raise ValueError(f"{type(self).__name__}: the schedule of {len(timesteps)} steps is finished; call set_timesteps again")
        if isinstance(timestep, Tensor) and timestep.device.type != "cpu":
            return i, tables  # reading a device timestep would synchronise every step: trust the index, as diffusers does
        t = self._timestep_value(timestep)
        expected = timesteps[i]
        if t != expected:
            if t not in timesteps:
                raise self._not_in_schedule(t)
            raise ValueError(
                f"{type(self).__name__}: step {i} expects timestep {expected:g}, got {t:g} "
                "(steps must follow scheduler.timesteps in order)"
            )
        return i, tables

    def _sigma_indices(self, timesteps: Tensor, n: int) -> list[int]:
        if self._begin_index is None:
            return [self.index_for_timestep(t) for t in timesteps.flatten()]
        return [self._step_index if self._step_index is not None else self._begin_index] * n

    def _add_noise_sigmas(self, original_samples: Tensor, timesteps) -> Tensor:
        """The sigma of each sample for ``add_noise`` (timesteps of the schedule, or the begin index when set)."""
        ts = torch.as_tensor(timesteps).reshape(-1)
        idx = self._sigma_indices(ts, original_samples.shape[0])
        if len(idx) == 1:
            idx = idx * original_samples.shape[0]
        if len(idx) != original_samples.shape[0]:
            raise ValueError(f"need one timestep or one per sample ({original_samples.shape[0]}), got {len(idx)}")
        return self._sigmas[idx]


class SigmaTableScheduler(SigmaSchedulerBase):
    """Shared by Euler, Euler ancestral and Heun: timesteps, the float64 sigma table, input scaling, add_noise."""

    _prediction_aliases = {"original_sample": "sample"}

    def _init_tables(self) -> None:
        T = self.config.num_train_timesteps
        self._init_schedule(zero_snr_floor=True)
        self.timesteps = torch.from_numpy(np.linspace(0, T - 1, T, dtype=float)[::-1].copy()).to(torch.float32)
        self.sigmas = torch.cat([self.schedule.sigmas.flip(0), torch.zeros(1, dtype=torch.float64)])
        self._reset_index()
        self._step_tables()

    def _prediction_type(self) -> str:
        p = self.config.prediction_type
        return self._prediction_aliases.get(p, p)

    def _x0(self, model_output: Tensor, level_sigma: float, guidance_scale) -> Prediction:
        return predict(model_output, self._prediction_type(), ve_level(level_sigma), guidance_scale)

    def _spaced_sigmas(self, num_inference_steps: int, num_train_timesteps: Optional[int] = None):
        """(timesteps, sigmas) before the final sigma, as diffusers' Euler family builds them."""
        cfg = self.config
        T = cfg.num_train_timesteps if num_train_timesteps is None else num_train_timesteps
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

    def _custom_schedule(self, timesteps, sigmas):
        """(timesteps, sigmas with the final one) from a user's ``timesteps`` or ``sigmas`` (diffusers'
        ``retrieve_timesteps``): sigmas interpolated at the timesteps, or timesteps from the sigmas."""
        cfg = self.config
        if timesteps is not None and sigmas is not None:
            raise ValueError("Only one of `timesteps` or `sigmas` should be set.")
        if timesteps is not None:
            for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
                if cfg.get(key):
                    raise ValueError(f"Cannot set `timesteps` with `config.{key} = True`.")
            ts = np.asarray(torch.as_tensor(timesteps).detach().cpu(), dtype=np.float64).reshape(-1)
            T = cfg.num_train_timesteps
            if ts.size == 0 or ts.min() < 0 or ts.max() > T - 1:
                raise ValueError(f"custom timesteps must be non-empty and lie in [0, {T - 1}]")
            ts = ts.astype(np.float32)
            sig = self.schedule.t_to_sigma(torch.from_numpy(ts.astype(np.float64))).numpy()
            return ts, np.append(sig, self._final_sigma())
        sig = np.asarray(torch.as_tensor(sigmas).detach().cpu(), dtype=np.float64).reshape(-1)
        if sig.size < 2 or not np.all(np.isfinite(sig)) or sig.min() < 0:
            raise ValueError("custom sigmas must hold at least 2 finite, non-negative noise levels (the last is the final one)")
        return self.schedule.sigma_to_t(sig[:-1]).numpy().astype(np.float32), sig

    def _final_sigma(self) -> float:
        kind = self.config.get("final_sigmas_type", "zero")
        if kind == "zero":
            return 0.0
        if kind == "sigma_min":
            return float(self.schedule.sigmas[0])
        raise ValueError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {kind!r}")

    @property
    def init_noise_sigma(self) -> Tensor:
        """Std of the initial noise: sigma_max (VE), or sqrt(sigma_max^2 + 1) with ``leading`` spacing, as a
        0-d float32 tensor like diffusers'."""
        m = max(self._step_tables().sigmas)
        m = m if self.config.timestep_spacing in ("linspace", "trailing") else math.sqrt(m * m + 1)
        return torch.tensor(m, dtype=torch.float32)

    def scale_model_input(self, sample: Tensor, timestep) -> Tensor:
        """The model sees the VP sample ``x / sqrt(sigma^2 + 1)``."""
        tables = self._step_tables()
        if self._step_index is None:
            self._init_step_index(timestep, tables)
        sigma = tables.sigmas[self._step_index]
        self.is_scale_input_called = True
        return sample / math.sqrt(sigma * sigma + 1)

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps) -> Tensor:
        """``x0 + sigma(t) * noise`` for timesteps of the schedule (or at the begin index when it is set)."""
        sigma = self._add_noise_sigmas(original_samples, timesteps).to(original_samples.device)
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
