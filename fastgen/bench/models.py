"""Whole models: the SD1.5 U-Net forward at CFG batch 2 and an SD VAE decode, fastgen against diffusers eager,
``torch.compile`` of the diffusers model and OpenVINO (where installed), in the same run.

Shapes (the issue's): U-Net with diffusers' default config and ``cross_attention_dim=768`` (SD1.5), latent
2x4x64x64, 77 text tokens, timestep 500; VAE with the SD config (``block_out_channels=(128, 256, 512, 512)``,
four down/up blocks, ``layers_per_block=2``) decoding 1x4x64x64 to 512x512. Random weights (diffusers' init),
shared: the fastgen model is loaded from the diffusers model's tensors with ``assign=True``, so both run the
very same weights and the run needs one copy of them.

Each row also gives the model's FLOP count (torch's FlopCounterMode on the diffusers model, on the meta
device) and every time as a fraction of this machine's GEMM peak in the row's dtype, measured in the same run
with a large matmul: on a CPU a ratio alone hides how far from the hardware both sides are.

``torch.compile`` (inductor, default mode) is timed after its compile; the compile time is a column of its
own. bf16 autocast rows run only on a CPU with native bf16 (:func:`cpu_has_native_bf16`). OpenVINO converts the diffusers model once (``openvino.convert_model``) and runs the compiled CPU model in
the row's precision (``INFERENCE_PRECISION_HINT`` f32 or bf16). ``--quick`` runs a 2x4x32x32 latent in fp32
without the compile and OpenVINO baselines.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Optional

import torch

from ._runner import Case

UNET_CONFIG = dict(cross_attention_dim=768)  # everything else: diffusers' defaults, which are SD1.5's
VAE_CONFIG = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=4,
    sample_size=512,
)


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 GEMMs natively here (AVX512_BF16 / AMX); without it (AVX2) a bf16 matmul runs at
    about 1 GFLOP/s, ~140x slower than fp32, and a bf16-autocast SD1.5 U-Net forward would take half an hour."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# Each timed call is seconds; the best of ROUNDS interleaved calls (fastgen._runner.time_interleaved_ms).
ROUNDS = 4


def _skip_compile() -> bool:
    """FASTGEN_BENCH_NO_COMPILE=1 leaves the torch.compile baseline out: compiling the SD1.5 U-Net takes minutes,
    more than the GPU check's time box (benchmarks/gpu_check.sh) has for this suite."""
    return os.environ.get("FASTGEN_BENCH_NO_COMPILE", "0") not in ("", "0")


def _dtypes(device: torch.device, quick: bool) -> list[torch.dtype]:
    if device.type == "cuda":
        return [torch.float16]
    if quick or not cpu_has_native_bf16():
        return [torch.float32]
    return [torch.float32, torch.bfloat16]


