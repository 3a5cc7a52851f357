"""Building blocks shared by fastgen's U-Net, VAE and GAN models."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _backend
from ..ops import group_norm
from ..ops.conv2d import conv2d
from ..ops._checks import check_dtype, check_same_device, check_tensor
from ..ops.attention import HEAD_DIMS as ATTENTION_HEAD_DIMS
from ..ops.attention import attention


class Conv2d(torch.nn.Conv2d):
    """Drop-in for :class:`torch.nn.Conv2d` on fastgen's fused convolution (:func:`fastgen.ops.conv2d`).

    Same constructor, parameters and state-dict names (``weight``, ``bias``). ``forward(x, residual,
    output_scale, padding)`` fuses what follows a diffusers ResNet block's ``conv2`` (``(shortcut + h) *
    output_scale``) and lets a caller pass asymmetric padding (the VAE's stride-2 ``Downsample2D``). Groups,
    dilation and non-zero padding modes run :class:`torch.nn.Conv2d`'s own forward and the epilogue eagerly.
    """

    def forward(self, x: Tensor, residual: Optional[Tensor] = None, output_scale: float = 1.0,
                padding=None) -> Tensor:
        plain = self.groups == 1 and self.dilation == (1, 1) and self.padding_mode == "zeros"
        if plain:
            return conv2d(x, self.weight, self.bias, stride=self.stride,
                          padding=self.padding if padding is None else padding,
                          residual=residual, output_scale=output_scale)
        if padding is not None:
            x = F.pad(x, padding)
        y = super().forward(x)
        if residual is not None:
            y = y + residual
        return y * output_scale if output_scale != 1.0 else y


class GroupNorm(torch.nn.GroupNorm):
    """Drop-in for :class:`torch.nn.GroupNorm` on fastgen's fused kernel.

    Same constructor, parameters and state-dict names (``weight``, ``bias``),
    so it loads any ``nn.GroupNorm`` checkpoint; ``activation="silu"`` fuses the
    SiLU that follows every GroupNorm in a diffusers ResNet block, and
    ``forward(x, residual)`` fuses a skip connection added after it.
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        device=None,
        dtype=None,
        *,
        activation: Optional[str] = None,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__(num_groups, num_channels, eps, affine, device=device, dtype=dtype)
        if activation not in (None, "silu"):
            raise ValueError(f"GroupNorm: activation must be None or 'silu', got {activation!r}")
        self.activation = activation
        self.backend = backend

    @classmethod
    def from_torch(cls, module: torch.nn.GroupNorm, *, activation: Optional[str] = None) -> "GroupNorm":
        """Wrap an existing ``nn.GroupNorm``, sharing (not copying) its parameters."""
        new = cls.__new__(cls)
        torch.nn.Module.__init__(new)
        new.num_groups, new.num_channels = module.num_groups, module.num_channels
        new.eps, new.affine = module.eps, module.affine
        new.weight, new.bias = module.weight, module.bias
        new.activation, new.backend = activation, None
        return new

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        return group_norm(
            x,
            self.num_groups,
            self.weight,
            self.bias,
            self.eps,
            activation=self.activation,
            residual=residual,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        extra = f", activation={self.activation!r}" if self.activation else ""
        return super().extra_repr() + extra


# ------------------------------------------------------------------ attention

_ATTN_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _unsupported(name: str, value, default) -> None:
    if value != default:
        raise NotImplementedError(
            f"Attention: {name}={value!r} is not supported yet (only {default!r}); "
            "fastgen's Attention covers the U-Net and VAE attention of diffusers' AttnProcessor2_0"
        )


class Attention(torch.nn.Module):
    """Multi-head self-/cross-attention with diffusers' ``Attention`` interface.

    Constructor arguments, attributes and parameter names follow
    ``diffusers.models.attention_processor.Attention`` (``to_q``, ``to_k``,
    ``to_v``, ``to_out.0`` Linear, ``to_out.1`` Dropout, optional ``group_norm``
    and ``norm_cross``), so ``load_state_dict(diffusers_attn.state_dict(),
    strict=True)`` works, and ``forward`` computes what diffusers'
    ``AttnProcessor2_0`` computes (``AttnProcessor`` when ``scale_qk=False``):

    * a 4-D input (B, C, H, W) is flattened to H*W tokens of C channels and the
      output restored to (B, C, H, W) (the VAE mid-block);
    * ``group_norm`` (fastgen's fused :class:`GroupNorm`) over the channels;
    * q/k/v projections, heads split to (B, heads, N, head_dim), attention
      through :func:`fastgen.ops.attention` with ``scale`` =
      ``dim_head ** -0.5`` (1.0 with ``scale_qk=False``), heads merged;
    * ``to_out``, the residual (the block's input) if ``residual_connection``,
      then division by ``rescale_output_factor``.

    ``upcast_attention`` / ``upcast_softmax`` are accepted and stored for
    compatibility but change nothing: every fastgen attention backend already
    computes q.k, the softmax and its accumulation in fp32, whatever the
    input dtype, which is what these flags ask diffusers to do.

    ``attention_mask`` (diffusers' convention: (B, Nk), (B, 1 or Nq, Nk) or
    (B*heads, 1 or Nq, Nk), additive float or boolean "may attend"; a 4-D mask
    broadcastable to (B, heads, Nq, Nk) is passed through as is) is not
    supported by the fused op yet, so a masked call runs
    ``torch.nn.functional.scaled_dot_product_attention`` with the mask: correct,
    just not fused. A mask is never ignored.

    Head dims without a fastgen kernel (:data:`fastgen.ops.attention.HEAD_DIMS`)
    also run on SDPA when the backend is chosen automatically (a warning says so
    once); a backend requested by name raises instead, like every fastgen op.

    Not supported yet (``NotImplementedError`` when set): ``kv_heads`` other
    than ``heads``, ``qk_norm``, ``added_kv_proj_dim``, ``spatial_norm_dim``,
    ``only_cross_attention``, ``processor``, ``context_pre_only``,
    ``pre_only`` and ``is_causal`` (which diffusers' own ``AttnProcessor2_0``
    ignores). ``backend`` (keyword-only, fastgen's own) picks the attention
    backend like the ops' ``backend=`` argument.
    """

    def __init__(
        self,
        query_dim: int,
        cross_attention_dim: Optional[int] = None,
        heads: int = 8,
        kv_heads: Optional[int] = None,
        dim_head: int = 64,
        dropout: float = 0.0,
        bias: bool = False,
        upcast_attention: bool = False,
        upcast_softmax: bool = False,
        cross_attention_norm: Optional[str] = None,
        cross_attention_norm_num_groups: int = 32,
        qk_norm: Optional[str] = None,
        added_kv_proj_dim: Optional[int] = None,
        added_proj_bias: Optional[bool] = True,
        norm_num_groups: Optional[int] = None,
        spatial_norm_dim: Optional[int] = None,
        out_bias: bool = True,
        scale_qk: bool = True,
        only_cross_attention: bool = False,
        eps: float = 1e-5,
        rescale_output_factor: float = 1.0,
        residual_connection: bool = False,
        _from_deprecated_attn_block: bool = False,
        processor=None,
        out_dim: Optional[int] = None,
        out_context_dim: Optional[int] = None,
        context_pre_only=None,
        pre_only: bool = False,
        elementwise_affine: bool = True,
        is_causal: bool = False,
        *,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        for name, value in (("query_dim", query_dim), ("heads", heads), ("dim_head", dim_head)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Attention: {name} must be a positive int, got {value!r}")
        if kv_heads is not None and kv_heads != heads:
            _unsupported("kv_heads", kv_heads, None)
        _unsupported("qk_norm", qk_norm, None)
        _unsupported("added_kv_proj_dim", added_kv_proj_dim, None)
        _unsupported("spatial_norm_dim", spatial_norm_dim, None)
        _unsupported("only_cross_attention", only_cross_attention, False)
        _unsupported("processor", processor, None)
        _unsupported("context_pre_only", context_pre_only, None)
        _unsupported("pre_only", pre_only, False)
        _unsupported("is_causal", is_causal, False)
        if out_dim is not None and out_dim % dim_head != 0:
            raise ValueError(f"Attention: out_dim ({out_dim}) must be a multiple of dim_head ({dim_head})")
        if cross_attention_norm not in (None, "layer_norm", "group_norm"):
            raise ValueError(
                f"Attention: cross_attention_norm must be None, 'layer_norm' or 'group_norm', got {cross_attention_norm!r}"
            )
        if rescale_output_factor == 0:
            raise ValueError("Attention: rescale_output_factor must be non-zero")

        self.inner_dim = out_dim if out_dim is not None else dim_head * heads
        self.inner_kv_dim = self.inner_dim
        self.query_dim = query_dim
        self.use_bias = bias
        self.is_cross_attention = cross_attention_dim is not None
        self.cross_attention_dim = cross_attention_dim if cross_attention_dim is not None else query_dim
        self.upcast_attention = upcast_attention
        self.upcast_softmax = upcast_softmax
        self.rescale_output_factor = rescale_output_factor
        self.residual_connection = residual_connection
        self.dropout = dropout
        self.out_dim = out_dim if out_dim is not None else query_dim
        self.scale_qk = scale_qk
        self.scale = dim_head**-0.5 if scale_qk else 1.0
        self.heads = out_dim // dim_head if out_dim is not None else heads
        self.dim_head = dim_head
        self.only_cross_attention = False
        self.is_causal = False
        self._from_deprecated_attn_block = _from_deprecated_attn_block
        self.backend = backend
        # diffusers attributes that code written against its Attention looks at.
        self.spatial_norm = None
        self.norm_q = self.norm_k = None

        if norm_num_groups is not None:
            self.group_norm = GroupNorm(num_groups=norm_num_groups, num_channels=query_dim, eps=eps, affine=True)
        else:
            self.group_norm = None
        if cross_attention_norm == "layer_norm":
            self.norm_cross = torch.nn.LayerNorm(self.cross_attention_dim)
        elif cross_attention_norm == "group_norm":
            self.norm_cross = GroupNorm(cross_attention_norm_num_groups, self.cross_attention_dim, eps=1e-5, affine=True)
        else:
            self.norm_cross = None

        self.to_q = torch.nn.Linear(query_dim, self.inner_dim, bias=bias)
        self.to_k = torch.nn.Linear(self.cross_attention_dim, self.inner_kv_dim, bias=bias)
        self.to_v = torch.nn.Linear(self.cross_attention_dim, self.inner_kv_dim, bias=bias)
        self.to_out = torch.nn.ModuleList(
            [torch.nn.Linear(self.inner_dim, self.out_dim, bias=out_bias), torch.nn.Dropout(dropout)]
        )

    # -------------------------------------------------------------- diffusers

    _CONFIG_ATTRS = (
        "inner_dim", "inner_kv_dim", "query_dim", "use_bias", "is_cross_attention", "cross_attention_dim",
        "upcast_attention", "upcast_softmax", "rescale_output_factor", "residual_connection", "dropout",
        "out_dim", "scale_qk", "scale", "heads", "_from_deprecated_attn_block",
    )

    @classmethod
    def from_diffusers(cls, attn: torch.nn.Module, *, backend: Optional[str] = None) -> "Attention":
        """Build from a diffusers ``Attention``, sharing (not copying) its parameters.

        The returned module's ``to_q``/``to_k``/``to_v``/``to_out``/``norm_cross``
        are the diffusers module's own submodules, and its ``group_norm`` a
        fastgen :class:`GroupNorm` over the same weight and bias tensors; so
        training either trains both, and the state dicts have the same names.
        The result computes what ``AttnProcessor2_0`` computes, whatever
        processor ``attn`` had set.
        """
        checks = (
            ("spatial_norm", getattr(attn, "spatial_norm", None) is not None),
            ("qk_norm", getattr(attn, "norm_q", None) is not None or getattr(attn, "norm_k", None) is not None),
            ("added_kv_proj_dim", getattr(attn, "added_kv_proj_dim", None) is not None),
            ("only_cross_attention", bool(getattr(attn, "only_cross_attention", False))),
            ("pre_only", getattr(attn, "to_out", None) is None),
            ("context_pre_only", getattr(attn, "to_add_out", None) is not None),
            ("kv_heads", getattr(attn, "inner_kv_dim", None) != getattr(attn, "inner_dim", None)),
        )
        for what, bad in checks:
            if bad:
                raise NotImplementedError(f"Attention.from_diffusers: {what} is not supported yet")
        norm_cross = getattr(attn, "norm_cross", None)
        if norm_cross is not None and not isinstance(norm_cross, (torch.nn.LayerNorm, torch.nn.GroupNorm)):
            raise NotImplementedError(f"Attention.from_diffusers: norm_cross {type(norm_cross).__name__}")

        new = cls.__new__(cls)
        torch.nn.Module.__init__(new)
        for name in cls._CONFIG_ATTRS:
            setattr(new, name, getattr(attn, name))
        new.dim_head = new.inner_dim // new.heads
        new.only_cross_attention = False
        new.is_causal = False
        new.backend = backend
        new.spatial_norm = None
        new.norm_q = new.norm_k = None
        gn = getattr(attn, "group_norm", None)
        new.group_norm = GroupNorm.from_torch(gn) if gn is not None else None
        if isinstance(norm_cross, torch.nn.GroupNorm):
            norm_cross = GroupNorm.from_torch(norm_cross)
        new.norm_cross = norm_cross
        new.to_q, new.to_k, new.to_v, new.to_out = attn.to_q, attn.to_k, attn.to_v, attn.to_out
        return new

    # ---------------------------------------------------------------- forward

    def forward(
        self,
        hidden_states: Tensor,
        encoder_hidden_states: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        temb: Optional[Tensor] = None,
    ) -> Tensor:
        """(B, N, query_dim) tokens or a (B, query_dim, H, W) map -> the same shape.

        ``encoder_hidden_states`` (B, Nk, cross_attention_dim) are the keys'
        and values' source (default: the normalised ``hidden_states``);
        ``temb`` is accepted for diffusers' signature (only its spatial norm,
        not supported here, uses it).
        """
        self._check_inputs(hidden_states, encoder_hidden_states)
        residual = hidden_states
        input_ndim = hidden_states.dim()
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.reshape(batch, channels, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]

        if self.group_norm is not None:
            hidden_states = self.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = self.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif self.norm_cross is not None:
            if isinstance(self.norm_cross, torch.nn.GroupNorm):
                encoder_hidden_states = self.norm_cross(encoder_hidden_states.transpose(1, 2)).transpose(1, 2)
            else:
                encoder_hidden_states = self.norm_cross(encoder_hidden_states)
        key = self.to_k(encoder_hidden_states)
        value = self.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // self.heads
        query = query.view(batch, -1, self.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, self.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, self.heads, head_dim).transpose(1, 2)

        out = self._attend(query, key, value, attention_mask)
        out = out.transpose(1, 2).reshape(batch, -1, self.heads * head_dim).to(query.dtype)
        out = self.to_out[0](out)
        out = self.to_out[1](out)

        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channels, height, width)
        if self.residual_connection:
            out = out + residual
        return out / self.rescale_output_factor

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]) -> Tensor:
        if mask is not None:
            mask = self._prepare_mask(mask, q, k)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        head_dim = q.shape[-1]
        if head_dim not in ATTENTION_HEAD_DIMS:
            requested = _backend.requested_backend(self.backend)
            if requested not in (None, "torch"):
                # Named backend: let the op raise its clear error.
                return attention(q, k, v, scale=self.scale, backend=self.backend)
            if requested is None:
                _backend.warn_once(
                    ("Attention", "head_dim", head_dim),
                    f"fastgen Attention: head dim {head_dim} has no fastgen attention kernel "
                    f"(kernels: {ATTENTION_HEAD_DIMS}); using torch's scaled_dot_product_attention",
                    stacklevel=3,
                )
            return F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return attention(q, k, v, scale=self.scale, backend=self.backend)

    @staticmethod
    def _prepare_mask(mask: Tensor, q: Tensor, k: Tensor) -> Tensor:
        """diffusers' mask convention -> a mask broadcastable to (B, heads, Nq, Nk)."""
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"Attention: attention_mask must be a torch.Tensor, got {type(mask).__name__}")
        batch, heads, nq, _ = q.shape
        nk = k.shape[-2]
        if mask.dtype != torch.bool and not mask.is_floating_point():
            raise TypeError(
                f"Attention: attention_mask must be bool (True = may attend) or floating (added to the logits), "
                f"got {str(mask.dtype).replace('torch.', '')}"
            )
        if mask.device != q.device:
            raise ValueError(f"Attention: attention_mask is on {mask.device}, the inputs on {q.device}")
        if mask.shape[-1] != nk:
            raise ValueError(
                f"Attention: attention_mask's last dim must be the number of key tokens ({nk}), "
                f"got shape {tuple(mask.shape)}"
            )
        if mask.dim() in (2, 3):
            lead = mask.shape[0]
            if lead not in (batch, batch * heads, 1):
                raise ValueError(
                    f"Attention: attention_mask's first dim must be batch ({batch}), batch*heads ({batch * heads}) "
                    f"or 1, got shape {tuple(mask.shape)}"
                )
            rows = mask.shape[1] if mask.dim() == 3 else 1
            if rows not in (1, nq):
                raise ValueError(
                    f"Attention: a 3-D attention_mask is (batch, 1 or query tokens ({nq}), key tokens), "
                    f"got shape {tuple(mask.shape)}"
                )
            # diffusers repeats a per-sample mask over the heads and views it as
            # (B, heads, rows, Nk); broadcasting a (B, 1, rows, Nk) view is the same.
            if lead == batch * heads and heads > 1:
                mask = mask.reshape(batch, heads, rows, nk)
            else:
                mask = mask.reshape(lead, 1, rows, nk)
        elif mask.dim() == 4:
            try:
                torch.broadcast_shapes(mask.shape, (batch, heads, nq, nk))
            except RuntimeError:
                raise ValueError(
                    f"Attention: a 4-D attention_mask must broadcast to (batch, heads, Nq, Nk) = "
                    f"{(batch, heads, nq, nk)}, got shape {tuple(mask.shape)}"
                ) from None
        else:
            raise ValueError(f"Attention: attention_mask must be 2-D, 3-D or 4-D, got shape {tuple(mask.shape)}")
        return mask if mask.dtype == torch.bool else mask.to(q.dtype)

    def _check_inputs(self, x: Tensor, context: Optional[Tensor]) -> None:
        check_tensor("Attention: hidden_states", x)
        check_dtype("Attention: hidden_states", x, _ATTN_DTYPES)
        if x.dim() == 3:
            channels, tokens = x.shape[2], x.shape[1]
            layout = "(batch, tokens, query_dim)"
        elif x.dim() == 4:
            channels, tokens = x.shape[1], x.shape[2] * x.shape[3]
            layout = "(batch, query_dim, height, width)"
        else:
            raise ValueError(
                "Attention: hidden_states must be 3-D (batch, tokens, query_dim) or 4-D (batch, query_dim, height, "
                f"width), got shape {tuple(x.shape)}"
            )
        if channels != self.query_dim:
            raise ValueError(
                f"Attention: hidden_states {layout} must have query_dim={self.query_dim} channels, "
                f"got shape {tuple(x.shape)}"
            )
        if tokens == 0:
            raise ValueError(f"Attention: hidden_states has no tokens, shape {tuple(x.shape)}")
        if context is not None:
            check_tensor("Attention: encoder_hidden_states", context)
            if context.dim() != 3 or context.shape[-1] != self.cross_attention_dim:
                raise ValueError(
                    "Attention: encoder_hidden_states must be 3-D (batch, tokens, "
                    f"cross_attention_dim={self.cross_attention_dim}), got shape {tuple(context.shape)}"
                )
            if context.shape[0] != x.shape[0]:
                raise ValueError(
                    f"Attention: encoder_hidden_states has batch {context.shape[0]}, hidden_states {x.shape[0]}"
                )
            if context.shape[1] == 0:
                raise ValueError("Attention: encoder_hidden_states has no tokens")
            # Under autocast the projections cast both to the autocast dtype, as in diffusers.
            if context.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
                raise TypeError(
                    f"Attention: encoder_hidden_states dtype {str(context.dtype).replace('torch.', '')} differs from "
                    f"hidden_states dtype {str(x.dtype).replace('torch.', '')}"
                )
            check_same_device(hidden_states=x, encoder_hidden_states=context)

    def extra_repr(self) -> str:
        return (
            f"heads={self.heads}, dim_head={self.dim_head}, scale={self.scale:.4g}"
            + (", residual_connection=True" if self.residual_connection else "")
            + (f", rescale_output_factor={self.rescale_output_factor}" if self.rescale_output_factor != 1.0 else "")
        )
