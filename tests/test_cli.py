"""The fastgen command line: info and bench."""

from __future__ import annotations

import json
import subprocess

from fastgen.cli import main

from helpers import python


def test_info_runs_as_module_and_reports_backends():
    out = subprocess.run([python(), "-m", "fastgen", "info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "torch" in out.stdout and "extension" in out.stdout and "backends (cpu)" in out.stdout
    from fastgen import _backend

    if _backend.extension() is not None:  # the CPU kernels' ISA variant and the variants built
        assert "cpu isa " in out.stdout and "cpu isas " in out.stdout


def test_info_json(capsys):
    assert main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert "torch" in data["backends"]["cpu"]
    assert set(data["extension"]) >= {"built", "with_cuda", "error", "cpu_isa", "cpu_isas_built"}


def test_bench_group_norm_quick(tmp_path, capsys):
    assert main(["bench", "group_norm", "--quick", "--min-time", "0.01", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "speedup_vs_eager" in out
    (saved,) = tmp_path.glob("group_norm-*.json")
    rows = json.loads(saved.read_text())["rows"]
    assert rows and all(r["fastgen_ms"] > 0 and r["speedup_vs_eager"] > 0 for r in rows)


def test_bench_unknown_suite_is_an_error(capsys):
    assert main(["bench", "nope", "--no-save"]) == 2
    assert "unknown suite" in capsys.readouterr().err
