"""pytest-benchmark suite for whole models; the same cases as `fastgen bench models` (SD1.5 U-Net forward at
CFG batch 2, SD VAE decode of a 64x64 latent), fastgen against diffusers eager, torch.compile of the diffusers
model, and OpenVINO where it is installed.

Run: python -m pytest benchmarks/bench_models.py --benchmark-group-by=param:case_id
Each forward takes seconds on a CPU (the U-Net ~14 s in fp32 on 2 cores) and the compile and OpenVINO
baselines pay minutes of compiling/converting in their first call: `fastgen bench models` prints the same
rows with speed-ups and fractions of the GEMM peak, and is the faster way to get them.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from fastgen.bench.models import cases  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = cases(DEVICE, quick=False)


def _case_id(case):
    p = case.params
    return f"{case.name}-{p['shape']}-{p['dtype']}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("impl", ["fastgen", "diffusers", "diffusers_compiled", "openvino"])
def test_models(benchmark, case, impl):
    benchmark.group = _case_id(case)
    fn = case.candidate if impl == "fastgen" else case.baselines.get(impl)
    if fn is None:
        pytest.skip(f"{impl} is not available here")
    fn()  # first call: compile / convert, outside the timing
    benchmark.pedantic(fn, rounds=3, iterations=1)
