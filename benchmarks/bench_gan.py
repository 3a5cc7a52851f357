"""pytest-benchmark suite for the GAN cases; the same cases as `fastgen bench gan --quick` (the torch.compile
baselines, which compile for tens of seconds per shape, are in `fastgen bench gan` only).

Run: python -m pytest benchmarks/bench_gan.py --benchmark-group-by=param:case_id
Each case is timed for fastgen and for the plain-PyTorch baseline in the same run.
"""

from __future__ import annotations

import pytest
import torch

from fastgen.bench.gan import cases

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = cases(DEVICE, quick=True)


def _case_id(case):
    p = case.params
    return f"{case.name}-{p['shape']}-{p['dtype']}"


@pytest.mark.parametrize("impl", ["fastgen", "eager"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_gan(benchmark, case, impl):
    benchmark.group = _case_id(case)
    fn = case.candidate if impl == "fastgen" else case.baselines["eager"]
    benchmark(fn)
