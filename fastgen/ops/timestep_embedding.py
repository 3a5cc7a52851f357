"""Sinusoidal timestep embedding (DDPM / diffusers ``get_timestep_embedding``).

``timestep_embedding(t, dim)`` maps N timesteps to an (N, dim) fp32 table of
``sin(t * f_i)`` and ``cos(t * f_i)`` with geometric frequencies
``f_i = max_period ** (-i / (dim // 2 - downscale_freq_shift))``.

Why plain PyTorch and no kernel: the output is (N, dim), e.g. 2 x 320 floats
for SD1.5 at CFG batch 2, computed once per denoising step. A launch of a
fused kernel would cost about what these few elementwise ops cost, and the
result then feeds a Linear layer that dominates by orders of magnitude. What
matters here is exactness: the function performs diffusers' operations in
diffusers' order and precision (fp32 frequencies from ``arange``, divide,
``exp``; fp32 product with the timesteps; ``scale *``; ``sin``/``cos``), so its
output is bit-for-bit equal to
``diffusers.models.embeddings.get_timestep_embedding`` and a fastgen U-Net
sees exactly the conditioning a diffusers one sees. The frequency table is not
cached between calls for the same reason: a cached table computed any other
way would not be bit-identical, and recomputing it is negligible.

One deliberate difference: where ``dim // 2 == downscale_freq_shift`` (dim 2
or 3 with the default shift 1) diffusers divides 0 by 0 and returns NaNs; this
function raises a ``ValueError`` instead.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from ._checks import check_tensor

__all__ = ["timestep_embedding"]


def timestep_embedding(
    t: Tensor,
    dim: int,
    *,
    flip_sin_to_cos: bool = False,
    downscale_freq_shift: float = 1.0,
    scale: float = 1.0,
    max_period: float = 10000,
) -> Tensor:
    """Sinusoidal embedding of N timesteps, bit-identical to diffusers.

    Args:
        t: 1-D tensor of N timesteps, integer or floating (fractional allowed);
            they are converted to fp32 like diffusers does.
        dim: embedding width (>= 1). An odd ``dim`` gets a zero last column.
        flip_sin_to_cos: order the halves ``[cos, sin]`` instead of
            ``[sin, cos]`` (True for the SD U-Nets).
        downscale_freq_shift: the frequency exponent is ``-i / (dim//2 - shift)``;
            diffusers' U-Nets use 0 or 1.
        scale: multiplies ``t * f_i`` before sin/cos.
        max_period: the period of the lowest frequency.

    Returns an (N, dim) fp32 tensor on ``t``'s device.
    """
    check_tensor("timestep_embedding: t", t)
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(
            f"timestep_embedding: t must have an integer or floating dtype, got {str(t.dtype).replace('torch.', '')}"
        )
    if t.dim() != 1:
        raise ValueError(
            f"timestep_embedding: t must be a 1-D tensor of N timesteps, got shape {tuple(t.shape)}"
        )
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
        raise TypeError(f"timestep_embedding: dim must be an int, got {type(dim).__name__}")
    dim = int(dim)
    if dim < 1:
        raise ValueError(f"timestep_embedding: dim must be >= 1, got {dim}")
    if max_period <= 0:
        raise ValueError(f"timestep_embedding: max_period must be > 0, got {max_period}")

    half = dim // 2
    denominator = half - downscale_freq_shift
    if half > 0 and denominator == 0:
        raise ValueError(
            f"timestep_embedding: dim // 2 ({half}) equals downscale_freq_shift ({downscale_freq_shift}), "
            "which divides by zero (diffusers returns NaNs here); use a larger dim or another shift"
        )

    # The order of these operations is diffusers' order; changing any of them
    # (e.g. folding the division into the log, or multiplying t by a cached
    # table in another dtype) changes the last bits of the result.
    exponent = -math.log(max_period) * torch.arange(0, half, dtype=torch.float32, device=t.device)
    exponent = exponent / denominator
    freqs = torch.exp(exponent)
    args = t[:, None].float() * freqs[None, :]
    args = scale * args
    sin, cos = torch.sin(args), torch.cos(args)
    halves = [cos, sin] if flip_sin_to_cos else [sin, cos]
    if dim % 2 == 1:
        halves.append(args.new_zeros(args.shape[0], 1))
    return torch.cat(halves, dim=-1)
