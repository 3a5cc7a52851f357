"""diffusers' ResNet block and its down/up-samplers, with every GroupNorm+SiLU pair as one fused call.

Parameter names and constructor arguments are diffusers' (``norm1``, ``conv1``, ``time_emb_proj``,
``norm2``, ``conv2``, ``conv_shortcut``; ``Downsample2D.conv``, ``Upsample2D.conv``), so diffusers state
dicts load with ``strict=True``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._modeling import refuse, refuse_unless
from .activations import SILU_NAMES, get_activation
from .blocks import Conv2d, GroupNorm


def norm_act(num_groups: int, channels: int, eps: float, act_fn: str) -> tuple[GroupNorm, Optional[torch.nn.Module]]:
    """(the GroupNorm, the activation still to apply after it or None when it is fused into the norm)."""
    if act_fn.lower() in SILU_NAMES:
        return GroupNorm(num_groups, channels, eps=eps, affine=True, activation="silu"), None
    return GroupNorm(num_groups, channels, eps=eps, affine=True), get_activation(act_fn)


def apply_norm_act(norm: GroupNorm, act: Optional[torch.nn.Module], x: Tensor) -> Tensor:
    x = norm(x)
    return act(x) if act is not None else x


class ResnetBlock2D(torch.nn.Module):
    """diffusers' ``ResnetBlock2D`` (``time_embedding_norm`` ``"default"`` or ``"scale_shift"``).

    ``x -> conv1(act(norm1(x))) [+ temb] -> act(norm2(.)) -> dropout -> conv2 -> (shortcut(x) + .) / scale``;
    with ``"scale_shift"`` the time embedding gives ``norm2(h) * (1 + scale) + shift`` before the activation.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: Optional[int] = None,
        conv_shortcut: bool = False,
        dropout: float = 0.0,
        temb_channels: Optional[int] = 512,
        groups: int = 32,
        groups_out: Optional[int] = None,
        pre_norm: bool = True,
        eps: float = 1e-6,
        non_linearity: str = "swish",
        skip_time_act: bool = False,
        time_embedding_norm: str = "default",
        kernel=None,
        output_scale_factor: float = 1.0,
        use_in_shortcut: Optional[bool] = None,
        up: bool = False,
        down: bool = False,
        conv_shortcut_bias: bool = True,
        conv_2d_out_channels: Optional[int] = None,
    ):
        super().__init__()
        owner = "ResnetBlock2D"
        refuse_unless(owner, "time_embedding_norm", time_embedding_norm, ("default", "scale_shift"))
        refuse_unless(owner, "pre_norm", pre_norm, (True,))
        if up or down:
            refuse(owner, "up" if up else "down", True, False)
        if kernel is not None:
            refuse(owner, "kernel", kernel, None)
        out_channels = in_channels if out_channels is None else out_channels
        conv_2d_out_channels = conv_2d_out_channels or out_channels
        groups_out = groups if groups_out is None else groups_out
        self.in_channels, self.out_channels = in_channels, out_channels
        self.use_conv_shortcut = conv_shortcut
        self.output_scale_factor = output_scale_factor
        self.time_embedding_norm = time_embedding_norm
        self.skip_time_act = skip_time_act

        self.norm1, self._act1 = norm_act(groups, in_channels, eps, non_linearity)
        self.conv1 = Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if temb_channels is not None:
            proj_out = out_channels * 2 if time_embedding_norm == "scale_shift" else out_channels
            self.time_emb_proj = torch.nn.Linear(temb_channels, proj_out)
        else:
            self.time_emb_proj = None
        if time_embedding_norm == "scale_shift":
            # The activation comes after the scale and shift, so it cannot be fused into norm2.
            self.norm2 = GroupNorm(groups_out, out_channels, eps=eps, affine=True)
            self._act2 = get_activation(non_linearity)
        else:
            self.norm2, self._act2 = norm_act(groups_out, out_channels, eps, non_linearity)
        self.dropout = torch.nn.Dropout(dropout)
        self.conv2 = Conv2d(out_channels, conv_2d_out_channels, kernel_size=3, stride=1, padding=1)
        self.nonlinearity = get_activation(non_linearity)
        self.use_in_shortcut = in_channels != conv_2d_out_channels if use_in_shortcut is None else use_in_shortcut
        if self.use_in_shortcut:
            k = 3 if conv_shortcut else 1
            self.conv_shortcut = Conv2d(
                in_channels, conv_2d_out_channels, kernel_size=k, stride=1, padding=k // 2, bias=conv_shortcut_bias
            )
        else:
            self.conv_shortcut = None

    def forward(self, input_tensor: Tensor, temb: Optional[Tensor] = None, *args, **kwargs) -> Tensor:
        h = apply_norm_act(self.norm1, self._act1, input_tensor)
        h = self.conv1(h)
        if self.time_emb_proj is not None and temb is not None:
            if not self.skip_time_act:
                temb = self.nonlinearity(temb)
            temb = self.time_emb_proj(temb)[:, :, None, None]
        else:
            temb = None
        if self.time_embedding_norm == "default":
            if temb is not None:
                h = h + temb
            h = apply_norm_act(self.norm2, self._act2, h)
        else:
            if temb is None:
                raise ValueError("ResnetBlock2D: time_embedding_norm='scale_shift' needs a time embedding (temb)")
            scale, shift = torch.chunk(temb, 2, dim=1)
            h = self.norm2(h)
            h = self._act2(h * (1 + scale) + shift)
        h = self.dropout(h)
        if self.conv_shortcut is not None:
            input_tensor = self.conv_shortcut(input_tensor)
        # (shortcut + conv2(h)) / output_scale_factor in conv2's epilogue: one pass instead of three.
        return self.conv2(h, residual=input_tensor, output_scale=1.0 / self.output_scale_factor)


