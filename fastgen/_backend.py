"""Backend detection and dispatch.

Every op has up to four implementations: ``triton`` (kernels/), ``cuda``
(csrc/cuda, inside the extension), ``cpu`` (csrc/cpu, inside the extension) and
``torch`` (the plain PyTorch reference, always present). The backend of a call
is chosen, in order of precedence, by the op's ``backend=`` argument, the
innermost :func:`use_backend` context, the ``FASTGEN_BACKEND`` environment
variable, and finally automatically from the tensor's device.

A backend asked for by name that cannot run raises :class:`BackendUnavailable`
naming what is missing. Only the automatic choice may fall back, and it warns
once per (op, device type, backend) when it does.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import json
import os
import warnings
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

BACKENDS = ("triton", "cuda", "cpu", "torch")

# Automatic preference per device type. Triton on CPU tensors only exists
# through the interpreter, which is for tests and orders of magnitude slower
# than anything else, so it is never picked automatically there.
DEFAULT_PREFERENCE = {
    "cuda": ("cuda", "triton", "torch"),
    "cpu": ("cpu", "torch"),
}


class BackendUnavailable(RuntimeError):
    """A backend was requested by name but cannot run here."""


_requested: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar(
    "fastgen_backend", default=None
)


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(
            f"unknown fastgen backend {name!r}: expected one of {', '.join(BACKENDS)}"
        )
    return name


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Run the ops inside the block on backend ``name`` (None restores automatic choice)."""
    if name is not None:
        _check_name(name)
    token = _requested.set(name)
    try:
        yield
    finally:
        _requested.reset(token)


# ---------------------------------------------------------------- detection


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> Optional[str]:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # triton missing or broken: report, don't crash
        return f"triton could not be imported ({type(exc).__name__}: {exc})"
    return None


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_version() -> Optional[str]:
    if _triton_import_error() is not None:
        return None
    import triton

    return triton.__version__


@functools.lru_cache(maxsize=None)
def _load_extension():
    """Return (module, error message). The error says why it is missing."""
    try:
        module = importlib.import_module("fastgen._C")
    except ImportError as exc:
        reason = _build_failure_reason() or f"import failed: {exc}"
        return None, reason
    return module, None


def _build_failure_reason() -> Optional[str]:
    # setup.py records why the extension was skipped, so `fastgen info` can say
    # "no C++ compiler" rather than a bare ImportError.
    info = Path(__file__).with_name("_build_info.json")
    if not info.exists():
        return None
    try:
        data = json.loads(info.read_text())
    except (OSError, ValueError):
        return None
    if data.get("built"):
        return None
    return data.get("reason")


def extension():
    """The compiled ``fastgen._C`` module, or None."""
    return _load_extension()[0]


def extension_error() -> Optional[str]:
    return _load_extension()[1]


def extension_has_cuda() -> bool:
    ext = extension()
    return bool(ext is not None and ext.has_cuda())


def unavailable_reason(backend: str, device: torch.device) -> Optional[str]:
    """Why ``backend`` cannot run on ``device`` (None when it can)."""
    _check_name(backend)
    dtype = device.type
    if backend == "torch":
        return None
    if backend == "triton":
        err = _triton_import_error()
        if err:
            return err
        if dtype == "cuda":
            return None
        if dtype == "cpu":
            if triton_interpreter_enabled():
                return None
            return "triton runs CPU tensors only under the interpreter (set TRITON_INTERPRET=1)"
        return f"triton does not support {dtype} tensors"
    if backend == "cpu":
        if dtype != "cpu":
            return f"the cpu backend needs CPU tensors, got {dtype} tensors"
        if extension() is None:
            return f"the C++ extension fastgen._C is not available: {extension_error()}"
        return None
    # backend == "cuda"
    if dtype != "cuda":
        return f"the cuda backend needs CUDA tensors, got {dtype} tensors"
    if extension() is None:
        return f"the C++ extension fastgen._C is not available: {extension_error()}"
    if not extension_has_cuda():
        return "the C++ extension fastgen._C was built without CUDA"
    return None


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    device = torch.device(device)
    return [b for b in BACKENDS if unavailable_reason(b, device) is None]


# ---------------------------------------------------------------- dispatch

_warned: set[tuple] = set()
_auto_choice: dict[tuple, str] = {}


# Python state only (argument, context, environment), so torch.compile may evaluate it once while tracing
# (it cannot trace ContextVar.get).
@torch.compiler.assume_constant_result
def requested_backend(explicit: Optional[str] = None) -> Optional[str]:
    """The backend asked for by name (argument, context, env), or None for automatic."""
    if explicit is not None:
        return _check_name(explicit)
    ctx = _requested.get()
    if ctx is not None:
        return ctx
    env = os.environ.get("FASTGEN_BACKEND", "").strip()
    if env and env != "auto":
        try:
            return _check_name(env)
        except ValueError as exc:
            raise ValueError(f"FASTGEN_BACKEND: {exc}") from None
    return None


