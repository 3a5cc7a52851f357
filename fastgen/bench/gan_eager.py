"""The GANs of :mod:`fastgen.models.gan` in plain PyTorch (``nn.Conv2d``, ``nn.BatchNorm2d``,
``nn.LeakyReLU``, ...; no fastgen op): the baseline the GAN benchmarks race, and the reference the tests
compare fastgen's models with.

Same constructor arguments and the same parameter and buffer names as the fastgen model of the same name
without ``Eager``, so ``eager.load_state_dict(fastgen_model.state_dict())`` works both ways (strict). The
layers run as the papers' reference code runs them: separate conv (biased where no BatchNorm follows),
BatchNorm and in-place activation modules; the pix2pix U-Net recurses through its levels the way the
authors' nested ``UnetSkipConnectionBlock``s do, calling dropout in the same order.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..models.gan._layers import LRELU_SLOPE, apply_spectral_norm, gan_init_
from ..models.gan.dcgan import discriminator_widths, generator_widths
from ..models.gan.pix2pix import DROPOUT, MIN_DOWNS, default_num_downs, unet_widths


class EagerDCGANGenerator(nn.Module):
    """:class:`fastgen.models.DCGANGenerator` in plain PyTorch."""

    def __init__(self, image_size: int = 64, out_channels: int = 3, latent_dim: int = 100, ngf: int = 64,
                 num_classes: Optional[int] = None, class_embed_dim: Optional[int] = None):
        super().__init__()
        embed = 0
        self.class_embedding = None
        if num_classes is not None:
            embed = latent_dim if class_embed_dim is None else class_embed_dim
            self.class_embedding = nn.Embedding(num_classes, embed)
        widths = generator_widths(image_size, ngf)
        self.blocks = nn.ModuleList()
        cin = latent_dim + embed
        for i, cout in enumerate(widths):
            block = nn.Module()
            block.conv = nn.ConvTranspose2d(cin, cout, 4, 1 if i == 0 else 2, 0 if i == 0 else 1, bias=False)
            block.norm = nn.BatchNorm2d(cout)
            block.act = nn.ReLU(inplace=True)
            self.blocks.append(block)
            cin = cout
        self.conv_out = nn.ConvTranspose2d(cin, out_channels, 4, 2, 1, bias=True)
        self.tanh = nn.Tanh()
        gan_init_(self)

    def forward(self, z: Tensor, class_labels: Optional[Tensor] = None) -> Tensor:
        h = z.reshape(z.shape[0], -1)
        if self.class_embedding is not None:
            h = torch.cat([h, self.class_embedding(class_labels)], dim=1)
        h = h[:, :, None, None]
        for block in self.blocks:
            h = block.act(block.norm(block.conv(h)))
        return self.tanh(self.conv_out(h))


def _down_block(cin: int, cout: int, stride: int, norm: bool) -> nn.Module:
    block = nn.Module()
    block.conv = nn.Conv2d(cin, cout, 4, stride, 1, bias=not norm)
    block.norm = nn.BatchNorm2d(cout) if norm else None
    block.act = nn.LeakyReLU(LRELU_SLOPE, inplace=True)
    return block


def _run_down(block: nn.Module, h: Tensor) -> Tensor:
    h = block.conv(h)
    if block.norm is not None:
        h = block.norm(h)
    return block.act(h)


class EagerDCGANDiscriminator(nn.Module):
    """:class:`fastgen.models.DCGANDiscriminator` in plain PyTorch."""

    def __init__(self, image_size: int = 64, in_channels: int = 3, ndf: int = 64, num_classes: Optional[int] = None,
                 condition_type: str = "projection", spectral_norm: bool = False):
        super().__init__()
        self.image_size, self.condition_type = image_size, condition_type
        widths = discriminator_widths(image_size, ndf)
        concat = num_classes is not None and condition_type == "concat"
        self.class_embedding = None
        if num_classes is not None:
            self.class_embedding = nn.Embedding(num_classes, image_size * image_size if concat else widths[-1])
        self.blocks = nn.ModuleList()
        cin = in_channels + int(concat)
        for i, cout in enumerate(widths):
            self.blocks.append(_down_block(cin, cout, 2, norm=i > 0))
            cin = cout
        self.conv_out = nn.Conv2d(cin, 1, 4, 1, 0, bias=True)
        gan_init_(self)
        if spectral_norm:
            apply_spectral_norm(self)

    def forward(self, x: Tensor, class_labels: Optional[Tensor] = None) -> Tensor:
        n, s = x.shape[0], self.image_size
        if self.class_embedding is not None and self.condition_type == "concat":
            x = torch.cat([x, self.class_embedding(class_labels).view(n, 1, s, s)], dim=1)
        h = x
        for block in self.blocks:
            h = _run_down(block, h)
        logit = self.conv_out(h).view(n)
        if self.class_embedding is not None and self.condition_type == "projection":
            logit = logit + (self.class_embedding(class_labels) * h.sum(dim=(2, 3))).sum(dim=1)
        return logit


class EagerPix2PixGenerator(nn.Module):
    """:class:`fastgen.models.Pix2PixGenerator` in plain PyTorch."""

    def __init__(self, in_channels: int = 3, out_channels: int = 3, image_size: int = 256, ngf: int = 64,
                 num_downs: Optional[int] = None, use_dropout: bool = True):
        super().__init__()
        num_downs = default_num_downs(image_size) if num_downs is None else num_downs
        last = num_downs - 1
        self.levels = nn.ModuleList()
        for i, (cin, inner, outer) in enumerate(unet_widths(in_channels, out_channels, ngf, num_downs)):
            lv = nn.Module()
            lv.outermost, lv.innermost = i == 0, i == last
            lv.down_relu = None if i == 0 else nn.LeakyReLU(LRELU_SLOPE, inplace=True)
            lv.down_conv = nn.Conv2d(cin, inner, 4, 2, 1, bias=False)
            lv.down_norm = None if i in (0, last) else nn.BatchNorm2d(inner)
            lv.up_relu = nn.ReLU(inplace=True)
            lv.up_conv = nn.ConvTranspose2d(inner if i == last else 2 * inner, outer, 4, 2, 1, bias=i == 0)
            lv.up_norm = None if i == 0 else nn.BatchNorm2d(outer)
            lv.up_act = nn.Tanh() if i == 0 else None
            lv.dropout = nn.Dropout(DROPOUT) if use_dropout and MIN_DOWNS - 1 <= i < last else None
            self.levels.append(lv)
        gan_init_(self)

    def _level(self, i: int, x: Tensor) -> Tensor:
        lv = self.levels[i]
        if lv.outermost:
            h = self._level(i + 1, lv.down_conv(x))
            return lv.up_act(lv.up_conv(lv.up_relu(h)))
        # in place, as in the pix2pix release: x itself becomes lrelu(x), and the skip below carries that
        # (the parent's ReLU makes it the same as carrying x)
        h = lv.down_conv(lv.down_relu(x))
        if not lv.innermost:
            h = self._level(i + 1, lv.down_norm(h))
        h = lv.up_norm(lv.up_conv(lv.up_relu(h)))
        if lv.dropout is not None:
            h = lv.dropout(h)
        return torch.cat([x, h], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        return self._level(0, x)


class EagerPatchGANDiscriminator(nn.Module):
    """:class:`fastgen.models.PatchGANDiscriminator` in plain PyTorch."""

    def __init__(self, in_channels: int = 6, ndf: int = 64, n_layers: int = 3, spectral_norm: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList()
        cin = in_channels
        for i in range(n_layers + 1):
            cout = ndf * min(2 ** i, 8)
            self.blocks.append(_down_block(cin, cout, 2 if i < n_layers else 1, norm=i > 0))
            cin = cout
        self.conv_out = nn.Conv2d(cin, 1, 4, 1, 1, bias=True)
        gan_init_(self)
        if spectral_norm:
            apply_spectral_norm(self)

    def forward(self, condition: Tensor, image: Tensor) -> Tensor:
        h = torch.cat([condition, image], dim=1)
        for block in self.blocks:
            h = _run_down(block, h)
        return self.conv_out(h)