class Downsample2D(torch.nn.Module):
    """diffusers' ``Downsample2D``: a stride-2 3x3 conv (``padding=0`` pads right/bottom by one, as the VAE
    does), or 2x2 average pooling without ``use_conv``."""

    def __init__(
        self,
        channels: int,
        use_conv: bool = False,
        out_channels: Optional[int] = None,
        padding: int = 1,
        name: str = "conv",
        kernel_size: int = 3,
        norm_type=None,
        eps=None,
        elementwise_affine=None,
        bias: bool = True,
    ):
        super().__init__()
        if norm_type is not None:
            refuse("Downsample2D", "norm_type", norm_type, None)
        if name not in ("conv", "op"):
            refuse("Downsample2D", "name", name, ("op", "conv"))
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.padding = padding
        self.name = name
        if use_conv:
            self.conv = Conv2d(channels, self.out_channels, kernel_size, stride=2, padding=padding, bias=bias)
        else:
            if self.out_channels != channels:
                raise ValueError("Downsample2D: average pooling keeps the channels (out_channels must equal channels)")
            self.conv = torch.nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        if self.use_conv and self.padding == 0:
            # diffusers' F.pad(x, (0, 1, 0, 1)) folded into the convolution's padding: no padded copy of x.
            return self.conv(hidden_states, padding=(0, 1, 0, 1))
        return self.conv(hidden_states)


class Upsample2D(torch.nn.Module):
    """diffusers' ``Upsample2D``: nearest 2x (or to ``output_size``) then a 3x3 conv."""

    def __init__(
        self,
        channels: int,
        use_conv: bool = False,
        use_conv_transpose: bool = False,
        out_channels: Optional[int] = None,
        name: str = "conv",
        kernel_size: Optional[int] = None,
        padding: int = 1,
        norm_type=None,
        eps=None,
        elementwise_affine=None,
        bias: bool = True,
        interpolate: bool = True,
    ):
        super().__init__()
        owner = "Upsample2D"
        if use_conv_transpose:
            refuse(owner, "use_conv_transpose", True, False)
        if norm_type is not None:
            refuse(owner, "norm_type", norm_type, None)
        if name != "conv":
            refuse(owner, "name", name, "conv")
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.use_conv_transpose = False
        self.name = name
        self.interpolate = interpolate
        if use_conv:
            k = kernel_size or 3
            self.conv = Conv2d(channels, self.out_channels, kernel_size=k, padding=padding, bias=bias)
        else:
            self.conv = None

    def forward(self, hidden_states: Tensor, output_size=None, *args, **kwargs) -> Tensor:
        if self.interpolate:
            if output_size is None:
                hidden_states = F.interpolate(hidden_states, scale_factor=2.0, mode="nearest")
            else:
                hidden_states = F.interpolate(hidden_states, size=output_size, mode="nearest")
        if self.conv is not None:
            hidden_states = self.conv(hidden_states)
        return hidden_states
