"""diffusers' U-Net and VAE blocks (``unet_2d_blocks``) on fastgen's ResNet, attention and transformer blocks.

Each block keeps diffusers' constructor arguments, child names (``resnets``, ``attentions``,
``downsamplers``, ``upsamplers``) and forward signature; :func:`get_down_block`, :func:`get_up_block` and
:func:`get_mid_block` build them by diffusers' type names and refuse a type fastgen does not implement.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

from ._modeling import checkpointed, refuse, refuse_unless
from .blocks import Attention
from .resnet import Downsample2D, ResnetBlock2D, Upsample2D
from .transformer import Transformer2DModel


def _per_layer(value: Union[int, Sequence[int]], num_layers: int, what: str) -> list[int]:
    if isinstance(value, int):
        return [value] * num_layers
    value = list(value)
    # diffusers reads the first num_layers entries (its SDXL mid-block gets the last down block's list)
    if len(value) < num_layers:
        raise ValueError(f"{what} has {len(value)} entries for {num_layers} layers")
    return value[:num_layers]


def _resnet(in_channels, out_channels, temb_channels, c: dict, groups=None, groups_out=None) -> ResnetBlock2D:
    return ResnetBlock2D(
        in_channels=in_channels,
        out_channels=out_channels,
        temb_channels=temb_channels,
        eps=c["resnet_eps"],
        groups=c["resnet_groups"] if groups is None else groups,
        groups_out=groups_out,
        dropout=c["dropout"],
        time_embedding_norm=c["resnet_time_scale_shift"],
        non_linearity=c["resnet_act_fn"],
        output_scale_factor=c["output_scale_factor"],
        pre_norm=c["resnet_pre_norm"],
        skip_time_act=c.get("resnet_skip_time_act", False),
    )


def _block_config(**kw) -> dict:
    c = dict(
        resnet_eps=1e-6, resnet_groups=32, dropout=0.0, resnet_time_scale_shift="default", resnet_act_fn="swish",
        output_scale_factor=1.0, resnet_pre_norm=True,
    )
    c.update(kw)
    refuse_unless("U-Net block", "resnet_time_scale_shift", c["resnet_time_scale_shift"], ("default", "scale_shift"))
    return c


def _spatial_attention(channels: int, head_dim: int, c: dict, groups: Optional[int]) -> Attention:
    """The deprecated-attn-block self-attention of AttnDownBlock2D / UNetMidBlock2D / the VAE mid-block."""
    if head_dim is None:
        head_dim = channels
    if channels % head_dim != 0:
        raise ValueError(f"attention_head_dim {head_dim} must divide the block's channels {channels}")
    return Attention(
        channels, heads=channels // head_dim, dim_head=head_dim, rescale_output_factor=c["output_scale_factor"],
        eps=c["resnet_eps"], norm_num_groups=groups, residual_connection=True, bias=True, upcast_softmax=True,
        _from_deprecated_attn_block=True,
    )


def _transformer(channels: int, num_heads: int, layers: int, c: dict, groups: int) -> Transformer2DModel:
    if channels % num_heads != 0:
        raise ValueError(f"num_attention_heads {num_heads} must divide the block's channels {channels}")
    return Transformer2DModel(
        num_heads, channels // num_heads, in_channels=channels, num_layers=layers,
        cross_attention_dim=c["cross_attention_dim"], norm_num_groups=groups,
        use_linear_projection=c.get("use_linear_projection", False),
        only_cross_attention=c.get("only_cross_attention", False), upcast_attention=c.get("upcast_attention", False),
        attention_type=c.get("attention_type", "default"),
    )


def _cross_attend(attn: Transformer2DModel, h: Tensor, context, attention_mask, cross_attention_kwargs,
                  encoder_attention_mask) -> Tensor:
    """One spatial transformer of a cross-attention block, as diffusers' down, mid and up blocks call it."""
    return attn(
        h, encoder_hidden_states=context, cross_attention_kwargs=cross_attention_kwargs,
        attention_mask=attention_mask, encoder_attention_mask=encoder_attention_mask, return_dict=False,
    )[0]


def _check_cross_options(owner: str, c: dict) -> None:
    if c.get("dual_cross_attention", False):
        refuse(owner, "dual_cross_attention", True, False)
    refuse_unless(owner, "attention_type", c.get("attention_type", "default"), ("default",))


