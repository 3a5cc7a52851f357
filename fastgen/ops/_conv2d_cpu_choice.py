"""Which CPU path runs a conv2d, and the Winograd weight transform.

Paths (csrc/cpu/conv2d.cpp): ``winograd4`` / ``winograd2`` (3x3 stride 1), ``direct`` (PyTorch's oneDNN
convolution + the fused epilogue) and ``direct_fp32`` (the same computed in fp32 for an fp16 / bf16 x).
The rule below comes from measurements of every SD1.5 U-Net and SD VAE conv shape (``fastgen bench conv``;
numbers in docs/design.md).
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

# Winograd tiles: F(m x m, 3 x 3) with A = m + 2; B^T, G, A^T for interpolation points 0, +-1, +-2 (m = 4)
# and 0, +-1 (m = 2) — Lavin & Gray 2016.
_G = {
    2: [[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]],
    4: [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
        [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
}


def winograd_m(algo: str) -> int:
    return {"winograd4": 4, "winograd2": 2}[algo]


def pack_weight(weight: Tensor, algo: str) -> Tensor:
    """U = G g G^T for every (K, C) 3x3 filter g, as a contiguous fp32 (A*A, C, K) tensor: computed in fp64
    and rounded once."""
    m = winograd_m(algo)
    g = torch.tensor(_G[m], dtype=torch.float64, device=weight.device)
    u = torch.einsum("ir,kcrs,js->ijck", g, weight.detach().to(torch.float64), g)
    a = m + 2
    return u.reshape(a * a, weight.shape[1], weight.shape[0]).to(torch.float32).contiguous()


@lru_cache(maxsize=None)
def _native_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def choose(n: int, c: int, k: int, h: int, w: int, r: int, s: int, sh: int, sw: int, dtype: torch.dtype) -> str:
    """The CPU path for one conv2d call."""
    direct = "direct" if dtype == torch.float32 or (dtype == torch.bfloat16 and _native_bf16()) else "direct_fp32"
    if (r, s) != (3, 3) or (sh, sw) != (1, 1) or min(c, k) < 16:
        return direct
    if h * w <= 12 * 12:  # 8x8 latents: F(4,3) has too few tiles to pay for its 36 GEMMs
        return "winograd2"
    return "winograd4"
