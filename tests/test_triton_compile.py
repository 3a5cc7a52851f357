"""Every Triton kernel compiles for an sm_90 GPU (ahead of time, no GPU needed).

The other Triton tests run the kernels through the interpreter, which accepts
code the GPU compiler rejects; this compiles one representative configuration
of each kernel (tests/triton_aot_cases.py) with Triton's bundled ptxas, in a
subprocess because TRITON_INTERPRET must be unset before triton is imported.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers import ROOT

pytest.importorskip("triton")


def test_triton_kernels_compile_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, not from an earlier run's cache
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "triton_aot_cases.py"), "90"],
        capture_output=True, text=True, env=env, timeout=900,
    )
    report = result.stdout + result.stderr
    assert result.returncode == 0 and "failures: 0" in result.stdout, report[-6000:]
    compiled = [line for line in result.stdout.splitlines() if line.startswith("ok")]
    kernels = {line.split()[2].split("_")[0] for line in compiled}
    assert kernels >= {"attn", "biasact", "conv", "gn", "geglu", "sampling", "vae"}, report[-3000:]
