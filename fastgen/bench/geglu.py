"""GEGLU on the Stable Diffusion 1.5 transformer-block shapes.

Baseline: PyTorch eager ``h, g = x.chunk(2, -1); h * F.gelu(g)``, the code
diffusers' ``GEGLU`` module runs after its ``proj`` Linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops.geglu import geglu
from ._runner import Case

# (batch, tokens, 2H) entering the GEGLU gate of the SD1.5 U-Net's transformer
# blocks at batch 2 (CFG), 512x512 images: 64x64, 32x32, 16x16 and 8x8 latent
# tokens; H = 4 * channels (1280, 2560, 5120, 5120).
SD15_SHAPES = [(2, 4096, 2 * 1280), (2, 1024, 2 * 2560), (2, 256, 2 * 5120), (2, 64, 2 * 5120)]


def _dtypes(device: torch.device) -> list[torch.dtype]:
    return [torch.float32, torch.bfloat16] + ([torch.float16] if device.type == "cuda" else [])


def _eager(x: torch.Tensor) -> torch.Tensor:
    hidden, gate = x.chunk(2, dim=-1)
    return hidden * F.gelu(gate)


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    out = []
    shapes = SD15_SHAPES[:2] if quick else SD15_SHAPES
    for shape in shapes:
        for dtype in _dtypes(device):
            out += _cases_for(shape, dtype, device, quick)
    return out


def _cases_for(shape, dtype, device, quick) -> list[Case]:  # quick: same cases, fewer shapes
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    elem = x.element_size() * x.numel()  # bytes of x; out and dout are half of it
    params = {"shape": "x".join(map(str, shape)), "dtype": str(dtype).replace("torch.", "")}

    def case(variant, candidate, eager, nbytes):
        return Case("geglu", variant, dict(params), candidate, {"eager": eager}, nbytes)

    # forward: read x, write out (x / 2)
    rows = [case("geglu", lambda: geglu(x), lambda: _eager(x), elem + elem // 2)]
    # The backward is measured in --quick runs too: on CPU it is where the
    # kernel's ISA variant matters most (fastgen info / cpu_isa in each row).
    xg = x.detach().clone().requires_grad_(True)
    dout = torch.randn(*shape[:-1], shape[-1] // 2, generator=g).to(device=device, dtype=dtype)

    def fused_fb():
        geglu(xg).backward(dout)

    def eager_fb():
        _eager(xg).backward(dout)

    # forward reads x, writes out; backward reads x and dout, writes dx
    rows.append(case("geglu fwd+bwd", fused_fb, eager_fb, elem + elem // 2 + elem + elem // 2 + elem))
    return rows
