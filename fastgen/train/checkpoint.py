"""Trainer checkpoints: safetensors tensors + one JSON trainer state, written so that a kill at any moment
leaves the last complete checkpoint loadable.

Layout: ``<out_dir>/checkpoints/step-00000100/`` holds ``model-<name>.safetensors`` (weights),
``ema-<name>.safetensors``, ``optimizer-<name>.safetensors`` (the optimizer's per-parameter tensors) and
``trainer_state.json`` (step, data position, config, optimizer hyper-parameters and scalar state, EMA
counters, grad-scaler state, RNG states). The folder is written as ``step-00000100.tmp-<pid>``, every file
fsynced, then renamed into place in one ``os.rename``: a reader sees either no checkpoint of that step or a
complete one, and a partial ``.tmp-*`` folder is never read (and is removed by the next save).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor

from ..io.files import CheckpointError, _fsync_dir, savable_state_dict

FORMAT = 1
STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def _save_tensors(path: Path, tensors: dict[str, Tensor]) -> None:
    from safetensors.torch import save_file

    save_file(savable_state_dict(tensors), str(path), metadata={"format": "pt"})
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _load_tensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for truncated or foreign files
        raise CheckpointError(f"checkpoint file {path} is not a readable safetensors file: {exc}") from exc


def optimizer_to_files(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict]:
    """(tensors, JSON part) of an optimizer's ``state_dict()``: per-parameter tensors go to safetensors as
    ``<param index>.<key>``, everything else (hyper-parameters, Python scalars) to JSON."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, Tensor):
                tensors[f"{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_files(tensors: dict[str, Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    for idx, values in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state(device: torch.device) -> dict:
    out = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii")}
    if device.type == "cuda":
        out["cuda"] = base64.b64encode(torch.cuda.get_rng_state(device).numpy().tobytes()).decode("ascii")
    return out


def set_rng_state(state: dict, device: torch.device) -> None:
    def decode(text: str) -> Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()

    if "torch" in state:
        torch.set_rng_state(decode(state["torch"]))
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(decode(state["cuda"]), device)


def checkpoint_root(out_dir: Union[str, os.PathLike]) -> Path:
    return Path(out_dir) / "checkpoints"


def step_dir(out_dir, step: int) -> Path:
    return checkpoint_root(out_dir) / f"step-{step:08d}"


def save_checkpoint(out_dir, step: int, *, models: dict[str, dict[str, Tensor]], emas: dict[str, dict[str, Tensor]],
                    optimizers: dict[str, tuple[dict[str, Tensor], dict]], state: dict, keep: int = 2) -> Path:
    """Write the checkpoint of ``step`` atomically (module docstring); keep the ``keep`` newest."""
    root = checkpoint_root(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob("step-*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = step_dir(out_dir, step)
    tmp = root / f"{final.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        for name, tensors in models.items():
            _save_tensors(tmp / f"model-{name}.safetensors", tensors)
        for name, tensors in emas.items():
            _save_tensors(tmp / f"ema-{name}.safetensors", tensors)
        opt_meta = {}
        for name, (tensors, meta) in optimizers.items():
            _save_tensors(tmp / f"optimizer-{name}.safetensors", tensors)
            opt_meta[name] = meta
        full_state = dict(state, format=FORMAT, step=step, optimizers=opt_meta)
        with open(tmp / STATE_FILE, "w", encoding="utf-8") as f:
            json.dump(full_state, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(str(tmp))
        if final.exists():  # the same step saved again (a resumed run): replace it whole
            old = root / f"{final.name}.old-{os.getpid()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(str(root))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(out_dir) -> list[Path]:
    """Complete checkpoints, oldest first (``.tmp-*`` folders of interrupted writes never match)."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(out_dir) -> Optional[Path]:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def load_checkpoint(path: Union[str, os.PathLike]) -> dict:
    """The parts of a checkpoint folder: ``state`` (the JSON), ``models``, ``emas``, ``optimizers`` (state
    dicts ready for ``load_state_dict``). A missing or malformed part raises ``CheckpointError`` naming it."""
    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise CheckpointError(f"{path} is not a fastgen trainer checkpoint: {STATE_FILE} is missing")
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{state_file} is not valid JSON: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT or "step" not in state:
        raise CheckpointError(f"{state_file} is not a format-{FORMAT} fastgen trainer state")
    models = {name: _load_tensors(path / f"model-{name}.safetensors") for name in state.get("models", [])}
    emas = {name: _load_tensors(path / f"ema-{name}.safetensors") for name in state.get("emas", {})}
    optimizers = {name: optimizer_from_files(_load_tensors(path / f"optimizer-{name}.safetensors"), meta)
                  for name, meta in state.get("optimizers", {}).items()}
    return {"state": state, "models": models, "emas": emas, "optimizers": optimizers, "path": path}
