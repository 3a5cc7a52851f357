"""diffusers' ``AutoencoderKL`` (the Stable Diffusion / SDXL VAE) on fastgen's fused blocks.

``Encoder``, ``Decoder``, ``DiagonalGaussianDistribution`` and ``AutoencoderKL`` take diffusers'
constructor arguments and parameter names (``encoder.conv_in``, ``encoder.down_blocks.*``,
``encoder.mid_block.*``, ``encoder.conv_norm_out``, ``quant_conv``, ``post_quant_conv``, ``decoder.*``), so
``load_state_dict(diffusers_vae.state_dict(), strict=True)`` works, and compute what diffusers 0.42
computes: ``encode`` -> ``.latent_dist``, ``decode`` -> ``.sample``, ``forward``, slicing and tiled
encode/decode (same tile grid, same linear blend). Every GroupNorm+SiLU pair, the encoder's and decoder's
final ``conv_norm_out`` + ``conv_act`` included, is one fused ``group_norm(activation="silu")`` call
(diffusers' ``conv_act`` is always ``nn.SiLU`` whatever ``act_fn`` says, so that one is always fused).

Tiling
------
``enable_tiling()`` / ``disable_tiling()`` / ``use_tiling``, ``tile_sample_min_size`` (default
``sample_size``), ``tile_latent_min_size`` (``sample_size / 2**(len(block_out_channels) - 1)``) and
``tile_overlap_factor`` (0.25) are diffusers'. A tiled decode cuts the latent into
``tile_latent_min_size`` squares every ``int(tile_latent_min_size * (1 - overlap))`` latent pixels, decodes
each, blends each tile linearly into the (already blended) tile above and to its left over
``int(tile_sample_min_size * overlap)`` output pixels and keeps the top-left
``tile_sample_min_size - blend`` pixels of each; the encode is the same with the roles swapped. The
result equals diffusers' tiled result to fp32 rounding (only the previous row of tiles is kept, not all).

Automatic tiling (fastgen's, not diffusers'): when tiling was neither enabled nor disabled explicitly
(``use_tiling`` never set), a decode whose latent's height or width exceeds ``auto_tiling_min_size``
(default 128 latent pixels: images above 1024x1024 with the 8x SD VAE) is tiled, and so is an encode whose
image exceeds ``auto_tiling_min_size * 2**(len(block_out_channels) - 1)`` pixels. Set the attribute to
``None`` to turn the rule off; ``disable_tiling()`` (or ``use_tiling = False``) turns it off for that model
and gives diffusers' untiled result at any size.

Memory, measured on this 2-core AVX2 CPU (fp32, random weights, the SD VAE config
``block_out_channels=(128, 256, 512, 512)``, ``layers_per_block=2``, ``sample_size=512``, no grad,
peak RSS of a fresh process from ``resource.getrusage(RUSAGE_SELF).ru_maxrss``):

* untiled 512x512 decode (latent 1x4x64x64, one tile's worth): 68.8 s, peak RSS 1.64 GiB, of which 0.96 GiB
  is the decode's growth over the 0.67 GiB of the process with torch and the model (84M fp32 parameters);
* tiled 1024x1024 decode (latent 1x4x128x128, 3x3 tiles of 64 latent pixels, 6.25 full tiles of work):
  384 s, peak RSS 1.68 GiB (growth 1.01 GiB): a tiled decode's peak is one tile's decode plus the output
  and two rows of decoded tiles, whatever the image size;
* tiled 2048x2048 decode (latent 1x4x256x256, 6x6 tiles, 27.6 full tiles of work), measured later on a
  quieter machine: 786.5 s, peak RSS 1.73 GiB (growth 1.06 GiB over the same 0.67 GiB), output finite:
  bounded by one tile's decode plus the 48 MiB output and two rows of tiles;
* untiled 2048x2048 not run: about 15 GiB growth (the 512 decode's 0.96 GiB x 16 pixels; by hand, the last
  upsampler's 256-channel 2048x2048 fp32 tensors are 4 GiB each and two or three are live together).

The times were taken while other jobs loaded the machine (load average 5-6 on 2 cores): expect about half
on an idle one. The peaks do not depend on that.

Precision: ``force_upcast``. diffusers' VAE itself never upcasts; its SD/SDXL pipelines, when
``vae.config.force_upcast`` is true and the VAE is fp16, move the whole VAE to fp32 for the decode (and for
img2img's encode), since fp16 activations overflow in the SDXL VAE. fastgen makes that an explicit
argument: ``decode(z, upcast=None)`` / ``encode(x, upcast=None)``; ``None`` upcasts exactly when
``config.force_upcast`` is true and the weights are fp16, ``True`` always computes in fp32 (autocast off,
weights cast per call through ``torch.func.functional_call``, the module itself untouched), ``False``
never. An upcast result is rounded once to the input's dtype.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .._config import register_to_config
from ..schedulers.noise import randn_tensor
from ._modeling import ModelMixin, ModelOutput, SampleOutput, checkpointed, refuse, refuse_unless
from .activations import get_activation
from .blocks import Conv2d, GroupNorm
from .unet_blocks import UNetMidBlock2D, get_down_block, get_up_block

__all__ = [
    "AutoencoderKL",
    "AutoencoderKLOutput",
    "Decoder",
    "DecoderOutput",
    "DiagonalGaussianDistribution",
    "Encoder",
]

DecoderOutput = SampleOutput

_DOWN_TYPES = ("DownEncoderBlock2D",)
_UP_TYPES = ("UpDecoderBlock2D",)


def _check_blocks(owner: str, types: Sequence[str], block_out_channels: Sequence[int], what: str) -> None:
    if len(types) != len(block_out_channels):
        raise ValueError(
            f"{owner}: {what} has {len(types)} entries but block_out_channels has {len(block_out_channels)}; "
            "they must have one entry per block"
        )


def _head(norm: GroupNorm, conv: torch.nn.Conv2d, x: Tensor) -> Tensor:
    return conv(norm(x))


class Encoder(torch.nn.Module):
    """diffusers' VAE ``Encoder``: ``conv_in``, ``DownEncoderBlock2D`` x n, ``UNetMidBlock2D``, then
    ``conv_out(silu(conv_norm_out(.)))`` (one fused norm+SiLU) to ``2 * out_channels`` (``double_z``).

    ``gradient_checkpointing`` (set by ``AutoencoderKL.enable_gradient_checkpointing``) checkpoints the
    output head here; the blocks checkpoint their ResNets under their own flags.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        down_block_types: Sequence[str] = ("DownEncoderBlock2D",),
        block_out_channels: Sequence[int] = (64,),
        layers_per_block: int = 2,
        norm_num_groups: int = 32,
        act_fn: str = "silu",
        double_z: bool = True,
        mid_block_add_attention: bool = True,
    ):
        super().__init__()
        _check_blocks("Encoder", down_block_types, block_out_channels, "down_block_types")
        get_activation(act_fn)  # an unknown name raises here, by name
        self.layers_per_block = layers_per_block
        self.conv_in = Conv2d(in_channels, block_out_channels[0], kernel_size=3, stride=1, padding=1)
        self.down_blocks = torch.nn.ModuleList()
        channels = block_out_channels[0]
        for i, block_type in enumerate(down_block_types):
            in_ch, channels = channels, block_out_channels[i]
            self.down_blocks.append(
                get_down_block(
                    block_type, _DOWN_TYPES, in_channels=in_ch, out_channels=channels, num_layers=layers_per_block,
                    add_downsample=i != len(block_out_channels) - 1, downsample_padding=0, resnet_eps=1e-6,
                    resnet_act_fn=act_fn, resnet_groups=norm_num_groups,
                )
            )
        self.mid_block = UNetMidBlock2D(
            in_channels=block_out_channels[-1], temb_channels=None, resnet_eps=1e-6, resnet_act_fn=act_fn,
            output_scale_factor=1, resnet_time_scale_shift="default", attention_head_dim=block_out_channels[-1],
            resnet_groups=norm_num_groups, add_attention=mid_block_add_attention,
        )
        self.conv_norm_out = GroupNorm(norm_num_groups, block_out_channels[-1], eps=1e-6, activation="silu")
        self.conv_out = Conv2d(
            block_out_channels[-1], 2 * out_channels if double_z else out_channels, 3, padding=1
        )
        self.gradient_checkpointing = False

    def forward(self, sample: Tensor) -> Tensor:
        sample = self.conv_in(sample)
        for block in self.down_blocks:
            sample = block(sample)
        sample = self.mid_block(sample)
        return checkpointed(self, _head, self.conv_norm_out, self.conv_out, sample)