def gemm_peak_gflops(device: torch.device, dtype: torch.dtype, n: Optional[int] = None, repeat: int = 3) -> float:
    """The best of a few n x n x n matmuls, in GFLOP/s: what this machine's BLAS reaches in ``dtype``.

    On a CPU without native bf16 (AVX2) a bf16 matmul runs an order of magnitude slower than fp32, so it is
    measured at n=1024 there to keep the measurement to seconds."""
    if n is None:
        n = 4096 if device.type == "cuda" else (1024 if dtype != torch.float32 else 2048)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = float("inf")
    for _ in range(repeat + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def _count_flops(build, args) -> Optional[int]:
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with torch.device("meta"):
            model = build()
            meta_args = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(*meta_args)
        return int(counter.get_total_flops())
    except Exception:  # a FLOP count is a nicety; never fail a benchmark for it
        return None


@functools.lru_cache(maxsize=None)
def _shared_pair(class_name: str, device_type: str):
    """(diffusers model, fastgen model) of one class over the very same weight tensors (``assign=True``)."""
    import diffusers

    from .. import models

    config = UNET_CONFIG if class_name == "UNet2DConditionModel" else VAE_CONFIG
    torch.manual_seed(0)
    ref = getattr(diffusers, class_name)(**config).eval().to(device_type)
    with torch.device("meta"):
        ours = getattr(models, class_name)(**config)
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    return ref, ours.eval()


def _unet_pair(device_type: str):
    return _shared_pair("UNet2DConditionModel", device_type)


def _vae_pair(device_type: str):
    ref, ours = _shared_pair("AutoencoderKL", device_type)
    ours.disable_tiling()  # a 512x512 decode, untiled in both
    return ref, ours


class _Lazy:
    """A baseline that pays a one-off cost (compile, conversion) in its first call, recorded in ``row``."""

    def __init__(self, make, row: dict, key: str):
        self.make, self.row, self.key, self.fn = make, row, key, None

    def __call__(self):
        if self.fn is None:
            t0 = time.perf_counter()
            self.fn = self.make()
            self.fn()  # compiles / converts and runs once
            self.row[self.key] = time.perf_counter() - t0
        return self.fn()


def _openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def _openvino_runner(model, example: tuple, dtype: torch.dtype):
    import openvino as ov

    with torch.no_grad():
        converted = ov.convert_model(model, example_input=example)
    hint = "bf16" if dtype == torch.bfloat16 else "f32"
    compiled = ov.Core().compile_model(converted, "CPU", {"INFERENCE_PRECISION_HINT": hint})
    request = compiled.create_infer_request()
    inputs = [a.numpy() for a in example]
    return lambda: request.infer(inputs)


def diffusers_available(suite: str) -> bool:
    """Whether diffusers (the baseline, and the source of the random weights) imports; says so when not."""
    try:
        import diffusers  # noqa: F401
    except ImportError:
        import sys

        print(f"fastgen bench {suite}: skipped, diffusers is not installed (pip install 'fastgen[bench]')",
              file=sys.stderr)
        return False
    return True


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    if not diffusers_available("models"):
        return []
    out = []
    hw = 32 if quick else 64
    for dtype in _dtypes(device, quick):
        peak = gemm_peak_gflops(device, dtype)
        out.append(_unet_case(device, dtype, hw, quick, peak))
        out.append(_vae_case(device, dtype, hw, quick, peak))
    return out


def _autocast(device: torch.device, dtype: torch.dtype):
    if device.type == "cpu" and dtype == torch.bfloat16:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def _timed(device, dtype, fn):
    def run():
        with torch.no_grad(), _autocast(device, dtype):
            return fn()

    return run


def _unet_case(device, dtype, hw, quick, peak) -> Case:
    import diffusers

    ref, ours = _unet_pair(device.type)
    if device.type == "cuda":
        ref, ours = ref.half(), ours.half()
    wdtype = torch.float16 if device.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, hw, hw, generator=g).to(device, wdtype)
    ctx = torch.randn(2, 77, 768, generator=g).to(device, wdtype)
    t = torch.tensor([500, 500], device=device)
    flops = _count_flops(lambda: diffusers.UNet2DConditionModel(**UNET_CONFIG), (x, t, ctx))
    row: dict = {"gemm_peak_gflops": peak}
    baselines = {"diffusers": _timed(device, dtype, lambda: ref(x, t, ctx).sample)}
    if not quick and not _skip_compile():
        compiled = _Lazy(lambda: _timed(device, dtype, functools.partial(torch.compile(ref), x, t, ctx)), row,
                         "diffusers_compile_s")
        baselines["diffusers_compiled"] = compiled
        if device.type == "cpu" and _openvino_available():
            baselines["openvino"] = _Lazy(
                lambda: _openvino_runner(_UNetForExport(ref), (x, t, ctx), dtype), row, "openvino_convert_s"
            )
    params = {"model": "unet sd1.5", "shape": f"2x4x{hw}x{hw} + 2x77x768", "dtype": _dtype_name(device, dtype)}
    return Case("models", "unet forward", params, _timed(device, dtype, lambda: ours(x, t, ctx).sample), baselines,
                extra={"flops": flops, "peak_gflops": peak, "row": row, "rounds": 2 if quick else ROUNDS})


def _vae_case(device, dtype, hw, quick, peak) -> Case:
    import diffusers

    ref, ours = _vae_pair(device.type)
    if device.type == "cuda":
        ref, ours = ref.half(), ours.half()
    wdtype = torch.float16 if device.type == "cuda" else torch.float32
    z = torch.randn(1, 4, hw, hw, generator=torch.Generator().manual_seed(0)).to(device, wdtype)
    flops = _count_flops(lambda: _DecodeOnly(diffusers.AutoencoderKL(**VAE_CONFIG)), (z,))
    row: dict = {"gemm_peak_gflops": peak}
    baselines = {"diffusers": _timed(device, dtype, lambda: ref.decode(z).sample)}
    if not quick:
        decode_only = _DecodeOnly(ref)
        if not _skip_compile():
            baselines["diffusers_compiled"] = _Lazy(
                lambda: _timed(device, dtype, functools.partial(torch.compile(decode_only), z)), row,
                "diffusers_compile_s")
        if device.type == "cpu" and _openvino_available():
            baselines["openvino"] = _Lazy(lambda: _openvino_runner(decode_only, (z,), dtype), row, "openvino_convert_s")
    params = {"model": "vae sd", "shape": f"1x4x{hw}x{hw} -> {8 * hw}px", "dtype": _dtype_name(device, dtype)}
    return Case("models", "vae decode", params, _timed(device, dtype, lambda: ours.decode(z).sample), baselines,
                extra={"flops": flops, "peak_gflops": peak, "row": row, "rounds": 2 if quick else ROUNDS})


def _dtype_name(device, dtype) -> str:
    if device.type == "cpu" and dtype == torch.bfloat16:
        return "bf16 autocast"
    return str(dtype).replace("torch.", "")


class _DecodeOnly(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, z):
        return self.vae.decode(z).sample


class _UNetForExport(torch.nn.Module):
    """(sample, timestep, encoder_hidden_states) -> tensor: the plain signature exporters trace."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]
