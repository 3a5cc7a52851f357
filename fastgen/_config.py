"""The read-only ``config`` that fastgen's schedulers and models share: their diffusers constructor arguments,
recorded by ``@register_to_config`` on ``__init__``."""

from __future__ import annotations

import functools
import inspect
import warnings

import numpy as np
from torch import Tensor


class FrozenConfig(dict):
    """An object's constructor arguments: a dict that also reads as attributes, and refuses edits."""

    def __init__(self, *args, **kwargs):
        dict.__init__(self, *args, **kwargs)
        # Attribute reads find the keys in the instance dict: a __getattr__ fallback costs about a microsecond
        # a read, and a step reads ten keys. (Safe: the mapping itself can never change.)
        vars(self).update((k, v) for k, v in self.items() if isinstance(k, str) and k.isidentifier() and not hasattr(dict, k))

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r}") from None

    def _refuse(self, *args, **kwargs):
        raise TypeError("a config is read-only: build a new object with from_config(config, key=value)")

    __setitem__ = __delitem__ = __setattr__ = update = pop = popitem = setdefault = clear = _refuse

    def __reduce__(self):  # copy / pickle without going through the refused __setitem__
        return (type(self), (dict(self),))


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


MISSING = object()


def deprecated_config_attribute(obj, name: str, example: str):
    """diffusers still resolves config keys as attributes of a model or scheduler, with a FutureWarning; so do
    fastgen's. The config value, or :data:`MISSING` when ``name`` is no public config key (``example`` names
    the object in the message: ``"unet"``, ``"scheduler"``)."""
    config = obj.__dict__.get("_config")
    if config is None or name not in config or name.startswith("_"):
        return MISSING
    owner = type(obj).__name__
    warnings.warn(
        f"Accessing config attribute `{name}` directly via '{owner}' object attribute is deprecated. Please access "
        f"'{name}' over '{owner}'s config object instead, e.g. '{example}.config.{name}'.",
        FutureWarning,
        stacklevel=3,
    )
    return config[name]
