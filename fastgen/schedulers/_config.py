"""Scheduler configuration and serialisation: the read-only ``config`` (diffusers' constructor arguments),
``from_config``, ``save_pretrained`` / ``from_pretrained`` and the handling of other schedulers' keys.

Nothing here knows about stepping; :mod:`._base` builds the stepping surface on top of :class:`ConfigMixin`.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import warnings
from typing import Any, Optional, Union

import numpy as np
from torch import Tensor

from .._config import MISSING, FrozenConfig, _jsonable, deprecated_config_attribute, register_to_config  # noqa: F401

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


class ConfigMixin:
    """``config`` / ``from_config`` / ``save_pretrained`` / ``from_pretrained`` with diffusers' file layout."""

    config_name = CONFIG_NAME

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

    def register_to_config(self, **kwargs) -> None:
        """Add or replace config values (diffusers' method; training scripts set ``prediction_type`` with it).
        Values the constructor derived tables from (betas, ...) are not rebuilt, as in diffusers."""
        self._register(**{k: _jsonable(v) for k, v in kwargs.items()})

    def __getattr__(self, name: str):
        value = deprecated_config_attribute(self, name, "scheduler")
        if value is MISSING:
            raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")
        return value

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

    def __repr__(self) -> str:
        return f"{type(self).__name__} {json.dumps(dict(self.config), sort_keys=True)}"
