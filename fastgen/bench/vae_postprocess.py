"""VAE output post-processing at the image sizes a pipeline decodes.

Baselines: PyTorch eager ``(x / 2 + 0.5).clamp(0, 1)`` (diffusers' ``VaeImageProcessor.denormalize``) for
the float output, and ``((x / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
.contiguous()`` for the uint8 NHWC image (what its numpy / PIL path computes, on tensors).
"""

from __future__ import annotations

import torch

from ..ops.vae_postprocess import vae_postprocess
from ._runner import Case

# (B, C, H, W) VAE decoder outputs: SD1.5 at 512x512, SDXL at 1024x1024, a batch of four 512x512 images.
SHAPES = [(1, 3, 512, 512), (1, 3, 1024, 1024), (4, 3, 512, 512)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _eager_float(x: torch.Tensor) -> torch.Tensor:
    return (x / 2 + 0.5).clamp(0, 1)


def _eager_uint8(x: torch.Tensor) -> torch.Tensor:
    return (_eager_float(x) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    out = []
    for shape in SHAPES[:2] if quick else SHAPES:
        for dtype in DTYPES:
            out += _cases_for(shape, dtype, device)
    return out


def _cases_for(shape, dtype, device) -> list[Case]:
    g = torch.Generator(device="cpu").manual_seed(0)
    x = (torch.randn(shape, generator=g) * 0.7).to(device=device, dtype=dtype)
    elem = x.element_size() * x.numel()
    params = {"shape": "x".join(map(str, shape)), "dtype": str(dtype).replace("torch.", "")}

    def case(variant, candidate, eager, nbytes):
        return Case("vae_postprocess", variant, dict(params), candidate, {"eager": eager}, nbytes)

    return [
        # read x, write y (x's dtype)
        case("vae_postprocess float", lambda: vae_postprocess(x), lambda: _eager_float(x), 2 * elem),
        # read x, write one byte per element
        case("vae_postprocess uint8", lambda: vae_postprocess(x, output="uint8"), lambda: _eager_uint8(x),
             elem + x.numel()),
    ]
