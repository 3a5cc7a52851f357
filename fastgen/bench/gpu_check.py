"""``fastgen bench --gpu-check`` (run by ``benchmarks/gpu_check.sh``): every CUDA and Triton path tested and
timed on a lent GPU in one time-boxed run, with one JSON and one markdown report.

Steps, in order of value (each a subprocess with its own time limit; a step that would start with less than
its minimum left of the whole budget is skipped, so the run ends on time and says what it skipped):

1. ``env``: device, driver, torch / Triton / nvcc versions.
2. ``build``: the extension with CUDA for this device's architecture (``pip install -e . --no-deps``, only the
   portable CPU variant, ``FASTGEN_CUDA_ARCH`` from the device's capability).
3. ``tests gpu``: the tests marked ``gpu``; ``tests cuda halves``: the ``cuda`` / ``triton`` cases of every op
   test (helpers.devices() adds ``cuda`` where there is one).
4. ``bench serve graphs``: the denoising loop with and without a CUDA graph at batch 1 (SD1.5 U-Net, 512x512,
   fp16, CFG batch 2).
5. ``bench drop_in``: diffusers' SD1.5 U-Net step and SD VAE decode, patched against unpatched.
6. ``bench models``: fastgen's U-Net and VAE against diffusers eager (and torch.compile).
7. ``bench ops``: every op suite (reduced cases): group_norm, attention, geglu, sampling, vae_postprocess,
   conv, gan.
8. ``bench e2e``: the whole SD1.5-architecture pipeline, eager vs patched, batch 1.

``--dry-run`` runs the same steps with CPU stand-ins (no wheels or CUDA build: the installed extension is
checked instead; the CPU halves of one op test file; the reduced CPU benchmarks), so the script and its report
are exercised before a session spends device minutes on them.

The report (``gpu_check-<device>-<time>.json`` / ``.md`` and ``.log`` in ``--out``) has every step's status
and time, the tests' counts, every benchmark row, and the headline figures next to the targets of the issues
that set them."""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[2]
OP_TESTS = ["test_group_norm.py", "test_attention.py", "test_geglu.py", "test_sampling_step.py",
            "test_vae_postprocess.py", "test_conv2d.py", "test_conv2d_triton.py", "test_bias_act.py",
            "test_timestep_embedding.py", "test_ops_dispatch.py", "test_backend.py"]
OP_SUITES = ["group_norm", "attention", "geglu", "sampling", "vae_postprocess", "conv", "gan"]


@dataclass
class Step:
    name: str
    cmd: list
    limit_s: float  # the step's own time limit
    min_s: float = 20.0  # not started with less than this left of the whole budget
    env: dict = field(default_factory=dict)
    ok_codes: tuple = (0,)


def _python() -> list:
    return [sys.executable]


def _tests(name: str, paths: list, select: list, junit: Path, limit_s: float) -> Step:
    # -v: one line per test in the log, so a step killed at its limit (no junit file then) still has its counts
    cmd = _python() + ["-m", "pytest", "-v", "-p", "no:cacheprovider", "-o", "addopts=", "--junitxml",
                       str(junit), *select, *paths]
    # rc 5: nothing selected (a dry run deselects every cuda case): a fact to report, not a failure
    return Step(name, cmd, limit_s, min_s=30, ok_codes=(0, 5))


def _bench(name: str, suites: list, device: str, out: Path, limit_s: float, extra=(), env=None) -> Step:
    return Step(name, _python() + ["-m", "fastgen", "bench", *suites, "--device", device, "--out", str(out),
                                   *extra], limit_s, env=dict(env or {}))