# ------------------------------------------------------------------ down


class _DownBase(torch.nn.Module):
    has_cross_attention = False

    def _init_down(self, out_channels: int, add_downsample: bool, padding: int) -> None:
        self.downsamplers = (
            torch.nn.ModuleList([Downsample2D(out_channels, use_conv=True, out_channels=out_channels,
                                              padding=padding, name="op")])
            if add_downsample else None
        )
        self.gradient_checkpointing = False

    def _downsample(self, h: Tensor, states: tuple) -> tuple[Tensor, tuple]:
        if self.downsamplers is not None:
            for down in self.downsamplers:
                h = down(h)
            states = states + (h,)
        return h, states


class DownBlock2D(_DownBase):
    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, num_layers: int = 1,
                 add_downsample: bool = True, downsample_padding: int = 1, **kw):
        super().__init__()
        c = _block_config(**kw)
        self.resnets = torch.nn.ModuleList(
            [_resnet(in_channels if i == 0 else out_channels, out_channels, temb_channels, c) for i in range(num_layers)]
        )
        self._init_down(out_channels, add_downsample, downsample_padding)

    def forward(self, hidden_states: Tensor, temb: Optional[Tensor] = None, *args, **kwargs):
        states = ()
        for resnet in self.resnets:
            hidden_states = checkpointed(self, resnet, hidden_states, temb)
            states = states + (hidden_states,)
        return self._downsample(hidden_states, states)


class AttnDownBlock2D(_DownBase):
    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, num_layers: int = 1,
                 add_downsample: bool = True, downsample_padding: int = 1, attention_head_dim: int = 1,
                 downsample_type: str = "conv", **kw):
        super().__init__()
        refuse_unless("AttnDownBlock2D", "downsample_type", downsample_type, ("conv",))
        c = _block_config(**kw)
        self.resnets = torch.nn.ModuleList(
            [_resnet(in_channels if i == 0 else out_channels, out_channels, temb_channels, c) for i in range(num_layers)]
        )
        self.attentions = torch.nn.ModuleList(
            [_spatial_attention(out_channels, attention_head_dim, c, c["resnet_groups"]) for _ in range(num_layers)]
        )
        self.downsample_type = downsample_type
        self._init_down(out_channels, add_downsample, downsample_padding)

    def forward(self, hidden_states: Tensor, temb: Optional[Tensor] = None, upsample_size=None,
                cross_attention_kwargs=None, **kwargs):
        states = ()
        for resnet, attn in zip(self.resnets, self.attentions):
            hidden_states = checkpointed(self, resnet, hidden_states, temb)
            hidden_states = attn(hidden_states)
            states = states + (hidden_states,)
        return self._downsample(hidden_states, states)


class CrossAttnDownBlock2D(_DownBase):
    has_cross_attention = True

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, num_layers: int = 1,
                 transformer_layers_per_block: Union[int, Sequence[int]] = 1, num_attention_heads: int = 1,
                 cross_attention_dim: int = 1280, add_downsample: bool = True, downsample_padding: int = 1, **kw):
        super().__init__()
        c = _block_config(cross_attention_dim=cross_attention_dim, **kw)
        _check_cross_options("CrossAttnDownBlock2D", c)
        layers = _per_layer(transformer_layers_per_block, num_layers, "transformer_layers_per_block")
        self.num_attention_heads = num_attention_heads
        self.resnets = torch.nn.ModuleList(
            [_resnet(in_channels if i == 0 else out_channels, out_channels, temb_channels, c) for i in range(num_layers)]
        )
        self.attentions = torch.nn.ModuleList(
            [_transformer(out_channels, num_attention_heads, layers[i], c, c["resnet_groups"]) for i in range(num_layers)]
        )
        self._init_down(out_channels, add_downsample, downsample_padding)

    def forward(self, hidden_states: Tensor, temb: Optional[Tensor] = None,
                encoder_hidden_states: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                cross_attention_kwargs: Optional[dict[str, Any]] = None,
                encoder_attention_mask: Optional[Tensor] = None, additional_residuals: Optional[Tensor] = None):
        states = ()
        blocks = list(zip(self.resnets, self.attentions))
        for i, (resnet, attn) in enumerate(blocks):
            hidden_states = checkpointed(self, resnet, hidden_states, temb)
            hidden_states = _cross_attend(attn, hidden_states, encoder_hidden_states, attention_mask,
                                          cross_attention_kwargs, encoder_attention_mask)
            if i == len(blocks) - 1 and additional_residuals is not None:
                hidden_states = hidden_states + additional_residuals
            states = states + (hidden_states,)
        return self._downsample(hidden_states, states)


