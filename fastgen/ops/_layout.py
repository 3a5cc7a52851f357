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



def _dense_any_order(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill ``numel`` consecutive memory slots, in any dim order."""
    expected = 1
    for st, size in sorted((st, size) for size, st in zip(t.shape, t.stride()) if size != 1):
        if st != expected:
            return False
        expected *= size
    return True


def _per_sample(t: torch.Tensor) -> int:
    s = 1
    for size in t.shape[1:]:
        s *= size
    return s


def is_batch_outer_dense(t: torch.Tensor) -> bool:
    """Dense with the batch dim outermost: sample n is memory ``[n*S, (n+1)*S)`` (contiguous, channels-last,
    or any other dense order of the non-batch dims). What the elementwise kernels walk linearly."""
    return t.is_contiguous() or (_dense_any_order(t) and (t.shape[0] <= 1 or t.stride(0) == _per_sample(t)))


def batch_outer_layout(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when :func:`is_batch_outer_dense`, else a contiguous copy."""
    return t if is_batch_outer_dense(t) else t.contiguous()


def _batch_outer_strides(ref: torch.Tensor) -> tuple[int, ...]:
    return (_per_sample(ref), *ref.stride()[1:])


def has_layout_of(t: torch.Tensor, ref: torch.Tensor) -> bool:
    """Whether ``t`` is in ``ref``'s memory order (``ref`` batch-outer dense; the batch sizes may differ), so
    an elementwise kernel indexes both alike. Strides of size-1 dims never matter."""
    if ref.is_contiguous() and t.is_contiguous():
        return True
    return all(size <= 1 or st == want for size, st, want in zip(t.shape, t.stride(), _batch_outer_strides(ref)))


def in_layout_of(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``t`` in ``ref``'s memory order (see :func:`has_layout_of`), copying only when the order differs."""
    if has_layout_of(t, ref):
        return t
    return torch.empty_strided(t.shape, _batch_outer_strides(ref), dtype=t.dtype, device=t.device).copy_(t)
