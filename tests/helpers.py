"""Shared test helpers: which backends to test, the fp16/bf16 tolerance rule,
and nvcc compilation of CUDA sources."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import torch

from fastgen import _backend

ROOT = Path(__file__).resolve().parents[1]
LOWP = (torch.float16, torch.bfloat16)


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def kernel_backends(device: str = "cpu") -> list[str]:
    """Native (non-reference) backends that can run on ``device`` here."""
    return [b for b in _backend.available_backends(device) if b != "torch"]


def all_backends(device: str = "cpu") -> list[str]:
    return _backend.available_backends(device)


def assert_lowp_close(out: torch.Tensor, ref32: torch.Tensor, torch_lowp: torch.Tensor, factor: float = 2.0, what: str = "") -> None:
    """docs/design.md's tolerance rule: the kernel's max error against an fp32 reference is at
    most ``factor`` x the error of PyTorch's own op in the same dtype.

    A floor of one unit of the dtype's rounding at the reference's magnitude
    keeps the rule meaningful where PyTorch happens to be exact.
    """
    ref = ref32.double()
    err = (out.double() - ref).abs().max().item()
    torch_err = (torch_lowp.double() - ref).abs().max().item()
    floor = torch.finfo(out.dtype).eps * max(ref.abs().max().item(), 1.0)
    limit = factor * max(torch_err, floor)
    assert err <= limit, f"{what} max error {err:.3g} > {factor} x PyTorch's {torch_err:.3g} (floor {floor:.3g})"


def assert_compiled_matches_eager(f, x: torch.Tensor) -> None:
    """``torch.compile(f, fullgraph=True)`` gives eager's output and eager's gradient w.r.t. ``x``."""
    out = torch.compile(f, fullgraph=True)(x)
    torch.testing.assert_close(out, f(x))
    out.sum().backward()
    g_compiled = x.grad.clone()
    x.grad = None
    f(x).sum().backward()
    torch.testing.assert_close(g_compiled, x.grad)


def nvcc() -> str | None:
    return shutil.which("nvcc")


def nvcc_command(source: Path, output: Path) -> list[str]:
    from torch.utils import cpp_extension

    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [
        nvcc(), "-c", str(source), "-o", str(output),
        # The flags torch's CUDAExtension passes, for one architecture: this is
        # a compile check, and every extra arch costs minutes on 2 CPU cores.
        "-std=c++17", "-O3", "-DFASTGEN_WITH_CUDA", "--expt-relaxed-constexpr",
        "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
        "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
        "--compiler-options", "-fPIC", "-DTORCH_API_INCLUDE_EXTENSION_H",
        "-gencode=arch=compute_90,code=sm_90",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-DTORCH_EXTENSION_NAME=_C",
        f"-I{ROOT / 'csrc'}", f"-I{sysconfig.get_paths()['include']}", *includes,
    ]


def compile_cuda(source: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(nvcc_command(source, tmp_path / (source.stem + ".o")), capture_output=True, text=True, timeout=900)


def python() -> str:
    return sys.executable
