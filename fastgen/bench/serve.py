"""``fastgen bench serve``: request batching under load, on localhost.

The server is a ``fastgen serve`` process (``BatchSampler`` -> ``RequestQueue`` -> HTTP on 127.0.0.1) over a
small fastgen latent-diffusion model (:func:`fastgen.bench.offline.tiny_latent_pipeline`, class-conditioned,
random weights, 32x32 images, DPM-Solver++ with guidance) saved to a temporary folder. This process is the
load generator: ``requests`` single-image requests with Poisson arrivals (exponential gaps from a fixed seed,
one thread per request, each POSTing JSON and reading the PNG). Clients and server are separate processes so
the clients' Python threads do not take the server's interpreter lock. Two servers answer the same arrival
sequences:

* ``one-by-one``: ``--max-batch-size 1``, each request answered alone, in arrival order;
* ``batched``: the queue grouping up to ``max_batch_size`` requests within ``max_wait_ms`` (default: half of
  one request's service time).

Arrival rates are multiples of the one-by-one capacity ``1 / t1`` (``t1``: one request's time through the
one-by-one server, HTTP and PNG included, best of 3 after a warm-up), so 1.0x and above saturate one-by-one
serving. Each row has the throughput (answers / s from the first arrival to the last answer), p50 / p95 / max
latency (send to answer, as the client sees it), the server's mean batch size and any errors. Everything is
bounded: ``requests`` requests, a per-request timeout, and the server processes are killed on the way out.

On a GPU it also times the denoising loop with and without a CUDA graph at batch 1 (CFG batch 2): the SD1.5
U-Net at 512x512 (fp16, 77 text tokens) with ``--full``, the tiny model with ``--quick``."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

SEED = 0
QUICK = dict(requests=16, rates=(2.0,), steps=4, max_batch_size=8)
FULL = dict(requests=64, rates=(0.5, 1.0, 2.0, 4.0), steps=8, max_batch_size=16)
START_TIMEOUT_S = 120


def _post(url: str, body: dict, timeout_s: float) -> bytes:
    req = urllib.request.Request(url + "/generate", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        return resp.read()


def _stats(url: str) -> dict:
    with urllib.request.urlopen(url + "/health", timeout=30) as resp:
        return json.loads(resp.read())["stats"]


def arrival_times(n: int, rate: float, seed: int = SEED) -> np.ndarray:
    """Seconds from the start of each of ``n`` Poisson arrivals at ``rate`` per second (the first at 0)."""
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=n)
    gaps[0] = 0.0
    return np.cumsum(gaps)


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else float("nan")


@contextlib.contextmanager
def server_process(model_dir, *, max_batch_size: int, max_wait_ms: float, device: torch.device):
    """A ``fastgen serve`` process on a free 127.0.0.1 port; yields its URL, kills it on the way out."""
    cmd = [sys.executable, "-m", "fastgen", "serve", "--model", str(model_dir), "--port", "0",
           "--max-batch-size", str(max_batch_size), "--max-wait-ms", str(max_wait_ms), "--max-pending", "4096",
           "--device", device.type]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        line = ""
        while not line.startswith("fastgen serve: http://") and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                raise RuntimeError(f"fastgen serve exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        if not line.startswith("fastgen serve: http://"):
            raise RuntimeError(f"fastgen serve did not start within {START_TIMEOUT_S} s")
        yield line.split()[2]
    finally:
        proc.kill()
        proc.communicate(timeout=30)


def load_run(url: str, arrivals: np.ndarray, steps: int, timeout_s: float) -> dict:
    """The server at ``url`` answering one arrival sequence; the row's measurements."""
    n = len(arrivals)
    latencies: list = [None] * n
    done_at = [0.0] * n
    errors: list = []
    before = _stats(url)
    start = time.perf_counter() + 0.05

    def client(i: int) -> None:
        delay = start + arrivals[i] - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        sent = time.perf_counter()
        try:
            _post(url, {"class_label": i % 10, "seed": i, "steps": steps}, timeout_s)
        except Exception as exc:  # noqa: BLE001 - every failure is counted and reported
            errors.append(f"{type(exc).__name__}: {exc}")
            return
        done_at[i] = time.perf_counter()
        latencies[i] = done_at[i] - sent

    with ThreadPoolExecutor(max_workers=n) as pool:
        list(pool.map(client, range(n)))
    after = _stats(url)
    ok = [x for x in latencies if x is not None]
    batches = after["batches"] - before["batches"]
    return {
        "requests": n, "answered": len(ok), "errors": len(errors), "error_sample": errors[:3],
        "throughput_rps": len(ok) / (max(done_at) - start) if ok else 0.0,
        "p50_s": percentile(ok, 50), "p95_s": percentile(ok, 95), "max_s": max(ok) if ok else float("nan"),
        "batches": batches, "mean_batch": (after["completed"] - before["completed"]) / batches if batches else 0.0,
    }


