"""The design lives in the repository and stays true to the code: docs/design.md exists, names every op
the package declares and every environment variable fastgen reads, and nothing in the repository points
outside it (a user's clone has no shared folder beside it)."""

from __future__ import annotations

import re
import subprocess

import pytest

from helpers import ROOT

DESIGN = ROOT / "docs" / "design.md"
# compile-time macros that setup.py names in quotes, not variables a user sets
MACROS = {"FASTGEN_WITH_CUDA", "FASTGEN_CPU_CAPABILITY"}


def _tracked_files():
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / p for p in out.splitlines()]


def test_design_names_every_declared_op():
    from fastgen.ops import attention, geglu, group_norm, sampling, vae_postprocess  # noqa: F401  (declares the ops)
    import importlib

    text = DESIGN.read_text()
    for module in ("attention", "geglu", "group_norm", "sampling", "vae_postprocess"):
        op = importlib.import_module(f"fastgen.ops.{module}")._op
        assert f"`{op.name}`" in text, f"docs/design.md does not mention the op {op.name}"


def test_design_names_every_environment_variable():
    text = DESIGN.read_text() + (ROOT / "README.md").read_text()
    used = set()
    for path in _tracked_files():
        if path.suffix in (".py", ".cpp", ".h") and path.is_file() and "tests" not in path.parts:
            # a quoted name is a variable looked up by name (C macros such as FASTGEN_WITH_CUDA are not)
            used |= set(re.findall(r"[\"'](FASTGEN_[A-Z_]*[A-Z])[\"']", path.read_text(errors="ignore")))
    assert "FASTGEN_BACKEND" in used and "FASTGEN_CPU_ISA" in used  # the scan finds what it should
    missing = sorted(v for v in used - MACROS if v not in text)
    assert not missing, f"environment variables neither docs/design.md nor README.md describes: {missing}"


OUTSIDE = "../" + "shared"  # (spelled in two parts so that this file does not match itself)


def test_nothing_points_outside_the_repository():
    offenders = [str(p.relative_to(ROOT)) for p in _tracked_files()
                 if p.is_file() and p.suffix in (".py", ".md", ".cpp", ".h", ".cu", ".toml", ".txt", "")
                 and OUTSIDE in p.read_text(errors="ignore")]
    assert not offenders, f"files that refer to {OUTSIDE}, which a clone of the repository lacks: {offenders}"
