"""The folder a trainer exports (``<out_dir>/model``): one diffusers-layout sub-folder per model
(``config.json`` + ``diffusion_pytorch_model.safetensors``) and ``fastgen_model.json`` naming the trainer kind
and its options, which ``fastgen sample`` reads to rebuild the sampler."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from ..io.files import CheckpointError, CheckpointNotFoundError, _write_json

MANIFEST = "fastgen_model.json"


def write_manifest(folder, kind: str, options: Any, **extra) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    opts = asdict(options) if is_dataclass(options) else dict(options)
    path = folder / MANIFEST
    _write_json(str(path), {"kind": kind, "options": opts, **extra})
    return path


def read_manifest(folder) -> dict:
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise CheckpointNotFoundError(f"model folder {os.fspath(folder)!r} does not exist")
    if not path.is_file():
        raise CheckpointNotFoundError(f"{os.fspath(folder)!r} is not a fastgen-trained model: {MANIFEST} is "
                                      "missing (point --model at a trainer's <out_dir>/model folder)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or "kind" not in data or not isinstance(data.get("options"), dict):
        raise CheckpointError(f"{path} has no 'kind' and 'options': not a fastgen model manifest")
    return data