class DownEncoderBlock2D(_DownBase):
    """The VAE encoder's block: ResNets without a time embedding, then a stride-2 conv."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int = 1, add_downsample: bool = True,
                 downsample_padding: int = 1, **kw):
        super().__init__()
        c = _block_config(**kw)
        self.resnets = torch.nn.ModuleList(
            [_resnet(in_channels if i == 0 else out_channels, out_channels, None, c) for i in range(num_layers)]
        )
        self._init_down(out_channels, add_downsample, downsample_padding)

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        for resnet in self.resnets:
            hidden_states = checkpointed(self, resnet, hidden_states, None)
        return self._downsample(hidden_states, ())[0]


# ------------------------------------------------------------------- mid


class UNetMidBlock2D(torch.nn.Module):
    """ResNet, then (self-attention, ResNet) x num_layers: the pixel U-Net's and the VAE's middle."""

    has_cross_attention = False

    def __init__(self, in_channels: int, temb_channels: Optional[int], num_layers: int = 1,
                 attn_groups: Optional[int] = None, add_attention: bool = True, attention_head_dim: int = 1, **kw):
        super().__init__()
        c = _block_config(**kw)
        if kw.get("resnet_groups", 32) is None:
            c["resnet_groups"] = min(in_channels // 4, 32)
        if attn_groups is None:
            attn_groups = c["resnet_groups"] if c["resnet_time_scale_shift"] == "default" else None
        self.add_attention = add_attention
        self.resnets = torch.nn.ModuleList(
            [_resnet(in_channels, in_channels, temb_channels, c) for _ in range(num_layers + 1)]
        )
        self.attentions = torch.nn.ModuleList(
            [_spatial_attention(in_channels, attention_head_dim, c, attn_groups) if add_attention else None
             for _ in range(num_layers)]
        )
        self.gradient_checkpointing = False

    def forward(self, hidden_states: Tensor, temb: Optional[Tensor] = None) -> Tensor:
        hidden_states = self.resnets[0](hidden_states, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            if attn is not None:
                hidden_states = attn(hidden_states, temb=temb)
            hidden_states = checkpointed(self, resnet, hidden_states, temb)
        return hidden_states


class UNetMidBlock2DCrossAttn(torch.nn.Module):
    has_cross_attention = True

    def __init__(self, in_channels: int, temb_channels: int, out_channels: Optional[int] = None, num_layers: int = 1,
                 transformer_layers_per_block: Union[int, Sequence[int]] = 1, num_attention_heads: int = 1,
                 cross_attention_dim: int = 1280, resnet_groups_out: Optional[int] = None, **kw):
        super().__init__()
        c = _block_config(cross_attention_dim=cross_attention_dim, **kw)
        _check_cross_options("UNetMidBlock2DCrossAttn", c)
        if kw.get("resnet_groups", 32) is None:
            c["resnet_groups"] = min(in_channels // 4, 32)
        out_channels = out_channels or in_channels
        groups_out = resnet_groups_out or c["resnet_groups"]
        layers = _per_layer(transformer_layers_per_block, num_layers, "transformer_layers_per_block")
        self.num_attention_heads = num_attention_heads
        resnets = [_resnet(in_channels, out_channels, temb_channels, c, groups_out=groups_out)]
        attentions = []
        for i in range(num_layers):
            attentions.append(_transformer(out_channels, num_attention_heads, layers[i], c, groups_out))
            resnets.append(_resnet(out_channels, out_channels, temb_channels, c, groups=groups_out))
        self.resnets = torch.nn.ModuleList(resnets)
        self.attentions = torch.nn.ModuleList(attentions)
        self.gradient_checkpointing = False

    def forward(self, hidden_states: Tensor, temb: Optional[Tensor] = None,
                encoder_hidden_states: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                cross_attention_kwargs: Optional[dict[str, Any]] = None,
                encoder_attention_mask: Optional[Tensor] = None) -> Tensor:
        hidden_states = self.resnets[0](hidden_states, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            hidden_states = _cross_attend(attn, hidden_states, encoder_hidden_states, attention_mask,
                                          cross_attention_kwargs, encoder_attention_mask)
            hidden_states = checkpointed(self, resnet, hidden_states, temb)
        return hidden_states


# -------------------------------------------------------------------- up


class _UpBase(torch.nn.Module):
    has_cross_attention = False

    def _init_up(self, in_channels, prev_output_channel, out_channels, temb_channels, num_layers, c,
                 add_upsample, resolution_idx) -> None:
        resnets = []
        for i in range(num_layers):
            skip = in_channels if i == num_layers - 1 else out_channels
            inp = prev_output_channel if i == 0 else out_channels
            resnets.append(_resnet(inp + skip, out_channels, temb_channels, c))
        self.resnets = torch.nn.ModuleList(resnets)
        self.upsamplers = (
            torch.nn.ModuleList([Upsample2D(out_channels, use_conv=True, out_channels=out_channels)])
            if add_upsample else None
        )
        self.resolution_idx = resolution_idx
        self.gradient_checkpointing = False

    def _upsample(self, h: Tensor, upsample_size) -> Tensor:
        if self.upsamplers is not None:
            for up in self.upsamplers:
                h = up(h, upsample_size)
        return h


def _cat_skip(h: Tensor, skips: tuple) -> tuple[Tensor, tuple]:
    return torch.cat([h, skips[-1]], dim=1), skips[:-1]


class UpBlock2D(_UpBase):
    def __init__(self, in_channels: int, prev_output_channel: int, out_channels: int, temb_channels: int,
                 resolution_idx: Optional[int] = None, num_layers: int = 1, add_upsample: bool = True, **kw):
        super().__init__()
        self._init_up(in_channels, prev_output_channel, out_channels, temb_channels, num_layers, _block_config(**kw),
                      add_upsample, resolution_idx)

    def forward(self, hidden_states: Tensor, res_hidden_states_tuple: tuple, temb: Optional[Tensor] = None,
                upsample_size=None, *args, **kwargs) -> Tensor:
        for resnet in self.resnets:
            hidden_states, res_hidden_states_tuple = _cat_skip(hidden_states, res_hidden_states_tuple)
            hidden_states = checkpointed(self, resnet, hidden_states, temb)
        return self._upsample(hidden_states, upsample_size)


class AttnUpBlock2D(_UpBase):
    def __init__(self, in_channels: int, prev_output_channel: int, out_channels: int, temb_channels: int,
                 resolution_idx: Optional[int] = None, num_layers: int = 1, add_upsample: bool = True,
                 attention_head_dim: int = 1, upsample_type: str = "conv", **kw):
        super().__init__()
        refuse_unless("AttnUpBlock2D", "upsample_type", upsample_type, ("conv",))
        c = _block_config(**kw)
        self._init_up(in_channels, prev_output_channel, out_channels, temb_channels, num_layers, c,
                      add_upsample, resolution_idx)
        self.attentions = torch.nn.ModuleList(
            [_spatial_attention(out_channels, attention_head_dim, c, c["resnet_groups"]) for _ in range(num_layers)]
        )
        self.upsample_type = upsample_type

    def forward(self, hidden_states: Tensor, res_hidden_states_tuple: tuple, temb: Optional[Tensor] = None,
                upsample_size=None, *args, **kwargs) -> Tensor:
        for resnet, attn in zip(self.resnets, self.attentions):
            hidden_states, res_hidden_states_tuple = _cat_skip(hidden_states, res_hidden_states_tuple)
            hidden_states = checkpointed(self, resnet, hidden_states, temb)
            hidden_states = attn(hidden_states)
        return self._upsample(hidden_states, upsample_size)


class CrossAttnUpBlock2D(_UpBase):
    has_cross_attention = True

    def __init__(self, in_channels: int, out_channels: int, prev_output_channel: int, temb_channels: int,
                 resolution_idx: Optional[int] = None, num_layers: int = 1,
                 transformer_layers_per_block: Union[int, Sequence[int]] = 1, num_attention_heads: int = 1,
                 cross_attention_dim: int = 1280, add_upsample: bool = True, **kw):
        super().__init__()
        c = _block_config(cross_attention_dim=cross_attention_dim, **kw)
        _check_cross_options("CrossAttnUpBlock2D", c)
        layers = _per_layer(transformer_layers_per_block, num_layers, "transformer_layers_per_block")
        self.num_attention_heads = num_attention_heads
        self._init_up(in_channels, prev_output_channel, out_channels, temb_channels, num_layers, c,
                      add_upsample, resolution_idx)
        self.attentions = torch.nn.ModuleList(
            [_transformer(out_channels, num_attention_heads, layers[i], c, c["resnet_groups"]) for i in range(num_layers)]
        )

    def forward(self, hidden_states: Tensor, res_hidden_states_tuple: tuple, temb: Optional[Tensor] = None,
                encoder_hidden_states: Optional[Tensor] = None,
                cross_attention_kwargs: Optional[dict[str, Any]] = None, upsample_size=None,
                attention_mask: Optional[Tensor] = None, encoder_attention_mask: Optional[Tensor] = None) -> Tensor:
        for resnet, attn in zip(self.resnets, self.attentions):
            hidden_states, res_hidden_states_tuple = _cat_skip(hidden_states, res_hidden_states_tuple)
            hidden_states = checkpointed(self, resnet, hidden_states, temb)
            hidden_states = _cross_attend(attn, hidden_states, encoder_hidden_states, attention_mask,
                                          cross_attention_kwargs, encoder_attention_mask)
        return self._upsample(hidden_states, upsample_size)


class UpDecoderBlock2D(torch.nn.Module):
    """The VAE decoder's block: ResNets (optionally time-conditioned), then nearest 2x + conv."""

    def __init__(self, in_channels: int, out_channels: int, resolution_idx: Optional[int] = None,
                 num_layers: int = 1, add_upsample: bool = True, temb_channels: Optional[int] = None, **kw):
        super().__init__()
        c = _block_config(**kw)
        self.resnets = torch.nn.ModuleList(
            [_resnet(in_channels if i == 0 else out_channels, out_channels, temb_channels, c) for i in range(num_layers)]
        )
        self.upsamplers = (
            torch.nn.ModuleList([Upsample2D(out_channels, use_conv=True, out_channels=out_channels)])
            if add_upsample else None
        )
        self.resolution_idx = resolution_idx
        self.gradient_checkpointing = False

    def forward(self, hidden_states: Tensor, temb: Optional[Tensor] = None) -> Tensor:
        for resnet in self.resnets:
            hidden_states = checkpointed(self, resnet, hidden_states, temb)
        if self.upsamplers is not None:
            for up in self.upsamplers:
                hidden_states = up(hidden_states)
        return hidden_states


