"""Convolutions with few output (or, transposed, input) pixels as one BLAS GEMM over im2col columns, on CPU.

oneDNN's direct convolution, which ``F.conv2d`` / ``F.conv_transpose2d`` run on CPU, is far from the GEMM peak
when the spatial size is tiny and the weight is large: the innermost levels of pix2pix's U-Net and DCGAN's
first and last layers (512-1024 channels at 1x1 to 4x4 pixels, 4x4 kernels). There the im2col columns are
small (C·16 x a few pixels), so ``unfold`` + one GEMM (``fold`` for the transposed convolution) costs little
beyond the GEMM, and autograd's backward of those ops is GEMMs too. Measured forward+backward on the AMD EPYC
AVX2 machine, 2 threads, batch 4, fp32 (F.conv2d → GEMM): 512→512 at 2x2→1x1 57.9 → 21.5 ms, 4x4→2x2
36.1 → 25.1 ms, 8x8→4x4 45.6 → 45.5 ms (parity, so the rule stops below it); transposed 512→512 at 1x1→2x2
52.0 → 19.5 ms, 1024→512 2x2→4x4 146.6 → 68.0 ms, 4x4→8x8 167.6 → 95.0 ms, 8x8→16x16 96.7 → 89.4 ms; from
16x16 up oneDNN wins. Max abs difference from F.conv2d 1e-5 (another summation order).

Only fp32 outside autocast: under CPU autocast, and for bf16/fp16, the matmul would run oneDNN's low-precision
GEMM (slow without native bf16), so those keep F.conv2d.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

MAX_PIXELS = 16  # output pixels (convolution) or input pixels (transposed) per image up to which GEMM wins


def _eligible(x: Tensor, pixels: int) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and pixels <= MAX_PIXELS
            and not torch.is_autocast_enabled("cpu"))


def conv2d_out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def use_gemm_conv2d(x: Tensor, kernel: tuple, stride: tuple, padding: tuple) -> bool:
    ho = conv2d_out_size(x.shape[2], kernel[0], stride[0], padding[0])
    wo = conv2d_out_size(x.shape[3], kernel[1], stride[1], padding[1])
    return _eligible(x, ho * wo)


def gemm_conv2d(x: Tensor, weight: Tensor, stride: tuple, padding: tuple) -> Tensor:
    """``F.conv2d(x, weight, None, stride, padding)`` as unfold + GEMM."""
    n, _, h, w = x.shape
    k, _, r, s = weight.shape
    ho = conv2d_out_size(h, r, stride[0], padding[0])
    wo = conv2d_out_size(w, s, stride[1], padding[1])
    cols = F.unfold(x, (r, s), padding=padding, stride=stride)  # (N, C*R*S, Ho*Wo)
    return (weight.reshape(k, -1) @ cols).view(n, k, ho, wo)


def use_gemm_conv_transpose2d(x: Tensor) -> bool:
    return _eligible(x, x.shape[2] * x.shape[3])


def gemm_conv_transpose2d(x: Tensor, weight: Tensor, stride: tuple, padding: tuple,
                          output_padding: tuple) -> Tensor:
    """``F.conv_transpose2d(x, weight, None, stride, padding, output_padding)`` as GEMM + fold."""
    n, cin, h, w = x.shape
    _, cout, r, s = weight.shape
    ho = (h - 1) * stride[0] - 2 * padding[0] + r + output_padding[0]
    wo = (w - 1) * stride[1] - 2 * padding[1] + s + output_padding[1]
    cols = weight.reshape(cin, cout * r * s).t() @ x.reshape(n, cin, h * w)  # (N, Cout*R*S, H*W)
    return F.fold(cols, (ho, wo), (r, s), padding=padding, stride=stride)
