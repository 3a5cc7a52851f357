"""The denoising loop every fastgen sampler runs: classifier-free guidance as one batched U-Net call on
``[uncond; cond]`` followed by the scheduler step that combines the two halves in its fused kernel
(``step(..., guidance_scale=g)``), so the guided prediction is never written out on its own.

The loop body only launches device work: timesteps reach the U-Net as device tensors made before the loop, and
the schedulers read their coefficients from Python-float tables. That is what lets the batch sampler capture
the whole loop as one CUDA graph (docs/design.md, "Serving")."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..schedulers.noise import make_generators

# Schedulers whose steps draw no noise (with their default step arguments): a CUDA graph of the loop replays
# the same computation, where a stochastic step would replay the noise drawn at capture.
DETERMINISTIC = ("DDIMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler", "HeunDiscreteScheduler")


def is_deterministic(scheduler) -> bool:
    name = type(scheduler).__name__
    if name not in DETERMINISTIC:
        return False
    return getattr(scheduler.config, "algorithm_type", "dpmsolver++") != "sde-dpmsolver++"


def fuses_guidance(scheduler) -> bool:
    """fastgen's schedulers take ``guidance_scale=`` and combine the halves in the step kernel; diffusers' do not."""
    return type(scheduler).__module__.startswith("fastgen.")


def guided(guidance_scale: float, has_uncond: bool) -> bool:
    """diffusers' rule: guidance runs for a scale above 1 on a conditional model."""
    return has_uncond and guidance_scale > 1.0


def unet_timesteps(scheduler, batch: int, device: torch.device) -> list[Tensor]:
    """One ``(batch,)`` timestep tensor per step on ``device`` (after ``set_timesteps``)."""
    ts = scheduler.timesteps
    dtype = ts.dtype if ts.is_floating_point() else torch.long
    return [torch.full((batch,), t.item(), dtype=dtype, device=device) for t in ts]


def denoise(unet, scheduler, latents: Tensor, cond: Tensor, uncond: Optional[Tensor], guidance_scale: float, *,
            generator=None, model_timesteps: Optional[list] = None) -> Tensor:
    """Run every step of ``scheduler`` (``set_timesteps`` already called) from ``latents`` (unscaled
    N(0, 1) noise) and return the final latents. ``cond`` / ``uncond``: the U-Net's
    ``encoder_hidden_states`` for the batch; ``uncond`` None (or a scale <= 1) runs without guidance."""
    use_cfg = guided(guidance_scale, uncond is not None)
    hidden = torch.cat([uncond, cond]) if use_cfg else cond
    rows = latents.shape[0] * (2 if use_cfg else 1)
    if model_timesteps is None:
        model_timesteps = unet_timesteps(scheduler, rows, latents.device)
    x = latents * scheduler.init_noise_sigma
    fused = fuses_guidance(scheduler)
    step_kwargs = {"guidance_scale": guidance_scale} if use_cfg and fused else {}
    if generator is not None and not is_deterministic(scheduler):  # (Heun's step takes no generator)
        if not fused and isinstance(generator, (list, tuple)) and generator and isinstance(generator[0], int):
            # diffusers' schedulers take generators, not seeds: the same per-seed step-noise streams
            generator = make_generators(list(generator), stream=1)
        step_kwargs["generator"] = generator
    for t, t_model in zip(scheduler.timesteps, model_timesteps):
        inp = torch.cat([x, x]) if use_cfg else x
        inp = scheduler.scale_model_input(inp, t)
        eps = unet(inp, t_model, encoder_hidden_states=hidden).sample
        if use_cfg and not fused:
            e_uncond, e_cond = eps.chunk(2)
            eps = e_uncond + guidance_scale * (e_cond - e_uncond)
        x = scheduler.step(eps, t, x, **step_kwargs).prev_sample
    return x
