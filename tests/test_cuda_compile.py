"""Every CUDA source compiles with nvcc (compile only: CI has no GPU)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from helpers import ROOT, compile_cuda, nvcc

CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    # nvcc is single-threaded and slow: compile every file at once, one per core.
    out = tmp_path_factory.mktemp("nvcc")
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results = pool.map(lambda src: (src, compile_cuda(src, out)), CUDA_SOURCES)
        return {src.name: result for src, result in results}


@pytest.mark.skipif(nvcc() is None, reason="nvcc not found")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_nvcc_compiles(source, compiled):
    result = compiled[source.name]
    assert result.returncode == 0, f"nvcc failed on {source.name}:\n{result.stderr[-4000:]}"


def test_there_are_cuda_sources():
    assert {"group_norm.cu", "attention.cu", "sampling.cu", "geglu.cu", "vae_postprocess.cu", "conv2d.cu", "bias_act.cu"} <= {p.name for p in CUDA_SOURCES}


def test_entry_points_never_change_a_layout():
    # Layout is decided once, by the public op in fastgen/ops; the C++ entry
    # points (CPU and CUDA) only check preconditions (csrc/layout.h).
    offenders = []
    for path in sorted((ROOT / "csrc").rglob("*")):
        if path.suffix in {".h", ".cuh", ".cpp", ".cu"}:
            for no, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("//", 1)[0]
                if ".contiguous(" in code or "copy_(" in code:
                    offenders.append(f"{path.relative_to(ROOT)}:{no}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
