"""Reading and writing weights: diffusers' folder layout, safe formats only, strict loading.

Formats read: ``.safetensors`` (single or sharded with an index), and ``.bin`` / ``.ckpt`` / ``.pt`` / ``.pth``
through ``torch.load(weights_only=True)``, which rebuilds tensors and plain containers only: a pickle holding
any other object is refused before anything in it runs. Every error names the file it is about.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import tempfile
from typing import Any, Iterable, Optional, Union

import torch
from torch import Tensor

PathLike = Union[str, os.PathLike]

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "diffusion_pytorch_model.safetensors"
SAFETENSORS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
ALT_SAFETENSORS_NAME = "model.safetensors"
BIN_NAME = "diffusion_pytorch_model.bin"
BIN_INDEX_NAME = "diffusion_pytorch_model.bin.index.json"
# The diffusers release whose folder layout and config keys fastgen writes (read back by diffusers' own
# from_pretrained; diffusers only compares it to warn about configs newer than itself).
DIFFUSERS_VERSION = "0.42.1"
DEFAULT_MAX_SHARD_SIZE = "10GB"
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")


class CheckpointError(ValueError):
    """A checkpoint fastgen will not load: unreadable, unsafe, or not matching the model. Names the file."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The path, or every weights file looked for in a folder, does not exist (also a ``FileNotFoundError``)."""


def _add_variant(name: str, variant: Optional[str]) -> str:
    """diffusers' naming: ``a.safetensors`` -> ``a.fp16.safetensors``; ``a.safetensors.index.json`` ->
    ``a.safetensors.index.fp16.json`` (the variant goes before the last suffix)."""
    if not variant:
        return name
    stem, _, ext = name.rpartition(".")
    return f"{stem}.{variant}.{ext}"


def local_folder(path: PathLike, subfolder: Optional[str] = None) -> str:
    """``path`` (+ ``subfolder``) as an existing local folder, or a ``FileNotFoundError`` saying fastgen
    loads local folders only (a Hub id such as ``"runwayml/stable-diffusion-v1-5"`` is never downloaded)."""
    path = os.fspath(path)
    folder = os.path.join(path, subfolder) if subfolder else path
    if not os.path.isdir(folder):
        what = "is not a folder" if os.path.exists(folder) else "does not exist"
        raise CheckpointNotFoundError(
            f"{folder!r} {what}: fastgen loads local folders only and never downloads; "
            "for a Hub model, download it first (e.g. `huggingface-cli download <repo> --local-dir DIR`) "
            "and pass DIR"
        )
    return folder


# ----------------------------------------------------------------------------------------- reading


def _weight_candidates(variant: Optional[str], use_safetensors: Optional[bool]) -> list[str]:
    names = []
    if use_safetensors is not False:
        names += [SAFETENSORS_INDEX_NAME, SAFETENSORS_NAME, ALT_SAFETENSORS_NAME]
    if use_safetensors is not True:
        names += [BIN_INDEX_NAME, BIN_NAME]
    return [_add_variant(n, variant) for n in names]


def resolve_weights(folder: PathLike, *, variant: Optional[str] = None, use_safetensors: Optional[bool] = None) -> str:
    """The weights file diffusers would read from ``folder``: an index (sharded) first, then the single
    safetensors file, ``model.safetensors``, then (unless ``use_safetensors=True``) the ``.bin`` files."""
    folder = os.fspath(folder)
    candidates = _weight_candidates(variant, use_safetensors)
    for name in candidates:
        file = os.path.join(folder, name)
        if os.path.isfile(file):
            return file
    raise CheckpointNotFoundError(
        f"no weights in {folder!r}: looked for {', '.join(candidates)}"
        + (f" (variant={variant!r})" if variant else "")
        + ("" if use_safetensors is not True else " (use_safetensors=True: .bin files not considered)")
    )


def _read_safetensors(file: str) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(file, device="cpu")
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{file}: no such file") from None
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError / ValueError variants)
        raise CheckpointError(
            f"{file}: not a valid safetensors file, truncated or corrupt ({type(e).__name__}: {e})"
        ) from None


def _read_pickle(file: str) -> Any:
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{file}: no such file") from None
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()
        detail = next((line for line in first if "GLOBAL" in line or "Unsupported" in line), first[0] if first else "")
        raise CheckpointError(
            f"{file}: the pickle holds objects other than tensors and plain containers ({detail.strip()}); "
            "fastgen does not unpickle them (that could run arbitrary code). If you trust the file, convert it "
            "to safetensors with the tool that made it"
        ) from None
    except Exception as e:  # truncated zip, bad magic number, ...
        raise CheckpointError(
            f"{file}: not a readable torch checkpoint, truncated or corrupt ({type(e).__name__}: {e})"
        ) from None