class Decoder(torch.nn.Module):
    """diffusers' VAE ``Decoder``: ``conv_in``, ``UNetMidBlock2D``, ``UpDecoderBlock2D`` x n
    (``layers_per_block + 1`` ResNets each), then ``conv_out(silu(conv_norm_out(.)))`` (one fused call).

    ``norm_type="spatial"`` (the MoVQ decoder's SpatialNorm) is not implemented and refused by name.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        up_block_types: Sequence[str] = ("UpDecoderBlock2D",),
        block_out_channels: Sequence[int] = (64,),
        layers_per_block: int = 2,
        norm_num_groups: int = 32,
        act_fn: str = "silu",
        norm_type: str = "group",
        mid_block_add_attention: bool = True,
    ):
        super().__init__()
        refuse_unless("Decoder", "norm_type", norm_type, ("group",))
        _check_blocks("Decoder", up_block_types, block_out_channels, "up_block_types")
        get_activation(act_fn)
        self.layers_per_block = layers_per_block
        self.conv_in = Conv2d(in_channels, block_out_channels[-1], kernel_size=3, stride=1, padding=1)
        # Without a SpatialNorm there is no time embedding, and diffusers' "group" time-scale-shift of the
        # up blocks' ResNets is then its "default": the same computation.
        self.mid_block = UNetMidBlock2D(
            in_channels=block_out_channels[-1], temb_channels=None, resnet_eps=1e-6, resnet_act_fn=act_fn,
            output_scale_factor=1, resnet_time_scale_shift="default", attention_head_dim=block_out_channels[-1],
            resnet_groups=norm_num_groups, add_attention=mid_block_add_attention,
        )
        self.up_blocks = torch.nn.ModuleList()
        reversed_channels = list(reversed(block_out_channels))
        channels = reversed_channels[0]
        for i, block_type in enumerate(up_block_types):
            in_ch, channels = channels, reversed_channels[i]
            self.up_blocks.append(
                get_up_block(
                    block_type, _UP_TYPES, in_channels=in_ch, out_channels=channels, num_layers=layers_per_block + 1,
                    add_upsample=i != len(block_out_channels) - 1, resnet_eps=1e-6, resnet_act_fn=act_fn,
                    resnet_groups=norm_num_groups, temb_channels=None,
                )
            )
        self.conv_norm_out = GroupNorm(norm_num_groups, block_out_channels[0], eps=1e-6, activation="silu")
        self.conv_out = Conv2d(block_out_channels[0], out_channels, 3, padding=1)
        self.gradient_checkpointing = False

    def forward(self, sample: Tensor, latent_embeds: Optional[Tensor] = None) -> Tensor:
        if latent_embeds is not None:
            refuse("Decoder", "latent_embeds", "<tensor>", None)
        sample = self.conv_in(sample)
        sample = self.mid_block(sample)
        for block in self.up_blocks:
            sample = block(sample)
        return checkpointed(self, _head, self.conv_norm_out, self.conv_out, sample)


class DiagonalGaussianDistribution:
    """diffusers' posterior: ``parameters`` (B, 2C, H, W) split into ``mean`` and ``logvar`` along dim 1,
    ``logvar`` clamped to [-30, 20], ``std = exp(logvar / 2)``, ``var = exp(logvar)``.

    ``sample(generator)`` draws ``mean + std * randn`` with diffusers' ``randn_tensor`` rules (a CPU
    generator draws on the CPU; a list of generators, or of int seeds, one per sample), so the same seed gives
    diffusers' sample. ``deterministic=True`` makes ``std``/``var`` zero and ``kl``/``nll`` zero; those
    zeros are (B,) tensors on the parameters' device (diffusers returns a one-element CPU tensor).
    """

    def __init__(self, parameters: Tensor, deterministic: bool = False):
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.deterministic = deterministic
        if deterministic:
            self.std = self.var = torch.zeros_like(self.mean)
        else:
            self.std = torch.exp(0.5 * self.logvar)
            self.var = torch.exp(self.logvar)

    def sample(self, generator=None) -> Tensor:
        noise = randn_tensor(self.mean.shape, generator, device=self.parameters.device, dtype=self.parameters.dtype)
        return self.mean + self.std * noise

    def mode(self) -> Tensor:
        return self.mean

    def _zero(self) -> Tensor:
        return self.mean.new_zeros(self.mean.shape[0])

    def kl(self, other: Optional["DiagonalGaussianDistribution"] = None) -> Tensor:
        if self.deterministic:
            return self._zero()
        if other is None:
            terms = self.mean.pow(2) + self.var - 1.0 - self.logvar
        else:
            terms = (self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar
        return 0.5 * torch.sum(terms, dim=[1, 2, 3])

    def nll(self, sample: Tensor, dims: Sequence[int] = (1, 2, 3)) -> Tensor:
        if self.deterministic:
            return self._zero()
        return 0.5 * torch.sum(np.log(2.0 * np.pi) + self.logvar + (sample - self.mean).pow(2) / self.var, dim=list(dims))


@dataclass
class AutoencoderKLOutput(ModelOutput):
    """diffusers' ``AutoencoderKLOutput``: the posterior of ``encode``."""

    latent_dist: DiagonalGaussianDistribution