def burst_time(url: str, batch: int, steps: int, rounds: int = 3) -> float:
    """Best-of-``rounds`` seconds for ``batch`` requests sent at once to be answered."""
    best = float("inf")
    for k in range(rounds):
        t = time.perf_counter()
        with ThreadPoolExecutor(max_workers=batch) as pool:
            list(pool.map(lambda i: _post(url, {"class_label": i % 10, "seed": 10_000 + i, "steps": steps}, 120),
                          range(batch)))
        best = min(best, time.perf_counter() - t)
    return best


def _warm_up(url: str, max_batch_size: int, steps: int) -> None:
    # first calls at a batch size pay one-time costs (allocator growth, oneDNN primitives, graph capture)
    b = 1
    while True:
        burst_time(url, b, steps, rounds=1)
        if b >= max_batch_size:
            break
        b = min(2 * b, max_batch_size)


def queue_rows(device: torch.device, quick: bool, *, requests: Optional[int] = None,
               rates: Optional[Sequence[float]] = None, steps: Optional[int] = None,
               max_batch_size: Optional[int] = None, max_wait_ms: Optional[float] = None,
               progress: bool = True) -> list[dict]:
    from tqdm import tqdm

    from .offline import tiny_latent_pipeline

    cfg = dict(QUICK if quick else FULL)
    for k, v in dict(requests=requests, rates=rates, steps=steps, max_batch_size=max_batch_size).items():
        if v is not None:
            cfg[k] = v
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="fastgen-bench-serve-") as tmp:
        model_dir = Path(tmp) / "model"
        tiny_latent_pipeline("class", seed=SEED).save_pretrained(model_dir)
        base = {"suite": "serve", "model": "tiny latent diffusion, class-conditioned, 32x32", "steps": cfg["steps"]}
        bar = tqdm(total=2 * len(cfg["rates"]), desc="bench serve", disable=not progress, leave=False)
        t1 = None
        for mode in ("one-by-one", "batched"):
            batch = 1 if mode == "one-by-one" else cfg["max_batch_size"]
            # the batch window: long enough for a few arrivals at saturation, short against one request's time
            wait_ms = 0.0 if batch == 1 else (max_wait_ms if max_wait_ms is not None else round(500 * t1, 1))
            with server_process(model_dir, max_batch_size=batch, max_wait_ms=wait_ms, device=device) as url:
                _warm_up(url, batch, cfg["steps"])
                service = burst_time(url, batch, cfg["steps"])
                if mode == "one-by-one":
                    t1 = service
                    base.update(t1_s=t1, one_by_one_capacity_rps=1 / t1)
                else:
                    base.update({f"t{batch}_s": service, "batched_capacity_rps": batch / service})
                for mult in cfg["rates"]:
                    # bounded: one-by-one needs about requests * t1 after the last arrival
                    timeout_s = 30 + 3 * cfg["requests"] * t1
                    row = dict(mode=mode, rate_x=mult, rate_rps=mult / t1, max_batch_size=batch, max_wait_ms=wait_ms)
                    row.update(load_run(url, arrival_times(cfg["requests"], mult / t1), cfg["steps"], timeout_s))
                    rows.append(row)
                    bar.update()
        bar.close()
    return [dict(base, **r) for r in rows]


def compare(rows: list[dict]) -> list[dict]:
    """Per saturating rate (>= 1x one-by-one capacity): batched throughput / one-by-one's and the p95s, against
    the issue's target (>= 2x throughput, p95 no worse). Throughput cannot exceed the arrival rate, so the
    target is judged only where arrivals come at least twice as fast as one-by-one answers them
    (``arrival_bound_ratio`` >= 2); below that the best possible ratio is the arrival bound itself."""
    out = []
    for mult in sorted({r["rate_x"] for r in rows if r.get("mode")}):
        pair = {r["mode"]: r for r in rows if r.get("rate_x") == mult and r.get("mode")}
        if {"one-by-one", "batched"} - set(pair) or mult < 1.0:
            continue
        one, bat = pair["one-by-one"], pair["batched"]
        ratio = bat["throughput_rps"] / one["throughput_rps"] if one["throughput_rps"] else float("nan")
        bound = one["rate_rps"] / one["throughput_rps"] if one["throughput_rps"] else float("nan")
        judged = bound >= 2.0
        out.append({"suite": "serve", "summary": f"rate {mult:g}x", "throughput_ratio": ratio,
                    "arrival_bound_ratio": bound, "p95_batched_s": bat["p95_s"], "p95_one_by_one_s": one["p95_s"],
                    "target_met": bool(ratio >= 2.0 and bat["p95_s"] <= one["p95_s"]) if judged else None})
    return out


