"""pix2pix (Isola, Zhu, Zhou & Efros 2017, "Image-to-Image Translation with Conditional Adversarial
Networks"): the U-Net generator and the PatchGAN discriminator, as the authors' PyTorch release builds them
with ``norm='batch'`` (``UnetGenerator`` of nested ``UnetSkipConnectionBlock``s and ``NLayerDiscriminator``).

Faithful to that release, including what the paper does not say:

* every convolution followed by a BatchNorm has no bias, the outermost down-convolution has none either;
* the LeakyReLU opening each inner block is in place, so the skip connection carries ``lrelu(x)``, not
  ``x`` (harmless: the skip only ever meets the parent's ReLU, and ``relu(lrelu(x)) = relu(x)``);
* dropout 0.5 follows the ``num_downs - 5`` decoder blocks just outside the innermost one; it is pix2pix's
  only noise source, and the authors keep it (and batch statistics) at test time by leaving the model in
  train mode.

``fastgen.bench.gan_eager`` holds the same networks in plain PyTorch with the same parameter names.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..._config import register_to_config
from .._modeling import ModelMixin
from ._layers import (BatchNormAct, ConvAct, ConvTransposeAct, DownBlock, act, apply_spectral_norm, check_image,
                      gan_init_, positive_int)

DROPOUT = 0.5
MAX_DOWNS = 8
MIN_DOWNS = 5  # the release's U-Net always has its innermost block, three widening ones and the outermost


def unet_widths(in_channels: int, out_channels: int, ngf: int, num_downs: int):
    """Per level (0 = outermost): (down-conv input, down-conv output, up-conv output) channels."""
    levels = []
    for i in range(num_downs):
        outer = out_channels if i == 0 else ngf * min(2 ** (i - 1), 8)
        inner = ngf * min(2 ** i, 8)
        levels.append((in_channels if i == 0 else outer, inner, outer))
    return levels


def default_num_downs(image_size: int) -> int:
    """As many halvings as image_size allows, at most 8 (256 px: 8, the paper's 1x1 bottleneck)."""
    n = 0
    while n < MAX_DOWNS and image_size % (2 ** (n + 1)) == 0:
        n += 1
    return n


def check_halvable(owner: str, what: str, size: int, num_downs: int) -> None:
    if size % (2 ** num_downs):
        raise ValueError(f"{owner}: {what} {size} cannot be halved num_downs={num_downs} times (it must be a "
                         f"multiple of 2**{num_downs} = {2 ** num_downs}); pass a smaller num_downs or resize")


class _Level(torch.nn.Module):
    """One ``UnetSkipConnectionBlock`` without its submodule: the down- and up-convolution of one level."""

    def __init__(self, cin: int, inner: int, outer: int, outermost: bool, innermost: bool, dropout: bool):
        super().__init__()
        self.down_conv = ConvAct(cin, inner, 4, 2, 1, bias=False)
        # the shift of the BatchNorm after the down-conv is added with the LeakyReLU of the next level
        self.down_norm = None if outermost or innermost else BatchNormAct(inner, act="lrelu")
        up_in = inner if innermost else 2 * inner
        if outermost:
            self.up_conv = ConvTransposeAct(up_in, outer, 4, 2, 1, bias=True, act="tanh")
            self.up_norm = None
        else:
            self.up_conv = ConvTransposeAct(up_in, outer, 4, 2, 1, bias=False)
            # the ReLU is the parent's up-ReLU, moved before the dropout and the concatenation: it commutes
            # with both (dropout scales by 0 or 2), so the result and the dropout mask are the release's
            self.up_norm = BatchNormAct(outer, act="relu")
        self.dropout = dropout


class Pix2PixGenerator(ModelMixin):
    """The pix2pix U-Net generator (Isola et al. 2017), ``UnetGenerator`` with BatchNorm.

    ``num_downs`` stride-2 levels (default: as many halvings as ``image_size`` allows, at most 8, so 8 at
    the default 256 px, the paper's ``unet_256``; 5 to 8); widths ngf, 2, 4, 8, 8, ... x ngf;
    ``use_dropout`` (default on, as pix2pix trains) puts dropout 0.5 after the ``num_downs - 5`` decoder
    blocks next to the innermost. ``forward(x)`` takes (N, in_channels, H, W) with H and W multiples of
    ``2 ** num_downs`` and returns (N, out_channels, H, W) in [-1, 1].
    """

    @register_to_config
    def __init__(self, in_channels: int = 3, out_channels: int = 3, image_size: int = 256, ngf: int = 64,
                 num_downs: Optional[int] = None, use_dropout: bool = True):
        super().__init__()
        owner = "Pix2PixGenerator"
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                            ("image_size", image_size), ("ngf", ngf)):
            positive_int(owner, name, value)
        if num_downs is None:
            num_downs = default_num_downs(image_size)
            if num_downs < MIN_DOWNS:
                raise ValueError(f"{owner}: image_size {image_size} cannot be halved {MIN_DOWNS} times (the "
                                 f"U-Net needs at least {MIN_DOWNS} levels); use a multiple of {2 ** MIN_DOWNS}")
        if isinstance(num_downs, bool) or not isinstance(num_downs, int) or num_downs < MIN_DOWNS:
            raise ValueError(f"{owner}: num_downs must be an int >= {MIN_DOWNS}, got {num_downs!r}")
        check_halvable(owner, "image_size", image_size, num_downs)
        if not isinstance(use_dropout, bool):
            raise ValueError(f"{owner}: use_dropout must be a bool, got {use_dropout!r}")
        self.in_channels, self.num_downs = in_channels, num_downs
        last = num_downs - 1
        self.levels = torch.nn.ModuleList(
            _Level(cin, inner, outer, outermost=i == 0, innermost=i == last,
                   dropout=use_dropout and MIN_DOWNS - 1 <= i < last)
            for i, (cin, inner, outer) in enumerate(unet_widths(in_channels, out_channels, ngf, num_downs)))
        gan_init_(self)

    def release_key_map(self) -> dict[str, str]:
        """This model's state-dict keys -> the pix2pix release's (``UnetGenerator`` of nested
        ``UnetSkipConnectionBlock``s, whose layers sit at fixed indices of each block's ``nn.Sequential``)."""
        last = self.num_downs - 1
        names = {}
        for i in range(self.num_downs):
            # the outermost block keeps its submodule at index 1 of its Sequential, the others at index 3
            seq = "model.model" if i == 0 else "model.model.1" + ".model.3" * (i - 1) + ".model"
            if i == 0:
                layers = {"down_conv": 0, "up_conv": 3}
            elif i == last:
                layers = {"down_conv": 1, "up_conv": 3, "up_norm": 4}
            else:
                layers = {"down_conv": 1, "down_norm": 2, "up_conv": 5, "up_norm": 6}
            for layer, index in layers.items():
                names[f"levels.{i}.{layer}."] = f"{seq}.{index}."
        return _expand(self, names)

    def load_release_state_dict(self, state_dict: dict) -> None:
        """Load a checkpoint of the pix2pix release (``latest_net_G.pth`` of a ``unet_*`` generator with
        ``norm='batch'``), strictly."""
        _load_release(self, state_dict)

    def forward(self, x: Tensor) -> Tensor:
        owner = type(self).__name__
        check_image(owner, "x", x, self.in_channels)
        for what, size in (("height", x.shape[2]), ("width", x.shape[3])):
            check_halvable(owner, f"input {what}", size, self.num_downs)
        levels = self.levels
        h = levels[0].down_conv(x)
        shift = None  # the pending BatchNorm shift of h, added by the next bias_act
        skips = []
        for level in levels[1:]:
            a = act(h, shift, "lrelu")
            skips.append(a)
            h = level.down_conv(a)
            if level.down_norm is not None:
                h, shift = level.down_norm.forward_without_shift(h), level.down_norm.bias
            else:
                shift = None
        h = act(h, shift, "relu")
        for level, skip in zip(reversed(levels[1:]), reversed(skips)):
            h = level.up_norm(level.up_conv(h))
            if level.dropout:
                h = F.dropout(h, DROPOUT, self.training)
            h = torch.cat([act(skip, None, "relu"), h], dim=1)
        return levels[0].up_conv(h)


