"""What the diffusers-compatible scheduler classes share: config handling, outputs, timestep lookup and the
checks that give clear errors. The step math itself lives in :mod:`.steps`."""

from __future__ import annotations

import functools
import inspect
import json
import os
import warnings
from dataclasses import dataclass, fields
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor

from .noise import NoiseSource
from .schedules import DiscreteSchedule, make_betas
from .steps import check_prediction_type

CONFIG_NAME = "scheduler_config.json"

# Config keys of diffusers' schedulers (the Karras-compatible family). diffusers silently drops the keys of
# compatible schedulers when a config moves between them (e.g. PNDM's skip_prk_steps into Euler); so do we.
_DIFFUSERS_SCHEDULER_KEYS = frozenset(
    """algorithm_type beta_end beta_schedule beta_start clip_sample clip_sample_range disable_corrector
    dynamic_thresholding_ratio euler_at_final final_sigmas_type flow_shift interpolation_type lambda_min_clipped
    lower_order_final num_train_timesteps predict_x0 prediction_type rescale_betas_zero_snr rho sample_max_value
    set_alpha_to_one shift_terminal sigma_data sigma_max sigma_min sigma_schedule skip_prk_steps solver_order
    solver_p solver_type steps_offset thresholding time_shift_type timestep_spacing timestep_type trained_betas
    use_beta_sigmas use_dynamic_shifting use_exponential_sigmas use_flow_sigmas use_karras_sigmas use_lu_lambdas
    variance_type timestep_values""".split()
)