def plan(dry_run: bool, work: Path) -> list[Step]:
    """The steps of a run (limits sized for an H100/H200 inside 8 minutes; a dry run's for 2 CPU cores)."""
    tests = REPO / "tests"
    op_tests = [str(tests / f) for f in OP_TESTS if (tests / f).is_file()]
    bench_out = work / "bench"
    env_cmd = _python() + ["-c", _ENV_SCRIPT]
    if dry_run:
        return [
            Step("env", env_cmd, 60, min_s=5),
            Step("build", _python() + ["-c", "import fastgen, fastgen._C; print('extension', fastgen._C.__file__)"],
                 60, min_s=5),
            _tests("tests gpu", [str(tests)], ["-m", "gpu"], work / "tests-gpu.xml", 240),
            _tests("tests cuda halves", [str(tests / "test_group_norm.py")], ["-k", "cpu and not cuda"],
                   work / "tests-cuda.xml", 180),
            Step("bench serve graphs", _python() + ["-c", _GRAPH_SCRIPT, "cpu", "1", str(bench_out)], 120),
            _bench("bench drop_in", ["drop_in"], "cpu", bench_out, 240, ["--quick"]),
            _bench("bench models", ["models"], "cpu", bench_out, 240, ["--quick"]),
            _bench("bench ops", ["group_norm", "sampling"], "cpu", bench_out, 240, ["--quick"]),
            _bench("bench e2e", ["e2e"], "cpu", bench_out, 300, ["--quick", "--e2e-batches", "1"]),
        ]
    return [
        Step("env", env_cmd, 30, min_s=5),
        Step("build", _python() + ["-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-build-isolation",
                                   "-e", str(REPO)], 240, min_s=60, env={"FASTGEN_PORTABLE": "1"}),
        _tests("tests gpu", [str(tests)], ["-m", "gpu"], work / "tests-gpu.xml", 120),
        _tests("tests cuda halves", op_tests, ["-k", "cuda or triton"], work / "tests-cuda.xml", 120),
        Step("bench serve graphs", _python() + ["-c", _GRAPH_SCRIPT, "cuda", "0", str(bench_out)], 90),
        _bench("bench drop_in", ["drop_in"], "cuda", bench_out, 90),
        # without the torch.compile baseline: compiling the SD1.5 U-Net alone takes longer than this step has
        _bench("bench models", ["models"], "cuda", bench_out, 90, env={"FASTGEN_BENCH_NO_COMPILE": "1"}),
        _bench("bench ops", OP_SUITES, "cuda", bench_out, 120, ["--quick"]),
        _bench("bench e2e", ["e2e"], "cuda", bench_out, 150, ["--e2e-batches", "1", "--e2e-variants", "eager,patched"]),
    ]


# The facts a report needs about the machine, printed as one JSON line.
_ENV_SCRIPT = r"""
import json, platform, shutil, subprocess, torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if torch.cuda.is_available() else None}
try:
    import triton
    info["triton"] = triton.__version__
except ImportError:
    info["triton"] = None
for name in ("diffusers", "transformers", "peft"):
    try:
        info[name] = __import__(name).__version__
    except ImportError:
        info[name] = None
nvcc = shutil.which("nvcc")
info["nvcc"] = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1] if nvcc else None
smi = shutil.which("nvidia-smi")
info["driver"] = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True).stdout.strip() if smi else None
print("GPU_CHECK_ENV " + json.dumps(info))
"""

