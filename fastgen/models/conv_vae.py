"""The classic convolutional VAE with a vector latent (Kingma & Welling 2014, "Auto-Encoding Variational Bayes"):
an encoder to the mean and log-variance of a diagonal Gaussian q(z|x), the reparameterisation
``z = mu + exp(logvar / 2) * eps``, and a decoder back to images in [-1, 1].

Unlike :class:`~fastgen.models.AutoencoderKL` (a latent *map* for latent diffusion), the latent here is one
vector per image, ``latent_dim`` numbers (2 gives the classic 2-D latent map, :func:`fastgen.latent.latent_map`).

The noise ``eps`` is always passed in (:meth:`ConvVAE.reparameterize`, :meth:`ConvVAE.forward`): the model
draws no random numbers, so a trainer decides where they come from (its per-sample random streams).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .._config import register_to_config
from ._modeling import ModelMixin
from .blocks import Conv2d

__all__ = ["ConvVAE", "kl_divergence"]

MIN_SIZE, MAX_SIZE = 8, 128
MAP_SIZE = 4  # the encoder stops, and the decoder starts, at 4x4


def kl_divergence(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, diag(exp(logvar))) || N(0, I)) per sample, in closed form (Kingma & Welling 2014, appendix B):

        KL = -1/2 * sum_j (1 + logvar_j - mu_j^2 - exp(logvar_j))

    summed over every dim but the first; returns (N,), computed in fp32.
    """
    if not isinstance(mu, Tensor) or not isinstance(logvar, Tensor):
        raise TypeError("kl_divergence: mu and logvar must be tensors")
    if mu.shape != logvar.shape or mu.dim() < 1:
        raise ValueError(f"kl_divergence: mu {tuple(mu.shape)} and logvar {tuple(logvar.shape)} must share one "
                         "shape with a leading batch dim")
    mu, logvar = mu.float(), logvar.float()
    return -0.5 * (1.0 + logvar - mu.square() - logvar.exp()).reshape(mu.shape[0], -1).sum(dim=1)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"ConvVAE: {name} must be a positive int, got {value!r}")
    return value


