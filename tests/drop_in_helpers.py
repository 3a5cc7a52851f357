"""Tiny diffusers pipelines and models for the drop-in (``fastgen.patch``) tests, built offline."""

from __future__ import annotations

import copy

import numpy as np
import torch

from model_helpers import perturbed

# SD1.x-style U-Net with head dims 40 (a fastgen kernel) and 16 (SDPA) so both attention paths run.
UNET = dict(
    block_out_channels=(80, 96), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=(2, 6), sample_size=8,
)
VAE = dict(
    block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8, latent_channels=4,
    sample_size=32,
)
TEXT = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, projection_dim=32)
CONTROLNET = dict(
    block_out_channels=(80, 96), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), attention_head_dim=(2, 6),
    conditioning_embedding_out_channels=(16, 32),
)
SDXL_UNET = dict(
    block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=64,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
    addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
    sample_size=8,
)

PROMPT = "a photo of a cat"


def perturb_all(components: dict, seed: int = 0) -> dict:
    for i, value in enumerate(components.values()):
        if isinstance(value, torch.nn.Module):
            perturbed(value, seed + i)
    return components


def sd_components(seed: int = 0, scheduler: str = "DPMSolverMultistepScheduler", **scheduler_kwargs) -> dict:
    import diffusers

    from fastgen.bench.offline import sd15_components

    components = sd15_components(seed=seed, unet=UNET, vae=VAE, text=TEXT, scheduler=scheduler)
    if scheduler_kwargs:
        components["scheduler"] = getattr(diffusers, scheduler).from_config(
            components["scheduler"].config, **scheduler_kwargs)
    return perturb_all(components, seed)


def sd_pipeline(cls_name: str = "StableDiffusionPipeline", **kwargs):
    import diffusers

    pipe = getattr(diffusers, cls_name)(**sd_components(**kwargs))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl_pipeline(seed: int = 0):
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from fastgen.bench.offline import clip_tokenizer

    torch.manual_seed(seed)
    components = dict(
        unet=diffusers.UNet2DConditionModel(**SDXL_UNET),
        vae=diffusers.AutoencoderKL(**VAE),
        text_encoder=CLIPTextModel(CLIPTextConfig(**TEXT)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**TEXT)),
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(),
        scheduler=diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                   beta_end=0.012, steps_offset=1, timestep_spacing="leading"),
    )
    pipe = diffusers.StableDiffusionXLPipeline(**perturb_all(components, seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, steps: int = 3, seed: int = 0, **kwargs) -> np.ndarray:
    kwargs.setdefault("prompt", PROMPT)
    kwargs.setdefault("output_type", "np")
    out = pipe(num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), **kwargs)
    return out.images


def twin(pipe):
    """An independent copy of a pipeline (same weights), so patched and unpatched run side by side."""
    return copy.deepcopy(pipe)


def assert_images_close(a, b, what: str = "", tol: float = 1e-4) -> None:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, f"{what}: shape {a.shape} != {b.shape}"
    err = float(np.abs(a - b).max())
    # Images in [0, 1]: the fp32 rule (1e-4 of the output's scale) with scale 1.
    assert err <= tol, f"{what}: max pixel diff {err:.3g} > {tol}"
    assert float(np.abs(a).max()) > 0, f"{what}: an all-black image proves nothing"
