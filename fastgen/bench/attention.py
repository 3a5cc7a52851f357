"""Attention on the Stable Diffusion shapes: fastgen against PyTorch SDPA and
the plain matmul-softmax-matmul, forward and forward+backward, in TFLOP/s.

SD1.5 at 512x512, batch 2 (CFG), 8 heads: self-attention at 4096/1024/256/64
tokens with head dims 40/80/160/160, cross-attention to 77 text tokens;
SDXL's head dim 64 (10 heads at 4096 tokens, 20 at 1024).
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
