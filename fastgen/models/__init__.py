"""fastgen's models: diffusers-compatible U-Nets and the VAE, built from fastgen's fused blocks."""

from .autoencoder_kl import AutoencoderKL
from .blocks import Attention, GroupNorm
from .unet_2d import UNet2DModel
from .unet_2d_condition import UNet2DConditionModel

__all__ = ["Attention", "AutoencoderKL", "GroupNorm", "UNet2DConditionModel", "UNet2DModel"]
