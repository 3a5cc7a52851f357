"""One training step of the SD1.5 U-Net: fastgen's ``UNet2DConditionModel`` against diffusers' with the same
config and the same weights, in the same run.

Shapes (SD1.5 fine-tuning at 512x512, batch 1): diffusers' default ``UNet2DConditionModel`` config with
``cross_attention_dim=768, sample_size=64`` (~860M parameters), noisy latent 1x4x64x64, text states 1x77x768,
timestep ``tensor([500])``. Random weights (diffusers' init, seeded); fastgen's model gets a copy of them
(``load_state_dict(strict=True)``: the keys match). Both models are in train mode.

A timed step is what a training loop runs per batch apart from the optimizer:

    [every parameter's version counter bumped]  # what optimizer.step()'s in-place update does to them
    forward (under torch.autocast(<device>, bfloat16) in the bf16 rows), loss = MSE(out.sample.float(), noise)
    loss.backward()
    zero_grad(set_to_none=True)                 # the next step's zero_grad, run at the end of this one

The optimizer step itself is left out: it is the same torch code for both models, and AdamW's state for 860M
parameters (two fp32 moments, 6.9 GB) would not fit beside two models and their gradients in the 24 GiB of
the project's CPU machine. Its one effect that is not the same for both is kept: an optimizer updates the
weights in place, which invalidates the weight transforms fastgen's CPU conv2d caches on the weight tensors
(``fastgen.ops.conv2d._packed_weight`` keys them on the version counter), so each timed step bumps every
parameter's version counter (``torch.autograd.graph.increment_version``, no data touched) and fastgen repacks
its Winograd weights inside the step, as it would in real training. Freeing the gradients at the end of each
step keeps one model's gradients in memory at a time while the two are timed in turn.

Timing: the first call of each (conv algorithm choice, allocator growth) is an untimed warm-up, then the best
of ``ROUNDS`` interleaved calls (:func:`fastgen.bench._runner.time_interleaved_ms`). Each row has the step's
FLOP count (forward + backward, torch's FlopCounterMode on the meta device), the fraction of this machine's
GEMM peak, and ``peak_rss_gib`` (the process's max RSS; on CUDA ``peak_cuda_gib``, max allocated).

Dtypes: fp32 and bf16 autocast; the bf16 rows run on CUDA and on CPUs with native bf16 (AVX512_BF16 / AMX)
only: on an AVX2 CPU oneDNN's bf16 GEMM/conv runs at ~1 GFLOP/s (one 320-channel 3x3 conv at 64x64 took 31 s
against 0.14 s in fp32), so one bf16 step of the SD1.5 U-Net would take hours, and even the tiny U-Net's
takes ~6 s (``tests/test_bench_train.py`` still checks its bf16 losses and gradients there).

``--quick``: a tiny U-Net (``block_out_channels=(32, 64)``, one cross-attention block down and up, one head,
``cross_attention_dim=32``), 1x4x16x16 latent, 1x77x32 text states, best of 3: seconds.
"""

from __future__ import annotations

import functools
import resource
import sys
from typing import Optional

import torch
import torch.nn.functional as F

from ._runner import Case
from .models import cpu_has_native_bf16, diffusers_available, gemm_peak_gflops

# diffusers' defaults, which are SD1.5's, with SD1.5's text width and latent size
UNET_CONFIG = dict(cross_attention_dim=768, sample_size=64)
TINY_CONFIG = dict(
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=1,  # one head of 32 channels (8 heads of 4 have no fastgen attention kernel)
    sample_size=16,
)
TIMESTEP = 500
TOKENS = 77
# Each full-size call is tens of seconds on a 2-core CPU: best of ROUNDS interleaved calls after the warm-up.
ROUNDS = 3
QUICK_ROUNDS = 3
# Bump every parameter's version counter at the start of each step, as an optimizer's in-place update does
# (fastgen then re-transforms its Winograd conv weights inside the step, as in real training). False: the
# weights' cached transforms are reused from step to step (a forward+backward with frozen weights).
UPDATE_WEIGHTS = True


def dtypes(device: torch.device) -> list[torch.dtype]:
    if device.type == "cuda" or cpu_has_native_bf16():
        return [torch.float32, torch.bfloat16]
    print("fastgen bench train: bf16 autocast rows skipped: this CPU has no native bf16 (AVX512_BF16 / AMX), "
          "and without it a bf16 step of the SD1.5 U-Net takes hours (of the tiny --quick one, seconds)",
          file=sys.stderr)
    return [torch.float32]


