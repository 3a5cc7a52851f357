"""GroupNorm (+SiLU, +residual) on the Stable Diffusion 1.5 ResNet shapes.

Baseline: PyTorch eager ``F.silu(F.group_norm(x))`` (+ residual), the code a
diffusers ResNet block runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops import group_norm
from ._runner import Case

# (N, C, H, W) of the SD1.5 U-Net ResNet blocks at batch 2, 512x512 images.
SD15_SHAPES = [(2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16), (2, 1280, 8, 8)]
GROUPS = 32


def _dtypes(device: torch.device) -> list[torch.dtype]:
    return [torch.float32, torch.bfloat16] + ([torch.float16] if device.type == "cuda" else [])


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    out = []
    shapes = SD15_SHAPES[:2] if quick else SD15_SHAPES
    layouts = ["contiguous"] if quick else ["contiguous", "channels_last"]
    for shape in shapes:
        for dtype in _dtypes(device):
            for layout in layouts:
                out += _cases_for(shape, dtype, layout, device, quick)
    return out


def _cases_for(shape, dtype, layout, device, quick) -> list[Case]:
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    r = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    if layout == "channels_last":
        x, r = x.contiguous(memory_format=torch.channels_last), r.contiguous(memory_format=torch.channels_last)
    w = torch.randn(shape[1], generator=g).to(device=device, dtype=dtype)
    b = torch.randn(shape[1], generator=g).to(device=device, dtype=dtype)
    elem = x.element_size() * x.numel()
    params = {"shape": "x".join(map(str, shape)), "dtype": str(dtype).replace("torch.", ""), "layout": layout}

    def case(variant, candidate, eager, nbytes):
        return Case("group_norm", variant, dict(params), candidate, {"eager": eager}, nbytes)

    rows = [
        case(
            "gn+silu",
            lambda: group_norm(x, GROUPS, w, b, activation="silu"),
            lambda: F.silu(F.group_norm(x, GROUPS, w, b)),
            2 * elem,
        ),
        case(
            "gn+silu+residual",
            lambda: group_norm(x, GROUPS, w, b, activation="silu", residual=r),
            lambda: F.silu(F.group_norm(x, GROUPS, w, b)) + r,
            3 * elem,
        ),
    ]
    if not quick:
        xg = x.detach().clone().requires_grad_(True)
        dy = torch.randn_like(x)

        def fused_fb():
            group_norm(xg, GROUPS, w, b, activation="silu").backward(dy)

        def eager_fb():
            F.silu(F.group_norm(xg, GROUPS, w, b)).backward(dy)

        # forward reads x twice (stats, apply) at best once from DRAM; backward reads x and dy, writes dx
        rows.append(case("gn+silu fwd+bwd", fused_fb, eager_fb, 5 * elem))
    return rows
