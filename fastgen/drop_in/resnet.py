"""Replacement forwards for diffusers' ``ResnetBlock2D`` and for the ``nn.Conv2d`` and ``nn.GroupNorm``
instances of a diffusers model, on fastgen's fused ops.

Each function is bound to one live instance (``_rebind.Record.bind``) and reads that instance's own
parameters on every call, so loading weights, LoRA merges (``fuse_lora`` writes the weight in place) and
optimizer steps are seen at once. Each also checks, per call, that the input is one its op covers, and
otherwise runs the class's own forward: a patched module never raises where diffusers' would not.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..ops.conv2d import conv2d
from ..ops.group_norm import group_norm
from ._rebind import mark, patched_kind

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


# ------------------------------------------------------------------ nn.Conv2d


def conv_unsupported_reason(conv: torch.nn.Conv2d) -> Optional[str]:
    """Why this convolution keeps torch's forward (None: fastgen's conv2d covers it)."""
    if conv.groups != 1:
        return "grouped"
    if tuple(conv.dilation) != (1, 1):
        return "dilated"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r}"
    if isinstance(conv.padding, str):
        return f"padding={conv.padding!r}"
    return None


def _conv_input_ok(conv: torch.nn.Conv2d, x: Tensor) -> bool:
    if x.dim() != 4 or x.dtype not in _FLOATS or x.device != conv.weight.device:
        return False
    return x.dtype == conv.weight.dtype or torch.is_autocast_enabled(x.device.type)


def _fused_conv(conv: torch.nn.Conv2d, x: Tensor, residual: Optional[Tensor] = None,
                output_scale: float = 1.0) -> Tensor:
    return conv2d(x, conv.weight, conv.bias, stride=conv.stride, padding=conv.padding,
                  residual=residual, output_scale=output_scale)


@mark("conv")
def conv2d_forward(self: torch.nn.Conv2d, input: Tensor) -> Tensor:
    if not _conv_input_ok(self, input):
        return type(self).forward(self, input)
    return _fused_conv(self, input)


# ------------------------------------------------------------------ nn.GroupNorm


def _norm_input_ok(norm: torch.nn.GroupNorm, x: Tensor) -> bool:
    return (2 <= x.dim() <= 5 and x.dtype in _FLOATS and x.shape[1] == norm.num_channels
            and (norm.weight is None or x.device == norm.weight.device))


@mark("group_norm")
def group_norm_forward(self: torch.nn.GroupNorm, input: Tensor) -> Tensor:
    if not _norm_input_ok(self, input):
        return type(self).forward(self, input)
    return group_norm(input, self.num_groups, self.weight, self.bias, self.eps)


def _norm_silu(norm: torch.nn.Module, x: Tensor, silu: bool) -> Tensor:
    """``silu(norm(x))`` in one pass when ``norm`` is a plain ``nn.GroupNorm``; otherwise the modules'."""
    if type(norm) is torch.nn.GroupNorm and _norm_input_ok(norm, x):
        return group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps,
                          activation="silu" if silu else None)
    x = norm(x)
    return torch.nn.functional.silu(x) if silu else x


# ------------------------------------------------------------------ ResnetBlock2D


def resnet_unsupported_reason(block: torch.nn.Module) -> Optional[str]:
    """Why this ``ResnetBlock2D`` keeps its forward (None: the fused forward covers it)."""
    if type(block.nonlinearity) is not torch.nn.SiLU:
        return f"its nonlinearity is {type(block.nonlinearity).__name__}, not SiLU"
    if block.upsample is not None or block.downsample is not None:
        return "it resamples inside the block (up=True / down=True)"
    if not getattr(block, "pre_norm", True):
        return "pre_norm=False"
    return None


@mark("resnet")
def resnet_forward(self: torch.nn.Module, input_tensor: Tensor, temb: Optional[Tensor] = None,
                   *args, **kwargs) -> Tensor:
    """diffusers' ``ResnetBlock2D.forward`` with GroupNorm+SiLU fused and the skip connection and
    ``1 / output_scale_factor`` in ``conv2``'s epilogue; the same operations in the same order otherwise."""
    if args or kwargs.get("scale", None) is not None:
        # diffusers deprecates (and ignores) a positional/keyword scale here; its own forward says so.
        return type(self).forward(self, input_tensor, temb, *args, **kwargs)
    h = _norm_silu(self.norm1, input_tensor, silu=True)
    h = self.conv1(h)
    if self.time_emb_proj is not None:
        if not self.skip_time_act:
            temb = self.nonlinearity(temb)
        temb = self.time_emb_proj(temb)[:, :, None, None]
    if self.time_embedding_norm == "default":
        if temb is not None:
            h = h + temb
        h = _norm_silu(self.norm2, h, silu=True)
    elif self.time_embedding_norm == "scale_shift":
        if temb is None:
            raise ValueError(
                f" `temb` should not be None when `time_embedding_norm` is {self.time_embedding_norm}"
            )
        scale, shift = torch.chunk(temb, 2, dim=1)
        h = _norm_silu(self.norm2, h, silu=False)
        h = self.nonlinearity(h * (1 + scale) + shift)
    else:  # diffusers' other values ("group", the VAE decoder's) ignore the time embedding
        h = _norm_silu(self.norm2, h, silu=True)
    h = self.dropout(h)
    shortcut = input_tensor
    if self.conv_shortcut is not None:
        if self.training:
            shortcut = shortcut.contiguous()  # diffusers' DDP-gradient-stride workaround, kept
        shortcut = self.conv_shortcut(shortcut)
    conv2 = self.conv2
    if patched_kind(conv2, "forward") == "conv" and _residual_fusable(conv2, h, shortcut):
        return _fused_conv(conv2, h, residual=shortcut, output_scale=1.0 / self.output_scale_factor)
    # conv2 unpatched (conv=False) or a peft LoRA wrapper: its own forward, then diffusers' arithmetic.
    return (shortcut + conv2(h)) / self.output_scale_factor


def _residual_fusable(conv: torch.nn.Conv2d, h: Tensor, shortcut: Tensor) -> bool:
    """conv2's epilogue may add the shortcut when diffusers' ``shortcut + conv2(h)`` would have conv2's
    output dtype and shape (under autocast a fp32 shortcut would promote the sum to fp32)."""
    if not _conv_input_ok(conv, h) or shortcut.dim() != 4 or shortcut.shape[-2:] != h.shape[-2:]:
        return False
    out_dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
    return shortcut.dtype == out_dtype and shortcut.device == h.device
