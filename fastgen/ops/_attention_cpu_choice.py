"""Which CPU attention is faster for a shape: fastgen's C++ kernel or PyTorch's SDPA.

The answer is data, not code: measurement tables in JSON, read once, lazily, on
the first automatic choice (nothing is read when ``backend=`` names a backend).

Lookup, for one call ``(Nq, Nk, head_dim, dtype, training)``:

1. ``FASTGEN_ATTENTION_CPU``: ``kernel`` or ``sdpa`` forces that choice for
   every shape; ``auto`` (or unset) uses the tables below; anything else
   raises ``ValueError``. (The op's ``backend=`` argument, the
   ``use_backend`` context and ``FASTGEN_BACKEND`` come before this: they
   name a backend, and this only decides between ``cpu`` and ``torch`` when
   the backend is chosen automatically.)
2. The user's choice file, ``$FASTGEN_CACHE_DIR/attention_cpu_choice.json``
   (default ``~/.cache/fastgen/``, or ``$XDG_CACHE_HOME/fastgen/``), written
   by ``fastgen bench attention --tune``: its tables whose machine has this
   CPU's model name and instruction set. A file measured on another machine
   is ignored (with a warning, once); a malformed one too (warning, once).
3. The table shipped in ``fastgen/data/attention_cpu_choice.json`` measured
   on the same instruction set, else its first table.

A table lists cells ``{dtype, training, head_dim, nq, nk, choice}`` (choice
``"kernel"`` or ``"sdpa"``, optionally the measured ``kernel_ms`` and
``sdpa_ms``). The cell of a call is, per axis, the largest grid value not
above the call's (the smallest where the call is below all of them), so a cell
covers the shapes from its own up to the next grid value; a table that has no
cell there (a tune run cut short, another dtype) leaves the call to the next
table. Answers are memoised per shape: the attention op calls this per layer.
"""

from __future__ import annotations

import bisect
import functools
import json
import os
from pathlib import Path
from typing import Any, Optional

import torch

ENV = "FASTGEN_ATTENTION_CPU"
MODES = ("auto", "kernel", "sdpa")
FILE_NAME = "attention_cpu_choice.json"
SHIPPED = Path(__file__).resolve().parents[1] / "data" / FILE_NAME
FORMAT = 1
CHOICES = ("kernel", "sdpa")
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


class ChoiceFileError(ValueError):
    """A choice file that cannot be read or does not have the documented format."""


# ------------------------------------------------------------------ machine


