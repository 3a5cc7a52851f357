"""End to end: a whole SD1.5-architecture text-to-image pipeline, diffusers against diffusers + ``fastgen.patch``.

``fastgen bench e2e`` builds ``StableDiffusionPipeline`` from configs with seeded random weights
(:mod:`fastgen.bench.offline`, nothing downloaded) and generates with 20 DPM-Solver++ steps and classifier-free
guidance (7.5) at batch 1 and 4: 256x256 fp32 on a CPU, 512x512 fp16 on a GPU. Variants:

* ``eager``: diffusers as it is;
* ``patched``: after ``fastgen.patch(pipe)``;
* ``compiled``: with ``pipe.unet = torch.compile(pipe.unet)`` (inductor; the U-Net is ~all of the time).

Every (variant, batch) runs in its own process (``python -m fastgen.bench.e2e --worker ...``), so that its peak
memory and its time to first image are its own and cold: nothing compiled, cached or allocated by another
variant. The worker times the first call (time to first image also counts the patch call; the compiled
variant's first call compiles), then ``rounds`` more identical calls (steady state, best of), and saves the
images; the parent compares them with the eager variant's for the same seeds.

Rows: one per (batch, variant), with seconds per image, steps per second, peak memory (max RSS of the worker
on a CPU, ``torch.cuda.max_memory_allocated`` on a GPU), time to first image, and for the patched / compiled
rows the speedups and the largest pixel difference from eager. :func:`save_chart` draws them beside the JSON.

``--quick`` runs a tiny pipeline (32x32, 3 steps, batch 1 and 2, eager and patched only, one torch thread per
worker) in well under a minute; the full suite takes ~30-60 min on a 2-core CPU, which is why plain ``fastgen bench`` leaves it out.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

PROMPT = "a photograph of an astronaut riding a horse on the moon"
GUIDANCE_SCALE = 7.5
VARIANTS = ("eager", "patched", "compiled")

# A pipeline of the SD1.5 layout (cross-attention down/up blocks, a VAE, a CLIP text encoder) small enough for
# a smoke run: seconds per call on a CPU.
TINY = dict(
    unet=dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
              down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2, sample_size=8),
    vae=dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
             up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8, latent_channels=4,
             sample_size=32),
    text=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, projection_dim=32),
)


def settings(device: torch.device, quick: bool = False, *, batches: Optional[Sequence[int]] = None,
             steps: Optional[int] = None, size: Optional[int] = None,
             variants: Optional[Sequence[str]] = None) -> dict:
    """The run's shape: the issue's defaults for ``device`` / ``quick``, with any of them overridden."""
    if quick:
        default = dict(batches=(1, 2), steps=3, size=32, variants=("eager", "patched"))
    else:
        default = dict(batches=(1, 4), steps=20, size=512 if device.type == "cuda" else 256, variants=VARIANTS)
    chosen = dict(batches=batches, steps=steps, size=size, variants=variants)
    out = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in chosen.items() if v is not None}
    out = {**default, **out}
    unknown = [v for v in out["variants"] if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown e2e variant(s) {', '.join(unknown)}: expected some of {', '.join(VARIANTS)}")
    if out["size"] % 8:
        raise ValueError(f"e2e image size must be a multiple of 8 (the VAE's downsampling), got {out['size']}")
    # eager first: the others are compared with its images
    out["variants"] = tuple(v for v in VARIANTS if v in out["variants"])
    return out


def build_pipeline(device: torch.device, tiny: bool, seed: int = 0):
    from .offline import sd15_pipeline

    pipe = sd15_pipeline(seed=seed, **(TINY if tiny else {}))
    if device.type == "cuda":
        pipe.to(device, torch.float16)
    return pipe


def generate(pipe, batch: int, steps: int, size: int):
    """One text-to-image call; the same seeds every call and every process, so images can be compared."""
    generator = [torch.Generator().manual_seed(i) for i in range(batch)]
    out = pipe(prompt=[PROMPT] * batch, num_inference_steps=steps, guidance_scale=GUIDANCE_SCALE, height=size,
               width=size, output_type="np", generator=generator)
    return out.images


# ---------------------------------------------------------------------------------------------------------------
# worker: one variant at one batch size, in a fresh process


def _peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device, fn):
    _sync(device)
    start = time.perf_counter()
    result = fn()
    _sync(device)
    return result, time.perf_counter() - start


def worker(variant: str, batch: int, size: int, steps: int, tiny: bool, out: Path, device: torch.device,
           rounds: int = 1, threads: Optional[int] = None) -> dict:
    if threads:
        torch.set_num_threads(threads)

    def say(msg):
        print(f"[e2e {variant} b{batch}] {msg}", flush=True)

    say(f"building the {'tiny' if tiny else 'SD1.5'} pipeline")
    pipe, build_s = _timed(device, lambda: build_pipeline(device, tiny))
    result = dict(variant=variant, batch=batch, size=size, steps=steps, threads=torch.get_num_threads(),
                  build_s=build_s, peak_memory_after_build_mib=_peak_memory_mib(device))
    setup_s = 0.0
    if variant == "patched":
        import fastgen

        report, setup_s = _timed(device, lambda: fastgen.patch(pipe))
        result.update(patch=str(report), patch_counts=dict(report.counts), patched_modules=report.total)
        say(str(report))
    elif variant == "compiled":
        # torch.compile itself is lazy: the compilation is paid by the first call, reported as compile_s
        _, setup_s = _timed(device, lambda: setattr(pipe, "unet", torch.compile(pipe.unet)))
    say(f"first call ({steps} steps, {size}x{size})")
    _, first_s = _timed(device, lambda: generate(pipe, batch, steps, size))
    say(f"first call {first_s:.2f} s")
    steady = []
    for i in range(rounds):
        images, seconds = _timed(device, lambda: generate(pipe, batch, steps, size))
        steady.append(seconds)
        say(f"steady call {i + 1}/{rounds} {seconds:.2f} s")
    steady_s = min(steady)  # best of: the least disturbed by neighbours on a shared machine
    image_path = out.with_suffix(".npy")
    np.save(image_path, np.asarray(images, dtype=np.float32))
    result.update(
        dtype=str(pipe.unet.dtype).replace("torch.", ""),
        setup_s=setup_s,
        first_call_s=first_s,
        time_to_first_image_s=setup_s + first_s,
        steady_s=steady_s,
        steady_calls_s=steady,
        peak_memory_mib=_peak_memory_mib(device),
        images=image_path.name,
    )
    if variant == "compiled":  # what its first call costs over a steady one
        result["compile_s"] = first_s - steady_s
    out.write_text(json.dumps(result, indent=1))
    say(f"done: {steady_s / batch:.2f} s/image, peak {result['peak_memory_mib']:.0f} MiB")
    return result


# ---------------------------------------------------------------------------------------------------------------
# parent: the workers in turn, then the comparisons


def _run_worker(args: list[str], timeout_s: float, progress: bool) -> tuple[Optional[str], str]:
    """Run one worker; returns (error or None, the tail of its output). Its progress lines are echoed."""
    tail: collections.deque = collections.deque(maxlen=40)
    # its own process group, so that a timeout also ends what it started (inductor's compile workers)
    proc = subprocess.Popen([sys.executable, "-m", "fastgen.bench.e2e", "--worker", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=os.name == "posix")

    def read():
        for line in proc.stdout:
            tail.append(line.rstrip("\n"))
            if progress and line.startswith("[e2e "):
                print(line, end="", flush=True)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=timeout_s)
        error = None if proc.returncode == 0 else f"worker exited with status {proc.returncode}"
    except subprocess.TimeoutExpired:
        error = f"worker timed out after {timeout_s:.0f} s"
    finally:
        if proc.poll() is None:  # timed out, or the parent was interrupted: the worker must not outlive it
            _kill(proc)
    reader.join(timeout=10)
    return error, "\n".join(tail)


def _kill(proc: subprocess.Popen) -> None:
    if os.name == "posix":
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    else:
        proc.kill()
    proc.wait()


def _worker_args(variant, batch, cfg, tiny, device, rounds, threads, out: Path) -> list[str]:
    args = ["--variant", variant, "--batch", str(batch), "--size", str(cfg["size"]), "--steps", str(cfg["steps"]),
            "--device", device.type, "--rounds", str(rounds), "--out", str(out)]
    return args + (["--tiny"] if tiny else []) + (["--threads", str(threads)] if threads else [])


def _max_diff(images, reference) -> dict:
    if images.shape != reference.shape:
        return {"max_abs_diff_vs_eager": float("nan")}
    # 0-255: the images as an 8-bit PNG would hold them, the difference a viewer could see
    as_u8 = lambda a: (np.clip(a, 0, 1) * 255).round().astype(np.int16)  # noqa: E731
    return {"max_abs_diff_vs_eager": float(np.abs(images - reference).max()),
            "max_abs_diff_vs_eager_255": int(np.abs(as_u8(images) - as_u8(reference)).max())}


def _compare(rows: list[dict], images: dict) -> None:
    """Speedups and pixel differences of one batch size's rows, in place."""
    by = {r["variant"]: r for r in rows if "error" not in r}
    patched, eager, compiled = by.get("patched"), by.get("eager"), by.get("compiled")
    for name, row in by.items():
        if name != "eager" and eager is not None:
            row.update(_max_diff(images[name], images["eager"]))
    if patched is not None:
        for name, base in (("eager", eager), ("compiled", compiled)):
            if base is not None:
                patched[f"speedup_vs_{name}"] = base["steady_s"] / patched["steady_s"]
                patched[f"first_image_speedup_vs_{name}"] = (base["time_to_first_image_s"]
                                                             / patched["time_to_first_image_s"])
    if compiled is not None and eager is not None:
        compiled["speedup_vs_eager"] = eager["steady_s"] / compiled["steady_s"]


