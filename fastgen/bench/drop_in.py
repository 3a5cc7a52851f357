"""``fastgen.patch`` on diffusers' own models: the SD1.5 U-Net step at CFG batch 2 and the SD VAE decode,
patched against unpatched, in the same run over the very same weight tensors.

The patched model is a second diffusers instance built on the meta device and given the eager model's
tensors (``load_state_dict(assign=True)``), then patched; so the comparison is diffusers against diffusers,
one weight copy in memory. Each row records the seconds ``fastgen.patch`` took and the first patched call
(which packs the Winograd weight transforms, cached on the weight tensors afterwards), and the time as a
fraction of this machine's GEMM peak measured in the same run. Shapes: ``fastgen bench models``' (latent
2x4x64x64 with 77 text tokens, 512x512 decode; ``--quick`` 32x32 latents). fp32 on CPU, fp16 on CUDA.
"""

from __future__ import annotations

import time

import torch

from ._runner import Case
from .models import UNET_CONFIG, VAE_CONFIG, _count_flops, _timed, diffusers_available, gemm_peak_gflops

ROUNDS = 3


def _twin(model):
    """A second instance of a diffusers model over the same tensors."""
    with torch.device("meta"):
        twin = type(model)(**{k: v for k, v in model.config.items() if not k.startswith("_")})
    twin.load_state_dict(model.state_dict(), strict=True, assign=True)
    return twin.eval()


class _Patched:
    """The patched twin's forward (``call``: no-grad, as the baseline's); its first call (weight packing) and the patch are timed into ``row``."""

    def __init__(self, model, call, row: dict):
        import fastgen

        t0 = time.perf_counter()
        report = fastgen.patch(model)
        row["patch_s"] = time.perf_counter() - t0
        row["patched_modules"] = report.total
        self.call, self.row, self.first = call, row, True

    def __call__(self):
        if self.first:
            t0 = time.perf_counter()
            self.call()
            self.row["first_patched_call_s"] = time.perf_counter() - t0
            self.first = False
        return self.call()


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    if not diffusers_available("drop_in"):
        return []
    import diffusers

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    hw = 32 if quick else 64
    peak = gemm_peak_gflops(device, dtype)
    g = torch.Generator().manual_seed(0)
    rounds = 2 if quick else ROUNDS
    dname = str(dtype).replace("torch.", "")

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**UNET_CONFIG).eval().to(device, dtype)
    x = torch.randn(2, 4, hw, hw, generator=g).to(device, dtype)
    ctx = torch.randn(2, 77, 768, generator=g).to(device, dtype)
    t = torch.tensor([500, 500], device=device)
    row: dict = {"gemm_peak_gflops": peak}
    patched_unet = _twin(unet)
    unet_case = Case(
        "drop_in", "unet step patched", {"model": "unet sd1.5", "shape": f"2x4x{hw}x{hw} + 2x77x768", "dtype": dname},
        _Patched(patched_unet, _timed(device, dtype, lambda: patched_unet(x, t, ctx).sample), row),
        {"diffusers": _timed(device, dtype, lambda: unet(x, t, ctx).sample)},
        extra={"flops": _count_flops(lambda: diffusers.UNet2DConditionModel(**UNET_CONFIG), (x, t, ctx)),
               "peak_gflops": peak, "row": row, "rounds": rounds},
    )

    vae = diffusers.AutoencoderKL(**VAE_CONFIG).eval().to(device, dtype)
    z = torch.randn(1, 4, hw, hw, generator=g).to(device, dtype)
    vrow: dict = {"gemm_peak_gflops": peak}
    patched_vae = _twin(vae)
    vae_case = Case(
        "drop_in", "vae decode patched", {"model": "vae sd", "shape": f"1x4x{hw}x{hw} -> {8 * hw}px", "dtype": dname},
        _Patched(patched_vae, _timed(device, dtype, lambda: patched_vae.decode(z).sample), vrow),
        {"diffusers": _timed(device, dtype, lambda: vae.decode(z).sample)},
        extra={"peak_gflops": peak, "row": vrow, "rounds": rounds},
    )
    return [unet_case, vae_case]
