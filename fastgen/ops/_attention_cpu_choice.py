"""Which CPU attention is faster for a shape: fastgen's C++ kernel or SDPA.

Measured on the project's machine (AMD EPYC, 2 cores, AVX-512 + BF16, torch
2.13 SDPA; benchmarks/results/README.md has the tables), batch 2 x 8 heads:

- every SD1.5/SDXL shape (Nq >= 64, D 40-160, self and 77-token cross
  attention), forward and forward+backward: the C++ kernel is 1.2-1.9x faster
  in fp32, 1.9-3.7x in bf16 (it uses the AVX512-BF16 dot product), 2-10x in fp16;
- fewer than 16 queries (the kernel pads query blocks to 16 rows): SDPA wins
  in fp32 (0.4-0.8x) and on tiny bf16 problems;
- D=512 (the VAE's single-head mid-block) in fp32: SDPA wins (0.75x at 4096
  tokens); in bf16 the kernel wins (1.9x).
"""

from __future__ import annotations

import torch


def cpu_kernel_is_faster(nq: int, nk: int, head_dim: int, dtype: torch.dtype, training: bool) -> bool:
    # `training` is accepted for the day forward and backward disagree; in the
    # measurements above they did not.
    if dtype == torch.float32:
        return nq >= 16 and head_dim <= 160
    return nq >= 16 or nk >= 1024