# ------------------------------------------------------------------ tiling


def _blend(prev: Tensor, cur: Tensor, extent: int, dim: int) -> Tensor:
    """``cur`` with its first ``extent`` rows (dim 2) or columns (dim 3) replaced by the linear ramp from
    ``prev``'s last ones: weight ``k / extent`` on ``cur``'s k-th line, ``1 - k / extent`` on ``prev``'s.
    The weights are computed in float64 and rounded once, like diffusers' Python-float factors."""
    extent = min(prev.shape[dim], cur.shape[dim], extent)
    if extent <= 0:
        return cur
    w = torch.arange(extent, dtype=torch.float64, device=cur.device) / extent
    shape = [1, 1, 1, 1]
    shape[dim] = extent
    compute = torch.promote_types(cur.dtype, torch.float32)
    w_cur = w.to(compute).view(shape)
    w_prev = (1.0 - w).to(compute).view(shape)
    head = prev.narrow(dim, prev.shape[dim] - extent, extent).to(compute) * w_prev
    head = (head + cur.narrow(dim, 0, extent).to(compute) * w_cur).to(cur.dtype)
    return torch.cat([head, cur.narrow(dim, extent, cur.shape[dim] - extent)], dim=dim)


def _tiled(x: Tensor, tile: int, step: int, blend: int, keep: int, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """diffusers' tile grid and blend: tiles ``x[..., i:i+tile, j:j+tile]`` for i, j in ``range(0, size,
    step)``, each ``fn``-mapped, blended into the blended tiles above and to the left, cropped to ``keep``."""
    if step <= 0 or keep <= 0:
        raise ValueError(
            f"tiling: tile size {tile} with tile_overlap_factor gives a step of {step} and keeps {keep} pixels "
            "per tile; use larger tiles or a smaller overlap"
        )
    out_rows = []
    above: Optional[list] = None
    for i in range(0, x.shape[2], step):
        row = []
        for n, j in enumerate(range(0, x.shape[3], step)):
            t = fn(x[:, :, i : i + tile, j : j + tile])
            if above is not None:
                t = _blend(above[n], t, blend, 2)
            if row:
                t = _blend(row[-1], t, blend, 3)
            row.append(t)
        out_rows.append(torch.cat([t[:, :, :keep, :keep] for t in row], dim=3))
        above = row
    return torch.cat(out_rows, dim=2)


class AutoencoderKL(ModelMixin):
    """diffusers' ``AutoencoderKL``; see the module docstring for tiling, slicing and ``upcast``.

    Constructor arguments are diffusers 0.42's. ``scaling_factor``, ``shift_factor``, ``latents_mean`` and
    ``latents_std`` are recorded in ``config`` for pipelines (diffusers' model does not use them either).
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["ResnetBlock2D"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        down_block_types: tuple = ("DownEncoderBlock2D",),
        up_block_types: tuple = ("UpDecoderBlock2D",),
        block_out_channels: tuple = (64,),
        layers_per_block: int = 1,
        act_fn: str = "silu",
        latent_channels: int = 4,
        norm_num_groups: int = 32,
        sample_size: int = 32,
        scaling_factor: float = 0.18215,
        shift_factor: Optional[float] = None,
        latents_mean: Optional[tuple] = None,
        latents_std: Optional[tuple] = None,
        force_upcast: bool = True,
        use_quant_conv: bool = True,
        use_post_quant_conv: bool = True,
        mid_block_add_attention: bool = True,
    ):
        super().__init__()
        for name, values in (("latents_mean", latents_mean), ("latents_std", latents_std)):
            if values is not None and len(values) != latent_channels:
                raise ValueError(f"AutoencoderKL: {name} has {len(values)} entries for {latent_channels} latent channels")
        self.encoder = Encoder(
            in_channels=in_channels, out_channels=latent_channels, down_block_types=down_block_types,
            block_out_channels=block_out_channels, layers_per_block=layers_per_block, act_fn=act_fn,
            norm_num_groups=norm_num_groups, double_z=True, mid_block_add_attention=mid_block_add_attention,
        )
        self.decoder = Decoder(
            in_channels=latent_channels, out_channels=out_channels, up_block_types=up_block_types,
            block_out_channels=block_out_channels, layers_per_block=layers_per_block,
            norm_num_groups=norm_num_groups, act_fn=act_fn, mid_block_add_attention=mid_block_add_attention,
        )
        self.quant_conv = Conv2d(2 * latent_channels, 2 * latent_channels, 1) if use_quant_conv else None
        self.post_quant_conv = Conv2d(latent_channels, latent_channels, 1) if use_post_quant_conv else None

        self.use_slicing = False
        self._use_tiling: Optional[bool] = None  # None: never set, the automatic rule applies
        size = sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size
        self.tile_sample_min_size = int(size)
        self.tile_latent_min_size = int(size / 2 ** (len(block_out_channels) - 1))
        self.tile_overlap_factor = 0.25
        self.auto_tiling_min_size: Optional[int] = 128

    # ------------------------------------------------------------ switches

    @property
    def use_tiling(self) -> bool:
        return bool(self._use_tiling)

    @use_tiling.setter
    def use_tiling(self, value: bool) -> None:
        self._use_tiling = bool(value)

    def enable_tiling(self, use_tiling: bool = True) -> None:
        self._use_tiling = bool(use_tiling)

    def disable_tiling(self) -> None:
        self._use_tiling = False

    def enable_slicing(self) -> None:
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    @property
    def _downscale(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    def _tiles(self, height: int, width: int, tile: int, auto_min: Optional[int]) -> bool:
        if max(height, width) <= tile:
            return False
        if self._use_tiling is not None:
            return self._use_tiling
        return self.auto_tiling_min_size is not None and max(height, width) > auto_min

    # ------------------------------------------------------------- checks

    def _check(self, x, channels: int, method: str, name: str, what: str) -> None:
        """The one place the public methods validate their input (a clear ValueError, not a conv error)."""
        if not isinstance(x, Tensor):
            raise TypeError(f"AutoencoderKL.{method}: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != channels:
            raise ValueError(
                f"AutoencoderKL.{method}: {name} must be a (batch, {channels}, height, width) {what} tensor, "
                f"got shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise ValueError(f"AutoencoderKL.{method}: {name} must be a floating-point tensor, got {x.dtype}")

    # ---------------------------------------------------------- precision

    def _upcasts(self, upcast: Optional[bool]) -> bool:
        if upcast is None:
            return bool(self.config.force_upcast) and self.dtype == torch.float16
        return bool(upcast)

    def _runner(self, module: Optional[torch.nn.Module], fp32: bool) -> Callable[[Tensor], Tensor]:
        if module is None:
            return lambda t: t
        if not fp32:
            return module
        params = {n: p.float() for n, p in module.named_parameters()}
        params.update({n: b.float() if b.is_floating_point() else b for n, b in module.named_buffers()})
        return lambda t: torch.func.functional_call(module, params, (t.float(),))

    @staticmethod
    def _fp32_context(fp32: bool, x: Tensor):
        if fp32:
            return torch.autocast(x.device.type, enabled=False)
        return contextlib.nullcontext()

    # -------------------------------------------------------------- encode

    def _encoder_fn(self, fp32: bool) -> Callable[[Tensor], Tensor]:
        enc, quant = self._runner(self.encoder, fp32), self._runner(self.quant_conv, fp32)
        return lambda t: quant(enc(t))

    def _encode(self, x: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
        if self._tiles(x.shape[2], x.shape[3], self.tile_sample_min_size,
                       None if self.auto_tiling_min_size is None else self.auto_tiling_min_size * self._downscale):
            return self._tiled_encode_moments(x, fn)
        return fn(x)

    def _tiled_encode_moments(self, x: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
        tile, latent_tile, f = self.tile_sample_min_size, self.tile_latent_min_size, self.tile_overlap_factor
        blend = int(latent_tile * f)
        return _tiled(x, tile, int(tile * (1 - f)), blend, latent_tile - blend, fn)

    def _sliced(self, x: Tensor, upcast: Optional[bool], make_fn, run) -> Tensor:
        """``run(x, make_fn(fp32))`` under the upcast rule, one sample at a time when slicing; an upcast result
        is rounded once to x's dtype."""
        fp32 = self._upcasts(upcast)
        with self._fp32_context(fp32, x):
            fn = make_fn(fp32)
            if self.use_slicing and x.shape[0] > 1:
                out = torch.cat([run(s, fn) for s in x.split(1)])
            else:
                out = run(x, fn)
        return out.to(x.dtype) if fp32 else out

    def encode(self, x: Tensor, return_dict: bool = True, *, upcast: Optional[bool] = None):
        """Images (B, in_channels, H, W) -> ``AutoencoderKLOutput(latent_dist=DiagonalGaussianDistribution)``
        (``(posterior,)`` with ``return_dict=False``). Tiled and sliced as set (module docstring)."""
        self._check(x, self.config.in_channels, "encode", "x", "image")
        moments = self._sliced(x, upcast, self._encoder_fn, self._encode)
        posterior = DiagonalGaussianDistribution(moments)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def tiled_encode(self, x: Tensor, return_dict: bool = True):
        """diffusers' ``tiled_encode``: always tiled, whatever the switches and the image size."""
        self._check(x, self.config.in_channels, "tiled_encode", "x", "image")
        posterior = DiagonalGaussianDistribution(self._tiled_encode_moments(x, self._encoder_fn(False)))
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    # -------------------------------------------------------------- decode

    def _decoder_fn(self, fp32: bool) -> Callable[[Tensor], Tensor]:
        post, dec = self._runner(self.post_quant_conv, fp32), self._runner(self.decoder, fp32)
        return lambda t: dec(post(t))

    def _tiled_decode_sample(self, z: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
        tile, latent_tile, f = self.tile_sample_min_size, self.tile_latent_min_size, self.tile_overlap_factor
        blend = int(tile * f)
        return _tiled(z, latent_tile, int(latent_tile * (1 - f)), blend, tile - blend, fn)

    def _decode(self, z: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
        if self._tiles(z.shape[2], z.shape[3], self.tile_latent_min_size, self.auto_tiling_min_size):
            return self._tiled_decode_sample(z, fn)
        return fn(z)

    def decode(self, z: Tensor, return_dict: bool = True, generator=None, *, upcast: Optional[bool] = None):
        """Latents (B, latent_channels, h, w) -> ``DecoderOutput(sample=images)`` (``(images,)`` with
        ``return_dict=False``). ``generator`` is accepted for diffusers' signature and unused (as there):
        decoding draws no noise. ``upcast``: see the module docstring."""
        self._check(z, self.config.latent_channels, "decode", "z", "latent")
        dec = self._sliced(z, upcast, self._decoder_fn, self._decode)
        return SampleOutput(sample=dec) if return_dict else (dec,)

    def tiled_decode(self, z: Tensor, return_dict: bool = True):
        """diffusers' ``tiled_decode``: always tiled, whatever the switches and the latent size."""
        self._check(z, self.config.latent_channels, "tiled_decode", "z", "latent")
        dec = self._tiled_decode_sample(z, self._decoder_fn(False))
        return SampleOutput(sample=dec) if return_dict else (dec,)

    # ------------------------------------------------------------- forward

    def forward(self, sample: Tensor, sample_posterior: bool = False, return_dict: bool = True, generator=None):
        """Encode, take the posterior's mode (or a sample with ``generator``), decode."""
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        dec = self.decode(z).sample
        return SampleOutput(sample=dec) if return_dict else (dec,)