def user_choice_path() -> Path:
    """Where ``fastgen bench attention --tune`` writes, and this module looks for, the user's table."""
    root = os.environ.get("FASTGEN_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = os.path.join(xdg, "fastgen") if xdg else os.path.join(os.path.expanduser("~"), ".cache", "fastgen")
    return Path(root) / FILE_NAME


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.lru_cache(maxsize=None)
def cpu_isa() -> str:
    """The instruction-set variant the CPU kernels run: ``avx512_bf16``, ``avx512``, ``avx2`` (with FMA) or
    ``portable`` — the extension's own choice (which ``FASTGEN_CPU_ISA`` may lower), or, without the
    extension, the best this CPU reports."""
    from .. import _backend

    ext = _backend.extension()
    if ext is not None and hasattr(ext, "cpu_isa"):
        return ext.cpu_isa()
    flags = _cpu_flags()
    if not flags:  # not Linux: what PyTorch's own CPU dispatch detected
        cap = str(getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")()).lower()
        return {"avx512": "avx512", "avx2": "avx2"}.get(cap, "portable")
    if "avx512f" in flags:
        return "avx512_bf16" if "avx512_bf16" in flags else "avx512"
    if "avx2" in flags and "fma" in flags:
        return "avx2"
    return "portable"


def this_machine() -> dict[str, Any]:
    """What a table records of the machine it was measured on (``cpu`` and ``isa`` are matched)."""
    from ..info import cpu_name

    return {"cpu": cpu_name(), "isa": cpu_isa(), "threads": torch.get_num_threads(), "torch": torch.__version__}


# ------------------------------------------------------------------ tables


class Table:
    """One machine's cells, indexed for the per-axis floor lookup."""

    def __init__(self, machine: dict, cells: list[dict], origin: str):
        self.machine = machine
        self.origin = origin
        self._grids: dict[tuple[str, bool], tuple[list[int], list[int], list[int], dict]] = {}
        by_key: dict[tuple[str, bool], dict[tuple[int, int, int], bool]] = {}
        for c in cells:
            by_key.setdefault((c["dtype"], c["training"]), {})[(c["head_dim"], c["nq"], c["nk"])] = (
                c["choice"] == "kernel"
            )
        for key, choice in by_key.items():
            axes = [sorted({k[i] for k in choice}) for i in range(3)]
            self._grids[key] = (*axes, choice)

    def lookup(self, nq: int, nk: int, head_dim: int, dtype: str, training: bool) -> Optional[bool]:
        grid = self._grids.get((dtype, training))
        if grid is None:
            return None
        head_dims, nqs, nks, choice = grid
        cell = tuple(_floor(axis, v) for axis, v in ((head_dims, head_dim), (nqs, nq), (nks, nk)))
        return choice.get(cell)


def _floor(axis: list[int], value: int) -> int:
    i = bisect.bisect_right(axis, value) - 1
    return axis[max(i, 0)]


def _fail(origin: str, what: str):
    raise ChoiceFileError(f"attention CPU choice file {origin}: {what}")


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def parse_tables(data: Any, origin: str) -> list[Table]:
    """The tables of a choice file's parsed JSON, validated (``ChoiceFileError`` says what is wrong)."""
    if not isinstance(data, dict):
        _fail(origin, f"expected a JSON object, got {type(data).__name__}")
    if data.get("format") != FORMAT:
        _fail(origin, f"unsupported format {data.get('format')!r} (this fastgen reads format {FORMAT})")
    tables = data.get("tables")
    if not isinstance(tables, list) or not tables:
        _fail(origin, "'tables' must be a non-empty list")
    out = []
    for i, t in enumerate(tables):
        where = f"tables[{i}]"
        if not isinstance(t, dict) or not isinstance(t.get("machine"), dict):
            _fail(origin, f"{where} must be an object with a 'machine' object")
        cells = t.get("entries")
        if not isinstance(cells, list):
            _fail(origin, f"{where}.entries must be a list")
        for j, c in enumerate(cells):
            ok = (
                isinstance(c, dict)
                and c.get("dtype") in DTYPE_NAMES.values()
                and isinstance(c.get("training"), bool)
                and all(_positive_int(c.get(k)) for k in ("head_dim", "nq", "nk"))
                and c.get("choice") in CHOICES
            )
            if not ok:
                _fail(origin, f"{where}.entries[{j}] = {c!r}: expected {{dtype: float32|float16|bfloat16, "
                              f"training: bool, head_dim, nq, nk: positive ints, choice: kernel|sdpa}}")
        out.append(Table(t["machine"], cells, f"{origin} {where}"))
    return out


def load_tables(path: Path) -> list[Table]:
    """The validated tables of the choice file at ``path``."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        _fail(str(path), f"cannot be read ({exc})")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        _fail(str(path), f"is not valid JSON ({exc})")
    return parse_tables(data, str(path))


def _warn(key: tuple, message: str) -> None:
    from .._backend import warn_once

    warn_once(("attention_cpu_choice", *key), message, stacklevel=2)


def _user_tables(machine: dict) -> list[Table]:
    path = user_choice_path()
    if not path.is_file():
        return []
    try:
        tables = load_tables(path)
    except ChoiceFileError as exc:
        _warn(("malformed", str(path)), f"{exc}; ignoring it and using fastgen's shipped table "
                                        f"(re-run `fastgen bench attention --tune` to rewrite it)")
        return []
    mine = [t for t in tables if t.machine.get("cpu") == machine["cpu"] and t.machine.get("isa") == machine["isa"]]
    if not mine:
        seen = ", ".join(f"{t.machine.get('cpu')!r} ({t.machine.get('isa')})" for t in tables)
        _warn(("other machine", str(path)),
              f"attention CPU choice file {path} was measured on {seen}, not on this {machine['cpu']!r} "
              f"({machine['isa']}); ignoring it (re-run `fastgen bench attention --tune` here)")
    return mine


def _shipped_tables(machine: dict) -> list[Table]:
    tables = load_tables(SHIPPED)  # a broken shipped file is a packaging error: raise
    same_isa = [t for t in tables if t.machine.get("isa") == machine["isa"]]
    return same_isa + [tables[0]] if tables[0] not in same_isa else same_isa


@functools.lru_cache(maxsize=None)
def tables() -> tuple[Table, ...]:
    """The tables the automatic choice consults, in order (loaded on first use)."""
    machine = this_machine()
    return (*_user_tables(machine), *_shipped_tables(machine))


def reload() -> None:
    """Forget the loaded tables and memoised answers (after a tune run or a change of FASTGEN_CACHE_DIR)."""
    tables.cache_clear()
    _table_choice.cache_clear()


@functools.lru_cache(maxsize=4096)
def _table_choice(nq: int, nk: int, head_dim: int, dtype: torch.dtype, training: bool) -> bool:
    name = DTYPE_NAMES.get(dtype)
    for table in tables():
        hit = table.lookup(nq, nk, head_dim, name, training)
        if hit is not None:
            return hit
    return False  # no table has the cell (the shipped one has every cell): SDPA is the safe answer


# ------------------------------------------------------------------ the choice


def mode() -> str:
    """``FASTGEN_ATTENTION_CPU``, validated: ``auto``, ``kernel`` or ``sdpa``."""
    value = os.environ.get(ENV)
    if value is None or value in MODES:
        return value or "auto"
    raise ValueError(f"{ENV}={value!r}: expected one of {', '.join(MODES)} (or unset, which means auto)")


# A performance choice from data and the environment, never from tensor values: torch.compile evaluates it
# once while tracing (it cannot trace the file reads behind it) and bakes the answer into the graph.
@torch.compiler.assume_constant_result
def cpu_kernel_is_faster(nq: int, nk: int, head_dim: int, dtype: torch.dtype, training: bool) -> bool:
    """Whether the automatic backend choice takes the C++ kernel over SDPA for this shape on CPU."""
    value = os.environ.get(ENV)
    if value is None or value == "auto":
        return _table_choice(int(nq), int(nk), int(head_dim), dtype, bool(training))
    if value == "kernel":
        return True
    if value == "sdpa":
        return False
    return mode() == "kernel"  # raises the clear error (and stays right if MODES grows)
