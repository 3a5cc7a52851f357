"""Timing, tables and JSON results for the benchmark suites."""

from __future__ import annotations

import datetime
import importlib
import json
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.utils import benchmark as tbench

from .._version import __version__
from ..info import cpu_isa, cpu_name, gpu_peak_bandwidth_gbps

# suite name -> module defining cases(device, quick), and optionally summary_rows(rows) -> rows appended
# after the suite's own (totals over its cases, e.g. the conv suite's time per model forward)
SUITES = {
    "attention": "fastgen.bench.attention",
    "conv": "fastgen.bench.conv",
    "drop_in": "fastgen.bench.drop_in",
    "gan": "fastgen.bench.gan",
    "geglu": "fastgen.bench.geglu",
    "group_norm": "fastgen.bench.group_norm",
    "models": "fastgen.bench.models",
    "sampling": "fastgen.bench.sampling",
    "vae_postprocess": "fastgen.bench.vae_postprocess",
    # one training step of the SD1.5 U-Net, fastgen against diffusers: two 860M-parameter models, minutes
    # and ~15 GiB at full size on a 2-core CPU, so only when named
    "train": "fastgen.bench.train",
    # whole pipelines, each variant in its own process: fastgen.bench.e2e.run, not cases(); ~30-60 min on a
    # 2-core CPU, so only when named
    "e2e": "fastgen.bench.e2e",
    # request batching under Poisson load through the HTTP server on localhost: fastgen.bench.serve.run, not
    # cases(); minutes of wall clock, so only when named
    "serve": "fastgen.bench.serve",
}
# suites that run only when named: each takes many minutes at full size on a 2-core CPU
NAMED_ONLY = ("train", "e2e", "serve")
# suites that run whole load tests or processes (module.run(device, quick)) instead of timed cases
RUN_SUITES = ("e2e", "serve")
# what `fastgen bench` with no suite named runs
DEFAULT_SUITES = [name for name in SUITES if name not in NAMED_ONLY]


def resolve_quick(named: bool, quick: bool = False, full: bool = False) -> bool:
    """Whether a ``fastgen bench`` run uses each suite's reduced cases (``quick``), given the flags.

    One value for the whole run, passed the same way to every suite's ``cases(device, quick)`` and to
    ``e2e.run``: ``--quick`` reduced, ``--full`` full; neither: reduced when no suite is named (plain
    ``fastgen bench``, minutes on a 2-core CPU), full when suites are named (``fastgen bench models``,
    ``fastgen bench e2e``: what naming them ran before)."""
    if quick and full:
        raise ValueError("--quick and --full exclude each other")
    if quick or full:
        return quick
    return not named


@dataclass
class Case:
    suite: str
    name: str
    params: dict
    candidate: Callable[[], object]
    baselines: dict[str, Callable[[], object]]
    # Minimum bytes the fused kernel must move (one read of each input, one
    # write of each output), for the fraction of peak bandwidth on a GPU.
    bytes_moved: Optional[int] = None
    extra: dict = field(default_factory=dict)


def time_ms(fn: Callable[[], object], min_run_time: float) -> float:
    """Median wall time of ``fn`` in ms (torch.utils.benchmark syncs CUDA)."""
    fn()  # warm-up: first-call compilation, allocator growth, autotuning
    # Timer's own default is one thread: name the process's count, which the table header reports.
    timer = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def time_interleaved_ms(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Best-of-``rounds`` wall time of each fn in ms, one call of each per round in turn.

    For calls of seconds (whole models): on a shared 2-core VM one call's time varies by +-15% with the
    neighbours' load, and drifts; calling the candidate and its baselines in turn within each round and
    keeping each one's best exposes them to the same conditions."""
    import time

    for fn in fns.values():
        fn()  # warm-up: compiles, conversions, allocator growth
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            best[name] = min(best[name], (time.perf_counter() - t0) * 1e3)
    return best


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} CPU, {torch.get_num_threads()} threads, fastgen CPU kernels: {cpu_isa() or 'none'}"