# fastgen.bench.serve.graph_rows saved as one results file (fastgen bench serve would also run the CPU load test).
_GRAPH_SCRIPT = r"""
import sys, torch
from pathlib import Path
from fastgen.bench import save_results
from fastgen.bench.serve import graph_rows
device, quick, out = torch.device(sys.argv[1]), sys.argv[2] == "1", Path(sys.argv[3])
rows = graph_rows(device, quick)
print(rows)
print("saved", save_results(rows, ["serve_graphs"], device, out, quick=quick))
"""


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def run_step(step: Step, log, budget_left_s: float) -> dict:
    """Run one step under ``min(step.limit_s, budget_left_s)``; its output goes to ``log``."""
    if budget_left_s < step.min_s:
        return {"step": step.name, "status": "skipped", "why": f"{budget_left_s:.0f} s of the budget left, "
                f"the step needs at least {step.min_s:.0f} s", "seconds": 0.0}
    limit = min(step.limit_s, budget_left_s)
    log.write(f"\n===== {step.name} (limit {limit:.0f} s): {' '.join(step.cmd)}\n")
    log.flush()
    env = dict(os.environ, PYTHONUNBUFFERED="1", **step.env)
    t0 = time.monotonic()
    proc = subprocess.Popen(step.cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own group: a timeout kills its workers too
    try:
        out, _ = proc.communicate(timeout=limit)
        status = "passed" if proc.returncode in step.ok_codes else "failed"
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, _ = proc.communicate()
        status = "timed out"
    seconds = time.monotonic() - t0
    log.write(out or "")
    log.write(f"\n===== {step.name}: {status} (rc {proc.returncode}) in {seconds:.1f} s\n")
    log.flush()
    result = {"step": step.name, "status": status, "rc": proc.returncode, "seconds": round(seconds, 1),
              "tail": (out or "")[-1500:], "output": out or ""}
    if step.name == "env":
        line = next((ln for ln in (out or "").splitlines() if ln.startswith("GPU_CHECK_ENV ")), None)
        result["env"] = json.loads(line.split(" ", 1)[1]) if line else {}
    return result


def junit_counts(path: Path) -> Optional[dict]:
    """passed / failed / errors / skipped of a pytest junit file, and the failing test ids (None: no file)."""
    if not path.is_file():
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:
        return None
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": []}
    for case in root.iter("testcase"):
        kinds = {child.tag for child in case}
        name = f"{case.get('classname')}::{case.get('name')}"
        if "failure" in kinds:
            counts["failed"] += 1
            counts["failures"].append(name)
        elif "error" in kinds:
            counts["errors"] += 1
            counts["failures"].append(name)
        elif "skipped" in kinds:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts


_VERDICT = re.compile(r"^(\S+::\S+.*?) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")


def output_counts(text: str) -> dict:
    """The counts of ``pytest -v`` output lines (for a run killed before it wrote its junit file)."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": [], "incomplete": True}
    for line in text.splitlines():
        m = _VERDICT.match(line.strip())
        if not m:
            continue
        verdict = m.group(2)
        if verdict in ("PASSED", "XPASS"):
            counts["passed"] += 1
        elif verdict in ("SKIPPED", "XFAIL"):
            counts["skipped"] += 1
        else:
            counts["failed" if verdict == "FAILED" else "errors"] += 1
            counts["failures"].append(m.group(1).split(" ")[0])
    return counts


def bench_rows(folder: Path) -> list[dict]:
    rows = []
    for path in sorted(glob.glob(str(folder / "*.json"))):
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            continue
        for row in data.get("rows", []):
            rows.append(dict(row, results_file=Path(path).name))
    return rows


def _first(rows, **match):
    for r in rows:
        if all(str(r.get(k, "")).startswith(str(v)) for k, v in match.items()):
            return r
    return None


def figures(rows: list[dict], judge: bool = True) -> list[dict]:
    """The headline figures beside the targets the issues set for a GPU (value None: not measured in this run).
    ``judge=False`` (a dry run's CPU stand-ins) reports the values without holding them to GPU targets."""
    out = []

    def add(figure, value, target, met, source):
        out.append({"figure": figure, "value": value, "target": target, "met": met if judge else None,
                    "source": source})

    speedup = _first(rows, case="cuda graph speedup")
    add("CUDA-graph loop vs eager, batch 1 (issue 14)", speedup and round(speedup["speedup"], 3), ">= 1.5x",
        None if speedup is None else speedup["speedup"] >= 1.5, "bench serve graphs")
    graphed = next((r for r in rows if r.get("case") == "cuda graph loop" and r.get("cuda_graphs")), None)
    add("SD1.5 512x512 step rate, batch 1 CFG 2, graphs (issue 14)", graphed and round(graphed["it_per_s"], 1),
        "> 105 it/s", None if graphed is None else graphed["it_per_s"] > 105, "bench serve graphs")
    for r in rows:
        if r.get("suite") == "drop_in" and "unet" in str(r.get("case", r.get("name", ""))):
            sp = r.get("speedup_vs_diffusers") or r.get("speedup_vs_eager")
            add(f"drop-in U-Net step {r.get('shape', '')} (issue 12)", sp, ">= 1.5x", None if sp is None else sp >= 1.5,
                "bench drop_in")
        if r.get("suite") == "models" and "unet" in str(r.get("case", r.get("name", ""))):
            sp = r.get("speedup_vs_diffusers")
            add(f"fastgen U-Net {r.get('dtype', '')} vs diffusers eager {r.get('shape', '')} (issue 9)", sp, ">= 1.3x",
                None if sp is None else sp >= 1.3, "bench models")
    for suite, target, issue in (("group_norm", 0.85, 2), ("sampling", 0.80, 4), ("gan", 0.80, 11)):
        fracs = [r["fraction_of_peak_bandwidth"] for r in rows
                 if r.get("suite") == suite and r.get("fraction_of_peak_bandwidth")]
        best = max(fracs) if fracs else None
        add(f"{suite}: best fraction of peak bandwidth (issue {issue})", best and round(best, 3), f">= {target:.0%}",
            None if best is None else best >= target, "bench ops")
    for suite, target, issue in (("attention", 0.9, 3), ("conv", 1.0, 10)):
        # the slowest case against its first baseline (attention: SDPA, at least 90% of it at D=64 and as
        # fast elsewhere; conv: cuDNN + the eager epilogue)
        ratios = []
        for r in rows:
            first = next((v for k, v in r.items() if k.startswith("speedup_vs_")), None)
            if r.get("suite") == suite and isinstance(first, (int, float)):
                ratios.append(first)
        worst = min(ratios) if ratios else None
        add(f"{suite}: slowest case vs its baseline (issue {issue})", worst and round(worst, 3), f">= {target}x",
            None if worst is None else worst >= target, "bench ops")
    return out


def _md_value(v) -> str:
    if v is None:
        return "not measured"
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def write_report(out_dir: Path, results: list, rows: list, figs: list, dry_run: bool, started: str,
                 log_path: Path) -> tuple[Path, Path]:
    env = next((r.get("env", {}) for r in results if r["step"] == "env"), {})
    device = env.get("device") or "unknown device"
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-").lower() or "device"
    stem = f"gpu_check-{'dry-run-' if dry_run else ''}{slug}-{started}"
    data = {"device": device, "dry_run": dry_run, "date": started, "env": env, "steps": results, "figures": figs,
            "rows": rows}
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(data, indent=1, default=str))
    lines = [f"# fastgen GPU check: {device}{' (dry run on the CPU)' if dry_run else ''}", "",
             f"{started}; torch {env.get('torch')}, CUDA {env.get('cuda')}, Triton {env.get('triton')}, "
             f"nvcc {env.get('nvcc')}, driver {env.get('driver')}, diffusers {env.get('diffusers')}", "",
             "| step | status | seconds | detail |", "|---|---|---|---|"]
    for r in results:
        detail = r.get("why", "")
        if r.get("tests"):
            t = r["tests"]
            detail = f"{t['passed']} passed, {t['failed']} failed, {t['errors']} errors, {t['skipped']} skipped"
        lines.append(f"| {r['step']} | {r['status']} | {r['seconds']} | {detail} |")
    lines += ["", "| figure | value | target (on a GPU) | met |", "|---|---|---|---|"]
    if dry_run:
        lines.insert(-2, "A dry run's figures are CPU stand-ins, not held to the GPU targets.")
        lines.insert(-2, "")
    for f in figs:
        met = "" if f["met"] is None else ("yes" if f["met"] else "**no**")
        lines.append(f"| {f['figure']} | {_md_value(f['value'])} | {f['target']} | {met} |")
    failures = [name for r in results for name in (r.get("tests") or {}).get("failures", [])]
    if failures:
        lines += ["", "Failing tests:", ""] + [f"- `{name}`" for name in failures[:40]]
    lines += ["", f"Log: `{log_path.name}`; every benchmark row is in `{json_path.name}`.", ""]
    md_path = out_dir / f"{stem}.md"
    md_path.write_text("\n".join(lines))
    return json_path, md_path


def summary_line(results: list, figs: list, dry_run: bool, seconds: float) -> str:
    tests = [r["tests"] for r in results if r.get("tests")]
    passed = sum(t["passed"] for t in tests)
    failed = sum(t["failed"] + t["errors"] for t in tests)
    bad = [r["step"] for r in results if r["status"] in ("failed", "timed out")]
    skipped = [r["step"] for r in results if r["status"] == "skipped"]
    if dry_run:
        figures_text = f"{sum(f['value'] is not None for f in figs)} of {len(figs)} figures had a CPU stand-in"
    else:
        met = sum(1 for f in figs if f["met"])
        measured = sum(1 for f in figs if f["met"] is not None)
        figures_text = f"targets met {met}/{measured} measured ({len(figs) - measured} not measured)"
    return (f"gpu_check{' --dry-run' if dry_run else ''}: {'OK' if not bad and not failed else 'PROBLEMS'} in "
            f"{seconds:.0f} s — tests {passed} passed, {failed} failed; steps failed/timed out: "
            f"{', '.join(bad) or 'none'}; skipped: {', '.join(skipped) or 'none'}; {figures_text}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fastgen bench --gpu-check", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="the same steps with CPU stand-ins")
    p.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "benchmarks" / "results"),
                   help="folder for the report (default: $OUT, else benchmarks/results)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="seconds for the whole run (default 460 on a GPU: the 8-minute limit less set-up; "
                        "1500 for a dry run on 2 CPU cores)")
    p.add_argument("--only", default=None, help="comma list of step names to run (default: all)")
    args = p.parse_args(argv)
    budget = args.budget_s or (1500.0 if args.dry_run else 460.0)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    work = Path(tempfile.mkdtemp(prefix="fastgen-gpu-check-"))
    steps = plan(args.dry_run, work)
    if args.only:
        wanted = {s.strip() for s in args.only.split(",")}
        unknown = wanted - {s.name for s in steps}
        if unknown:
            p.error(f"--only: no step(s) {', '.join(sorted(unknown))}; steps: {', '.join(s.name for s in steps)}")
        steps = [s for s in steps if s.name in wanted]
    log_path = out_dir / f"gpu_check-{'dry-run-' if args.dry_run else ''}{started}.log"
    t0 = time.monotonic()
    results = []
    with open(log_path, "w") as log:
        for step in steps:
            left = budget - (time.monotonic() - t0)
            result = run_step(step, log, left)
            if step.name.startswith("tests"):
                junit = next((Path(c) for c in step.cmd if str(c).endswith(".xml")), None)
                result["tests"] = (junit_counts(junit) if junit else None) or output_counts(result.get("output", ""))
            result.pop("output", None)
            results.append(result)
            print(f"gpu_check: {step.name}: {result['status']} ({result['seconds']} s)", flush=True)
            if step.name == "build" and result["status"] != "passed":
                print("gpu_check: the build failed; the remaining steps would test a stale extension, so they "
                      "are skipped", flush=True)
                results += [{"step": s.name, "status": "skipped", "why": "the build failed", "seconds": 0.0}
                            for s in steps[steps.index(step) + 1:]]
                break
    rows = bench_rows(work / "bench")
    figs = figures(rows, judge=not args.dry_run)
    json_path, md_path = write_report(out_dir, results, rows, figs, args.dry_run, started, log_path)
    shutil.rmtree(work, ignore_errors=True)
    print(Path(md_path).read_text())
    line = summary_line(results, figs, args.dry_run, time.monotonic() - t0)
    print(line, flush=True)
    bad = any(r["status"] in ("failed", "timed out") for r in results)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