def _widths(image_size: int, base_channels: int) -> list[int]:
    """Channels at image_size, image_size / 2, ..., 4: base, 2 base, 4 base, capped at 8 base."""
    steps = int(math.log2(image_size // MAP_SIZE))
    return [base_channels * min(2 ** i, 8) for i in range(steps + 1)]


class ConvVAE(ModelMixin):
    """A vector-latent convolutional VAE for ``image_size`` x ``image_size`` images (a power of two, 8 to 128).

    Encoder: a 3x3 convolution to ``base_channels``, then stride-2 3x3 convolutions (widths doubling, capped at
    8x) down to 4x4, each followed by SiLU; flattened, two linear heads give ``mu`` and ``logvar``
    (``latent_dim`` each). Decoder: a linear layer to the 4x4 map, then nearest 2x upsampling + 3x3
    convolution + SiLU steps back to ``image_size``, and a 3x3 convolution to ``in_channels`` with tanh.

    * ``encode(x) -> (mu, logvar)``, each (N, latent_dim);
    * ``decode(z) -> images`` (N, in_channels, image_size, image_size) in [-1, 1]; ``decode_logits(z)`` is the
      same before the tanh (``(tanh(h) + 1) / 2 = sigmoid(2 h)``, so ``2 h`` are exact Bernoulli logits of the
      images mapped to [0, 1]: a numerically stable BCE);
    * ``reparameterize(mu, logvar, noise) = mu + exp(logvar / 2) * noise``;
    * ``forward(x, noise=None) -> (recon, mu, logvar)``; ``noise`` None decodes ``mu`` (no sampling);
      ``return_logits=True`` returns ``decode_logits``' output in place of ``recon`` (one forward for a
      trainer's BCE, through a DDP wrapper).
    """

    @register_to_config
    def __init__(self, in_channels: int = 1, image_size: int = 16, latent_dim: int = 16, base_channels: int = 32):
        super().__init__()
        _positive_int("in_channels", in_channels)
        _positive_int("latent_dim", latent_dim)
        _positive_int("base_channels", base_channels)
        if (isinstance(image_size, bool) or not isinstance(image_size, int) or not MIN_SIZE <= image_size <= MAX_SIZE
                or image_size & (image_size - 1)):
            raise ValueError(f"ConvVAE: image_size must be a power of two from {MIN_SIZE} to {MAX_SIZE} "
                             f"(16, 32, 64, ...), got {image_size!r}")
        self.in_channels, self.image_size, self.latent_dim = in_channels, image_size, latent_dim
        widths = _widths(image_size, base_channels)
        self.conv_in = Conv2d(in_channels, widths[0], 3, padding=1)
        self.down = torch.nn.ModuleList(Conv2d(ci, co, 3, stride=2, padding=1) for ci, co in zip(widths, widths[1:]))
        flat = widths[-1] * MAP_SIZE * MAP_SIZE
        self.to_mu = torch.nn.Linear(flat, latent_dim)
        self.to_logvar = torch.nn.Linear(flat, latent_dim)
        self.from_latent = torch.nn.Linear(latent_dim, flat)
        rev = widths[::-1]
        self.up = torch.nn.ModuleList(Conv2d(ci, co, 3, padding=1) for ci, co in zip(rev, rev[1:]))
        self.conv_out = Conv2d(widths[0], in_channels, 3, padding=1)
        self._map_channels = widths[-1]

    # ------------------------------------------------------------------ checks

    def _check_images(self, x) -> None:
        owner = type(self).__name__
        if not isinstance(x, Tensor):
            raise TypeError(f"{owner}: x must be a tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{owner}: x must be (N, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"{owner}: x has {x.shape[1]} channels, the model expects in_channels="
                             f"{self.in_channels} (shape {tuple(x.shape)})")
        s = self.image_size
        if tuple(x.shape[2:]) != (s, s):
            raise ValueError(f"{owner}: x must be {s}x{s} (image_size={s}), got {x.shape[2]}x{x.shape[3]}")

    def _check_latent(self, name: str, z) -> None:
        owner = type(self).__name__
        if not isinstance(z, Tensor):
            raise TypeError(f"{owner}: {name} must be a tensor, got {type(z).__name__}")
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"{owner}: {name} must be (N, {self.latent_dim}) (latent_dim={self.latent_dim}), got "
                             f"shape {tuple(z.shape)}")

    # ------------------------------------------------------------------ the model

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._check_images(x)
        h = F.silu(self.conv_in(x))
        for conv in self.down:
            h = F.silu(conv(h))
        h = h.flatten(1)
        return self.to_mu(h), self.to_logvar(h)

    def decode_logits(self, z: Tensor) -> Tensor:
        self._check_latent("z", z)
        h = F.silu(self.from_latent(z)).view(z.shape[0], self._map_channels, MAP_SIZE, MAP_SIZE)
        for conv in self.up:
            h = F.silu(conv(F.interpolate(h, scale_factor=2.0, mode="nearest")))
        return self.conv_out(h)

    def decode(self, z: Tensor) -> Tensor:
        return torch.tanh(self.decode_logits(z))

    def reparameterize(self, mu: Tensor, logvar: Tensor, noise: Tensor) -> Tensor:
        self._check_latent("mu", mu)
        if not isinstance(logvar, Tensor) or logvar.shape != mu.shape:
            raise ValueError(f"{type(self).__name__}: logvar must have mu's shape {tuple(mu.shape)}, got "
                             f"{tuple(logvar.shape) if isinstance(logvar, Tensor) else type(logvar).__name__}")
        if not isinstance(noise, Tensor) or noise.shape != mu.shape:
            raise ValueError(f"{type(self).__name__}: noise must have mu's shape {tuple(mu.shape)}, got "
                             f"{tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__}")
        return mu + torch.exp(0.5 * logvar) * noise.to(mu.dtype)

    def forward(self, x: Tensor, noise: Optional[Tensor] = None,
                return_logits: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        mu, logvar = self.encode(x)
        z = mu if noise is None else self.reparameterize(mu, logvar, noise)
        logits = self.decode_logits(z)
        return (logits if return_logits else torch.tanh(logits)), mu, logvar
