"""Pipelines built offline, for the drop-in tests and ``fastgen bench e2e``: nothing is downloaded.

* :func:`clip_tokenizer`: a CLIP tokenizer over a character vocabulary written here (every lowercase letter and
  digit, alone and word-final), with CLIP's special tokens and 77-token padding; BPE merges are not needed for
  the prompts a benchmark or a test sends.
* :func:`sd15_components`: the SD1.5 architecture with random weights — diffusers' default
  ``UNet2DConditionModel`` config with ``cross_attention_dim=768``, the SD VAE, and a CLIP text encoder of
  SD1.5's width (``CLIPTextConfig`` with 768 hidden, 3072 intermediate, 12 heads and 12 layers: the default
  config is 512 wide, which a 768-wide cross-attention cannot take).

Weights are drawn from a seeded generator, so two processes building the same components get the same
tensors (the e2e benchmark compares images across processes).
"""

from __future__ import annotations

import string
from typing import Optional

import torch

from .models import UNET_CONFIG, VAE_CONFIG

# The U-Net and VAE configs of `fastgen bench models`: SD1.5's.
SD15_UNET, SD_VAE = UNET_CONFIG, VAE_CONFIG
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                 projection_dim=768)


def clip_vocab() -> dict:
    chars = string.ascii_lowercase + string.digits
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in chars:
            vocab[c + suffix] = len(vocab)
    return vocab


def clip_tokenizer(max_length: int = 77):
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=clip_vocab(), merges=[], model_max_length=max_length)


def sd15_components(*, seed: int = 0, unet: Optional[dict] = None, vae: Optional[dict] = None,
                    text: Optional[dict] = None, scheduler: str = "DPMSolverMultistepScheduler") -> dict:
    """The components of a ``StableDiffusionPipeline`` (``safety_checker=None``), weights from ``seed``."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    text_config = CLIPTextConfig(**(SD15_TEXT if text is None else text))
    components = dict(
        unet=diffusers.UNet2DConditionModel(**(SD15_UNET if unet is None else unet)).eval(),
        vae=diffusers.AutoencoderKL(**(SD_VAE if vae is None else vae)).eval(),
        text_encoder=CLIPTextModel(text_config).eval(),
        tokenizer=clip_tokenizer(text_config.max_position_embeddings),
        scheduler=getattr(diffusers, scheduler)(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return components


def sd15_pipeline(**kwargs):
    import diffusers

    pipe = diffusers.StableDiffusionPipeline(**sd15_components(**kwargs))
    pipe.set_progress_bar_config(disable=True)
    return pipe


# A small latent-diffusion model of fastgen's own (random weights): what `fastgen bench serve` serves and the
# pipeline / sampler tests run. 32x32 RGB images through a 2-level VAE to 3x16x16 latents.
TINY_UNET = dict(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                 attention_head_dim=8, norm_num_groups=8)
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=3, block_out_channels=(16, 32),
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                layers_per_block=1, norm_num_groups=8, sample_size=32)
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                 max_position_embeddings=16, projection_dim=32)
TINY_CLASSES = [str(d) for d in range(10)]


def tiny_latent_pipeline(conditioning: str = "prompt", *, seed: int = 0, scheduler: str = "DPMSolverMultistepScheduler",
                         unet: Optional[dict] = None):
    """A fastgen ``LatentDiffusionPipeline`` with random weights from ``seed``: ``conditioning`` "prompt" (a tiny
    CLIP text encoder over :func:`clip_tokenizer`), "class" (ten class tokens, named "0".."9") or "none"."""
    from .. import schedulers
    from ..models import AutoencoderKL, UNet2DConditionModel
    from ..pipelines import LatentDiffusionPipeline
    from ..train.conditioning import TokenTable

    torch.manual_seed(seed)
    unet_model = UNet2DConditionModel(**(TINY_UNET if unet is None else unet))
    vae = AutoencoderKL(**TINY_VAE)
    sched = getattr(schedulers, scheduler)(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    dim = unet_model.config.cross_attention_dim
    text = {}
    if conditioning == "prompt":
        from transformers import CLIPTextConfig, CLIPTextModel

        config = CLIPTextConfig(**dict(TINY_TEXT, hidden_size=dim, projection_dim=dim))
        text = dict(text_encoder=CLIPTextModel(config), tokenizer=clip_tokenizer(config.max_position_embeddings))
    elif conditioning in ("class", "none"):
        text = dict(condition_tokens=TokenTable(len(TINY_CLASSES) if conditioning == "class" else 0, dim))
    else:
        raise ValueError(f"conditioning must be prompt, class or none; got {conditioning!r}")
    names = TINY_CLASSES if conditioning == "class" else []
    return LatentDiffusionPipeline(unet_model, sched, vae, **text, class_names=names, default_num_inference_steps=8,
                                   default_guidance_scale=4.0)