def run_case(case: Case, min_run_time: float, peak_gbps: Optional[float]) -> dict:
    row = {"suite": case.suite, "case": case.name, **case.params}
    # The ISA variant of the C++ CPU kernels (csrc/cpu/dispatch.h) in every
    # row, so that rows of runs under different FASTGEN_CPU_ISA stay apart.
    row["cpu_isa"] = cpu_isa()
    rounds = case.extra.get("rounds")
    if rounds:
        times = time_interleaved_ms({"fastgen": case.candidate, **case.baselines}, rounds)
    else:
        times = {"fastgen": time_ms(case.candidate, min_run_time)}
        times.update((name, time_ms(fn, min_run_time)) for name, fn in case.baselines.items())
    row["fastgen_ms"] = times["fastgen"]
    for name in case.baselines:
        row[f"{name}_ms"] = times[name]
        row[f"speedup_vs_{name}"] = times[name] / row["fastgen_ms"]
    flops = case.extra.get("flops")
    if flops:
        row["gflop"] = flops / 1e9
        row["fastgen_tflops"] = flops / (row["fastgen_ms"] * 1e-3) / 1e12
        peak = case.extra.get("peak_gflops")
        if peak:  # a CPU's GEMM peak in the row's dtype, measured in the same run
            for name in ["fastgen", *case.baselines]:
                row[f"{name}_fraction_of_gemm_peak"] = flops / (row[f"{name}_ms"] * 1e-3) / 1e9 / peak
    row.update(case.extra.get("row", {}))  # what a case's callables recorded while timed (compile seconds)
    if case.bytes_moved is not None:
        gbps = case.bytes_moved / (row["fastgen_ms"] * 1e-3) / 1e9
        row["fastgen_gbps"] = gbps
        if peak_gbps:
            row["fraction_of_peak_bandwidth"] = gbps / peak_gbps
    return row


def run_suites(
    names: list[str],
    device: torch.device,
    quick: bool = False,
    min_run_time: Optional[float] = None,
    progress: bool = True,
) -> list[dict]:
    from tqdm import tqdm

    min_run_time = min_run_time if min_run_time is not None else (0.05 if quick else 0.5)
    peak = gpu_peak_bandwidth_gbps(device.index or 0) if device.type == "cuda" else None
    suites = []
    for name in names:
        if name not in SUITES:
            raise ValueError(f"unknown benchmark suite {name!r}: expected one of {', '.join(SUITES)}")
        module = importlib.import_module(SUITES[name])
        if not hasattr(module, "cases"):
            raise ValueError(f"benchmark suite {name!r} has no cases: it runs whole processes (fastgen bench {name}, "
                             f"or {SUITES[name]}.run)")
        suites.append((module, module.cases(device, quick)))
    rows: list[dict] = []
    with tqdm(total=sum(len(c) for _, c in suites), desc="bench", disable=not progress, leave=False) as bar:
        for module, cases in suites:
            suite_rows = []
            for case in cases:
                suite_rows.append(run_case(case, min_run_time, peak))
                bar.update()
            summarize = getattr(module, "summary_rows", None)
            rows += suite_rows + (summarize(suite_rows) if summarize is not None and suite_rows else [])
    return rows


def format_table(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)"
    cols = list(dict.fromkeys(k for r in rows for k in r if k != "suite"))
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
        return str(v)
    table = [cols] + [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cpu_isas_supported() -> Optional[list[str]]:
    from .. import _backend

    ext = _backend.extension()
    return ext.cpu_isas_supported() if ext is not None and hasattr(ext, "cpu_isas_supported") else None


def save_results(rows: list[dict], suites: list[str], device: torch.device, out_dir: Path,
                 quick: Optional[bool] = None) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    name = device_name(device)
    stamp = datetime.datetime.now(datetime.timezone.utc)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()
    path = out_dir / f"{'+'.join(suites)}-{slug}-{stamp:%Y%m%d-%H%M%S}.json"
    payload = {
        "suites": suites,
        "device": name,
        "date": stamp.isoformat(timespec="seconds"),
        "fastgen": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_isa": cpu_isa(),
        "cpu_isas_supported": _cpu_isas_supported(),
        # whether the run used the suites' reduced cases (None: not said, as in files written before 2026-12-02)
        "quick": quick,
        "rows": rows,
    }
    path.write_text(json.dumps(payload, indent=1))
    return path