# the worker's fields that go into a row, in the table's order
_ROW_FIELDS = ("dtype", "threads", "seconds_per_image", "steps_per_second", "time_to_first_image_s", "setup_s",
               "first_call_s", "compile_s", "steady_s", "peak_memory_mib", "peak_memory_after_build_mib", "build_s",
               "patched_modules", "patch_counts", "steady_calls_s")


def _row(result: dict, base: dict) -> dict:
    result = dict(result, seconds_per_image=result["steady_s"] / result["batch"],
                  steps_per_second=result["steps"] / result["steady_s"])
    return {**base, **{k: result[k] for k in _ROW_FIELDS if k in result}}


def run(device: torch.device, quick: bool = False, *, batches: Optional[Sequence[int]] = None,
        steps: Optional[int] = None, size: Optional[int] = None, variants: Optional[Sequence[str]] = None,
        rounds: int = 1, threads: Optional[int] = None, timeout_s: Optional[float] = None,
        work_dir: Optional[Path] = None, progress: bool = True) -> list[dict]:
    """Run every (batch, variant) worker in turn and return the rows (``save_results`` writes them).

    A worker that fails or times out gives a row with ``error`` and ``log_tail``; the others still run.
    ``threads``: torch threads of each worker (default: torch's, one per core; 1 with ``quick``). On a machine
    shared with other jobs one thread is the steadier measure: with two, every small op's parallel region waits
    whenever the neighbour holds the other core (10-40x slower calls on a 2-core VM); the tiny pipeline's ops
    are too small to gain from threads anyway.
    ``work_dir`` keeps each worker's JSON and images (``.npy``); by default they go to a temporary folder."""
    from ..info import cpu_isa

    cfg = settings(device, quick, batches=batches, steps=steps, size=size, variants=variants)
    tiny = quick
    threads = threads if threads is not None else (1 if quick else None)
    timeout_s = timeout_s if timeout_s is not None else (600 if tiny else 3600)
    if progress:
        print(f"e2e: {'tiny' if tiny else 'SD1.5'} pipeline, {cfg['size']}x{cfg['size']}, {cfg['steps']} steps, "
              f"batches {', '.join(map(str, cfg['batches']))}, variants {', '.join(cfg['variants'])}; "
              f"one process each", flush=True)
    with tempfile.TemporaryDirectory(prefix="fastgen-e2e-") as tmp:
        folder = Path(work_dir) if work_dir is not None else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        rows = []
        for batch in cfg["batches"]:
            batch_rows, images = [], {}
            for variant in cfg["variants"]:
                base = {"suite": "e2e", "case": "tiny pipeline" if tiny else "sd15 pipeline", "variant": variant,
                        "batch": batch, "size": cfg["size"], "steps": cfg["steps"], "cpu_isa": cpu_isa()}
                out = folder / f"{variant}-b{batch}.json"
                args = _worker_args(variant, batch, cfg, tiny, device, rounds, threads, out)
                error, tail = _run_worker(args, timeout_s, progress)
                if error is None and not out.exists():
                    error = "worker wrote no result"
                if error is not None:
                    if progress:
                        print(f"e2e: {variant} batch {batch}: {error}\n{tail}", flush=True)
                    batch_rows.append({**base, "error": error, "log_tail": tail})
                    continue
                result = json.loads(out.read_text())
                images[variant] = np.load(folder / result["images"])
                batch_rows.append(_row(result, base))
            _compare(batch_rows, images)
            rows += batch_rows
    return rows