# -------------------------------------------------------------- factories

DOWN_BLOCKS = {"DownBlock2D": DownBlock2D, "AttnDownBlock2D": AttnDownBlock2D,
               "CrossAttnDownBlock2D": CrossAttnDownBlock2D, "DownEncoderBlock2D": DownEncoderBlock2D}
UP_BLOCKS = {"UpBlock2D": UpBlock2D, "AttnUpBlock2D": AttnUpBlock2D, "CrossAttnUpBlock2D": CrossAttnUpBlock2D,
             "UpDecoderBlock2D": UpDecoderBlock2D}
MID_BLOCKS = {"UNetMidBlock2D": UNetMidBlock2D, "UNetMidBlock2DCrossAttn": UNetMidBlock2DCrossAttn}


def _block_type(name: str, table: dict, kind: str, allowed: Sequence[str]):
    name = name[7:] if name.startswith("UNetRes") else name  # diffusers' legacy prefix
    if name not in table or name not in allowed:
        raise NotImplementedError(
            f"{kind} block type {name!r} is not supported by fastgen (supported: {sorted(allowed)})"
        )
    return table[name]


def get_down_block(name: str, allowed: Sequence[str], **kw) -> torch.nn.Module:
    return _block_type(name, DOWN_BLOCKS, "down", allowed)(**kw)


def get_up_block(name: str, allowed: Sequence[str], **kw) -> torch.nn.Module:
    return _block_type(name, UP_BLOCKS, "up", allowed)(**kw)


def get_mid_block(name: str, allowed: Sequence[str], **kw) -> torch.nn.Module:
    return _block_type(name, MID_BLOCKS, "mid", allowed)(**kw)