def build_pair(config: dict, device: torch.device, seed: int = 0):
    """(diffusers model, fastgen model) in train mode, fastgen's holding a copy of diffusers' random weights."""
    import diffusers

    from .. import models

    torch.manual_seed(seed)
    ref = diffusers.UNet2DConditionModel(**config).to(device).train()
    ours = models.UNet2DConditionModel(**config)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours.to(device).train()


def make_batch(config: dict, device: torch.device, seed: int = 0) -> dict:
    """x_t, t, encoder_hidden_states and the noise target, batch 1."""
    hw = config["sample_size"]
    g = torch.Generator().manual_seed(seed)
    return dict(
        x=torch.randn(1, 4, hw, hw, generator=g).to(device),
        t=torch.tensor([TIMESTEP], device=device),
        ehs=torch.randn(1, TOKENS, config["cross_attention_dim"], generator=g).to(device),
        noise=torch.randn(1, 4, hw, hw, generator=g).to(device),
    )


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def train_step(model: torch.nn.Module, batch: dict, device: torch.device, dtype: torch.dtype,
               free_grads: bool = True, update_weights: Optional[bool] = None) -> torch.Tensor:
    """One step without the optimizer (see the module docstring); returns the loss. ``free_grads=False``
    keeps the gradients in ``.grad`` (for comparing them); ``update_weights`` (default
    :data:`UPDATE_WEIGHTS`) bumps the parameters' version counters first."""
    if UPDATE_WEIGHTS if update_weights is None else update_weights:
        for p in model.parameters():  # what an optimizer's in-place update does to the version counters
            if p.requires_grad:
                torch.autograd.graph.increment_version(p)
    with autocast(device, dtype):
        out = model(batch["x"], batch["t"], batch["ehs"]).sample
    loss = F.mse_loss(out.float(), batch["noise"])
    loss.backward()
    if free_grads:
        model.zero_grad(set_to_none=True)
    return loss.detach()


def count_step_flops(config: dict) -> Optional[int]:
    """Forward + backward FLOPs of one step (diffusers' model on the meta device)."""
    import diffusers
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with torch.device("meta"):
            model = diffusers.UNet2DConditionModel(**config)
            batch = make_batch_meta(config)
        with FlopCounterMode(display=False) as counter:
            F.mse_loss(model(batch["x"], batch["t"], batch["ehs"]).sample, batch["noise"]).backward()
        return int(counter.get_total_flops())
    except Exception:  # a FLOP count is a nicety; never fail a benchmark for it
        return None


def make_batch_meta(config: dict) -> dict:
    hw = config["sample_size"]
    return dict(x=torch.empty(1, 4, hw, hw), t=torch.tensor([TIMESTEP]),
                ehs=torch.empty(1, TOKENS, config["cross_attention_dim"]), noise=torch.empty(1, 4, hw, hw))


def _peak_memory(device: torch.device, row: dict) -> None:
    if device.type == "cuda":
        row["peak_cuda_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        row["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class _Step:
    """A timed step of one model; records the process's peak memory into ``row`` after each call."""

    def __init__(self, model, batch, device, dtype, row):
        self.model, self.batch, self.device, self.dtype, self.row = model, batch, device, dtype, row

    def __call__(self):
        loss = train_step(self.model, self.batch, self.device, self.dtype)
        _peak_memory(self.device, self.row)
        return loss


@functools.lru_cache(maxsize=None)
def _pair(quick: bool, device_type: str):
    return build_pair(TINY_CONFIG if quick else UNET_CONFIG, torch.device(device_type))


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    if not diffusers_available("train"):
        return []
    config = TINY_CONFIG if quick else UNET_CONFIG
    ref, ours = _pair(quick, device.type)
    batch = make_batch(config, device)
    flops = count_step_flops(config)
    hw = config["sample_size"]
    shape = f"1x4x{hw}x{hw} + 1x{TOKENS}x{config['cross_attention_dim']}"
    model_name = "unet tiny" if quick else "unet sd1.5"
    out = []
    for dtype in dtypes(device):
        # a bf16 GEMM on a CPU without native bf16 is ~100x slower: a small matmul measures its peak there
        n = 512 if (device.type == "cpu" and dtype != torch.float32 and not cpu_has_native_bf16()) else None
        peak = gemm_peak_gflops(device, dtype, n=n)
        row: dict = {"gemm_peak_gflops": peak}
        params = {"model": model_name, "shape": shape,
                  "dtype": "float32" if dtype == torch.float32 else "bf16 autocast", "weights_updated": UPDATE_WEIGHTS}
        out.append(Case(
            "train", "unet train step", params,
            _Step(ours, batch, device, dtype, row),
            {"diffusers": _Step(ref, batch, device, dtype, row)},
            extra={"flops": flops, "peak_gflops": peak, "row": row, "rounds": QUICK_ROUNDS if quick else ROUNDS},
        ))
    return out