# ---------------------------------------------------------------------------------------------------------------
# chart


def save_chart(rows: list[dict], path: Path, device: Optional[str] = None) -> Optional[Path]:
    """Grouped bars of seconds per image and time to first image per variant and batch, written to ``path``
    (PNG); None without matplotlib or without a successful row. ``device`` names the machine in the title."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display: files only
        import matplotlib.pyplot as plt
    except ImportError:
        print("e2e: matplotlib is not installed, no chart (pip install matplotlib)")
        return None
    ok = [r for r in rows if r.get("suite") == "e2e" and "error" not in r]
    if not ok:
        print("e2e: no successful rows, no chart")
        return None
    batches = sorted({r["batch"] for r in ok})
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in ok)]
    cell = {(r["batch"], r["variant"]): r for r in ok}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    panels = (("seconds_per_image", "seconds per image (steady state)", _speed_note),
              ("time_to_first_image_s", "time to first image, s (incl. patch / compile)", _first_image_note))
    width = 0.8 / len(variants)
    for ax, (key, label, note) in zip(axes, panels):
        for i, variant in enumerate(variants):
            xs = [x - 0.4 + width * (i + 0.5) for x in range(len(batches))]
            heights = [cell[(b, variant)][key] if (b, variant) in cell else 0.0 for b in batches]
            bars = ax.bar(xs, heights, width, label=variant)
            for bar, b in zip(bars, batches):
                text = note(cell.get((b, variant)))
                if text:
                    ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                                va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
        ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
        ax.set_ylabel(label)
        ax.margins(y=0.2)
        ax.legend(fontsize=8)
    first = ok[0]
    title = (f"{first['case']}: {first['size']}x{first['size']}, {first['steps']} DPM-Solver++ steps, CFG "
             f"{GUIDANCE_SCALE}, {first.get('dtype', '')}, {_threads(first.get('threads'))} per worker")
    fig.suptitle(title + (f"\n{device}" if device else ""), fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _threads(n) -> str:
    return f"{n} thread" + ("" if n == 1 else "s")


def _speed_note(row) -> str:
    if row is None:
        return ""
    if row["variant"] == "patched":
        parts = [f"{row[k]:.2f}x vs {k.rsplit('_', 1)[1]}" for k in ("speedup_vs_eager", "speedup_vs_compiled")
                 if k in row]
        return "\n".join(parts)
    return f"{row['speedup_vs_eager']:.2f}x" if "speedup_vs_eager" in row else ""


def _first_image_note(row) -> str:
    if row is None:
        return ""
    return "\n".join(f"{row[k]:.2f}x vs {k.rsplit('_', 1)[1]}"
                     for k in ("first_image_speedup_vs_eager", "first_image_speedup_vs_compiled") if k in row)


# ---------------------------------------------------------------------------------------------------------------


def _worker_main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastgen.bench.e2e",
                                     description="one e2e benchmark worker (fastgen bench e2e runs these)")
    parser.add_argument("--worker", action="store_true", required=True)
    parser.add_argument("--variant", choices=VARIANTS, required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--rounds", type=int, default=1, help="steady-state calls after the first (best of)")
    parser.add_argument("--tiny", action="store_true", help="the tiny pipeline of --quick")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out", type=Path, required=True, help="result JSON; the images go beside it (.npy)")
    args = parser.parse_args(argv)
    worker(args.variant, args.batch, args.size, args.steps, args.tiny, args.out, torch.device(args.device),
           rounds=max(1, args.rounds), threads=args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main())
