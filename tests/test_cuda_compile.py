"""Every CUDA source compiles with nvcc (compile only: CI has no GPU)."""

from __future__ import annotations

import pytest

from helpers import ROOT, compile_cuda, nvcc

CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))


@pytest.mark.skipif(nvcc() is None, reason="nvcc not found")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_nvcc_compiles(source, tmp_path):
    result = compile_cuda(source, tmp_path)
    assert result.returncode == 0, f"nvcc failed on {source.name}:\n{result.stderr[-4000:]}"


def test_there_are_cuda_sources():
    assert CUDA_SOURCES, "csrc/cuda/ has no .cu files"
