"""Image size <-> latent shape, and the initial noise, for any pipeline with a ``unet`` (``config.sample_size``,
``config.in_channels``), a ``device`` and a ``vae_scale_factor``."""

from __future__ import annotations

import torch
from torch import Tensor

from ..schedulers.noise import randn_tensor


class LatentGeometry:
    vae_scale_factor: int

    def default_size(self) -> tuple[int, int]:
        """(height, width) of the images the U-Net was built for."""
        side = self.unet.config.sample_size * self.vae_scale_factor
        return side, side

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.vae_scale_factor
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of {f} (the VAE's downsampling), "
                             f"got {height}x{width}")
        return self.unet.config.in_channels, height // f, width // f

    def initial_latents(self, n: int, height: int, width: int, generator=None) -> Tensor:
        """(n, C, h, w) N(0, 1) noise: a list of seeds or generators gives one per image (image i the same in
        any batch), one generator draws the batch in one go as diffusers does."""
        shape = (n,) + self.latent_shape(height, width)
        return randn_tensor(shape, generator, device=self.device, dtype=torch.float32)