class FrozenConfig(dict):
    """The scheduler's constructor arguments: a dict that also reads as attributes, and refuses edits."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r}") from None

    def _refuse(self, *args, **kwargs):
        raise TypeError("a scheduler config is read-only: build a new scheduler with from_config(config, key=value)")

    __setitem__ = __delitem__ = __setattr__ = update = pop = popitem = setdefault = clear = _refuse

    def __reduce__(self):  # copy / pickle without going through the refused __setitem__
        return (type(self), (dict(self),))


@dataclass
class SchedulerOutput:
    """Result of ``step``: ``prev_sample`` (the next state) and ``pred_original_sample`` (the x0 prediction).

    Indexes like diffusers' ``BaseOutput``: ``out[0]``, ``out["prev_sample"]``, ``out.to_tuple()``.
    """

    prev_sample: Tensor
    pred_original_sample: Optional[Tensor] = None

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None)

    def __getitem__(self, key):
        return getattr(self, key) if isinstance(key, str) else self.to_tuple()[key]

    def keys(self):
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]


def register_to_config(init):
    """Record the bound constructor arguments (defaults filled in) as the read-only ``config``."""
    sig = inspect.signature(init)

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        bound = sig.bind(self, *args, **kwargs)
        bound.apply_defaults()
        cfg = {k: _jsonable(v) for k, v in bound.arguments.items() if k != "self"}
        self._config = FrozenConfig(cfg)
        init(self, *args, **kwargs)

    return wrapper


def _jsonable(v):
    if isinstance(v, Tensor):
        return v.detach().cpu().tolist()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return v


class BaseScheduler:
    """Common surface of the scheduler classes (config, from_config, save/load, validation helpers)."""

    order = 1
    config_name = CONFIG_NAME
    _unsupported: dict = {}  # config key -> the only value we accept (features we do not implement)
    _prediction_aliases: dict = {}

    @property
    def config(self) -> FrozenConfig:
        return self._config

    @property
    def _internal_dict(self) -> FrozenConfig:
        # diffusers' name for the config; its pipelines replace it to fix outdated configs (e.g. steps_offset)
        return self._config

    @_internal_dict.setter
    def _internal_dict(self, value) -> None:
        self._config = FrozenConfig(dict(value))

    def _register(self, **updates) -> None:
        """Record config values normalised after construction (diffusers' ``register_to_config`` in ``__init__``)."""
        cfg = dict(self._config)
        cfg.update(updates)
        self._config = FrozenConfig(cfg)

    @classmethod
    def config_keys(cls) -> list[str]:
        return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]

    @classmethod
    def from_config(cls, config: Union[dict, Any, None] = None, return_unused_kwargs: bool = False, **kwargs):
        """Build from a diffusers config dict (or a scheduler / object with ``.config``), ``kwargs`` overriding.

        Private keys (``_class_name``, ``_diffusers_version``, ...) and keys of other diffusers schedulers are
        dropped silently, as diffusers does; any other unknown key is dropped with a warning.
        ``return_unused_kwargs=True`` returns ``(scheduler, unused_kwargs)`` like diffusers.
        """
        if config is None:
            config = {}
        if hasattr(config, "config") and not isinstance(config, dict):
            config = config.config
        if not isinstance(config, dict):
            raise TypeError(f"config must be a dict or have a .config dict, got {type(config).__name__}")
        used_defaults = set(config.get("_use_default_values", []))
        merged = {k: v for k, v in config.items() if k not in used_defaults}
        merged.update(kwargs)
        keys = set(cls.config_keys())
        init = {k: v for k, v in merged.items() if k in keys}
        unknown = sorted(k for k in merged if k not in keys and not k.startswith("_") and k not in _DIFFUSERS_SCHEDULER_KEYS)
        if unknown:
            warnings.warn(
                f"The config attributes {unknown} were passed to {cls.__name__}, but are not expected and will be ignored.",
                stacklevel=2,
            )
        scheduler = cls(**init)
        if return_unused_kwargs:
            return scheduler, {k: v for k, v in kwargs.items() if k not in keys}
        return scheduler

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], subfolder: Optional[str] = None, **kwargs):
        """Load ``scheduler_config.json`` from a local folder (a pipeline folder with ``subfolder="scheduler"``)."""
        path = os.fspath(pretrained_model_name_or_path)
        if subfolder:
            path = os.path.join(path, subfolder)
        file = path if os.path.isfile(path) else os.path.join(path, CONFIG_NAME)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no {CONFIG_NAME} at {path!r} (fastgen loads local folders only)")
        with open(file, encoding="utf-8") as f:
            return cls.from_config(json.load(f), **kwargs)

    def save_pretrained(self, save_directory: Union[str, os.PathLike]) -> None:
        """Write ``scheduler_config.json`` (diffusers' layout, with ``_class_name``)."""
        os.makedirs(save_directory, exist_ok=True)
        with open(os.path.join(save_directory, CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump({"_class_name": type(self).__name__, **self.config}, f, indent=2, sort_keys=True)

    save_config = save_pretrained

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def __repr__(self) -> str:
        return f"{type(self).__name__} {json.dumps(dict(self.config), sort_keys=True)}"

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
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        if zero_snr_floor and cfg.get("rescale_betas_zero_snr", False):
            # sigma-based schedulers need a finite sigma_max: diffusers floors the last abar at 2^-24
            self.alphas_cumprod[-1] = 2**-24
        self.schedule = DiscreteSchedule(self.alphas_cumprod)
        self.num_inference_steps = None
        self._noise = NoiseSource(None)

    def _floats(self, name: str) -> list:
        """``getattr(self, name)`` as a list of Python floats, rebuilt only when that tensor is replaced or edited
        in place: indexing a tensor costs microseconds a step, which is most of a sampling loop's overhead."""
        t = getattr(self, name)
        cache = self.__dict__.setdefault("_float_cache", {})
        hit = cache.get(name)
        if hit is None or hit[0] is not t or hit[1] != t._version:
            hit = cache[name] = (t, t._version, t.detach().to("cpu", torch.float64).tolist())
        return hit[2]

    def _noise_for(self, generator) -> NoiseSource:
        self._noise = self._noise.update(generator)
        return self._noise

    def _require_timesteps(self) -> None:
        if self.num_inference_steps is None:
            raise ValueError(f"{type(self).__name__}: call set_timesteps(num_inference_steps) before step()")

    @staticmethod
    def _check_step_inputs(model_output, sample, guidance_scale, extra_channels: bool = False) -> None:
        for name, t in (("model_output", model_output), ("sample", sample)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if sample.dim() < 1:
            raise ValueError("sample must have a batch dimension")
        n = sample.shape[0] * (2 if guidance_scale is not None else 1)
        ok = model_output.shape[0] == n and model_output.shape[2:] == sample.shape[2:] and model_output.dim() == sample.dim()
        if ok and sample.dim() > 1:
            c = model_output.shape[1]
            ok = c == sample.shape[1] or (extra_channels and c == 2 * sample.shape[1])
        if not ok:
            what = "the [uncond; cond] batch of " if guidance_scale is not None else ""
            raise ValueError(
                f"model_output must be {what}shape {(n, *sample.shape[1:])} to match sample {tuple(sample.shape)}, "
                f"got {tuple(model_output.shape)}"
            )

    @staticmethod
    def _timestep_value(timestep) -> float:
        if isinstance(timestep, Tensor):
            if timestep.numel() != 1:
                raise ValueError(f"timestep must be a single value, got a tensor of shape {tuple(timestep.shape)}")
            return float(timestep.item())
        if isinstance(timestep, (int, float, np.integer, np.floating)) and not isinstance(timestep, bool):
            return float(timestep)
        raise TypeError(f"timestep must be a number or a one-element tensor, got {type(timestep).__name__}")

    def _integer_timestep(self, timestep) -> int:
        """A DDPM/DDIM timestep: an integer-valued number or one-element tensor that is in the schedule."""
        t = self._timestep_value(timestep)
        if t != int(t) or int(t) not in self._index:
            raise self._not_in_schedule(t)
        return int(t)

    def _not_in_schedule(self, t: float) -> ValueError:
        shown = self.timesteps.tolist()
        shown = shown if len(shown) <= 12 else shown[:6] + ["..."] + shown[-3:]
        return ValueError(f"{type(self).__name__}: timestep {t:g} is not in the schedule set by set_timesteps: {shown}")


class SigmaSchedulerBase(BaseScheduler):
    """Schedulers that walk a sigma table with an internal step index (Euler, Euler ancestral, Heun, DPM-Solver)."""

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
        ts = self.timesteps if schedule_timesteps is None else schedule_timesteps
        t = self._timestep_value(timestep)
        idx = (ts.detach().cpu().double() == t).nonzero().flatten().tolist()
        if not idx:
            raise self._not_in_schedule(t)
        return idx[1] if len(idx) > 1 else idx[0]

    def _init_step_index(self, timestep) -> None:
        if self._begin_index is not None:
            self._step_index = self._begin_index
        elif self._timestep_value(timestep) == self._floats("timesteps")[0]:
            # the usual start; diffusers would take a second occurrence of a repeated first timestep and run
            # off the end of the schedule (DPM-Solver with Karras sigmas on the cosine schedule)
            self._step_index = 0
        else:
            self._step_index = self.index_for_timestep(timestep)

    def _enter_step(self, timestep) -> int:
        """The index of this call; checks that ``timestep`` is the one the schedule expects here."""
        self._require_timesteps()
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        timesteps = self._floats("timesteps")
        if i >= len(timesteps):
            raise ValueError(f"{type(self).__name__}: the schedule of {len(self.timesteps)} steps is finished; call set_timesteps again")
        if isinstance(timestep, Tensor) and timestep.device.type != "cpu":
            return i  # reading a device timestep would synchronise every step: trust the index, as diffusers does
        t = self._timestep_value(timestep)
        expected = timesteps[i]
        if t != expected:
            if not bool((self.timesteps.double() == t).any()):
                raise self._not_in_schedule(t)
            raise ValueError(
                f"{type(self).__name__}: step {i} expects timestep {expected:g}, got {t:g} "
                "(steps must follow scheduler.timesteps in order)"
            )
        return i

    def _sigma_indices(self, timesteps: Tensor, n: int) -> list[int]:
        if self._begin_index is None:
            return [self.index_for_timestep(t) for t in timesteps.flatten()]
        return [self._step_index if self._step_index is not None else self._begin_index] * n
