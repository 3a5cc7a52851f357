"""An attention processor for diffusers' ``Attention`` that computes what ``AttnProcessor2_0`` computes, with
fastgen's attention kernel and GroupNorm.

It is installed with diffusers' own hook (``Attention.set_processor``), so the module, its projections
(plain ``Linear`` or peft LoRA wrappers) and its parameters stay what they are. Only modules whose current
processor is diffusers' default (``AttnProcessor2_0`` / ``AttnProcessor``) are switched: a processor the
user chose (IP-Adapter, fused QKV, a custom one) is theirs and is left alone.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _backend
from ..ops.attention import HEAD_DIMS, attention
from ..ops.group_norm import group_norm

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def unsupported_reason(attn: torch.nn.Module) -> Optional[str]:
    """Why this ``Attention`` module keeps its processor (None: the fastgen processor covers it)."""
    processor = getattr(attn, "processor", None)
    name = type(processor).__name__
    if name not in ("AttnProcessor2_0", "AttnProcessor"):
        return f"its processor is {name}, not diffusers' default"
    features = (
        ("spatial_norm", getattr(attn, "spatial_norm", None) is not None),
        ("norm_q/norm_k", getattr(attn, "norm_q", None) is not None or getattr(attn, "norm_k", None) is not None),
        ("added_kv_proj_dim", getattr(attn, "added_kv_proj_dim", None) is not None),
        ("only_cross_attention", bool(getattr(attn, "only_cross_attention", False))),
        ("is_causal", bool(getattr(attn, "is_causal", False))),
    )
    for feature, present in features:
        if present:
            return f"it uses {feature}"
    head_dim = attn.inner_dim // attn.heads
    if name == "AttnProcessor" and not math.isclose(attn.scale, head_dim ** -0.5):
        # The classic processor applies attn.scale (scale_qk=False); AttnProcessor2_0, which this one
        # reproduces, always uses SDPA's default.
        return f"AttnProcessor with scale {attn.scale:g} (not 1/sqrt(head_dim))"
    return None


class FastgenAttnProcessor:
    """diffusers' ``AttnProcessor2_0`` on fastgen's kernels.

    Same steps in the same order: spatial norm (absent here by construction), 4-D maps to tokens, the mask
    through ``attn.prepare_attention_mask``, ``group_norm`` (fastgen's), the projections, ``norm_cross``,
    attention, ``to_out``, the residual connection and ``rescale_output_factor``. The softmax scale is
    SDPA's default ``1/sqrt(head_dim)``, as in ``AttnProcessor2_0`` (which does not pass ``attn.scale``), so
    the images are the same. With an attention mask, a head dim fastgen has no kernel for, or a dtype the
    kernel lacks, the product runs on SDPA exactly as diffusers' does, and a head dim says so once.
    """

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: Tensor,
        encoder_hidden_states: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        temb: Optional[Tensor] = None,
        *args,
        **kwargs,
    ) -> Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        batch, key_tokens, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, key_tokens, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            gn = attn.group_norm
            hidden_states = group_norm(
                hidden_states.transpose(1, 2), gn.num_groups, gn.weight, gn.bias, gn.eps
            ).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        out = _attend(query, key, value, attention_mask, head_dim)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], head_dim: int) -> Tensor:
    if mask is None and head_dim in HEAD_DIMS and q.dtype in _KERNEL_DTYPES and q.dtype == k.dtype == v.dtype:
        return attention(q, k, v, scale=1.0 / math.sqrt(head_dim))
    if mask is None and head_dim not in HEAD_DIMS:
        _backend.warn_once(
            ("drop_in.attention", "head_dim", head_dim),
            f"fastgen.patch: attention head dim {head_dim} has no fastgen kernel (kernels: {HEAD_DIMS}); "
            "those layers run torch's scaled_dot_product_attention, as diffusers does",
            stacklevel=3,
        )
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
