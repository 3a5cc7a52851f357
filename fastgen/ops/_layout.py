"""Memory-layout helpers shared by the ops.

Kernels accept two dense layouts of an (N, C, *spatial) tensor: contiguous
(channels-first) and channels-last (C innermost). Anything else is copied into
one of those before the kernel runs.
"""

from __future__ import annotations

import torch


def channels_last_strides(shape: torch.Size) -> tuple[int, ...]:
    """Strides of a dense (N, C, *spatial) tensor whose channel dim is innermost."""
    n, c, *spatial = shape
    strides = [0] * len(shape)
    strides[1] = 1
    step = c
    for dim in range(len(shape) - 1, 1, -1):
        strides[dim] = step
        step *= shape[dim]
    strides[0] = step
    return tuple(strides)


def _same_strides(t: torch.Tensor, strides: tuple[int, ...]) -> bool:
    # Strides of size-1 dims never matter for addressing.
    return all(size == 1 or st == want for size, st, want in zip(t.shape, t.stride(), strides))


def is_channels_last_dense(t: torch.Tensor) -> bool:
    return t.dim() >= 3 and _same_strides(t, channels_last_strides(t.shape))


def kernel_layout(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself if a kernel can read it as is, else a contiguous copy.

    Kernels index by position (n*C*S + c*S + s, or n*S*C + s*C + c when the
    tensor is not contiguous), so only the two dense layouts pass through.
    """
    if t.is_contiguous() or is_channels_last_dense(t):
        return t
    return t.contiguous()


def match_layout(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` with exactly the strides of ``like`` (copying only when needed)."""
    if t.stride() == like.stride():
        return t
    out = torch.empty_strided(like.shape, like.stride(), dtype=t.dtype, device=t.device)
    return out.copy_(t)

