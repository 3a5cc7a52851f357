"""pytest-benchmark suite for conv2d with the fused epilogue; the same cases as `fastgen bench conv` (every
distinct convolution of the SD1.5 U-Net at CFG batch 2 and of the SD VAE decode to 512x512).

Run: python -m pytest benchmarks/bench_conv.py --benchmark-group-by=param:case_id
Each case is timed for fastgen and for the PyTorch-eager baseline (diffusers' op sequence) in the same run.
`fastgen bench conv` prints the same rows with speed-ups, fractions of the GEMM peak and the per-forward
totals (each shape's time x how often the model runs it), which pytest-benchmark does not.
"""

from __future__ import annotations

import pytest
import torch

from fastgen.bench.conv import cases

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = cases(DEVICE, quick=False)


def _case_id(case):
    p = case.params
    return f"{p['model']}-{p['layer']}-{p['shape']}-{p['kernel']}-{p['dtype']}"


@pytest.mark.parametrize("impl", ["fastgen", "eager"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_conv(benchmark, case, impl):
    benchmark.group = _case_id(case)
    fn = case.candidate if impl == "fastgen" else case.baselines["eager"]
    fn()  # makes the case's inputs (one case's at a time, fastgen.bench.conv._inputs), outside the timing
    benchmark(fn)
