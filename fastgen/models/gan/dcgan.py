"""DCGAN (Radford, Metz & Chintala 2015, "Unsupervised Representation Learning with Deep Convolutional
Generative Adversarial Networks") for 16 to 128 px, optionally class-conditional: the generator concatenates
a class embedding to z (Mirza & Osindero 2014); the discriminator either concatenates a learned per-class map
to the image or is a projection discriminator (Miyato & Koyama 2018, "cGANs with Projection Discriminator").

Every bias and activation runs through :func:`fastgen.ops.bias_act` (BatchNorm's shift included), every
convolution through fastgen's :class:`~fastgen.models.blocks.Conv2d`; the transposed convolutions are
:class:`torch.nn.ConvTranspose2d`'s. ``fastgen.bench.gan_eager`` holds the same networks in plain PyTorch
with the same parameter names.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..._config import register_to_config
from .._modeling import ModelMixin
from ._layers import (BatchNormAct, ConvAct, ConvTransposeAct, DownBlock, apply_spectral_norm, check_image, gan_init_,
                      log2_exact, positive_int)

CONDITION_TYPES = ("projection", "concat")
MIN_SIZE, MAX_SIZE = 16, 128


def generator_widths(image_size: int, ngf: int) -> list[int]:
    """Channels of the generator's feature maps at 4x4, 8x8, ... up to image_size / 2: halving on each
    up-step and ``ngf`` at the last hidden one (64 px: 8, 4, 2, 1 x ngf, as in the paper)."""
    steps = log2_exact("image_size", "DCGAN", image_size, MIN_SIZE, MAX_SIZE) - 2
    return [ngf * 2 ** (steps - 1 - i) for i in range(steps)]


def discriminator_widths(image_size: int, ndf: int) -> list[int]:
    """Channels after each stride-2 step, image_size / 2 down to 4x4: ndf, 2 ndf, 4 ndf, ..."""
    steps = log2_exact("image_size", "DCGAN", image_size, MIN_SIZE, MAX_SIZE) - 2
    return [ndf * 2 ** i for i in range(steps)]


def check_labels(owner: str, num_classes: Optional[int], labels, batch: int) -> None:
    if num_classes is None:
        if labels is not None:
            raise ValueError(f"{owner}: class_labels were given but the model is unconditional (num_classes=None)")
        return
    if labels is None:
        raise ValueError(f"{owner}: class_labels are needed (the model was built with num_classes={num_classes})")
    if not isinstance(labels, Tensor) or labels.dtype not in (torch.int64, torch.int32) or labels.shape != (batch,):
        raise ValueError(f"{owner}: class_labels must be an int tensor of shape ({batch},), got "
                         f"{labels if not isinstance(labels, Tensor) else (labels.dtype, tuple(labels.shape))}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"{owner}: class_labels must lie in [0, {num_classes}), got "
                         f"[{int(labels.min())}, {int(labels.max())}]")


def _check_common(owner, image_size, num_classes, **positive):
    log2_exact("image_size", owner, image_size, MIN_SIZE, MAX_SIZE)
    for name, value in positive.items():
        positive_int(owner, name, value)
    if num_classes is not None:
        positive_int(owner, "num_classes", num_classes)


class _UpBlock(torch.nn.Module):
    def __init__(self, cin: int, cout: int, first: bool):
        super().__init__()
        stride, padding = (1, 0) if first else (2, 1)
        # no conv bias: the BatchNorm's shift right after it would cancel it
        self.conv = ConvTransposeAct(cin, cout, 4, stride, padding, bias=False)
        self.norm = BatchNormAct(cout, act="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(x))


class DCGANGenerator(ModelMixin):
    """The DCGAN generator (Radford et al. 2015): z as a 1x1 map, ConvTranspose(4, 1, 0) to 4x4, then
    ConvTranspose(4, 2, 1) up-steps with BatchNorm + ReLU, and a ConvTranspose(4, 2, 1) to ``out_channels``
    with Tanh.

    With ``num_classes``, an embedding of the label (``class_embed_dim``, default ``latent_dim``) is
    concatenated to z (Mirza & Osindero 2014). ``forward(z, class_labels=None)`` takes z as (N, latent_dim)
    or (N, latent_dim, 1, 1) and returns (N, out_channels, image_size, image_size) in [-1, 1].
    """

    @register_to_config
    def __init__(self, image_size: int = 64, out_channels: int = 3, latent_dim: int = 100, ngf: int = 64,
                 num_classes: Optional[int] = None, class_embed_dim: Optional[int] = None):
        super().__init__()
        owner = "DCGANGenerator"
        _check_common(owner, image_size, num_classes, out_channels=out_channels, latent_dim=latent_dim, ngf=ngf)
        self.image_size, self.latent_dim, self.num_classes = image_size, latent_dim, num_classes
        embed = 0
        self.class_embedding = None
        if num_classes is not None:
            embed = positive_int(owner, "class_embed_dim", latent_dim if class_embed_dim is None else class_embed_dim)
            self.class_embedding = torch.nn.Embedding(num_classes, embed)
        widths = generator_widths(image_size, ngf)
        cins = [latent_dim + embed] + widths[:-1]
        self.blocks = torch.nn.ModuleList(_UpBlock(ci, co, i == 0) for i, (ci, co) in enumerate(zip(cins, widths)))
        self.conv_out = ConvTransposeAct(widths[-1], out_channels, 4, 2, 1, bias=True, act="tanh")
        gan_init_(self)

    def forward(self, z: Tensor, class_labels: Optional[Tensor] = None) -> Tensor:
        owner = type(self).__name__
        if not isinstance(z, Tensor) or not (z.dim() == 2 or (z.dim() == 4 and z.shape[2:] == (1, 1))) \
                or z.shape[1] != self.latent_dim:
            raise ValueError(f"{owner}: z must be (N, {self.latent_dim}) or (N, {self.latent_dim}, 1, 1), got "
                             f"{tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__}")
        check_labels(owner, self.num_classes, class_labels, z.shape[0])
        h = z.reshape(z.shape[0], -1)
        if self.class_embedding is not None:
            h = torch.cat([h, self.class_embedding(class_labels).to(h.dtype)], dim=1)
        h = h[:, :, None, None]
        for block in self.blocks:
            h = block(h)
        return self.conv_out(h)


class DCGANDiscriminator(ModelMixin):
    """The DCGAN discriminator (Radford et al. 2015): Conv(4, 2, 1) steps down to 4x4 with LeakyReLU(0.2),
    BatchNorm on all but the first, then Conv(4, 1, 0) to one logit per image.

    Class conditioning (``num_classes``): ``condition_type="projection"`` (Miyato & Koyama 2018) adds
    ``<embed(y), phi(x)>`` to the logit, phi(x) being the last 4x4 features summed over space;
    ``"concat"`` appends a learned image-sized map per class to the input as one more channel.
    ``spectral_norm=True`` spectrally normalises every convolution weight (Miyato et al. 2018).
    ``forward(x, class_labels=None)`` takes (N, in_channels, image_size, image_size) and returns (N,) logits.
    """

    @register_to_config
    def __init__(self, image_size: int = 64, in_channels: int = 3, ndf: int = 64, num_classes: Optional[int] = None,
                 condition_type: str = "projection", spectral_norm: bool = False):
        super().__init__()
        owner = "DCGANDiscriminator"
        _check_common(owner, image_size, num_classes, in_channels=in_channels, ndf=ndf)
        if condition_type not in CONDITION_TYPES:
            raise ValueError(f"{owner}: unknown condition_type {condition_type!r}; expected one of {CONDITION_TYPES}")
        if not isinstance(spectral_norm, bool):
            raise ValueError(f"{owner}: spectral_norm must be a bool, got {spectral_norm!r}")
        self.image_size, self.in_channels, self.num_classes = image_size, in_channels, num_classes
        self.condition_type = condition_type
        widths = discriminator_widths(image_size, ndf)
        concat = num_classes is not None and condition_type == "concat"
        self.class_embedding = None
        if num_classes is not None:
            self.class_embedding = torch.nn.Embedding(num_classes, image_size * image_size if concat else widths[-1])
        cins = [in_channels + int(concat)] + widths[:-1]
        self.blocks = torch.nn.ModuleList(DownBlock(ci, co, 2, norm=i > 0)
                                          for i, (ci, co) in enumerate(zip(cins, widths)))
        self.conv_out = ConvAct(widths[-1], 1, 4, 1, 0, bias=True)
        gan_init_(self)
        if spectral_norm:
            apply_spectral_norm(self)

    def forward(self, x: Tensor, class_labels: Optional[Tensor] = None) -> Tensor:
        owner = type(self).__name__
        check_image(owner, "x", x, self.in_channels)
        s = self.image_size
        if x.shape[2:] != (s, s):
            raise ValueError(f"{owner}: x must be {s}x{s} (image_size={s}), got {x.shape[2]}x{x.shape[3]}")
        check_labels(owner, self.num_classes, class_labels, x.shape[0])
        if self.class_embedding is not None and self.condition_type == "concat":
            cmap = self.class_embedding(class_labels).to(x.dtype).view(x.shape[0], 1, s, s)
            x = torch.cat([x, cmap], dim=1)
        h = x
        for block in self.blocks:
            h = block(h)
        logit = self.conv_out(h).reshape(x.shape[0])
        if self.class_embedding is not None and self.condition_type == "projection":
            phi = h.sum(dim=(2, 3))
            logit = logit + (self.class_embedding(class_labels).to(phi.dtype) * phi).sum(dim=1)
        return logit
