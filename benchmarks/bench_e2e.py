"""pytest-benchmark suite for the whole-pipeline comparison at the size of `fastgen bench e2e --quick`: the tiny
SD1.5-layout pipeline (32x32, 3 DPM-Solver++ steps, CFG 7.5, batch 1), diffusers eager against diffusers +
fastgen.patch, in this process (`fastgen bench e2e` runs each variant in its own process, at full size, with
torch.compile, time to first image and peak memory).

Run: python -m pytest benchmarks/bench_e2e.py --benchmark-group-by=group
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from fastgen.bench import e2e  # noqa: E402

BATCH, STEPS, SIZE = 1, 3, 32


@pytest.fixture(scope="module")
def pipelines():
    import fastgen

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    eager = e2e.build_pipeline(device, tiny=True)
    patched = e2e.build_pipeline(device, tiny=True)  # the same seed: the same weights
    fastgen.patch(patched)
    return {"eager": eager, "fastgen": patched}


def test_e2e_patched_matches_eager(pipelines):
    images = {name: e2e.generate(pipe, BATCH, STEPS, SIZE) for name, pipe in pipelines.items()}
    assert np.abs(images["fastgen"] - images["eager"]).max() < 1e-3


@pytest.mark.parametrize("impl", ["fastgen", "eager"])
def test_e2e(benchmark, pipelines, impl):
    benchmark.group = f"tiny pipeline {SIZE}x{SIZE} {STEPS} steps batch {BATCH}"
    benchmark.pedantic(e2e.generate, args=(pipelines[impl], BATCH, STEPS, SIZE), rounds=5, warmup_rounds=1)
