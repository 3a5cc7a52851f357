"""CUDA graphs of the whole denoising loop, one per shape, and what invalidates them.

A graph records kernel launches with their argument pointers and the Python-side decisions taken while it
was captured; replaying it re-runs those kernels on whatever the recorded memory holds. So:

* **Still valid** after a weight changes *in place* (LoRA ``fuse_lora`` / ``unfuse_lora`` adding into the
  weight, ``param.data.copy_``, an optimizer step): the graph reads the live memory. (fastgen's CUDA convs keep
  no derived copy of the weights; the CPU's cached Winograd transforms never run under a graph.)
* **Invalid**, detected by :func:`weights_fingerprint` before every replay (all graphs are then dropped and
  the next batch re-captures): a parameter or buffer that moved to new memory (``load_state_dict(assign=True)``,
  ``.to(dtype)``, ``weight.data = w``), and Python state the capture baked in — LoRA scales and active
  adapters (``set_adapters``, unfused LoRA layers' ``scaling``), merged/disabled adapters, attention
  processors (``set_attn_processor``), ``fastgen.patch`` / ``unpatch`` (a rebound ``forward``), train/eval mode.
* **Another graph**: a new (batch bucket, latent shape, text length, steps, guidance, scheduler) key.

Only deterministic schedulers are captured (:func:`~fastgen.pipelines.denoise.is_deterministic`): the
noise a stochastic step draws at capture would be replayed unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
from torch import Tensor

from .denoise import denoise, guided, unet_timesteps

# Per-module Python state that changes what the captured kernels compute (peft's LoRA layers keep these).
_ADAPTER_ATTRS = ("scaling", "_active_adapter", "merged_adapters", "_disable_adapters", "processor")


def _state_token(value) -> object:
    if isinstance(value, dict):
        return tuple(sorted((str(k), _state_token(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_state_token(v) for v in value)
    if isinstance(value, (int, float, str, bool, type(None))):
        return value
    return (type(value).__qualname__, id(value))


def weights_fingerprint(modules: Iterable[torch.nn.Module]) -> tuple:
    """Where every parameter and buffer lives and the Python state a captured graph depends on."""
    parts = []
    for root in modules:
        for t in list(root.parameters()) + list(root.buffers()):
            parts.append((t.data_ptr(), t.dtype, tuple(t.shape), t.device))
        for m in root.modules():
            forward = m.__dict__.get("forward")
            state = [m.training, id(getattr(forward, "__func__", forward)) if forward is not None else None]
            state += [_state_token(m.__dict__[a]) for a in _ADAPTER_ATTRS if a in m.__dict__]
            parts.append(tuple(state))
    return tuple(parts)


def scheduler_key(scheduler) -> str:
    """The scheduler's class and config as one hashable value (configs hold lists: ``trained_betas``, diffusers'
    ``_use_default_values``)."""
    return type(scheduler).__name__ + json.dumps(dict(scheduler.config), sort_keys=True, default=str)


@dataclass
class CapturedLoop:
    """One captured loop: copy inputs into ``latents`` / ``cond`` / ``uncond``, ``graph.replay()``, read ``out``."""

    graph: "torch.cuda.CUDAGraph"
    latents: Tensor
    cond: Tensor
    uncond: Optional[Tensor]
    out: Tensor
    keep: list = field(default_factory=list)  # tensors the graph reads that nothing else holds (timesteps)


def _pad_into(static: Tensor, rows: Tensor) -> None:
    # rows beyond the batch repeat its first row: real values, no NaN/inf risk, results discarded
    n = rows.shape[0]
    static[:n].copy_(rows)
    if n < static.shape[0]:
        static[n:].copy_(rows[:1].expand(static.shape[0] - n, *rows.shape[1:]))


def capture_loop(unet, scheduler, latents: Tensor, cond: Tensor, uncond: Optional[Tensor], guidance_scale: float,
                 steps: int, bucket: int) -> CapturedLoop:
    """Warm the loop up on a side stream (Triton compiles, cuDNN picks algorithms, the allocator settles), then
    capture it for a batch of ``bucket`` rows."""
    device = latents.device
    static_latents = torch.empty((bucket,) + tuple(latents.shape[1:]), device=device, dtype=latents.dtype)
    static_cond = torch.empty((bucket,) + tuple(cond.shape[1:]), device=device, dtype=cond.dtype)
    static_uncond = None if uncond is None else torch.empty_like(static_cond)
    _pad_into(static_latents, latents)
    _pad_into(static_cond, cond)
    if uncond is not None:
        _pad_into(static_uncond, uncond)
    rows = bucket * (2 if guided(guidance_scale, uncond is not None) else 1)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        scheduler.set_timesteps(steps)
        denoise(unet, scheduler, static_latents, static_cond, static_uncond, guidance_scale)
    torch.cuda.current_stream(device).wait_stream(side)
    scheduler.set_timesteps(steps)  # the multistep history starts empty again for the captured run
    timesteps = unet_timesteps(scheduler, rows, device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = denoise(unet, scheduler, static_latents, static_cond, static_uncond, guidance_scale,
                      model_timesteps=timesteps)
    return CapturedLoop(graph, static_latents, static_cond, static_uncond, out, keep=timesteps)


def replay(loop: CapturedLoop, latents: Tensor, cond: Tensor, uncond: Optional[Tensor]) -> Tensor:
    _pad_into(loop.latents, latents)
    _pad_into(loop.cond, cond)
    if uncond is not None and loop.uncond is not None:
        _pad_into(loop.uncond, uncond)
    loop.graph.replay()
    return loop.out[: latents.shape[0]].clone()
