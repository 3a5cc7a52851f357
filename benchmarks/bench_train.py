"""pytest-benchmark suite for a U-Net training step; the same cases as `fastgen bench train --quick`: the tiny
U-Net (block_out_channels (32, 64), 1x4x16x16 latent), fastgen against diffusers over the same weights,
forward + MSE loss + backward (fp32; bf16 autocast too on CUDA and on CPUs with native bf16).

Run: python -m pytest benchmarks/bench_train.py --benchmark-group-by=param:case_id
The SD1.5-size step (~860M parameters, tens of seconds a step on a 2-core CPU and ~15 GiB for the two models)
is `fastgen bench train`, which interleaves fastgen's and diffusers' calls and prints the speed-ups.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from fastgen.bench.train import cases  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = cases(DEVICE, quick=True)


def _case_id(case):
    p = case.params
    return f"{case.name}-{p['shape']}-{p['dtype']}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("impl", ["fastgen", "diffusers"])
def test_train(benchmark, case, impl):
    benchmark.group = _case_id(case)
    fn = case.candidate if impl == "fastgen" else case.baselines["diffusers"]
    fn()  # first call: conv algorithm choice and weight packing, outside the timing
    benchmark.pedantic(fn, rounds=5, iterations=1)
