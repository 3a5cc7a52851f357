"""``UNet2DConditionModel``: the latent-diffusion U-Net of Stable Diffusion 1.x / 2.x / SDXL, with diffusers'
constructor arguments, parameter names and forward signature, on fastgen's fused blocks.

Implemented: positional time embedding (``TimestepEmbedding`` with ``time_cond_proj_dim``, post-activation
and ``time_embedding_act_fn``), class embeddings (``num_class_embeds``; ``class_embed_type`` ``"timestep"``,
``"identity"``, ``"projection"``, ``"simple_projection"``; ``class_embeddings_concat``), SDXL's
``addition_embed_type="text_time"``, ``encoder_hid_dim_type="text_proj"``, per-block head counts, cross-attention
dims, layers and transformer depths (SDXL's nested ``transformer_layers_per_block``), linear projections,
``upcast_attention`` (fastgen's attention is always fp32 inside), ``resnet_time_scale_shift``
``"default"``/``"scale_shift"``, ``resnet_skip_time_act``, ``resnet_out_scale_factor``, ControlNet residuals
(``down_block_additional_residuals``, ``mid_block_additional_residual``) and T2I-Adapter residuals
(``down_intrablock_additional_residuals``), attention masks. Everything else raises ``NotImplementedError``
naming the argument.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

from .._config import register_to_config
from ._modeling import ModelMixin, SampleOutput, refuse, refuse_unless
from .activations import SILU_NAMES, get_activation
from .blocks import Conv2d, GroupNorm
from .embeddings import TimestepEmbedding, Timesteps
from .unet_blocks import get_down_block, get_mid_block, get_up_block

UNet2DConditionOutput = SampleOutput

_DOWN = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP = ("CrossAttnUpBlock2D", "UpBlock2D")
_MID = ("UNetMidBlock2DCrossAttn",)


def _as_tuple(value, n: int, name: str) -> tuple:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"UNet2DConditionModel: {name} must have one entry per down block ({n}), got {value!r}")
        return tuple(value)
    return (value,) * n


def timesteps_for(sample: Tensor, timestep) -> Tensor:
    """diffusers' broadcast of a timestep (python number, 0-D or (N,) tensor) to one per sample."""
    if not torch.is_tensor(timestep):
        dtype = torch.float64 if isinstance(timestep, float) else torch.int64
        if sample.device.type == "mps":
            dtype = torch.float32 if dtype == torch.float64 else torch.int32
        timestep = torch.tensor([timestep], dtype=dtype, device=sample.device)
    elif timestep.dim() == 0:
        timestep = timestep[None].to(sample.device)
    if timestep.dim() != 1 or timestep.shape[0] not in (1, sample.shape[0]):
        raise ValueError(
            f"timestep must be a number, a 0-D tensor or a 1-D tensor of batch size {sample.shape[0]}, "
            f"got shape {tuple(timestep.shape)}"
        )
    return timestep.expand(sample.shape[0])


def check_sample(owner: str, sample: Tensor, in_channels: int) -> None:
    if not isinstance(sample, torch.Tensor):
        raise TypeError(f"{owner}: sample must be a torch.Tensor, got {type(sample).__name__}")
    if sample.dim() != 4 or sample.shape[1] != in_channels:
        raise ValueError(
            f"{owner}: sample must be (batch, in_channels={in_channels}, height, width), got shape {tuple(sample.shape)}"
        )
    if not sample.is_floating_point():
        raise TypeError(f"{owner}: sample must be a floating tensor, got {sample.dtype}")


