"""A diffusers ``StableDiffusionPipeline`` (patched by ``fastgen.patch`` or not) seen through the sampling
interface of :class:`~fastgen.pipelines.LatentDiffusionPipeline`, so the batch sampler serves both: prompts
through the pipeline's own ``encode_prompt``, its U-Net, scheduler and VAE as they are (with their LoRAs)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .geometry import LatentGeometry


class DiffusersAdapter(LatentGeometry):
    conditioning = "prompt"
    class_names: list = []
    default_num_inference_steps = 50  # StableDiffusionPipeline's defaults
    default_guidance_scale = 7.5

    def __init__(self, pipe):
        missing = [a for a in ("unet", "vae", "scheduler", "encode_prompt") if not hasattr(pipe, a)]
        if missing:
            raise TypeError(f"BatchSampler takes a fastgen LatentDiffusionPipeline or a diffusers text-to-image "
                            f"pipeline with unet, vae, scheduler and encode_prompt; {type(pipe).__name__} lacks "
                            f"{', '.join(missing)}")
        self.pipe = pipe

    unet = property(lambda self: self.pipe.unet)
    vae = property(lambda self: self.pipe.vae)
    scheduler = property(lambda self: self.pipe.scheduler)
    device = property(lambda self: self.pipe.unet.device)
    dtype = property(lambda self: self.pipe.unet.dtype)

    def torch_modules(self) -> dict:
        return {k: getattr(self.pipe, k) for k in ("unet", "vae", "text_encoder")
                if isinstance(getattr(self.pipe, k, None), torch.nn.Module)}

    @property
    def vae_scale_factor(self) -> int:
        return int(getattr(self.pipe, "vae_scale_factor", 2 ** (len(self.vae.config.block_out_channels) - 1)))

    def resolve_condition(self, prompt: Optional[str] = None, class_label=None):
        if class_label is not None:
            raise ValueError(f"a {type(self.pipe).__name__} is conditioned on prompts: send a prompt, not a class_label")
        if prompt is None:
            raise ValueError(f"a {type(self.pipe).__name__} needs a prompt")
        return prompt

    @torch.no_grad()
    def encode_conditions(self, conditions: Sequence, negative_prompt=None) -> tuple[Tensor, Tensor]:
        cond, uncond = self.pipe.encode_prompt(list(conditions), self.device, 1, True, negative_prompt)
        return cond, uncond

    def decode(self, latents: Tensor) -> Tensor:
        return self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor, return_dict=False)[0]
