"""2-D convolutions with the fused epilogue (:func:`fastgen.ops.conv2d.conv2d`) at every distinct shape of the
SD1.5 U-Net forward at CFG batch 2 (latent 2x4x64x64: 43 shapes, 98 convolutions) and of the SD VAE decode of
a 1x4x64x64 latent to 512x512 (17 shapes, 36 convolutions).

Baseline "eager", diffusers' op sequence: ``F.conv2d(x, w, b, stride, padding)`` (bias fused by oneDNN /
cuDNN); for a ResNet block's ``conv2`` then ``(residual + h) / output_scale_factor``
(``ResnetBlock2D.forward``: diffusers divides even when the factor is 1.0, as it is in SD, so the eager
baseline does that pass too), for a transformer's 1x1 ``proj_out`` then ``h + residual``
(``Transformer2DModel``). Candidate: ``conv2d(x, w, b, stride=..., padding=..., residual=r,
output_scale=...)`` with no ``backend`` argument: timed on whichever backend fastgen chooses. x contiguous
(NCHW), as diffusers runs.

The shapes are written out in :data:`UNET_SHAPES` and :data:`VAE_SHAPES` (not read from diffusers at run
time), from diffusers' configs: the U-Net's defaults (SD1.5, fastgen.bench.models.UNET_CONFIG:
``block_out_channels=(320, 640, 1280, 1280)``, ``layers_per_block=2``, 1x1-conv ``proj_in`` / ``proj_out``
around each of its 16 transformers) and the VAE's SD config (fastgen.bench.models.VAE_CONFIG:
``block_out_channels=(128, 256, 512, 512)``, three resnets per decoder up block). The table was checked
against forward hooks on every ``nn.Conv2d`` of the diffusers models (diffusers 0.42, meta device): the
same shapes and counts. A shape is the key (N, C, K, H=W, R=S, stride, padding, residual, output_scale);
``count`` is how many convolutions of it one forward runs (layers of one shape are one row, e.g. a down
block's resnet ``conv1`` and the upsampler conv after it, both 1280->1280 3x3 at 16x16), and the summary
rows (:func:`summary_rows`, one per model and dtype) weight each shape's time by it: the time of one
forward's convolutions, fastgen against eager, over the shapes that ran.

Each row has ``flops`` = 2*N*K*C*R*S*Ho*Wo (a direct convolution's; the Winograd path does fewer multiplies:
this is the problem's size, not the kernel's work) and each side's fraction of this machine's GEMM peak in
the row's dtype, measured in the same run (fastgen.bench.models.gemm_peak_gflops). dtypes: float32; without
``--quick`` also float16 on CUDA, and bfloat16 on a CPU whose oneDNN runs bf16 natively (on an AVX2 CPU an
eager bf16 convolution is two orders of magnitude slower than fp32). ``--quick`` keeps six U-Net shapes: the
resnet ``conv2`` (residual) at 320@64, 640@32, 1280@16 and 1280@8, one 1x1 shortcut and one stride-2
downsampler.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..ops.conv2d import conv2d
from ._runner import Case


class Shape(NamedTuple):
    role: str  # which layers: "resnet conv2", "shortcut", "downsample", ...
    n: int
    c: int  # input channels
    k: int  # output channels
    h: int  # input height = width
    r: int  # kernel size (R = S)
    stride: int
    padding: int
    residual: bool  # a ResNet block's conv2 (adds the shortcut) or a transformer's proj_out
    count: int  # convolutions of this shape in one forward
    output_scale: float = 1.0  # 1 / output_scale_factor (1.0 in SD's U-Net and VAE)

    @property
    def ho(self) -> int:
        return (self.h + 2 * self.padding - self.r) // self.stride + 1

    @property
    def flops(self) -> int:
        return 2 * self.n * self.k * self.c * self.r * self.r * self.ho * self.ho


# SD1.5 U-Net, CFG batch 2, latent 64x64. Resnet: conv1 C->K 3x3 (bias; diffusers then adds the time
# embedding, which is not part of the convolution), conv2 K->K 3x3 + residual, a 1x1 shortcut C->K where C != K.
# Transformer: proj_in 1x1 C->C, proj_out 1x1 C->C + residual (2 per down block 0-2, 1 mid, 3 per up block 1-3).
# Down path: 320@64 (2 resnets, downsample 3x3 s2 p1 to 32), 640@32 (320->640 first, downsample to 16),
# 1280@16 (640->1280 first, downsample to 8), 1280@8 (2 resnets, no downsample); mid: 2 resnets 1280@8.
# Up path, three resnets per block over the concatenated skips (the previous output joined with the skip
# popped from the down path): @8 2560->1280 x3 (then upsample: nearest 2x + conv 1280 3x3 at 16);
# @16 2560->1280 x2, 1920->1280 (upsample conv 1280 at 32); @32 1920->640, 1280->640, 960->640 (upsample
# conv 640 at 64); @64 960->320, 640->320 x2; conv_in 4->320 and conv_out 320->4 at 64.
UNET_SHAPES = [
    Shape("conv_in", 2, 4, 320, 64, 3, 1, 1, False, 1),
    # 320 @ 64
    Shape("resnet conv1", 2, 320, 320, 64, 3, 1, 1, False, 2),
    Shape("resnet conv2", 2, 320, 320, 64, 3, 1, 1, True, 5),  # 2 down + 3 up
    Shape("downsample", 2, 320, 320, 64, 3, 2, 1, False, 1),
    Shape("resnet conv1", 2, 960, 320, 64, 3, 1, 1, False, 1),
    Shape("shortcut", 2, 960, 320, 64, 1, 1, 0, False, 1),
    Shape("resnet conv1", 2, 640, 320, 64, 3, 1, 1, False, 2),
    Shape("shortcut", 2, 640, 320, 64, 1, 1, 0, False, 2),
    Shape("proj_in", 2, 320, 320, 64, 1, 1, 0, False, 5),  # 2 down + 3 up transformers
    Shape("proj_out", 2, 320, 320, 64, 1, 1, 0, True, 5),
    Shape("conv_out", 2, 320, 4, 64, 3, 1, 1, False, 1),
    # 640 @ 32
    Shape("resnet conv1", 2, 320, 640, 32, 3, 1, 1, False, 1),
    Shape("shortcut", 2, 320, 640, 32, 1, 1, 0, False, 1),
    Shape("resnet conv1", 2, 640, 640, 32, 3, 1, 1, False, 1),
    Shape("resnet conv2", 2, 640, 640, 32, 3, 1, 1, True, 5),  # 2 down + 3 up
    Shape("downsample", 2, 640, 640, 32, 3, 2, 1, False, 1),
    Shape("resnet conv1", 2, 1920, 640, 32, 3, 1, 1, False, 1),
    Shape("shortcut", 2, 1920, 640, 32, 1, 1, 0, False, 1),
    Shape("resnet conv1", 2, 1280, 640, 32, 3, 1, 1, False, 1),
    Shape("shortcut", 2, 1280, 640, 32, 1, 1, 0, False, 1),
    Shape("resnet conv1", 2, 960, 640, 32, 3, 1, 1, False, 1),
    Shape("shortcut", 2, 960, 640, 32, 1, 1, 0, False, 1),
    Shape("upsample conv", 2, 640, 640, 64, 3, 1, 1, False, 1),
    Shape("proj_in", 2, 640, 640, 32, 1, 1, 0, False, 5),
    Shape("proj_out", 2, 640, 640, 32, 1, 1, 0, True, 5),
    # 1280 @ 16
    Shape("resnet conv1", 2, 640, 1280, 16, 3, 1, 1, False, 1),
    Shape("shortcut", 2, 640, 1280, 16, 1, 1, 0, False, 1),
    Shape("resnet conv1, upsample conv", 2, 1280, 1280, 16, 3, 1, 1, False, 2),  # down resnet + the 8->16 upsampler
    Shape("resnet conv2", 2, 1280, 1280, 16, 3, 1, 1, True, 5),  # 2 down + 3 up
    Shape("downsample", 2, 1280, 1280, 16, 3, 2, 1, False, 1),
    Shape("resnet conv1", 2, 2560, 1280, 16, 3, 1, 1, False, 2),
    Shape("shortcut", 2, 2560, 1280, 16, 1, 1, 0, False, 2),
    Shape("resnet conv1", 2, 1920, 1280, 16, 3, 1, 1, False, 1),
    Shape("shortcut", 2, 1920, 1280, 16, 1, 1, 0, False, 1),
    Shape("upsample conv", 2, 1280, 1280, 32, 3, 1, 1, False, 1),
    Shape("proj_in", 2, 1280, 1280, 16, 1, 1, 0, False, 5),
    Shape("proj_out", 2, 1280, 1280, 16, 1, 1, 0, True, 5),
    # 1280 @ 8
    Shape("resnet conv1", 2, 1280, 1280, 8, 3, 1, 1, False, 4),  # 2 down + 2 mid
    Shape("resnet conv2", 2, 1280, 1280, 8, 3, 1, 1, True, 7),  # 2 down + 2 mid + 3 up
    Shape("resnet conv1", 2, 2560, 1280, 8, 3, 1, 1, False, 3),
    Shape("shortcut", 2, 2560, 1280, 8, 1, 1, 0, False, 3),
    Shape("proj_in", 2, 1280, 1280, 8, 1, 1, 0, False, 1),  # the mid block's transformer
    Shape("proj_out", 2, 1280, 1280, 8, 1, 1, 0, True, 1),
]

# SD VAE decode of 1x4x64x64: post_quant_conv 1x1 4->4 (AutoencoderKL.decode), conv_in 4->512 at 64; mid block
# 2 resnets 512@64; up blocks of 3 resnets: 512@64 (upsample conv 512 at 128), 512@128 (upsample conv at
# 256), 512->256 first then 256@256 (upsample conv 256 at 512), 256->128 first then 128@512; conv_out 128->3.
VAE_SHAPES = [
    Shape("post_quant_conv", 1, 4, 4, 64, 1, 1, 0, False, 1),
    Shape("conv_in", 1, 4, 512, 64, 3, 1, 1, False, 1),
    Shape("resnet conv1", 1, 512, 512, 64, 3, 1, 1, False, 5),  # 2 mid + 3 up
    Shape("resnet conv2", 1, 512, 512, 64, 3, 1, 1, True, 5),
    Shape("resnet conv1, upsample conv", 1, 512, 512, 128, 3, 1, 1, False, 4),  # 3 resnets + the 64->128 upsampler
    Shape("resnet conv2", 1, 512, 512, 128, 3, 1, 1, True, 3),
    Shape("upsample conv", 1, 512, 512, 256, 3, 1, 1, False, 1),
    Shape("resnet conv1", 1, 512, 256, 256, 3, 1, 1, False, 1),
    Shape("shortcut", 1, 512, 256, 256, 1, 1, 0, False, 1),
    Shape("resnet conv1", 1, 256, 256, 256, 3, 1, 1, False, 2),
    Shape("resnet conv2", 1, 256, 256, 256, 3, 1, 1, True, 3),
    Shape("upsample conv", 1, 256, 256, 512, 3, 1, 1, False, 1),
    Shape("resnet conv1", 1, 256, 128, 512, 3, 1, 1, False, 1),
    Shape("shortcut", 1, 256, 128, 512, 1, 1, 0, False, 1),
    Shape("resnet conv1", 1, 128, 128, 512, 3, 1, 1, False, 2),
    Shape("resnet conv2", 1, 128, 128, 512, 3, 1, 1, True, 3),
    Shape("conv_out", 1, 128, 3, 512, 3, 1, 1, False, 1),
]

MODELS = {"unet sd1.5": UNET_SHAPES, "vae sd": VAE_SHAPES}

# --quick: (model, layer, C, K, H, stride) of the shapes kept
QUICK = [
    ("unet sd1.5", "resnet conv2", 320, 320, 64, 1),  # + residual
    ("unet sd1.5", "resnet conv2", 640, 640, 32, 1),
    ("unet sd1.5", "resnet conv2", 1280, 1280, 16, 1),
    ("unet sd1.5", "resnet conv2", 1280, 1280, 8, 1),
    ("unet sd1.5", "shortcut", 1920, 640, 32, 1),  # 1x1
    ("unet sd1.5", "downsample", 320, 320, 64, 2),  # 3x3 stride 2
]


def _find(model: str, role: str, c: int, k: int, h: int, stride: int) -> Shape:
    (shape,) = [s for s in MODELS[model] if (s.role, s.c, s.k, s.h, s.stride) == (role, c, k, h, stride)]
    return shape


# A call of more than this many FLOPs on a CPU (a VAE convolution at 256 or 512 px is ~77 GFLOP, about a
# second on 2 cores) is timed as the best of a few interleaved calls (_runner.time_interleaved_ms) rather
# than by torch.utils.benchmark's autorange, which would spend seconds per measurement.
_INTERLEAVE_FLOPS = 5e9


def _dtypes(device: torch.device, quick: bool) -> list[torch.dtype]:
    from .models import cpu_has_native_bf16

    if quick:
        return [torch.float32]
    if device.type == "cuda":
        return [torch.float32, torch.float16]
    return [torch.float32, torch.bfloat16] if cpu_has_native_bf16() else [torch.float32]


def shapes(quick: bool = False) -> list[tuple[str, Shape]]:
    """(model, shape) pairs the suite times."""
    if quick:
        return [(q[0], _find(*q)) for q in QUICK]
    return [(m, s) for m, table in MODELS.items() for s in table]


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    from .models import gemm_peak_gflops

    out = []
    for dtype in _dtypes(device, quick):
        peak = gemm_peak_gflops(device, dtype)
        out += [_case(model, s, dtype, device, quick, peak) for model, s in shapes(quick)]
    return out


def _eager(x, w, b, r, s: Shape):
    y = F.conv2d(x, w, b, s.stride, s.padding)
    if r is None:
        return y
    if s.role == "proj_out":
        return y + r  # Transformer2DModel: hidden_states + residual
    return (r + y) / (1.0 / s.output_scale)  # ResnetBlock2D: (input_tensor + hidden_states) / output_scale_factor


# The inputs of one case at a time, made on its first call: all of the suite's at once would hold 3.5 GB in
# float32 (a 1x256x512x512 input is 268 MB) and take half a minute of randn before the first timing.
_inputs_cache: dict = {}


def _inputs(key: tuple, make):
    hit = _inputs_cache.get(key)
    if hit is None:
        _inputs_cache.clear()
        hit = _inputs_cache[key] = make()
    return hit


def _make_inputs(s: Shape, dtype: torch.dtype, device: torch.device):
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(s.n, s.c, s.h, s.h, generator=g).to(device=device, dtype=dtype)
    w = (torch.randn(s.k, s.c, s.r, s.r, generator=g) / (s.c * s.r * s.r) ** 0.5).to(device=device, dtype=dtype)
    b = (torch.randn(s.k, generator=g) * 0.1).to(device=device, dtype=dtype)
    r = torch.randn(s.n, s.k, s.ho, s.ho, generator=g).to(device=device, dtype=dtype) if s.residual else None
    return x, w, b, r


def _case(model: str, s: Shape, dtype: torch.dtype, device: torch.device, quick: bool, peak: float) -> Case:
    key = (model, s, dtype, device)
    make = functools.partial(_make_inputs, s, dtype, device)

    def candidate():
        x, w, b, r = _inputs(key, make)
        with torch.no_grad():
            return conv2d(x, w, b, stride=s.stride, padding=s.padding, residual=r, output_scale=s.output_scale)

    def eager():
        x, w, b, r = _inputs(key, make)
        with torch.no_grad():
            return _eager(x, w, b, r, s)

    params = {
        "model": model,
        "layer": s.role,
        "shape": f"{s.n}x{s.c}x{s.h}x{s.h} -> {s.k}x{s.ho}x{s.ho}",
        "kernel": f"{s.r}x{s.r} s{s.stride} p{s.padding}",
        "residual": s.residual,
        "output_scale": s.output_scale,
        "dtype": str(dtype).replace("torch.", ""),
        "count": s.count,
    }
    extra: dict = {"flops": s.flops, "peak_gflops": peak}
    if device.type == "cpu" and s.flops > _INTERLEAVE_FLOPS:
        extra["rounds"] = 2 if quick else 3
    return Case("conv", "conv2d", params, candidate, {"eager": eager}, extra=extra)


def summary_rows(rows: list[dict]) -> list[dict]:
    """One row per (model, dtype): the time of one forward's convolutions (each shape's time x its count),
    fastgen against eager, over the shapes that ran (all of them, or the --quick subset)."""
    out = []
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row.get("case") == "conv2d":
            groups.setdefault((row["model"], row["dtype"]), []).append(row)
    for (model, dtype), group in groups.items():
        fastgen = sum(r["fastgen_ms"] * r["count"] for r in group)
        eager = sum(r["eager_ms"] * r["count"] for r in group)
        flops = sum(r["gflop"] * 1e9 * r["count"] for r in group)
        out.append({
            "suite": "conv",
            "case": "total (ms x count)",
            "model": model,
            "layer": f"{len(group)} of {len(MODELS[model])} shapes",
            "dtype": dtype,
            "count": sum(r["count"] for r in group),
            "cpu_isa": group[0].get("cpu_isa"),
            "fastgen_ms": fastgen,
            "eager_ms": eager,
            "speedup_vs_eager": eager / fastgen,
            "gflop": flops / 1e9,
            "fastgen_tflops": flops / (fastgen * 1e-3) / 1e12,
        })
    return out