def graph_rows(device: torch.device, quick: bool, steps: int = 20, rounds: int = 5) -> list[dict]:
    """CUDA: denoising-loop step rate at batch 1 (CFG batch 2) with and without a CUDA graph."""
    if device.type != "cuda":
        return [{"suite": "serve", "case": "cuda graph loop", "skipped": "needs a CUDA device"}]
    from ..pipelines import BatchSampler, SampleRequest
    from .offline import tiny_latent_pipeline

    if quick:
        pipe = tiny_latent_pipeline("prompt", seed=SEED).to(device)
        name, size, dtype = "tiny", None, torch.float32
    else:
        pipe, name, size, dtype = _sd15_pipeline(device), "sd1.5 unet", 512, torch.float16
    rows = []
    for graphs in (False, True):
        sampler = BatchSampler(pipe, max_batch_size=1, cuda_graphs=graphs)
        req = [SampleRequest(prompt="a photo of a cat", seed=0, steps=steps, guidance_scale=7.5, height=size,
                             width=size)]
        sampler(req)  # warm-up (and the capture)
        loop = loop_only(sampler, req[0])
        loop_s = float("inf")
        for _ in range(rounds):
            torch.cuda.synchronize()
            t = time.perf_counter()
            loop()
            torch.cuda.synchronize()
            loop_s = min(loop_s, time.perf_counter() - t)
        rows.append({"suite": "serve", "case": "cuda graph loop", "model": name, "dtype": str(dtype).split(".")[-1],
                     "cuda_graphs": graphs, "steps": steps, "loop_s": loop_s, "it_per_s": steps / loop_s,
                     "captures": sampler.stats["captures"]})
    rows.append({"suite": "serve", "case": "cuda graph speedup", "model": name,
                 "speedup": rows[0]["loop_s"] / rows[1]["loop_s"]})
    return rows


def loop_only(sampler, request):
    """A callable running the denoising loop of one batch of ``request`` — no text encoding, decoding or copy
    back, which are prepared here, outside what is timed."""
    from ..pipelines.denoise import denoise, guided

    pipe = sampler.pipe
    steps, g, h, w = sampler.batch_key(request)
    latents = pipe.initial_latents(1, h, w, [request.seed]).to(pipe.dtype)
    cond, uncond = pipe.encode_conditions([pipe.resolve_condition(request.prompt, request.class_label)])
    uncond = uncond if guided(g, uncond is not None) else None
    sched = sampler._scheduler(steps)

    @torch.no_grad()
    def loop():
        if sampler.cuda_graphs:
            return sampler._graph_run(sched, latents, cond, uncond, g, steps)
        sched.set_timesteps(steps)
        return denoise(pipe.unet, sched, latents, cond, uncond, g)

    return loop


def _sd15_pipeline(device):
    """SD1.5's U-Net and VAE (random weights, fp16) with a 768-wide text encoder of 2 layers over 77 tokens:
    the loop's cost is the U-Net's; the text encoder runs once per batch, outside it."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from .. import schedulers
    from ..models import AutoencoderKL, UNet2DConditionModel
    from ..pipelines import LatentDiffusionPipeline
    from .offline import SD15_TEXT, SD15_UNET, SD_VAE, clip_tokenizer

    torch.manual_seed(SEED)
    text = CLIPTextModel(CLIPTextConfig(**dict(SD15_TEXT, num_hidden_layers=2)))
    pipe = LatentDiffusionPipeline(
        UNet2DConditionModel(**SD15_UNET), schedulers.DPMSolverMultistepScheduler(
            beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        AutoencoderKL(**SD_VAE), text, clip_tokenizer(77))
    return pipe.to(device, torch.float16)


def run(device: torch.device, quick: bool = False, *, progress: bool = True, **options) -> list[dict]:
    rows = queue_rows(device, quick, progress=progress, **options)
    return rows + compare(rows) + graph_rows(device, quick)


def save_chart(rows: list[dict], path: Path, device: Optional[str] = None) -> Optional[Path]:
    """Throughput and p95 latency against the arrival rate, one line per mode (PNG); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    runs = [r for r in rows if r.get("mode")]
    if not runs:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for mode in ("one-by-one", "batched"):
        mine = sorted((r for r in runs if r["mode"] == mode), key=lambda r: r["rate_x"])
        x = [r["rate_rps"] for r in mine]
        axes[0].plot(x, [r["throughput_rps"] for r in mine], "o-", label=mode)
        axes[1].plot(x, [r["p95_s"] for r in mine], "o-", label=mode)
    axes[0].set(xlabel="arrival rate (requests / s)", ylabel="throughput (requests / s)", title="throughput")
    axes[1].set(xlabel="arrival rate (requests / s)", ylabel="p95 latency (s)", title="p95 latency")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"fastgen bench serve — {runs[0]['model']}" + (f" — {device}" if device else ""), fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