class PatchGANDiscriminator(ModelMixin):
    """The pix2pix PatchGAN discriminator (Isola et al. 2017), ``NLayerDiscriminator`` with BatchNorm.

    Sees the (condition, image) pair concatenated on channels (``in_channels`` = both together, default
    3 + 3). ``n_layers`` stride-2 Conv(4) + LeakyReLU(0.2) steps (BatchNorm on all but the first, widths
    ndf x 1, 2, 4, 8, 8, ...), one stride-1 step, and a stride-1 Conv(4) to one logit per patch: with the
    default n_layers=3 each logit sees a 70x70 patch (:attr:`receptive_field`) and a 256x256 pair gives
    (N, 1, 30, 30). ``spectral_norm=True`` spectrally normalises every convolution weight.
    """

    @register_to_config
    def __init__(self, in_channels: int = 6, ndf: int = 64, n_layers: int = 3, spectral_norm: bool = False):
        super().__init__()
        owner = "PatchGANDiscriminator"
        for name, value in (("in_channels", in_channels), ("ndf", ndf), ("n_layers", n_layers)):
            positive_int(owner, name, value)
        if not isinstance(spectral_norm, bool):
            raise ValueError(f"{owner}: spectral_norm must be a bool, got {spectral_norm!r}")
        self.in_channels, self.n_layers = in_channels, n_layers
        widths = [ndf * min(2 ** i, 8) for i in range(n_layers + 1)]
        self.blocks = torch.nn.ModuleList()
        cin = in_channels
        for i, cout in enumerate(widths):
            self.blocks.append(DownBlock(cin, cout, 2 if i < n_layers else 1, norm=i > 0))
            cin = cout
        self.conv_out = ConvAct(cin, 1, 4, 1, 1, bias=True)
        gan_init_(self)
        if spectral_norm:
            apply_spectral_norm(self)

    @property
    def receptive_field(self) -> int:
        """Input pixels (per side) one output logit depends on."""
        field = 1
        for conv in reversed([b.conv for b in self.blocks] + [self.conv_out]):
            field = (field - 1) * conv.stride[0] + conv.kernel_size[0]
        return field

    def release_key_map(self) -> dict[str, str]:
        """This model's state-dict keys -> the pix2pix release's ``NLayerDiscriminator`` (one
        ``nn.Sequential``: conv, LeakyReLU, then conv, BatchNorm, LeakyReLU per step, then the last conv)."""
        names = {"blocks.0.conv.": "model.0."}
        for k in range(1, self.n_layers + 1):
            names[f"blocks.{k}.conv."] = f"model.{3 * k - 1}."
            names[f"blocks.{k}.norm."] = f"model.{3 * k}."
        names["conv_out."] = f"model.{3 * self.n_layers + 2}."
        return _expand(self, names)

    def load_release_state_dict(self, state_dict: dict) -> None:
        """Load a checkpoint of the pix2pix release (``latest_net_D.pth`` of a ``basic`` / ``n_layers``
        discriminator with ``norm='batch'``), strictly."""
        _load_release(self, state_dict)

    def forward(self, condition: Tensor, image: Tensor) -> Tensor:
        owner = type(self).__name__
        for name, t in (("condition", condition), ("image", image)):
            if not isinstance(t, Tensor) or t.dim() != 4:
                raise ValueError(f"{owner}: {name} must be an (N, C, H, W) tensor, got "
                                 f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
        if condition.shape[0] != image.shape[0] or condition.shape[2:] != image.shape[2:]:
            raise ValueError(f"{owner}: condition {tuple(condition.shape)} and image {tuple(image.shape)} must "
                             "share batch size, height and width")
        if condition.shape[1] + image.shape[1] != self.in_channels:
            raise ValueError(f"{owner}: condition and image have {condition.shape[1]} + {image.shape[1]} channels, "
                             f"the model expects in_channels={self.in_channels} together")
        min_size = 2 ** self.n_layers * 3
        if min(image.shape[2:]) < min_size:
            raise ValueError(f"{owner}: the image is {image.shape[2]}x{image.shape[3]}; with n_layers="
                             f"{self.n_layers} it must be at least {min_size} px per side")
        h = torch.cat([condition, image], dim=1)
        for block in self.blocks:
            h = block(h)
        return self.conv_out(h)


def _expand(model: torch.nn.Module, prefixes: dict[str, str]) -> dict[str, str]:
    out = {}
    for key in model.state_dict():
        for ours, theirs in prefixes.items():
            if key.startswith(ours):
                out[key] = theirs + key[len(ours):]
                break
        else:
            raise AssertionError(f"no release name for {key}")
    return out


def _load_release(model: torch.nn.Module, state_dict: dict) -> None:
    # checkpoints saved from nn.DataParallel carry a "module." prefix
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    if any("parametrizations" in k for k in model.state_dict()):
        raise ValueError(f"{type(model).__name__}: the pix2pix release has no spectral norm; build the model "
                         "with spectral_norm=False to load its checkpoints")
    names = model.release_key_map()
    theirs = set(names.values())
    # releases saved before PyTorch 0.4.1 have no num_batches_tracked; BatchNorm starts it at 0 then
    missing = sorted(k for k in theirs - set(sd) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(sd) - theirs)
    if missing or unexpected:
        raise ValueError(f"{type(model).__name__}: not a checkpoint of this release configuration "
                         f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
                         f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''})")
    ours = {k: sd[v] if v in sd else torch.zeros((), dtype=torch.long) for k, v in names.items()}
    model.load_state_dict(ours, strict=True)