def _looks_like_safetensors(file: str) -> bool:
    with open(file, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and not head.startswith(b"PK")


def _check_tensors(obj: Any, file: str) -> dict[str, Tensor]:
    if not isinstance(obj, dict):
        raise CheckpointError(f"{file}: holds a {type(obj).__name__}, not a dict of tensors")
    if "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # original Stable Diffusion / Lightning .ckpt: weights nested, other keys dropped
    bad = [(k, v) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        shown = ", ".join(f"{k!r} ({type(v).__name__})" for k, v in bad[:5])
        raise CheckpointError(
            f"{file}: {len(bad)} entries are not str -> tensor, e.g. {shown}; a state dict holds tensors only"
        )
    return dict(obj)


def _read_index(index_file: str) -> dict[str, list[str]]:
    """shard file -> keys it holds, from a ``*.index.json``; every problem named with the index's path."""
    try:
        with open(index_file, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{index_file}: not a valid shard index ({type(e).__name__}: {e})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(
            f"{index_file}: not a valid shard index (needs a non-empty \"weight_map\" of key -> file)"
        )
    shards: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        if os.path.basename(shard) != shard or shard in ("", ".", ".."):
            raise CheckpointError(f"{index_file}: shard name {shard!r} is not a file name in the index's folder")
        shards.setdefault(shard, []).append(key)
    return shards


def _read_sharded(index_file: str) -> dict[str, Tensor]:
    folder = os.path.dirname(index_file)
    shards = _read_index(index_file)
    missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
    if missing:
        raise CheckpointNotFoundError(f"{index_file}: shard files missing: {', '.join(missing)}")
    out: dict[str, Tensor] = {}
    for shard, keys in shards.items():
        file = os.path.join(folder, shard)
        part = _read_file(file)
        if set(part) != set(keys):
            lost = sorted(set(keys) - set(part))
            extra = sorted(set(part) - set(keys))
            raise CheckpointError(
                f"{file}: does not match {os.path.basename(index_file)} "
                f"(keys the index puts here but missing: {lost[:10]}; keys not in the index: {extra[:10]})"
            )
        dup = sorted(set(part) & set(out))
        if dup:
            raise CheckpointError(f"{file}: keys also in another shard: {dup[:10]}")
        out.update(part)
    return out


def _read_file(file: str) -> dict[str, Tensor]:
    if file.endswith(".index.json") or file.endswith(".json"):
        return _read_sharded(file)
    if not os.path.isfile(file):
        raise CheckpointNotFoundError(f"{file}: no such file" if not os.path.isdir(file) else f"{file}: is a folder")
    if file.endswith(".safetensors"):
        return _read_safetensors(file)
    if file.endswith(PICKLE_SUFFIXES):
        return _check_tensors(_read_pickle(file), file)
    if _looks_like_safetensors(file):
        return _read_safetensors(file)
    return _check_tensors(_read_pickle(file), file)


def load_state_dict(
    path: PathLike, *, variant: Optional[str] = None, use_safetensors: Optional[bool] = None
) -> dict[str, Tensor]:
    """``{name: tensor}`` (on the CPU) from a weights file or a diffusers-layout folder.

    A file: ``.safetensors``, a shard ``*.index.json``, or ``.bin`` / ``.ckpt`` / ``.pt`` / ``.pth`` (read with
    ``torch.load(weights_only=True)``; weights nested under ``"state_dict"`` are unwrapped). A folder: the file
    :func:`resolve_weights` finds. Raises :class:`CheckpointError` (naming the file) for anything else.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = resolve_weights(path, variant=variant, use_safetensors=use_safetensors)
    elif not os.path.exists(path):
        raise CheckpointNotFoundError(f"{path}: no such file or folder (fastgen reads local files only)")
    return _read_file(path)


def read_json_object(file: str, *, missing: str, invalid: str = "not valid JSON") -> dict:
    """A JSON object file (a config, a pipeline's model_index.json): ``CheckpointNotFoundError(missing)`` when
    it is absent, ``CheckpointError`` naming the file when it is not a JSON object."""
    if not os.path.isfile(file):
        raise CheckpointNotFoundError(missing)
    try:
        with open(file, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: {invalid} ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{file}: holds a {type(obj).__name__}, not a JSON object")
    return obj


def read_config(folder: str) -> dict:
    return read_json_object(os.path.join(folder, CONFIG_NAME), missing=f"no {CONFIG_NAME} in {folder!r}",
                            invalid="not a valid JSON config")


# ----------------------------------------------------------------------------------------- loading


def check_state_dict(expected: dict[str, Any], state_dict: dict[str, Tensor], source: str) -> None:
    """Strict match of ``state_dict`` against ``expected`` (name -> tensor, or shape): one
    :class:`CheckpointError` listing the first missing and unexpected keys (with counts) and every shape
    mismatch (first 10), naming ``source``."""
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = []
    for k, want in expected.items():
        if k in state_dict:
            want_shape = tuple(want.shape) if isinstance(want, Tensor) else tuple(want)
            got = tuple(state_dict[k].shape)
            if got != want_shape:
                wrong.append(f"{k}: model expects {want_shape}, file has {got}")
    if not (missing or unexpected or wrong):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (first {min(10, len(missing))}: {missing[:10]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (first {min(10, len(unexpected))}: {unexpected[:10]})")
    if wrong:
        parts.append(f"{len(wrong)} shape mismatches ({'; '.join(wrong[:10])})")
    raise CheckpointError(f"{source}: does not match the model: " + "; ".join(parts))


def _meta_leftovers(model: torch.nn.Module) -> bool:
    for m in model.modules():
        for v in list(m._parameters.values()) + list(m._buffers.values()) + list(vars(m).values()):
            if isinstance(v, Tensor) and v.is_meta:
                return True
    return False


def build_and_load(cls, config: dict, state_dict: dict[str, Tensor], source: str, torch_dtype=None):
    """``cls.from_config(config)`` with ``state_dict`` loaded strictly, cast to ``torch_dtype``, in eval mode.

    The model is built on the meta device (no random init of weights about to be overwritten) when that is
    exact: when every tensor it holds comes from the state dict. Otherwise it is built normally."""
    torch_dtype = _as_dtype(torch_dtype)
    model = None
    try:
        with torch.device("meta"):
            meta_model = cls.from_config(config)
    except Exception:  # a config error is raised again by the normal build below; anything else: build normally
        meta_model = None
    if meta_model is not None:
        expected = meta_model.state_dict()
        check_state_dict(expected, state_dict, source)
        n_sd = len(expected)
        n_all = sum(1 for _ in meta_model.parameters()) + sum(1 for _ in meta_model.buffers())
        if n_sd == n_all:  # no non-persistent buffers a meta build would leave empty
            # copied into torch's allocator (64-byte aligned, as a normal build's parameters are; tensors read
            # from a file need not be), in the model's dtype as load_state_dict's copy would give
            sd = {k: v.to(expected[k].dtype if v.is_floating_point() and expected[k].is_floating_point() else v.dtype,
                          copy=True, memory_format=torch.contiguous_format)
                  for k, v in state_dict.items()}
            meta_model.load_state_dict(sd, strict=True, assign=True)
            if not _meta_leftovers(meta_model):
                model = meta_model
    if model is None:
        model = cls.from_config(config)
        check_state_dict(model.state_dict(), state_dict, source)
        model.load_state_dict(state_dict, strict=True)
    if torch_dtype is not None:
        model = model.to(torch_dtype)
    return model.eval()


def _as_dtype(torch_dtype):
    if torch_dtype is None or isinstance(torch_dtype, torch.dtype):
        return torch_dtype
    if isinstance(torch_dtype, str):
        dt = getattr(torch, torch_dtype.removeprefix("torch."), None)
        if isinstance(dt, torch.dtype):
            return dt
    raise TypeError(f"torch_dtype must be a torch.dtype (e.g. torch.float16), got {torch_dtype!r}")


_LOAD_KWARGS = ("variant", "use_safetensors", "local_files_only")


def load_model(cls, path: PathLike, *, subfolder: Optional[str] = None, torch_dtype=None, **kwargs):
    """``cls`` from a local diffusers-layout folder (``config.json`` + weights), loaded strictly, in eval mode.

    ``kwargs``: ``variant`` (``"fp16"`` reads ``diffusion_pytorch_model.fp16.safetensors``),
    ``use_safetensors`` (``True``: safetensors only; ``False``: ``.bin`` only) and ``local_files_only``
    (accepted; fastgen never downloads). Any other keyword is refused by name.
    """
    unknown = sorted(k for k in kwargs if k not in _LOAD_KWARGS)
    if unknown:
        raise TypeError(
            f"{getattr(cls, '__name__', cls)}.from_pretrained: unsupported keyword arguments {unknown} "
            f"(fastgen accepts subfolder, torch_dtype, {', '.join(_LOAD_KWARGS)})"
        )
    folder = local_folder(path, subfolder)
    config = read_config(folder)
    weights = resolve_weights(folder, variant=kwargs.get("variant"), use_safetensors=kwargs.get("use_safetensors"))
    state_dict = _read_file(weights)
    return build_and_load(cls, config, state_dict, weights, torch_dtype)


# ----------------------------------------------------------------------------------------- writing


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: Union[int, str]) -> int:
    """``"5GB"`` -> 5*10**9, ``"10MiB"`` -> 10*2**20, an int -> itself (bytes)."""
    if isinstance(size, bool):
        raise TypeError(f"max_shard_size must be an int (bytes) or a string like '5GB', got {size!r}")
    if isinstance(size, int):
        if size <= 0:
            raise ValueError(f"max_shard_size must be positive, got {size}")
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
    if not m or m.group(2).upper() not in _SIZE_UNITS:
        raise ValueError(f"max_shard_size {size!r} is not a size like '5GB', '10MB', '500KiB' or an int of bytes")
    value = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])
    if value <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return value


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, write) -> None:
    """Write ``path`` through ``write(tmp_path)`` on a temporary file in the same folder, fsync it, and
    ``os.replace`` it into place: a crash leaves the previous file intact (and at most a stray ``.tmp``)."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(directory)


def _write_json(path: str, obj: Any) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def _jsonable(v):
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    return v


def savable_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Detached, contiguous CPU tensors that each own their storage: a tensor sharing storage with another
    (tied weights) or viewing part of a larger one is cloned (safetensors refuses shared storage)."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for k, t in state_dict.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"state dict entry {k!r} is a {type(t).__name__}, not a tensor")
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if (not t.is_contiguous()) or storage.nbytes() != t.nbytes or (ptr in seen and t.nbytes > 0):
            t = t.clone(memory_format=torch.contiguous_format)
            ptr = t.untyped_storage().data_ptr()
        seen.add(ptr)
        out[k] = t
    return out


def _shard(state_dict: dict[str, Tensor], max_bytes: int) -> list[dict[str, Tensor]]:
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for k, t in state_dict.items():
        n = t.nbytes
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += n
    return shards


_SHARD_RE = re.compile(r"-\d{5}-of-\d{5}$")


def save_model(
    model,
    directory: PathLike,
    *,
    safe_serialization: bool = True,
    max_shard_size: Union[int, str, None] = None,
    variant: Optional[str] = None,
) -> None:
    """Write ``config.json`` and the weights in diffusers' layout, readable by diffusers' ``from_pretrained``.

    Weights go to ``diffusion_pytorch_model[.<variant>].safetensors`` (``.bin`` with
    ``safe_serialization=False``), split into ``...-00001-of-0000N...`` shards plus an index when larger than
    ``max_shard_size`` (default ``"10GB"``, like diffusers). Each file is written atomically; weights files
    of the same name pattern left by an earlier save (stale shards, an index) are removed afterwards.
    """
    directory = os.fspath(directory)
    if os.path.isfile(directory):
        raise FileExistsError(f"{directory!r} is a file; save_pretrained writes a folder")
    os.makedirs(directory, exist_ok=True)
    max_bytes = parse_size(DEFAULT_MAX_SHARD_SIZE if max_shard_size is None else max_shard_size)

    config = {k: _jsonable(v) for k, v in dict(model.config).items() if not k.startswith("_")}
    config["_class_name"] = type(model).__name__
    config["_diffusers_version"] = DIFFUSERS_VERSION

    state_dict = savable_state_dict(model.state_dict())
    weights_name = _add_variant(SAFETENSORS_NAME if safe_serialization else BIN_NAME, variant)
    index_name = _add_variant(SAFETENSORS_INDEX_NAME if safe_serialization else BIN_INDEX_NAME, variant)
    ext = ".safetensors" if safe_serialization else ".bin"

    def write_weights(path: str, tensors: dict[str, Tensor]) -> None:
        if safe_serialization:
            from safetensors.torch import save_file

            atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        else:
            atomic_write(path, lambda tmp: torch.save(tensors, tmp))

    _write_json(os.path.join(directory, CONFIG_NAME), config)
    shards = _shard(state_dict, max_bytes)
    written: set[str] = set()
    if len(shards) == 1:
        write_weights(os.path.join(directory, weights_name), shards[0])
        written.add(weights_name)
    else:
        stem = weights_name[: -len(ext)]
        weight_map: dict[str, str] = {}
        for i, shard in enumerate(shards, 1):
            name = f"{stem}-{i:05d}-of-{len(shards):05d}{ext}"
            write_weights(os.path.join(directory, name), shard)
            written.add(name)
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.nbytes for t in state_dict.values())
        _write_json(os.path.join(directory, index_name), {"metadata": {"total_size": total}, "weight_map": weight_map})
        written.add(index_name)
    _remove_stale(directory, weights_name, index_name, ext, written)


def _remove_stale(directory: str, weights_name: str, index_name: str, ext: str, written: Iterable[str]) -> None:
    stem = weights_name[: -len(ext)]
    for name in os.listdir(directory):
        if name in written:
            continue
        stale = name in (weights_name, index_name) or (
            name.startswith(stem) and name.endswith(ext) and _SHARD_RE.search(name[: -len(ext)]) is not None
            and name[: -len(ext)][: -len("-00001-of-00001")] == stem
        )
        if stale and os.path.isfile(os.path.join(directory, name)):
            os.remove(os.path.join(directory, name))