# The choice depends only on Python state (arguments, context, environment,
# what is installed), never on tensor data, so torch.compile may evaluate it once
# while tracing and bake the answer into the graph.
@torch.compiler.assume_constant_result
def resolve(
    op: str,
    device: torch.device,
    backend: Optional[str] = None,
    *,
    supported: Sequence[str] = BACKENDS,
    preference: Optional[Sequence[str]] = None,
    unsupported_reason: Optional[dict[str, str]] = None,
    dtype: Optional[torch.dtype] = None,
) -> str:
    """Pick the backend for one call of ``op`` on ``device``.

    ``supported`` lists the backends that implement ``op``;
    ``unsupported_reason`` maps a backend to why it cannot take these
    particular inputs (e.g. a head dim its kernel lacks). ``preference``
    overrides the device's default automatic order. With ``dtype``, the
    automatic choice on CPU skips the C++ kernel where the extension says it
    is slower than eager PyTorch on this CPU's instruction-set variant (the
    portable build: see :func:`cpu_kernel_is_fast`).
    """
    device = device if isinstance(device, torch.device) else torch.device(device)
    name = requested_backend(backend)
    if name is None and not unsupported_reason:
        # The automatic answer is fixed by what is installed (and, where Triton on CPU tensors is a
        # candidate, by the interpreter flag); memoising it keeps dispatch to ~1 us on every op call.
        kind = device.type  # (a property that costs ~0.5 us: read once)
        order = preference or DEFAULT_PREFERENCE.get(kind, ())
        interp = kind == "cpu" and "triton" in order and triton_interpreter_enabled()
        slow_cpu = kind == "cpu" and dtype is not None and "cpu" in order and not cpu_kernel_is_fast(op, dtype)
        key = (op, kind, tuple(supported), preference and tuple(preference), interp, slow_cpu, _load_extension())
        hit = _auto_choice.get(key)
        if hit is None:
            if slow_cpu:
                preference = tuple(b for b in order if b != "cpu")
            hit = _auto_choice[key] = _choose_automatically(op, device, supported, preference, {})
        return hit
    unsupported_reason = unsupported_reason or {}
    if name is not None:
        if name not in supported:
            raise BackendUnavailable(
                f"fastgen.ops.{op}: backend {name!r} does not implement this op "
                f"(implemented: {', '.join(supported)})"
            )
        why = unavailable_reason(name, device) or unsupported_reason.get(name)
        if why is not None:
            raise BackendUnavailable(f"fastgen.ops.{op}: backend {name!r} is unavailable: {why}")
        return name

    return _choose_automatically(op, device, supported, preference, unsupported_reason)


_fast_cpu: dict[tuple, bool] = {}


def cpu_kernel_is_fast(op: str, dtype: torch.dtype) -> bool:
    """Whether fastgen's C++ CPU kernel of ``op`` beats eager PyTorch for ``dtype`` on the instruction-set
    variant the extension runs now (``fastgen._C.cpu_isa()``, which ``FASTGEN_CPU_ISA`` may lower). The
    extension owns the answer; it is False for the portable variant's geglu, group_norm and attention."""
    ext = extension()
    if ext is None or not hasattr(ext, "cpu_kernel_is_fast"):
        return True
    key = (op, dtype, ext.cpu_isa())
    hit = _fast_cpu.get(key)
    if hit is None:
        hit = _fast_cpu[key] = bool(ext.cpu_kernel_is_fast(op, str(dtype).replace("torch.", "")))
    return hit


def _choose_automatically(op, device, supported, preference, unsupported_reason) -> str:
    order = preference or DEFAULT_PREFERENCE.get(device.type, ("torch",))
    skipped = []
    for cand in order:
        if cand not in supported:
            continue
        why = unavailable_reason(cand, device) or unsupported_reason.get(cand)
        if why is None:
            if skipped:
                _warn_fallback(op, device.type, cand, skipped)
            return cand
        skipped.append((cand, why))
    return "torch"


def warn_once(key: tuple, message: str, *, category=RuntimeWarning, stacklevel: int = 3) -> bool:
    """Warn with ``message`` the first time ``key`` is seen in this process (every fallback in fastgen, op or
    model, says so through here, once). Returns whether it warned."""
    if key in _warned:
        return False
    _warned.add(key)
    warnings.warn(message, category, stacklevel=stacklevel + 1)
    return True


def _warn_fallback(op: str, device_type: str, chosen: str, skipped) -> None:
    reasons = "; ".join(f"{b}: {why}" for b, why in skipped)
    warn_once(
        ("fallback", op, device_type, chosen),
        f"fastgen.ops.{op} on {device_type} tensors falls back to the {chosen!r} backend ({reasons})",
        stacklevel=4,
    )


def native_kernel(op: str, fn: str, backend: str):
    """The compiled or Triton entry point ``fn`` of ``op`` for ``backend``.

    Naming is uniform across layers: ``kernels/<op>.py`` defines ``<fn>`` for
    Triton and the extension binds ``<fn>_cpu`` / ``<fn>_cuda``.
    """
    if backend == "triton":
        module = importlib.import_module(f"fastgen.kernels.{op}")
        return getattr(module, fn)
    if backend in ("cpu", "cuda"):
        ext = extension()
        if ext is None:
            raise BackendUnavailable(f"the C++ extension fastgen._C is not available: {extension_error()}")
        return getattr(ext, f"{fn}_{backend}")
    raise ValueError(f"backend {backend!r} has no native kernel; the torch backend lives in fastgen/ops/{op}.py")
