"""pytest-benchmark suite for attention; the same cases as `fastgen bench attention`.

Run: python -m pytest benchmarks/bench_attention.py --benchmark-group-by=group
"""

from __future__ import annotations

import pytest
import torch

from fastgen.bench.attention import cases

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = cases(DEVICE, quick=False)


def _case_id(case):
    p = case.params
    return f"{case.name}-{p['kind']}-h{p['heads']}-n{p['nq']}x{p['nk']}-d{p['d']}-{p['dtype']}"


@pytest.mark.parametrize("impl", ["fastgen", "sdpa"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_attention(benchmark, case, impl):
    benchmark.group = _case_id(case)
    benchmark(case.candidate if impl == "fastgen" else case.baselines["sdpa"])
