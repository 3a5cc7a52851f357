"""diffusers' spatial transformer (``Transformer2DModel`` for continuous inputs) and its
``BasicTransformerBlock``: self-attention, cross-attention and a GEGLU feed-forward, on fastgen's fused
attention, GroupNorm and GEGLU ops. Parameter names are diffusers'."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from .. import _backend
from ._modeling import SampleOutput, checkpointed, refuse, refuse_unless
from .activations import FeedForward
from .blocks import Attention, Conv2d, GroupNorm


def check_cross_attention_kwargs(kwargs: Optional[dict]) -> None:
    """diffusers hands ``cross_attention_kwargs`` to its attention processors; fastgen's attention takes none.
    ``scale`` (the deprecated LoRA scale, which diffusers ignores too) is dropped with a warning; any other key
    is refused rather than silently ignored."""
    if not kwargs:
        return
    unknown = sorted(k for k in kwargs if k != "scale")
    if unknown:
        raise NotImplementedError(
            f"cross_attention_kwargs {unknown} are not supported by fastgen's attention (it takes none; "
            "a LoRA scale belongs to the pipeline call)"
        )
    _backend.warn_once(
        ("cross_attention_kwargs", "scale"),
        "cross_attention_kwargs['scale'] is ignored, as in diffusers (set LoRA scales on the adapters)",
    )


class BasicTransformerBlock(torch.nn.Module):
    """``x + attn1(norm1(x))``, ``+ attn2(norm2(.), context)``, ``+ ff(norm3(.))`` (``norm_type="layer_norm"``)."""

    def __init__(
        self,
        dim: int,
        num_attention_heads: int,
        attention_head_dim: int,
        dropout: float = 0.0,
        cross_attention_dim: Optional[int] = None,
        activation_fn: str = "geglu",
        num_embeds_ada_norm: Optional[int] = None,
        attention_bias: bool = False,
        only_cross_attention: bool = False,
        double_self_attention: bool = False,
        upcast_attention: bool = False,
        norm_elementwise_affine: bool = True,
        norm_type: str = "layer_norm",
        norm_eps: float = 1e-5,
        final_dropout: bool = False,
        attention_type: str = "default",
        positional_embeddings: Optional[str] = None,
        num_positional_embeddings: Optional[int] = None,
        ada_norm_continous_conditioning_embedding_dim: Optional[int] = None,
        ada_norm_bias: Optional[int] = None,
        ff_inner_dim: Optional[int] = None,
        ff_bias: bool = True,
        attention_out_bias: bool = True,
    ):
        super().__init__()
        owner = "BasicTransformerBlock"
        refuse_unless(owner, "norm_type", norm_type, ("layer_norm",))
        refuse_unless(owner, "attention_type", attention_type, ("default",))
        refuse_unless(owner, "num_embeds_ada_norm", num_embeds_ada_norm, (None,))
        refuse_unless(owner, "positional_embeddings", positional_embeddings, (None,))
        if only_cross_attention:
            refuse(owner, "only_cross_attention", only_cross_attention, False)
        self.dim = dim
        self.only_cross_attention = False
        self.norm_type = norm_type
        self.norm1 = torch.nn.LayerNorm(dim, elementwise_affine=norm_elementwise_affine, eps=norm_eps)
        self.attn1 = Attention(
            query_dim=dim, heads=num_attention_heads, dim_head=attention_head_dim, dropout=dropout,
            bias=attention_bias, upcast_attention=upcast_attention, out_bias=attention_out_bias,
        )
        if cross_attention_dim is not None or double_self_attention:
            self.norm2 = torch.nn.LayerNorm(dim, norm_eps, norm_elementwise_affine)
            self.attn2 = Attention(
                query_dim=dim, cross_attention_dim=cross_attention_dim if not double_self_attention else None,
                heads=num_attention_heads, dim_head=attention_head_dim, dropout=dropout, bias=attention_bias,
                upcast_attention=upcast_attention, out_bias=attention_out_bias,
            )
        else:
            self.norm2 = self.attn2 = None
        self.norm3 = torch.nn.LayerNorm(dim, norm_eps, norm_elementwise_affine)
        self.ff = FeedForward(
            dim, dropout=dropout, activation_fn=activation_fn, final_dropout=final_dropout,
            inner_dim=ff_inner_dim, bias=ff_bias,
        )

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Optional[Tensor] = None,
        encoder_hidden_states: Optional[Tensor] = None,
        encoder_attention_mask: Optional[Tensor] = None,
        timestep=None,
        cross_attention_kwargs: Optional[dict[str, Any]] = None,
        class_labels=None,
        added_cond_kwargs=None,
    ) -> Tensor:
        check_cross_attention_kwargs(cross_attention_kwargs)
        hidden_states = self.attn1(self.norm1(hidden_states), attention_mask=attention_mask) + hidden_states
        if self.attn2 is not None:
            hidden_states = (
                self.attn2(self.norm2(hidden_states), encoder_hidden_states, attention_mask=encoder_attention_mask)
                + hidden_states
            )
        return self.ff(self.norm3(hidden_states)) + hidden_states


class Transformer2DModel(torch.nn.Module):
    """diffusers' ``Transformer2DModel`` for continuous (B, C, H, W) inputs: ``x + proj_out(blocks(proj_in(
    norm(x))))`` over H*W tokens, with 1x1-conv or (``use_linear_projection``) Linear projections."""

    def __init__(
        self,
        num_attention_heads: int = 16,
        attention_head_dim: int = 88,
        in_channels: Optional[int] = None,
        out_channels: Optional[int] = None,
        num_layers: int = 1,
        dropout: float = 0.0,
        norm_num_groups: int = 32,
        cross_attention_dim: Optional[int] = None,
        attention_bias: bool = False,
        sample_size: Optional[int] = None,
        num_vector_embeds: Optional[int] = None,
        patch_size: Optional[int] = None,
        activation_fn: str = "geglu",
        num_embeds_ada_norm: Optional[int] = None,
        use_linear_projection: bool = False,
        only_cross_attention: bool = False,
        double_self_attention: bool = False,
        upcast_attention: bool = False,
        norm_type: str = "layer_norm",
        norm_elementwise_affine: bool = True,
        norm_eps: float = 1e-5,
        attention_type: str = "default",
        caption_channels: Optional[int] = None,
        interpolation_scale: Optional[float] = None,
        use_additional_conditions: Optional[bool] = None,
    ):
        super().__init__()
        owner = "Transformer2DModel"
        if in_channels is None:
            refuse(owner, "in_channels", None, "an int (continuous inputs)")
        for name, value in (("num_vector_embeds", num_vector_embeds), ("patch_size", patch_size),
                            ("caption_channels", caption_channels)):
            refuse_unless(owner, name, value, (None,))
        self.num_attention_heads = num_attention_heads
        self.attention_head_dim = attention_head_dim
        self.in_channels = in_channels
        self.out_channels = in_channels if out_channels is None else out_channels
        self.use_linear_projection = use_linear_projection
        self.gradient_checkpointing = False
        inner_dim = num_attention_heads * attention_head_dim
        self.inner_dim = inner_dim
        self.norm = GroupNorm(num_groups=norm_num_groups, num_channels=in_channels, eps=1e-6, affine=True)
        if use_linear_projection:
            self.proj_in = torch.nn.Linear(in_channels, inner_dim)
        else:
            self.proj_in = Conv2d(in_channels, inner_dim, kernel_size=1, stride=1, padding=0)
        self.transformer_blocks = torch.nn.ModuleList(
            [
                BasicTransformerBlock(
                    inner_dim, num_attention_heads, attention_head_dim, dropout=dropout,
                    cross_attention_dim=cross_attention_dim, activation_fn=activation_fn,
                    num_embeds_ada_norm=num_embeds_ada_norm, attention_bias=attention_bias,
                    only_cross_attention=only_cross_attention, double_self_attention=double_self_attention,
                    upcast_attention=upcast_attention, norm_type=norm_type,
                    norm_elementwise_affine=norm_elementwise_affine, norm_eps=norm_eps, attention_type=attention_type,
                )
                for _ in range(num_layers)
            ]
        )
        if use_linear_projection:
            self.proj_out = torch.nn.Linear(inner_dim, self.out_channels)
        else:
            self.proj_out = Conv2d(inner_dim, self.out_channels, kernel_size=1, stride=1, padding=0)

    def forward(
        self,
        hidden_states: Tensor,
        encoder_hidden_states: Optional[Tensor] = None,
        timestep=None,
        added_cond_kwargs=None,
        class_labels=None,
        cross_attention_kwargs: Optional[dict[str, Any]] = None,
        attention_mask: Optional[Tensor] = None,
        encoder_attention_mask: Optional[Tensor] = None,
        return_dict: bool = True,
    ):
        if hidden_states.dim() != 4:
            raise ValueError(
                f"Transformer2DModel: hidden_states must be (batch, channels, height, width), got shape "
                f"{tuple(hidden_states.shape)}"
            )
        batch, _, height, width = hidden_states.shape
        residual = hidden_states
        h = self.norm(hidden_states)
        if not self.use_linear_projection:
            h = self.proj_in(h)
            h = h.permute(0, 2, 3, 1).reshape(batch, height * width, self.inner_dim)
        else:
            h = h.permute(0, 2, 3, 1).reshape(batch, height * width, self.in_channels)
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = checkpointed(
                self,
                lambda x, b=block: b(
                    x, attention_mask=attention_mask, encoder_hidden_states=encoder_hidden_states,
                    encoder_attention_mask=encoder_attention_mask, cross_attention_kwargs=cross_attention_kwargs,
                ),
                h,
            )
        if not self.use_linear_projection:
            # The tokens are an (B, H, W, C) map: as a channels-last (B, C, H, W) view it feeds the 1x1 conv
            # without diffusers' .contiguous() copy; `residual + h` takes the residual's layout.
            h = h.reshape(batch, height, width, self.inner_dim).permute(0, 3, 1, 2)
            h = self.proj_out(h)
        else:
            h = self.proj_out(h)
            h = h.reshape(batch, height, width, self.out_channels).permute(0, 3, 1, 2)
        out = residual + h
        if not return_dict:
            return (out,)
        return SampleOutput(sample=out)
