"""Which CPU path runs a conv2d, and the Winograd weight transform.

Paths (csrc/cpu/conv2d.cpp): ``winograd4`` / ``winograd2`` (3x3 stride 1), ``gemm`` (1x1 stride 1, BLAS
GEMMs over the pixels + the fused epilogue), ``direct`` (PyTorch's oneDNN
convolution + the fused epilogue) and ``direct_fp32`` (the same computed in fp32 for an fp16 / bf16 x).
The rule below comes from measurements of every SD1.5 U-Net and SD VAE conv shape (``fastgen bench conv``;
numbers in docs/design.md).
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch
from torch import Tensor

# The transformed weights cost 4x (F(4,3)) or 1.8x (F(2,3)) the fp32 weight (SD1.5's U-Net: 6.1 GB on top of
# its 3.4 GB): FASTGEN_CONV_WINOGRAD=f2 caps that at F(2,3) (1.8x; ~25% slower convolutions at 16x16 and
# up), =off runs oneDNN with no cache.
WINOGRAD_ENV = "FASTGEN_CONV_WINOGRAD"
WINOGRAD_CHOICES = ("auto", "f2", "off")

# Winograd tiles: F(m x m, 3 x 3) with A = m + 2; B^T, G, A^T for interpolation points 0, +-1, +-2 (m = 4)
# and 0, +-1 (m = 2) — Lavin & Gray 2016.
_G = {
    2: [[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]],
    4: [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
        [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
}


def winograd_m(algo: str) -> int:
    return {"winograd4": 4, "winograd2": 2}[algo]


def pack_weight(weight: Tensor, algo: str, *, blocked: bool = True) -> Tensor:
    """U = G g G^T for every (K, C) 3x3 filter g, as a contiguous fp32 (A*A, C, K) tensor: computed in fp64
    and rounded once.

    Written as GEMMs, ``kron(G, G) @ taps`` with each input channel's taps a (9, K) matrix, over blocks of
    channels whose fp64 product stays in cache: the first call of a patched SD1.5 U-Net packs ~600M weights,
    and an einsum over (K, C, 3, 3) with its permuted fp64 result took 4x as long (1.26 s against ~0.3 s for
    one 1280x1280 filter bank, AVX2, 2 threads). ``blocked=False`` (used while tracing) is one einsum, one
    graph node instead of a loop.
    """
    m = winograd_m(algo)
    a = m + 2
    g = torch.tensor(_G[m], dtype=torch.float64, device=weight.device)
    k, c = weight.shape[:2]
    w = weight.detach()
    if not blocked:
        u = torch.einsum("ir,kcrs,js->ijck", g, w.to(torch.float64), g)
        return u.reshape(a * a, c, k).to(torch.float32).contiguous()
    transform = torch.kron(g, g)  # (A*A, 9): row i*A + j holds g[i, r] * g[j, s] at column r*3 + s
    taps = w.reshape(k, c, 9).permute(1, 2, 0)  # (C, 9, K), a view
    out = torch.empty(a * a, c, k, dtype=torch.float32, device=weight.device)
    block = max(1, (8 << 20) // (a * a * k * 8))  # channels per step: an ~8 MB fp64 product
    for c0 in range(0, c, block):
        out[:, c0:c0 + block].copy_(torch.matmul(transform, taps[c0:c0 + block].to(torch.float64)).transpose(0, 1))
    return out


@lru_cache(maxsize=None)
def _native_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def choose(n: int, c: int, k: int, h: int, w: int, r: int, s: int, sh: int, sw: int, pads: tuple,
           dtype: torch.dtype, training: bool = False) -> str:
    """The CPU path for one conv2d call. ``training``: the weight requires grad under grad mode, so an optimizer
    will change it before the next call and a cached Winograd transform would be recomputed every step."""
    native = dtype == torch.float32 or (dtype == torch.bfloat16 and _native_bf16())
    direct = "direct" if native else "direct_fp32"
    if (r, s, sh, sw) == (1, 1, 1, 1) and pads == (0, 0, 0, 0):
        # Measured (AVX2, 2 threads, interleaved best-of-7): BLAS over the pixels beats oneDNN's 1x1 by
        # 1.14-1.57x where the image is large and the channels few (320->320 @64x64, the VAE's 512->256
        # @256 and 256->128 @512) and loses 2-23% elsewhere (640->320 @64, every shape at 32x32 and below).
        if not native or (c <= 512 and h * w >= 64 * 64):
            return "gemm"
        return direct
    if (r, s) != (3, 3) or (sh, sw) != (1, 1) or min(c, k) < 16:
        return direct
    if training:
        # Measured (fastgen bench train, SD1.5 U-Net step, AVX2): re-transforming ~600M weights after every
        # update (4x their size, written once per step) cost more than Winograd's faster forward saved: the
        # step ran at 0.88x diffusers' with it, 1.44x when the weights were frozen.
        return direct
    winograd = os.environ.get(WINOGRAD_ENV, "auto")
    if winograd not in WINOGRAD_CHOICES:
        raise ValueError(f"{WINOGRAD_ENV}={winograd!r}: expected one of {', '.join(WINOGRAD_CHOICES)}")
    if winograd == "off":
        return direct
    if winograd == "f2" or h * w <= 12 * 12:  # 8x8 latents: F(4,3) has too few tiles to pay for its 36 GEMMs
        return "winograd2"
    return "winograd4"
