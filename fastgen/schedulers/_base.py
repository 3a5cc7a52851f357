"""What the diffusers-compatible scheduler classes share for stepping: outputs, the tensor tables and their
per-step Python-float copies, input checks and timestep lookup. Config and serialisation are
:mod:`._config`; the step math itself is :mod:`.steps`.

Tables. A step needs a few numbers from the scheduler's tensors (a sigma, an alphas_cumprod entry, the
timestep it expects); indexing a tensor costs microseconds, most of a sampling loop's overhead. So each
scheduler keeps Python-float tables (``_build_tables``), computed where the tensors are written: in the
constructor and ``set_timesteps``, and again before the next step after a user assigns ``sigmas``,
``timesteps`` or ``alphas_cumprod``. Reading ``sigmas`` or ``alphas_cumprod`` (whose values the step math
uses) hands out the live tensor, which may then be edited in place, so a read also marks the tables for a
rebuild. Steps never re-validate or re-read the tensors.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, fields
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ._config import ConfigMixin
from .noise import NoiseSource
from .schedules import DiscreteSchedule, make_betas
from .steps import check_prediction_type


@dataclass(init=False)
class SchedulerOutput(OrderedDict):
    """Result of ``step``: ``prev_sample`` (the next state) and ``pred_original_sample`` (the x0 prediction).

    Behaves like diffusers' ``BaseOutput``: an ordered dict of the fields that are not None (``keys()``,
    ``values()``, ``items()``, ``out["prev_sample"]``), indexable by position (``out[0]``) and
    ``to_tuple()``, with attribute access.
    """

    prev_sample: Tensor
    pred_original_sample: Optional[Tensor] = None

    def __init__(self, prev_sample: Tensor, pred_original_sample: Optional[Tensor] = None) -> None:
        # (written out rather than generated: one is built per step)
        object.__setattr__(self, "prev_sample", prev_sample)
        object.__setattr__(self, "pred_original_sample", pred_original_sample)
        if prev_sample is not None:
            OrderedDict.__setitem__(self, "prev_sample", prev_sample)
        if pred_original_sample is not None:
            OrderedDict.__setitem__(self, "pred_original_sample", pred_original_sample)

    def __getitem__(self, key):
        if isinstance(key, str):
            return OrderedDict.__getitem__(self, key)
        return self.to_tuple()[key]

    def __setitem__(self, key, value) -> None:
        OrderedDict.__setitem__(self, key, value)
        object.__setattr__(self, key, value)

    def __setattr__(self, name, value) -> None:
        if name in self and value is not None:
            OrderedDict.__setitem__(self, name, value)
        object.__setattr__(self, name, value)

    def _refuse(self, *args, **kwargs):
        raise TypeError(f"a {type(self).__name__} cannot be changed with this method")

    __delitem__ = setdefault = pop = update = popitem = _refuse

    def to_tuple(self) -> tuple:
        return tuple(self[k] for k in self.keys())

    def __reduce__(self):
        return (type(self), tuple(getattr(self, f.name) for f in fields(self)))


class TableTensor:
    """A scheduler tensor (``sigmas``, ``timesteps``, ``alphas_cumprod``) with Python-float tables derived from
    it. Assigning it marks the tables for a rebuild before the next step; with ``live=True`` (tensors whose
    values the step math uses) so does reading it, because the tensor handed out may be edited in place."""

    def __init__(self, live: bool):
        self.live = live

    def __set_name__(self, owner, name: str) -> None:
        self.name, self.slot = name, "_" + name

    def __get__(self, obj, objtype=None):
        if obj is None:
            return self
        try:
            value = obj.__dict__[self.slot]
        except KeyError:
            raise AttributeError(f"{type(obj).__name__} has no {self.name} yet") from None
        if self.live:
            obj.__dict__["_tables"] = None
        return value

    def __set__(self, obj, value) -> None:
        obj.__dict__[self.slot] = value
        obj.__dict__["_tables"] = None


def float_list(t: Tensor) -> list:
    """A 1-D tensor as Python floats (float64 first, so float32 tables convert exactly)."""
    if not isinstance(t, Tensor) or t.dim() != 1:
        raise ValueError(f"a scheduler table must be a 1-D tensor, got {type(t).__name__} {tuple(getattr(t, 'shape', ()))}")
    return t.detach().to("cpu", torch.float64).tolist()


class BaseScheduler(ConfigMixin):
    """Common surface of the scheduler classes: the noise schedule, tables, outputs and input checks."""

    order = 1
    _unsupported: dict = {}  # config key -> the only value we accept (features we do not implement)
    _prediction_aliases: dict = {}
    _tables = None

    alphas_cumprod = TableTensor(live=True)
    timesteps = TableTensor(live=False)

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # ------------------------------------------------------------ shared construction

    def _init_schedule(self, *, zero_snr_floor: bool) -> None:
        """betas / alphas / alphas_cumprod (float32, as trained) and the DiscreteSchedule (float64 sigmas)."""
        cfg = self.config
        for key, allowed in self._unsupported.items():
            if cfg.get(key, allowed) != allowed:
                raise NotImplementedError(f"{type(self).__name__}: {key}={cfg[key]!r} is not supported by fastgen")
        check_prediction_type(self._prediction_aliases.get(cfg.prediction_type, cfg.prediction_type))
        self.betas = make_betas(
            cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end, cfg.beta_schedule, cfg.trained_betas,
            cfg.get("rescale_betas_zero_snr", False),
        )
        self.alphas = 1.0 - self.betas
        alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        if zero_snr_floor and cfg.get("rescale_betas_zero_snr", False):
            # sigma-based schedulers need a finite sigma_max: diffusers floors the last abar at 2^-24
            alphas_cumprod[-1] = 2**-24
        self.alphas_cumprod = alphas_cumprod
        self.schedule = DiscreteSchedule(alphas_cumprod)
        self.num_inference_steps = None
        self._noise = NoiseSource(None)

    # ------------------------------------------------------------ tables

    def _build_tables(self):
        """The Python-float tables a step reads, from the current tensors (see the module docstring)."""
        raise NotImplementedError

    def _step_tables(self):
        tables = self._tables
        if tables is None:
            tables = self._tables = self._build_tables()
        return tables

    # ------------------------------------------------------------ stepping helpers

    def _noise_for(self, generator) -> NoiseSource:
        self._noise = self._noise.update(generator)
        return self._noise

    def _require_timesteps(self) -> None:
        if self.num_inference_steps is None:
            raise ValueError(f"{type(self).__name__}: call set_timesteps(num_inference_steps) before step()")

    @staticmethod
    def _check_step_inputs(model_output, sample) -> None:
        """Types and the batch dimension, which the step reads before the op. Shapes (and the ``[uncond; cond]``
        batch under guidance) are checked once, by :func:`fastgen.ops.sampling.sampling_step`."""
        for name, t in (("model_output", model_output), ("sample", sample)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if sample.dim() < 1:
            raise ValueError("sample must have a batch dimension")

    @staticmethod
    def _timestep_value(timestep) -> float:
        if isinstance(timestep, Tensor):
            if timestep.numel() != 1:
                raise ValueError(f"timestep must be a single value, got a tensor of shape {tuple(timestep.shape)}")
            return float(timestep.item())
        if isinstance(timestep, (int, float, np.integer, np.floating)) and not isinstance(timestep, bool):
            return float(timestep)
        raise TypeError(f"timestep must be a number or a one-element tensor, got {type(timestep).__name__}")

    def _not_in_schedule(self, t: float) -> ValueError:
        shown = self._timesteps.tolist()
        shown = shown if len(shown) <= 12 else shown[:6] + ["..."] + shown[-3:]
        return ValueError(f"{type(self).__name__}: timestep {t:g} is not in the schedule set by set_timesteps: {shown}")
