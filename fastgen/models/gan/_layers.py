"""Layers shared by fastgen's GANs: a convolution, a transposed convolution and a BatchNorm whose bias (or
affine shift) is left out of the layer and added by :func:`fastgen.ops.bias_act` together with the activation
that follows, in one pass instead of two or three.

Each keeps :mod:`torch.nn`'s parameter names (``weight``, ``bias``, ``running_mean``, ...), so a plain PyTorch
model with the same attribute names loads strictly.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ...ops.bias_act import bias_act
from ...ops.conv2d import KERNEL_SIZES, conv2d
from ..blocks import Conv2d
from ._gemm_conv import gemm_conv2d, gemm_conv_transpose2d, use_gemm_conv2d, use_gemm_conv_transpose2d

LRELU_SLOPE = 0.2


def act(x: Tensor, b: Optional[Tensor], kind: str) -> Tensor:
    """``kind(x + b)`` with the classic GANs' constants: slope 0.2 for LeakyReLU and no gain (bias_act's
    defaults are StyleGAN's sqrt(2) gains, which DCGAN and pix2pix do not use)."""
    return bias_act(x, b, dim=1, act=kind, alpha=LRELU_SLOPE if kind == "lrelu" else None, gain=1.0)


class ConvAct(Conv2d):
    """fastgen's :class:`~fastgen.models.blocks.Conv2d` with its bias (if any) and an activation applied by
    ``bias_act``. ``act="linear"`` with a bias is a plain biased convolution."""

    def __init__(self, *args, act: str = "linear", **kwargs):
        super().__init__(*args, **kwargs)
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        # fastgen's conv kernels take 1x1 and 3x3; the papers' 4x4 convolutions go to the torch backend by
        # name, so they neither warn about the fallback nor fail under a use_backend("cpu") context.
        backend = None if tuple(self.kernel_size) in KERNEL_SIZES else "torch"
        # self.weight (not a cached tensor): spectral norm re-parametrizes it on every access
        if (backend == "torch" and self.padding_mode == "zeros" and not isinstance(self.padding, str)
                and self.groups == 1 and tuple(self.dilation) == (1, 1)
                and use_gemm_conv2d(x, self.kernel_size, self.stride, self.padding)):
            y = gemm_conv2d(x, self.weight, self.stride, self.padding)
        else:
            y = conv2d(x, self.weight, None, stride=self.stride, padding=self.padding, backend=backend)
        if self.bias is None and self.act == "linear":
            return y
        return act(y, self.bias, self.act)


class ConvTransposeAct(torch.nn.ConvTranspose2d):
    """:class:`torch.nn.ConvTranspose2d` (fastgen has no transposed-convolution kernel) with its bias and an
    activation applied by ``bias_act``."""

    def __init__(self, *args, act: str = "linear", **kwargs):
        super().__init__(*args, **kwargs)
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        if self.groups == 1 and tuple(self.dilation) == (1, 1) and use_gemm_conv_transpose2d(x):
            y = gemm_conv_transpose2d(x, self.weight, self.stride, self.padding, self.output_padding)
        else:
            y = F.conv_transpose2d(x, self.weight, None, self.stride, self.padding, self.output_padding,
                                   self.groups, self.dilation)
        if self.bias is None and self.act == "linear":
            return y
        return act(y, self.bias, self.act)


class BatchNormAct(torch.nn.BatchNorm2d):
    """:class:`torch.nn.BatchNorm2d` whose affine shift is added by ``bias_act`` with the activation after it.

    Running statistics, momentum and ``num_batches_tracked`` behave as in ``nn.BatchNorm2d.forward``."""

    def __init__(self, num_features: int, *, act: str = "linear", **kwargs):
        super().__init__(num_features, **kwargs)
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        return act(self.forward_without_shift(x), self.bias, self.act)

    def forward_without_shift(self, x: Tensor) -> Tensor:
        """The normalised, scaled x, for a caller that adds ``self.bias`` in a later ``bias_act``."""
        self._check_input_dim(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        use_running = not self.training or self.track_running_stats
        return F.batch_norm(x, self.running_mean if use_running else None,
                            self.running_var if use_running else None, self.weight, None, batch_stats, factor, self.eps)


class DownBlock(torch.nn.Module):
    """A discriminator step: Conv(4, stride, 1), BatchNorm unless ``norm=False``, LeakyReLU(0.2)."""

    def __init__(self, cin: int, cout: int, stride: int, norm: bool):
        super().__init__()
        # a bias only where no BatchNorm follows (its shift plays that role)
        self.conv = ConvAct(cin, cout, 4, stride, 1, bias=not norm, act="linear" if norm else "lrelu")
        self.norm = BatchNormAct(cout, act="lrelu") if norm else None

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        return y if self.norm is None else self.norm(y)


def gan_init_(module: torch.nn.Module) -> None:
    """The initialisation of Radford et al. 2015, which pix2pix (Isola et al. 2017) reuses: conv weights
    N(0, 0.02), BatchNorm scales N(1, 0.02), biases zero."""
    for m in module.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            torch.nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)
        elif isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.normal_(m.weight, 1.0, 0.02)
            torch.nn.init.zeros_(m.bias)


def apply_spectral_norm(module: torch.nn.Module) -> None:
    """Spectral normalisation (Miyato et al. 2018) of every convolution weight in ``module``."""
    convs = [m for m in module.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    for m in convs:
        torch.nn.utils.parametrizations.spectral_norm(m)


def log2_exact(name: str, owner: str, value, lo: int, hi: int) -> int:
    """log2 of a power-of-two int in [lo, hi], or a ValueError saying what is allowed."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi or value & (value - 1):
        raise ValueError(f"{owner}: {name} must be a power of two from {lo} to {hi}, got {value!r}")
    return int(math.log2(value))


def positive_int(owner: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")
    return value


def check_image(owner: str, name: str, x, channels: int) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{owner}: {name} must be a tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{owner}: {name} must be (N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != channels:
        raise ValueError(f"{owner}: {name} has {x.shape[1]} channels, the model expects {channels} "
                         f"(shape {tuple(x.shape)})")
