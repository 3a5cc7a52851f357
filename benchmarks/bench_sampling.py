"""pytest-benchmark suite for the fused sampler steps; the same cases as `fastgen bench sampling`.

Run: python -m pytest benchmarks/bench_sampling.py --benchmark-group-by=group
"""

from __future__ import annotations

import pytest
import torch

from fastgen.bench.sampling import cases

pytest.importorskip("diffusers")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = cases(DEVICE, quick=False)


def _case_id(case):
    p = case.params
    return f"{case.name}-{p['shape']}-{p['steps']}steps"


@pytest.mark.parametrize("impl", ["fastgen", "diffusers"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_sampling(benchmark, case, impl):
    benchmark.group = _case_id(case)
    benchmark(case.candidate if impl == "fastgen" else case.baselines["diffusers"])
