"""What every fastgen model shares: the read-only diffusers ``config``, strict ``from_config``, loading and
saving through :mod:`fastgen.io`, gradient checkpointing, and the ``.sample`` output object."""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import Tensor

from .._config import MISSING, FrozenConfig, deprecated_config_attribute


@dataclass
class ModelOutput:
    """diffusers' ``BaseOutput`` shape: attribute access, ``output[0]`` and ``output["sample"]``."""

    def __getitem__(self, key):
        if isinstance(key, str):
            return getattr(self, key)
        return self.to_tuple()[key]

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, f) for f in self.__dataclass_fields__)

    def keys(self):
        return list(self.__dataclass_fields__)


@dataclass
class SampleOutput(ModelOutput):
    """``UNet2DOutput`` / ``UNet2DConditionOutput`` / ``DecoderOutput``: the model's output tensor."""

    sample: Tensor


def refuse(owner: str, name: str, value: Any, supported: Any) -> None:
    """Refuse a diffusers argument fastgen does not implement, by name (never ignore it)."""
    raise NotImplementedError(
        f"{owner}: {name}={value!r} is not supported by fastgen (supported: {supported!r}); "
        "remove it from the config or use diffusers' model"
    )


def refuse_unless(owner: str, name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        refuse(owner, name, value, allowed[0] if len(allowed) == 1 else allowed)


class ModelMixin(torch.nn.Module):
    """diffusers' ``ModelMixin`` + ``ConfigMixin`` surface for fastgen's models.

    Subclasses decorate ``__init__`` with :func:`fastgen._config.register_to_config` and take diffusers'
    constructor arguments; an argument whose value fastgen does not implement raises ``NotImplementedError``
    naming it (:func:`refuse`), and a config key that is no constructor argument is refused by
    :meth:`from_config`.
    """

    config_name = "config.json"
    _supports_gradient_checkpointing = False

    @property
    def config(self) -> FrozenConfig:
        return self.__dict__["_config"]

    @classmethod
    def config_keys(cls) -> list[str]:
        return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]

    @classmethod
    def from_config(cls, config: Union[dict, Any, None] = None, **kwargs):
        """Build from a diffusers config (a dict, or an object with ``.config``), ``kwargs`` overriding.

        Keys starting with ``_`` (``_class_name``, ``_diffusers_version``, ...) are metadata and dropped; any
        other key this class has no argument for raises a ``ValueError`` naming it.
        """
        if config is None:
            config = {}
        if hasattr(config, "config") and not isinstance(config, dict):
            config = config.config
        if not isinstance(config, dict):
            raise TypeError(f"{cls.__name__}.from_config: config must be a dict, got {type(config).__name__}")
        merged = {k: v for k, v in config.items() if not k.startswith("_")}
        merged.update(kwargs)
        keys = set(cls.config_keys())
        unknown = sorted(k for k in merged if k not in keys)
        if unknown:
            raise ValueError(
                f"{cls.__name__}: config keys {unknown} are not arguments of {cls.__name__} "
                "(fastgen refuses config keys rather than ignore them)"
            )
        return cls(**merged)

    # ------------------------------------------------------------ files

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: Union[str, os.PathLike],
        subfolder: Optional[str] = None,
        torch_dtype: Optional[torch.dtype] = None,
        **kwargs,
    ):
        """Load a diffusers-layout local folder (``config.json`` + weights); never a network request."""
        from .. import io

        return io.load_model(cls, pretrained_model_name_or_path, subfolder=subfolder, torch_dtype=torch_dtype, **kwargs)

    @classmethod
    def from_single_file(
        cls,
        pretrained_model_link_or_path: Union[str, os.PathLike],
        *,
        config: Union[dict, str, os.PathLike, None] = None,
        torch_dtype: Optional[torch.dtype] = None,
    ):
        """Load an original Stable Diffusion single-file checkpoint (``.safetensors`` / ``.ckpt``), its keys
        converted to diffusers' (``UNet2DConditionModel`` and ``AutoencoderKL``); a local file only."""
        from .. import io

        return io.from_single_file(cls, pretrained_model_link_or_path, config=config, torch_dtype=torch_dtype)

    def save_pretrained(self, save_directory: Union[str, os.PathLike], **kwargs) -> None:
        """Write ``config.json`` + ``diffusion_pytorch_model.safetensors`` (diffusers' layout)."""
        from .. import io

        io.save_model(self, save_directory, **kwargs)

    # ------------------------------------------------ gradient checkpointing

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) for m in self.modules())

    def enable_gradient_checkpointing(self) -> None:
        if not self._supports_gradient_checkpointing:
            raise ValueError(f"{type(self).__name__} does not support gradient checkpointing")
        for m in self.modules():
            if hasattr(m, "gradient_checkpointing"):
                m.gradient_checkpointing = True

    def disable_gradient_checkpointing(self) -> None:
        for m in self.modules():
            if hasattr(m, "gradient_checkpointing"):
                m.gradient_checkpointing = False

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            value = deprecated_config_attribute(self, name, "unet")
            if value is MISSING:
                raise
            return value

    # ---------------------------------------------------------------- misc

    @property
    def dtype(self) -> torch.dtype:
        for p in self.parameters():
            return p.dtype
        return torch.get_default_dtype()

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    def num_parameters(self, only_trainable: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not only_trainable)


def checkpointed(module: torch.nn.Module, fn, *args):
    """Run ``fn(*args)`` under activation checkpointing when the module asks for it and grads are on."""
    if getattr(module, "gradient_checkpointing", False) and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)