class UNet2DConditionModel(ModelMixin):
    """diffusers' ``UNet2DConditionModel`` (same arguments, keys and outputs) on fastgen's fused ops."""

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        sample_size: Optional[Union[int, tuple[int, int]]] = None,
        in_channels: int = 4,
        out_channels: int = 4,
        center_input_sample: bool = False,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        down_block_types: Sequence[str] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                           "DownBlock2D"),
        mid_block_type: Optional[str] = "UNetMidBlock2DCrossAttn",
        up_block_types: Sequence[str] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                         "CrossAttnUpBlock2D"),
        only_cross_attention: Union[bool, Sequence[bool]] = False,
        block_out_channels: Sequence[int] = (320, 640, 1280, 1280),
        layers_per_block: Union[int, Sequence[int]] = 2,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1,
        dropout: float = 0.0,
        act_fn: str = "silu",
        norm_num_groups: Optional[int] = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: Union[int, Sequence[int]] = 1280,
        transformer_layers_per_block: Union[int, Sequence[int], Sequence[Sequence[int]]] = 1,
        reverse_transformer_layers_per_block: Optional[Sequence[Sequence[int]]] = None,
        encoder_hid_dim: Optional[int] = None,
        encoder_hid_dim_type: Optional[str] = None,
        attention_head_dim: Union[int, Sequence[int]] = 8,
        num_attention_heads: Optional[Union[int, Sequence[int]]] = None,
        dual_cross_attention: bool = False,
        use_linear_projection: bool = False,
        class_embed_type: Optional[str] = None,
        addition_embed_type: Optional[str] = None,
        addition_time_embed_dim: Optional[int] = None,
        num_class_embeds: Optional[int] = None,
        upcast_attention: bool = False,
        resnet_time_scale_shift: str = "default",
        resnet_skip_time_act: bool = False,
        resnet_out_scale_factor: float = 1.0,
        time_embedding_type: str = "positional",
        time_embedding_dim: Optional[int] = None,
        time_embedding_act_fn: Optional[str] = None,
        timestep_post_act: Optional[str] = None,
        time_cond_proj_dim: Optional[int] = None,
        conv_in_kernel: int = 3,
        conv_out_kernel: int = 3,
        projection_class_embeddings_input_dim: Optional[int] = None,
        attention_type: str = "default",
        class_embeddings_concat: bool = False,
        mid_block_only_cross_attention: Optional[bool] = None,
        cross_attention_norm: Optional[str] = None,
        addition_embed_type_num_heads: int = 64,
    ):
        super().__init__()
        owner = "UNet2DConditionModel"
        self.sample_size = sample_size
        if num_attention_heads is not None:
            # diffusers raises here too: its attention_head_dim has always meant the number of heads.
            raise ValueError(
                "UNet2DConditionModel: num_attention_heads cannot be set (diffusers' naming issue #2011: "
                "attention_head_dim holds the number of heads in every released config)"
            )
        refuse_unless(owner, "time_embedding_type", time_embedding_type, ("positional",))
        refuse_unless(owner, "addition_embed_type", addition_embed_type, (None, "text_time"))
        refuse_unless(owner, "encoder_hid_dim_type", encoder_hid_dim_type, (None, "text_proj"))
        refuse_unless(owner, "attention_type", attention_type, ("default",))
        refuse_unless(owner, "dual_cross_attention", dual_cross_attention, (False,))
        refuse_unless(owner, "cross_attention_norm", cross_attention_norm, (None,))
        refuse_unless(owner, "resnet_time_scale_shift", resnet_time_scale_shift, ("default", "scale_shift"))
        if any(only_cross_attention if isinstance(only_cross_attention, (list, tuple)) else [only_cross_attention]):
            refuse(owner, "only_cross_attention", only_cross_attention, False)
        if mid_block_only_cross_attention:
            refuse(owner, "mid_block_only_cross_attention", mid_block_only_cross_attention, None)
        if mid_block_type is not None and mid_block_type not in _MID:
            refuse(owner, "mid_block_type", mid_block_type, _MID + (None,))
        n = len(down_block_types)
        if len(up_block_types) != n:
            raise ValueError(f"{owner}: down_block_types ({n}) and up_block_types ({len(up_block_types)}) differ in length")
        if len(block_out_channels) != n:
            raise ValueError(f"{owner}: block_out_channels must have one entry per down block ({n}), got {block_out_channels}")
        if encoder_hid_dim_type is not None and encoder_hid_dim is None:
            raise ValueError(f"{owner}: encoder_hid_dim_type={encoder_hid_dim_type!r} needs encoder_hid_dim")
        if isinstance(cross_attention_dim, (list, tuple)) and encoder_hid_dim_type is not None:
            refuse(owner, "cross_attention_dim", cross_attention_dim, "an int with encoder_hid_dim_type")

        heads = _as_tuple(attention_head_dim, n, "attention_head_dim")
        cross_dims = _as_tuple(cross_attention_dim, n, "cross_attention_dim")
        layers = _as_tuple(layers_per_block, n, "layers_per_block")
        tlayers = _as_tuple(transformer_layers_per_block, n, "transformer_layers_per_block")
        if reverse_transformer_layers_per_block is None and any(isinstance(t, (list, tuple)) for t in tlayers):
            raise ValueError(
                f"{owner}: a nested transformer_layers_per_block needs reverse_transformer_layers_per_block"
            )

        # ----------------------------------------------------------- embeddings
        self.conv_in = Conv2d(in_channels, block_out_channels[0], conv_in_kernel, padding=(conv_in_kernel - 1) // 2)
        time_embed_dim = time_embedding_dim or block_out_channels[0] * 4
        timestep_input_dim = block_out_channels[0]
        self.time_proj = Timesteps(block_out_channels[0], flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(
            timestep_input_dim, time_embed_dim, act_fn=act_fn, post_act_fn=timestep_post_act,
            cond_proj_dim=time_cond_proj_dim,
        )
        self.encoder_hid_proj = (
            torch.nn.Linear(encoder_hid_dim, cross_attention_dim) if encoder_hid_dim_type == "text_proj" else None
        )
        if class_embed_type is None and num_class_embeds is not None:
            self.class_embedding = torch.nn.Embedding(num_class_embeds, time_embed_dim)
        elif class_embed_type == "timestep":
            self.class_embedding = TimestepEmbedding(timestep_input_dim, time_embed_dim, act_fn=act_fn)
        elif class_embed_type == "identity":
            self.class_embedding = torch.nn.Identity(time_embed_dim, time_embed_dim)
        elif class_embed_type in ("projection", "simple_projection"):
            if projection_class_embeddings_input_dim is None:
                raise ValueError(f"{owner}: class_embed_type={class_embed_type!r} needs projection_class_embeddings_input_dim")
            self.class_embedding = (
                TimestepEmbedding(projection_class_embeddings_input_dim, time_embed_dim)
                if class_embed_type == "projection"
                else torch.nn.Linear(projection_class_embeddings_input_dim, time_embed_dim)
            )
        elif class_embed_type is None:
            self.class_embedding = None
        else:
            refuse(owner, "class_embed_type", class_embed_type, (None, "timestep", "identity", "projection", "simple_projection"))
        if addition_embed_type == "text_time":
            if addition_time_embed_dim is None or projection_class_embeddings_input_dim is None:
                raise ValueError(
                    f"{owner}: addition_embed_type='text_time' needs addition_time_embed_dim and "
                    "projection_class_embeddings_input_dim"
                )
            self.add_time_proj = Timesteps(addition_time_embed_dim, flip_sin_to_cos, freq_shift)
            self.add_embedding = TimestepEmbedding(projection_class_embeddings_input_dim, time_embed_dim)
        self.time_embed_act = get_activation(time_embedding_act_fn) if time_embedding_act_fn is not None else None
        blocks_temb = time_embed_dim * 2 if class_embeddings_concat else time_embed_dim

        # resnet_skip_time_act and resnet_out_scale_factor reach only diffusers' ResnetDownsample/SimpleCrossAttn
        # blocks; its Down/CrossAttn/Up blocks (the ones implemented here) never see them, so neither do ours.
        common = dict(
            temb_channels=blocks_temb, resnet_eps=norm_eps, resnet_act_fn=act_fn, resnet_groups=norm_num_groups,
            resnet_time_scale_shift=resnet_time_scale_shift, dropout=dropout,
        )
        cross = dict(use_linear_projection=use_linear_projection, upcast_attention=upcast_attention)

        # ---------------------------------------------------------------- down
        self.down_blocks = torch.nn.ModuleList()
        out_ch = block_out_channels[0]
        for i, kind in enumerate(down_block_types):
            in_ch, out_ch = out_ch, block_out_channels[i]
            kw = dict(common, in_channels=in_ch, out_channels=out_ch, num_layers=layers[i],
                      add_downsample=i < n - 1, downsample_padding=downsample_padding)
            if kind.endswith("CrossAttnDownBlock2D"):
                kw.update(cross, transformer_layers_per_block=tlayers[i], num_attention_heads=heads[i],
                          cross_attention_dim=cross_dims[i])
            self.down_blocks.append(get_down_block(kind, _DOWN, **kw))

        # ----------------------------------------------------------------- mid
        if mid_block_type is None:
            self.mid_block = None
        else:
            kw = dict(common, in_channels=block_out_channels[-1], transformer_layers_per_block=tlayers[-1],
                      num_attention_heads=heads[-1], cross_attention_dim=cross_dims[-1], **cross)
            kw["output_scale_factor"] = mid_block_scale_factor
            self.mid_block = get_mid_block(mid_block_type, _MID, **kw)

        # ------------------------------------------------------------------ up
        self.num_upsamplers = 0
        rev_ch = list(reversed(block_out_channels))
        rev_heads, rev_layers, rev_cross = list(reversed(heads)), list(reversed(layers)), list(reversed(cross_dims))
        rev_t = list(reversed(tlayers)) if reverse_transformer_layers_per_block is None else list(reverse_transformer_layers_per_block)
        self.up_blocks = torch.nn.ModuleList()
        out_ch = rev_ch[0]
        for i, kind in enumerate(up_block_types):
            last = i == n - 1
            prev, out_ch = out_ch, rev_ch[i]
            in_ch = rev_ch[min(i + 1, n - 1)]
            if not last:
                self.num_upsamplers += 1
            kw = dict(common, in_channels=in_ch, out_channels=out_ch, prev_output_channel=prev,
                      num_layers=rev_layers[i] + 1, add_upsample=not last, resolution_idx=i)
            if kind.endswith("CrossAttnUpBlock2D"):
                kw.update(cross, transformer_layers_per_block=rev_t[i], num_attention_heads=rev_heads[i],
                          cross_attention_dim=rev_cross[i])
            self.up_blocks.append(get_up_block(kind, _UP, **kw))

        # ----------------------------------------------------------------- out
        if norm_num_groups is not None:
            fused = act_fn.lower() in SILU_NAMES
            self.conv_norm_out = GroupNorm(norm_num_groups, block_out_channels[0], eps=norm_eps,
                                           activation="silu" if fused else None)
            self.conv_act = None if fused else get_activation(act_fn)
        else:
            self.conv_norm_out = self.conv_act = None
        self.conv_out = Conv2d(block_out_channels[0], out_channels, conv_out_kernel, padding=(conv_out_kernel - 1) // 2)

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        sample: Tensor,
        timestep: Union[Tensor, float, int],
        encoder_hidden_states: Tensor,
        class_labels: Optional[Tensor] = None,
        timestep_cond: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        cross_attention_kwargs: Optional[dict[str, Any]] = None,
        added_cond_kwargs: Optional[dict[str, Tensor]] = None,
        down_block_additional_residuals: Optional[tuple[Tensor, ...]] = None,
        mid_block_additional_residual: Optional[Tensor] = None,
        down_intrablock_additional_residuals: Optional[tuple[Tensor, ...]] = None,
        encoder_attention_mask: Optional[Tensor] = None,
        return_dict: bool = True,
    ):
        cfg = self.config
        check_sample("UNet2DConditionModel", sample, cfg.in_channels)
        if encoder_hidden_states is None or encoder_hidden_states.dim() != 3 or encoder_hidden_states.shape[0] != sample.shape[0]:
            shape = None if encoder_hidden_states is None else tuple(encoder_hidden_states.shape)
            raise ValueError(
                f"UNet2DConditionModel: encoder_hidden_states must be (batch={sample.shape[0]}, tokens, dim), got {shape}"
            )
        factor = 2**self.num_upsamplers
        forward_upsample_size = any(s % factor != 0 for s in sample.shape[-2:])

        # diffusers' masks: 1 = keep, 0 = discard, as an additive bias over the keys
        if attention_mask is not None:
            attention_mask = ((1 - attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
        if encoder_attention_mask is not None:
            encoder_attention_mask = ((1 - encoder_attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
        if cfg.center_input_sample:
            sample = 2 * sample - 1.0

        emb = self.time_embedding(self.time_proj(timesteps_for(sample, timestep)).to(sample.dtype), timestep_cond)
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("UNet2DConditionModel: class_labels are needed (the config has a class embedding)")
            if cfg.class_embed_type == "timestep":
                class_labels = self.time_proj(class_labels).to(sample.dtype)
            class_emb = self.class_embedding(class_labels).to(sample.dtype)
            emb = torch.cat([emb, class_emb], dim=-1) if cfg.class_embeddings_concat else emb + class_emb
        if cfg.addition_embed_type == "text_time":
            emb = emb + self._text_time_embedding(added_cond_kwargs, emb)
        if self.time_embed_act is not None:
            emb = self.time_embed_act(emb)
        if self.encoder_hid_proj is not None:
            encoder_hidden_states = self.encoder_hid_proj(encoder_hidden_states)

        sample = self.conv_in(sample)

        is_controlnet = mid_block_additional_residual is not None and down_block_additional_residuals is not None
        adapter = list(down_intrablock_additional_residuals) if down_intrablock_additional_residuals is not None else None
        if not is_controlnet and down_block_additional_residuals is not None and adapter is None:
            adapter = list(down_block_additional_residuals)  # diffusers' deprecated T2I-Adapter spelling
        cross = dict(encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask,
                     cross_attention_kwargs=cross_attention_kwargs, encoder_attention_mask=encoder_attention_mask)

        skips = (sample,)
        for block in self.down_blocks:
            if block.has_cross_attention:
                extra = {"additional_residuals": adapter.pop(0)} if adapter else {}
                sample, res = block(sample, emb, **cross, **extra)
            else:
                sample, res = block(sample, emb)
                if adapter:
                    sample = sample + adapter.pop(0)
            skips += res

        if is_controlnet:
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(
                    f"UNet2DConditionModel: down_block_additional_residuals has {len(down_block_additional_residuals)} "
                    f"tensors, the U-Net has {len(skips)} skip connections"
                )
            skips = tuple(s + r for s, r in zip(skips, down_block_additional_residuals))

        if self.mid_block is not None:
            sample = self.mid_block(sample, emb, **cross)
            if adapter and sample.shape == adapter[0].shape:
                sample = sample + adapter.pop(0)
        if is_controlnet:
            sample = sample + mid_block_additional_residual

        upsample_size = None
        for i, block in enumerate(self.up_blocks):
            res, skips = skips[-len(block.resnets):], skips[: -len(block.resnets)]
            if i < len(self.up_blocks) - 1 and forward_upsample_size:
                upsample_size = skips[-1].shape[2:]
            if block.has_cross_attention:
                sample = block(sample, res, emb, upsample_size=upsample_size, **cross)
            else:
                sample = block(sample, res, emb, upsample_size=upsample_size)

        if self.conv_norm_out is not None:
            sample = self.conv_norm_out(sample)
            if self.conv_act is not None:
                sample = self.conv_act(sample)
        sample = self.conv_out(sample)
        if not return_dict:
            return (sample,)
        return UNet2DConditionOutput(sample=sample)

    def _text_time_embedding(self, added_cond_kwargs: Optional[dict], emb: Tensor) -> Tensor:
        """SDXL: ``add_embedding(cat(text_embeds, sinusoid(time_ids)))``."""
        added = added_cond_kwargs or {}
        for key in ("text_embeds", "time_ids"):
            if key not in added:
                raise ValueError(
                    f"UNet2DConditionModel: addition_embed_type='text_time' needs added_cond_kwargs[{key!r}]"
                )
        text_embeds, time_ids = added["text_embeds"], added["time_ids"]
        time_embeds = self.add_time_proj(time_ids.flatten()).reshape(text_embeds.shape[0], -1)
        add_embeds = torch.cat([text_embeds, time_embeds], dim=-1).to(emb.dtype)
        return self.add_embedding(add_embeds)
