"""The GPU validation driver (benchmarks/gpu_check.sh -> fastgen.bench.gpu_check): its plan, time-boxing,
report and figures, and a short dry run of its first steps."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fastgen.bench import gpu_check

REPO = Path(__file__).resolve().parents[1]


def test_the_shell_script_parses_and_the_gpu_plan_is_in_order_of_value(tmp_path):
    subprocess.run(["bash", "-n", str(REPO / "benchmarks" / "gpu_check.sh")], check=True)
    names = [s.name for s in gpu_check.plan(False, tmp_path)]
    assert names == ["env", "build", "tests gpu", "tests cuda halves", "bench serve graphs", "bench drop_in",
                     "bench models", "bench ops", "bench e2e"]
    assert names == [s.name for s in gpu_check.plan(True, tmp_path)]  # the dry run walks the same steps
    gpu = gpu_check.plan(False, tmp_path)
    # the limits leave the whole run inside 8 minutes only through the budget: steps are also skipped
    assert sum(s.limit_s for s in gpu) > 450 and all(s.min_s <= s.limit_s for s in gpu)
    build = gpu[1]
    assert "--no-index" in build.cmd and build.env["FASTGEN_PORTABLE"] == "1"
    assert any("cuda" in str(c) for c in gpu[3].cmd)
    for f in gpu_check.OP_TESTS:
        assert (REPO / "tests" / f).is_file(), f"gpu_check.OP_TESTS names a missing test file {f}"


def test_a_step_is_time_boxed_and_skipped_when_the_budget_is_short(tmp_path):
    log = open(tmp_path / "log", "w")
    slow = gpu_check.Step("slow", [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"],
                          limit_s=1.5, min_s=0.1)
    result = gpu_check.run_step(slow, log, budget_left_s=100)
    assert result["status"] == "timed out" and result["seconds"] < 20 and "started" in result["tail"]
    skipped = gpu_check.run_step(slow, log, budget_left_s=0.05)
    assert skipped["status"] == "skipped" and "budget" in skipped["why"]
    ok = gpu_check.run_step(gpu_check.Step("five", [sys.executable, "-c", "raise SystemExit(5)"], 30, min_s=0,
                                           ok_codes=(0, 5)), log, 100)
    assert ok["status"] == "passed" and ok["rc"] == 5


def test_junit_counts(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite><testcase classname="t" name="a"/>'
                   '<testcase classname="t" name="b"><failure message="x"/></testcase>'
                   '<testcase classname="t" name="c"><skipped/></testcase>'
                   '<testcase classname="t" name="d"><error/></testcase></testsuite></testsuites>')
    counts = gpu_check.junit_counts(xml)
    assert counts == {"passed": 1, "failed": 1, "errors": 1, "skipped": 1, "failures": ["t::b", "t::d"]}
    assert gpu_check.junit_counts(tmp_path / "missing.xml") is None


def test_figures_judge_the_targets_and_say_what_was_not_measured():
    rows = [
        {"suite": "serve", "case": "cuda graph loop", "cuda_graphs": True, "it_per_s": 120.0},
        {"suite": "serve", "case": "cuda graph speedup", "speedup": 1.2},
        {"suite": "drop_in", "case": "unet step patched", "shape": "2x4x64x64", "speedup_vs_diffusers": 1.7},
        {"suite": "group_norm", "case": "gn", "fraction_of_peak_bandwidth": 0.9},
        {"suite": "conv", "case": "c1", "speedup_vs_cudnn": 1.1},
        {"suite": "conv", "case": "c2", "speedup_vs_cudnn": 0.8},
    ]
    by_name = {f["figure"].split(" (")[0]: f for f in gpu_check.figures(rows)}
    assert by_name["CUDA-graph loop vs eager, batch 1"]["met"] is False
    assert by_name["SD1.5 512x512 step rate, batch 1 CFG 2, graphs"]["met"] is True
    assert by_name["drop-in U-Net step 2x4x64x64"]["met"] is True
    assert by_name["group_norm: best fraction of peak bandwidth"]["met"] is True
    assert by_name["conv: slowest case vs its baseline"]["value"] == 0.8
    assert by_name["sampling: best fraction of peak bandwidth"]["met"] is None  # not measured is not a failure
    assert gpu_check.figures([])[0]["value"] is None
    # a dry run's CPU numbers are reported, never held to a GPU target
    assert all(f["met"] is None for f in gpu_check.figures(rows, judge=False))


def test_counts_from_verbose_output_of_a_killed_run():
    text = ("tests/test_a.py::test_x[cuda] PASSED [ 10%]\n"
            "tests/test_a.py::test_y[cuda-fp16] FAILED [ 20%]\n"
            "tests/test_b.py::test_z SKIPPED (needs a CUDA device) [ 30%]\n"
            "tests/test_b.py::test_w ERROR [ 40%]\nnoise\n")
    counts = gpu_check.output_counts(text)
    assert (counts["passed"], counts["failed"], counts["skipped"], counts["errors"]) == (1, 1, 1, 1)
    assert counts["failures"] == ["tests/test_a.py::test_y[cuda-fp16]", "tests/test_b.py::test_w"]
    assert counts["incomplete"] is True


def test_dry_run_of_the_first_steps_writes_the_report(tmp_path, capsys):
    rc = gpu_check.main(["--dry-run", "--only", "env,build", "--out", str(tmp_path), "--budget-s", "300"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "gpu_check --dry-run: OK" in out.splitlines()[-1] and "CPU stand-in" in out.splitlines()[-1]
    report = json.loads(next(tmp_path.glob("gpu_check-dry-run-*.json")).read_text())
    assert [s["step"] for s in report["steps"]] == ["env", "build"]
    assert report["env"]["torch"] and report["dry_run"] is True
    md = next(tmp_path.glob("gpu_check-dry-run-*.md")).read_text()
    assert "| env | passed |" in md and "not measured" in md
    assert list(tmp_path.glob("gpu_check-dry-run-*.log"))
    with pytest.raises(SystemExit):
        gpu_check.main(["--dry-run", "--only", "nonsense", "--out", str(tmp_path)])


def test_the_cli_forwards_to_the_driver(capsys):
    from fastgen.cli import main

    assert main(["bench", "--dry-run"]) == 2
    assert "--dry-run goes with --gpu-check" in capsys.readouterr().err
