"""fastgen's models: diffusers-compatible U-Nets and the VAE, and classic GANs, built from fastgen's fused blocks."""

from .autoencoder_kl import AutoencoderKL
from .blocks import Attention, GroupNorm
from .conv_vae import ConvVAE
from .gan import DCGANDiscriminator, DCGANGenerator, PatchGANDiscriminator, Pix2PixGenerator
from .unet_2d import UNet2DModel
from .unet_2d_condition import UNet2DConditionModel

__all__ = [
    "Attention",
    "AutoencoderKL",
    "ConvVAE",
    "DCGANDiscriminator",
    "DCGANGenerator",
    "GroupNorm",
    "PatchGANDiscriminator",
    "Pix2PixGenerator",
    "UNet2DConditionModel",
    "UNet2DModel",
]
