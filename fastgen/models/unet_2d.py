"""``UNet2DModel``: the pixel-space DDPM U-Net (optionally class-conditioned), with diffusers' constructor
arguments, parameter names and forward signature, on fastgen's fused blocks.

Implemented: positional and learned time embeddings, class embeddings (``num_class_embeds``,
``class_embed_type`` ``"timestep"`` / ``"identity"``), ``DownBlock2D`` / ``AttnDownBlock2D`` /
``UpBlock2D`` / ``AttnUpBlock2D`` with conv down/up-sampling, the attention mid-block (or none, or without
attention), ``resnet_time_scale_shift`` ``"default"`` / ``"scale_shift"``. The score-SDE variants (Fourier
time embedding, skip and FIR blocks, ResNet down/up-samplers) raise ``NotImplementedError`` naming the
argument.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .._config import register_to_config
from ._modeling import ModelMixin, SampleOutput, refuse_unless
from .blocks import Conv2d, GroupNorm
from .embeddings import TimestepEmbedding, Timesteps
from .unet_2d_condition import check_sample
from .unet_blocks import get_down_block, get_mid_block, get_up_block

UNet2DOutput = SampleOutput

_DOWN = ("DownBlock2D", "AttnDownBlock2D")
_UP = ("UpBlock2D", "AttnUpBlock2D")
_MID = ("UNetMidBlock2D",)


class UNet2DModel(ModelMixin):
    """diffusers' ``UNet2DModel`` (same arguments, keys and outputs) on fastgen's fused ops."""

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        sample_size: Optional[Union[int, tuple[int, int]]] = None,
        in_channels: int = 3,
        out_channels: int = 3,
        center_input_sample: bool = False,
        time_embedding_type: str = "positional",
        time_embedding_dim: Optional[int] = None,
        freq_shift: int = 0,
        flip_sin_to_cos: bool = True,
        down_block_types: Sequence[str] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        mid_block_type: Optional[str] = "UNetMidBlock2D",
        up_block_types: Sequence[str] = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        block_out_channels: Sequence[int] = (224, 448, 672, 896),
        layers_per_block: int = 2,
        mid_block_scale_factor: float = 1,
        downsample_padding: int = 1,
        downsample_type: str = "conv",
        upsample_type: str = "conv",
        dropout: float = 0.0,
        act_fn: str = "silu",
        attention_head_dim: Optional[int] = 8,
        norm_num_groups: int = 32,
        attn_norm_num_groups: Optional[int] = None,
        norm_eps: float = 1e-5,
        resnet_time_scale_shift: str = "default",
        add_attention: bool = True,
        class_embed_type: Optional[str] = None,
        num_class_embeds: Optional[int] = None,
        num_train_timesteps: Optional[int] = None,
    ):
        super().__init__()
        owner = "UNet2DModel"
        self.sample_size = sample_size
        refuse_unless(owner, "time_embedding_type", time_embedding_type, ("positional", "learned"))
        refuse_unless(owner, "downsample_type", downsample_type, ("conv",))
        refuse_unless(owner, "upsample_type", upsample_type, ("conv",))
        refuse_unless(owner, "class_embed_type", class_embed_type, (None, "timestep", "identity"))
        refuse_unless(owner, "resnet_time_scale_shift", resnet_time_scale_shift, ("default", "scale_shift"))
        if mid_block_type is not None:
            refuse_unless(owner, "mid_block_type", mid_block_type, _MID + (None,))
        n = len(down_block_types)
        if len(up_block_types) != n:
            raise ValueError(f"{owner}: down_block_types ({n}) and up_block_types ({len(up_block_types)}) differ in length")
        if len(block_out_channels) != n:
            raise ValueError(f"{owner}: block_out_channels must have one entry per down block ({n}), got {block_out_channels}")
        if time_embedding_type == "learned" and num_train_timesteps is None:
            raise ValueError(f"{owner}: time_embedding_type='learned' needs num_train_timesteps")

        time_embed_dim = time_embedding_dim or block_out_channels[0] * 4
        self.conv_in = Conv2d(in_channels, block_out_channels[0], kernel_size=3, padding=(1, 1))
        if time_embedding_type == "positional":
            self.time_proj = Timesteps(block_out_channels[0], flip_sin_to_cos, freq_shift)
        else:
            self.time_proj = torch.nn.Embedding(num_train_timesteps, block_out_channels[0])
        self.time_embedding = TimestepEmbedding(block_out_channels[0], time_embed_dim)
        if class_embed_type is None and num_class_embeds is not None:
            self.class_embedding = torch.nn.Embedding(num_class_embeds, time_embed_dim)
        elif class_embed_type == "timestep":
            self.class_embedding = TimestepEmbedding(block_out_channels[0], time_embed_dim)
        elif class_embed_type == "identity":
            self.class_embedding = torch.nn.Identity(time_embed_dim, time_embed_dim)
        else:
            self.class_embedding = None

        common = dict(temb_channels=time_embed_dim, resnet_eps=norm_eps, resnet_act_fn=act_fn,
                      resnet_groups=norm_num_groups, resnet_time_scale_shift=resnet_time_scale_shift, dropout=dropout)
        self.down_blocks = torch.nn.ModuleList()
        out_ch = block_out_channels[0]
        for i, kind in enumerate(down_block_types):
            in_ch, out_ch = out_ch, block_out_channels[i]
            kw = dict(common, in_channels=in_ch, out_channels=out_ch, num_layers=layers_per_block,
                      add_downsample=i < n - 1, downsample_padding=downsample_padding)
            if kind == "AttnDownBlock2D":
                kw["attention_head_dim"] = attention_head_dim if attention_head_dim is not None else out_ch
            self.down_blocks.append(get_down_block(kind, _DOWN, **kw))

        if mid_block_type is None:
            self.mid_block = None
        else:
            self.mid_block = get_mid_block(
                mid_block_type, _MID, **dict(common, in_channels=block_out_channels[-1],
                                             output_scale_factor=mid_block_scale_factor,
                                             attention_head_dim=attention_head_dim or block_out_channels[-1],
                                             attn_groups=attn_norm_num_groups, add_attention=add_attention),
            )

        self.up_blocks = torch.nn.ModuleList()
        rev = list(reversed(block_out_channels))
        out_ch = rev[0]
        for i, kind in enumerate(up_block_types):
            prev, out_ch = out_ch, rev[i]
            in_ch = rev[min(i + 1, n - 1)]
            kw = dict(common, in_channels=in_ch, out_channels=out_ch, prev_output_channel=prev,
                      num_layers=layers_per_block + 1, add_upsample=i < n - 1)
            if kind == "AttnUpBlock2D":
                kw["attention_head_dim"] = attention_head_dim if attention_head_dim is not None else out_ch
            self.up_blocks.append(get_up_block(kind, _UP, **kw))

        groups_out = norm_num_groups if norm_num_groups is not None else min(block_out_channels[0] // 4, 32)
        # diffusers' UNet2DModel always ends in GroupNorm + SiLU, whatever act_fn says: one fused call.
        self.conv_norm_out = GroupNorm(groups_out, block_out_channels[0], eps=norm_eps, activation="silu")
        self.conv_out = Conv2d(block_out_channels[0], out_channels, kernel_size=3, padding=1)

    def forward(
        self,
        sample: Tensor,
        timestep: Union[Tensor, float, int],
        class_labels: Optional[Tensor] = None,
        return_dict: bool = True,
    ):
        cfg = self.config
        check_sample("UNet2DModel", sample, cfg.in_channels)
        if cfg.center_input_sample:
            sample = 2 * sample - 1.0
        timesteps = timestep
        if not torch.is_tensor(timesteps):
            timesteps = torch.tensor([timesteps], dtype=torch.long, device=sample.device)
        elif timesteps.dim() == 0:
            timesteps = timesteps[None].to(sample.device)
        timesteps = timesteps * torch.ones(sample.shape[0], dtype=timesteps.dtype, device=timesteps.device)
        emb = self.time_embedding(self.time_proj(timesteps).to(self.dtype))
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("UNet2DModel: class_labels are needed (the config has a class embedding)")
            if cfg.class_embed_type == "timestep":
                class_labels = self.time_proj(class_labels)
            emb = emb + self.class_embedding(class_labels).to(self.dtype)
        elif class_labels is not None:
            raise ValueError("UNet2DModel: class_labels given, but the config has no class embedding (num_class_embeds)")

        sample = self.conv_in(sample)
        skips = (sample,)
        for block in self.down_blocks:
            sample, res = block(sample, emb)
            skips += res
        if self.mid_block is not None:
            sample = self.mid_block(sample, emb)
        for block in self.up_blocks:
            res, skips = skips[-len(block.resnets):], skips[: -len(block.resnets)]
            sample = block(sample, res, emb)
        sample = self.conv_out(self.conv_norm_out(sample))
        if not return_dict:
            return (sample,)
        return UNet2DOutput(sample=sample)
