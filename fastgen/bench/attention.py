"""Attention on the Stable Diffusion shapes: fastgen against PyTorch SDPA and
the plain matmul-softmax-matmul, forward and forward+backward, in TFLOP/s.

SD1.5 at 512x512, batch 2 (CFG), 8 heads: self-attention at 4096/1024/256/64
tokens with head dims 40/80/160/160, cross-attention to 77 text tokens;
SDXL's head dim 64 (10 heads at 4096 tokens, 20 at 1024).

:func:`tune` (``fastgen bench attention --tune``) measures instead the C++
CPU kernel against SDPA on a grid of shapes and writes the user choice file
that the automatic CPU backend choice reads (fastgen/ops/_attention_cpu_choice.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops.attention import attention
from ._runner import Case

SD15 = [(8, 4096, 40), (8, 1024, 80), (8, 256, 160), (8, 64, 160)]
SDXL = [(10, 4096, 64), (20, 1024, 64)]
BATCH = 2
TEXT_TOKENS = 77


def _naive(q, k, v):
    scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def _dtypes(device):
    return [torch.float16, torch.bfloat16] if device.type == "cuda" else [torch.float32, torch.bfloat16]


def _fwd_bwd(fn, q, k, v, do):
    qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))

    def run():
        fn(qq, kk, vv).backward(do)

    return run


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    out = []
    shapes = [("sd15", *s) for s in SD15] + [("sdxl", *s) for s in SDXL]
    if quick:
        shapes = shapes[1:2]
    dtypes = _dtypes(device)[:1] if quick else _dtypes(device)
    g = torch.Generator().manual_seed(0)
    for model, heads, n, d in shapes:
        for nk, kind in ((n, "self"), (TEXT_TOKENS, "cross")):
            for dtype in dtypes:
                q = torch.randn(BATCH, heads, n, d, generator=g).to(device=device, dtype=dtype)
                k = torch.randn(BATCH, heads, nk, d, generator=g).to(device=device, dtype=dtype)
                v = torch.randn(BATCH, heads, nk, d, generator=g).to(device=device, dtype=dtype)
                flops = 4 * BATCH * heads * n * nk * d
                params = {"model": model, "kind": kind, "heads": heads, "nq": n, "nk": nk, "d": d,
                          "dtype": str(dtype).replace("torch.", "")}
                out += _cases_for(device, params, q, k, v, flops, quick)
    return out


def _cases_for(device, params, q, k, v, flops, quick) -> list[Case]:
    def fg(backend=None):
        return lambda q, k, v: attention(q, k, v, backend=backend)

    sdpa = F.scaled_dot_product_attention
    # The naive baseline materialises the score matrix: skip it where that is GiBs.
    naive_ok = not quick and params["nq"] * params["nk"] * params["heads"] * 2 * 4 <= 2**31
    variants = [("fwd", 1.0)] + ([] if quick else [("fwd+bwd", 3.5)])
    rows = []
    for variant, flop_mult in variants:
        if variant == "fwd":
            def wrap(fn):
                return lambda: fn(q, k, v)
        else:
            do = torch.randn_like(q)

            def wrap(fn):
                return _fwd_bwd(fn, q, k, v, do)

        baselines = {"sdpa": wrap(sdpa)}
        if naive_ok:
            baselines["naive"] = wrap(_naive)
        extra = {"flops": flops * flop_mult}
        rows.append(Case("attention", f"{variant} auto", dict(params), wrap(fg()), baselines, extra=extra))
        if device.type == "cpu" and not quick:
            # What the C++ kernel reaches by itself, whatever the automatic choice is.
            rows.append(Case("attention", f"{variant} C++ kernel", dict(params), wrap(fg("cpu")),
                             {"sdpa": wrap(sdpa)}, extra=extra))
    return rows


# ------------------------------------------------------------------ tune

# The grid `fastgen bench attention --tune` measures (see fastgen/ops/_attention_cpu_choice.py for how a
# call finds its cell): every head dim the kernels support, query and key counts around the thresholds
# that matter (the kernel pads query blocks to 16 rows; 77 text tokens; 1024+ keys), forward and
# forward+backward. The largest cell, 4096 x 1024 at D=512, stands for every larger shape.
TUNE_GRID = {
    "dtype": ("float32", "bfloat16", "float16"),
    "training": (False, True),
    "head_dim": (32, 40, 64, 80, 96, 128, 160, 512),
    "nq": (1, 16, 64, 256, 1024, 4096),
    "nk": (16, 77, 1024),
}
QUICK_TUNE_GRID = {
    "dtype": ("float32", "bfloat16"),
    "training": (False,),
    "head_dim": (40, 64, 160, 512),
    "nq": (1, 16, 256, 4096),
    "nk": (77, 1024),
}
TUNE_BATCH, TUNE_HEADS = 2, 4
TUNE_BUDGET_S = {False: 900.0, True: 120.0}  # full / quick: cells left when it runs out keep the shipped choice


def _seconds(fn, min_time: float, max_reps: int = 25) -> float:
    """Median wall time of ``fn`` over at least 3 runs (or one run longer than ``min_time``) after a warm-up."""
    import statistics
    import time

    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        if times[-1] >= min_time or (len(times) >= 3 and time.perf_counter() - start >= min_time):
            break
    return statistics.median(times)


def _tune_cell(dtype: torch.dtype, training: bool, head_dim: int, nq: int, nk: int, min_time: float):
    g = torch.Generator().manual_seed(head_dim * 7919 + nq * 31 + nk)
    q = torch.randn(TUNE_BATCH, TUNE_HEADS, nq, head_dim, generator=g).to(dtype)
    k = torch.randn(TUNE_BATCH, TUNE_HEADS, nk, head_dim, generator=g).to(dtype)
    v = torch.randn(TUNE_BATCH, TUNE_HEADS, nk, head_dim, generator=g).to(dtype)
    kernel = lambda q, k, v: attention(q, k, v, backend="cpu")  # noqa: E731
    sdpa = F.scaled_dot_product_attention
    if training:
        do = torch.randn_like(q)
        run_kernel, run_sdpa = _fwd_bwd(kernel, q, k, v, do), _fwd_bwd(sdpa, q, k, v, do)
    else:
        def run_kernel():
            with torch.no_grad():
                kernel(q, k, v)

        def run_sdpa():
            with torch.no_grad():
                sdpa(q, k, v)
    return _seconds(run_kernel, min_time), _seconds(run_sdpa, min_time)


def tune(
    *,
    quick: bool = False,
    grid: dict | None = None,
    path=None,
    min_time: float | None = None,
    budget_s: float | None = None,
    progress: bool = True,
):
    """Measure the C++ CPU attention kernel against SDPA on a grid of shapes and write the user choice file.

    ``grid`` (default :data:`TUNE_GRID`, or :data:`QUICK_TUNE_GRID` with ``quick``) has the keys ``dtype``
    (names), ``training``, ``head_dim``, ``nq`` and ``nk``. Cells are measured cheapest first; when
    ``budget_s`` (seconds) is spent the rest are left out (those shapes keep the shipped table's choice). The file
    (``path``, default :func:`fastgen.ops._attention_cpu_choice.user_choice_path`) keeps the tables of
    other machines it already holds and replaces this machine's. Returns ``(path, table)``.
    """
    import datetime
    import itertools
    import json
    import time
    from pathlib import Path

    from .. import _backend
    from ..ops import _attention_cpu_choice as choice

    why = _backend.unavailable_reason("cpu", torch.device("cpu"))
    if why is not None:
        raise RuntimeError(f"fastgen bench attention --tune needs the C++ CPU attention kernel: {why}")
    grid = dict(grid or (QUICK_TUNE_GRID if quick else TUNE_GRID))
    missing = {"dtype", "training", "head_dim", "nq", "nk"} - set(grid)
    if missing:
        raise ValueError(f"tune grid lacks {sorted(missing)}")
    dtypes = {name: getattr(torch, name) for name in grid["dtype"]}
    min_time = min_time if min_time is not None else (0.02 if quick else 0.1)
    budget_s = budget_s if budget_s is not None else TUNE_BUDGET_S[bool(quick)]
    path = Path(path) if path is not None else choice.user_choice_path()

    cells = list(itertools.product(grid["dtype"], grid["training"], grid["head_dim"], grid["nq"], grid["nk"]))
    cells.sort(key=lambda c: (c[1] + 1) * c[2] * c[3] * c[4])  # cheapest first
    entries, start, skipped = [], time.perf_counter(), 0
    for i, (dt, training, d, nq, nk) in enumerate(cells):
        if i and time.perf_counter() - start > budget_s:  # (the first cell is always measured)
            skipped = len(cells) - i
            break
        kernel_s, sdpa_s = _tune_cell(dtypes[dt], training, d, nq, nk, min_time)
        entries.append({"dtype": dt, "training": training, "head_dim": d, "nq": nq, "nk": nk,
                        "choice": "kernel" if kernel_s < sdpa_s else "sdpa",
                        "kernel_ms": round(kernel_s * 1e3, 4), "sdpa_ms": round(sdpa_s * 1e3, 4)})
        if progress:
            e = entries[-1]
            print(f"  [{i + 1}/{len(cells)}] {dt} {'fwd+bwd' if training else 'fwd'} D={d} Nq={nq} Nk={nk}: "
                  f"kernel {e['kernel_ms']:.3f} ms, sdpa {e['sdpa_ms']:.3f} ms -> {e['choice']}", flush=True)
    entries.sort(key=lambda e: (e["dtype"], e["training"], e["head_dim"], e["nq"], e["nk"]))
    machine = choice.this_machine()
    table = {
        "machine": machine,
        "measured": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": f"fastgen bench attention --tune{' --quick' if quick else ''}, batch {TUNE_BATCH} x "
                  f"{TUNE_HEADS} heads, median of timed runs after a warm-up",
        "complete": skipped == 0,
        "entries": entries,
    }
    others = []
    if path.is_file():
        try:
            old = json.loads(path.read_text())
            choice.parse_tables(old, str(path))  # keep the other machines' tables only from a valid file
            others = [t for t in old["tables"]
                      if (t["machine"].get("cpu"), t["machine"].get("isa")) != (machine["cpu"], machine["isa"])]
        except (OSError, ValueError):
            others = []
    payload = {"format": choice.FORMAT, "about": "fastgen CPU attention choice (kernel or sdpa) per shape",
               "tables": [*others, table]}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    tmp.replace(path)
    choice.reload()
    if skipped and progress:
        print(f"  time budget of {budget_s:.0f} s reached: {skipped} of {len(cells)} cells not measured "
              f"(they keep the shipped choice)")
    return path, table
