"""Components of a diffusers pipeline folder (``model_index.json`` + one subfolder per component)."""

from __future__ import annotations

import importlib
import os
from typing import Iterable, Optional

import torch

from .files import CheckpointError, CheckpointNotFoundError, PathLike, local_folder, read_json_object

MODEL_INDEX = "model_index.json"


class LoadedPipeline(dict):
    """``{component: object}`` for what fastgen loaded (models, schedulers), ``{component: folder path}``
    for what it skipped (text encoders, tokenizers, ...: listed in ``skipped``), ``None`` for components
    the pipeline leaves empty. ``classes`` maps each component to its ``(library, class name)`` entry;
    ``class_name`` and ``config`` hold the rest of ``model_index.json``."""

    def __init__(self, folder: str, class_name: Optional[str], config: dict):
        super().__init__()
        self.folder = folder
        self.class_name = class_name
        self.config = config
        self.skipped: dict[str, str] = {}
        self.classes: dict[str, tuple] = {}

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


# Model classes by the module that defines them (for those fastgen.models does not re-export).
_MODEL_MODULES = {"UNet2DConditionModel": "unet_2d_condition", "UNet2DModel": "unet_2d", "AutoencoderKL": "autoencoder_kl"}


def _fastgen_class(name: str):
    from .. import models, schedulers

    candidates = [getattr(models, name, None), getattr(schedulers, name, None)]
    if name in _MODEL_MODULES and candidates[0] is None:
        try:
            module = importlib.import_module(f"{models.__name__}.{_MODEL_MODULES[name]}")
        except ImportError:
            module = None
        candidates.append(getattr(module, name, None))
    for obj in candidates:
        if isinstance(obj, type) and hasattr(obj, "from_pretrained"):
            return obj
    return None


def load_pipeline(folder: PathLike, *, torch_dtype=None, skip: Iterable[str] = ()) -> LoadedPipeline:
    """Load a StableDiffusionPipeline-layout folder's diffusers components with fastgen's classes.

    Each ``model_index.json`` entry ``name: [library, ClassName]`` whose library is ``diffusers`` is loaded
    from ``folder/name`` by the fastgen class of that name (models from :mod:`fastgen.models`, cast to
    ``torch_dtype``; schedulers from :mod:`fastgen.schedulers`); a class fastgen lacks raises a
    :class:`~fastgen.io.CheckpointError` naming it (pass ``skip=("name",)`` to leave it out). Components of
    other libraries (``transformers`` text encoders and tokenizers, the safety checker) and those in
    ``skip`` are not loaded: their folder paths are returned and listed in ``.skipped``."""
    folder = local_folder(folder)
    index_file = os.path.join(folder, MODEL_INDEX)
    index = read_json_object(index_file,
                             missing=f"no {MODEL_INDEX} in {folder!r}: not a diffusers pipeline folder")
    skip = set(skip)
    config = {k: v for k, v in index.items() if not k.startswith("_") and not _is_component(v)}
    out = LoadedPipeline(folder, index.get("_class_name"), config)
    unknown_skip = skip - {k for k, v in index.items() if _is_component(v)}
    if unknown_skip:
        raise ValueError(f"skip={sorted(unknown_skip)}: no such components in {index_file}")
    for name, value in index.items():
        if name.startswith("_") or not _is_component(value):
            continue
        library, class_name = value
        out.classes[name] = (library, class_name)
        if library is None or class_name is None:
            out[name] = None
            continue
        sub = os.path.join(folder, name)
        if library != "diffusers" or name in skip:
            out[name] = sub
            out.skipped[name] = sub
            continue
        cls = _fastgen_class(class_name)
        if cls is None:
            raise CheckpointError(
                f"{index_file}: component {name!r} is a {class_name}, which fastgen does not implement "
                f"(fastgen.models and fastgen.schedulers have no {class_name}); "
                f"pass skip=({name!r},) to load the rest"
            )
        if not os.path.isdir(sub):
            raise CheckpointNotFoundError(f"{index_file}: component {name!r} has no folder {sub!r}")
        if issubclass(cls, torch.nn.Module):
            out[name] = cls.from_pretrained(sub, torch_dtype=torch_dtype)
        else:
            out[name] = cls.from_pretrained(sub)
    return out


def _is_component(value) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 2 and all(v is None or isinstance(v, str) for v in value)
