"""pytest-benchmark suite for VAE output post-processing; the same cases as `fastgen bench vae_postprocess`.

Run: python -m pytest benchmarks/bench_vae_postprocess.py --benchmark-group-by=param:case_id
Each case is timed for fastgen and for the PyTorch-eager baseline in the same run.
"""

from __future__ import annotations

import pytest
import torch

from fastgen.bench.vae_postprocess import cases

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = cases(DEVICE, quick=False)


def _case_id(case):
    p = case.params
    return f"{case.name}-{p['shape']}-{p['dtype']}"


@pytest.mark.parametrize("impl", ["fastgen", "eager"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_vae_postprocess(benchmark, case, impl):
    benchmark.group = _case_id(case)
    fn = case.candidate if impl == "fastgen" else case.baselines["eager"]
    benchmark(fn)
