"""`fastgen bench e2e --quick`: the tiny pipeline, eager and patched, each in its own worker process."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from fastgen.bench import e2e  # noqa: E402
from fastgen.cli import main  # noqa: E402


def test_e2e_quick_end_to_end(tmp_path, capsys):
    # batch 1 only, and one torch thread per worker: on a shared 2-core machine two threads make the tiny
    # pipeline's small ops wait on the neighbour's load (seconds instead of a tenth of a second per call)
    argv = ["bench", "e2e", "--quick", "--device", "cpu", "--e2e-batches", "1", "--e2e-threads", "1",
            "--out", str(tmp_path)]
    assert main(argv) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert "[e2e patched b1] fastgen.patch:" in out  # the workers' progress lines reach the parent's output

    (saved,) = tmp_path.glob("e2e-*.json")
    payload = json.loads(saved.read_text())
    assert payload["suites"] == ["e2e"] and payload["device"] and "cpu_isa" in payload
    rows = {r["variant"]: r for r in payload["rows"]}
    assert set(rows) == {"eager", "patched"}
    for row in rows.values():
        assert "error" not in row, row.get("log_tail")
        assert row["batch"] == 1 and row["size"] == 32 and row["steps"] == 3 and row["threads"] == 1
        for key in ("seconds_per_image", "steps_per_second", "time_to_first_image_s", "first_call_s", "steady_s",
                    "peak_memory_mib"):
            assert row[key] > 0, key
    patched = rows["patched"]
    assert patched["patched_modules"] > 0
    assert patched["max_abs_diff_vs_eager"] < 1e-3
    assert patched["speedup_vs_eager"] > 0 and patched["first_image_speedup_vs_eager"] > 0
    assert patched["time_to_first_image_s"] >= patched["first_call_s"]  # the patch call counts

    chart = saved.with_suffix(".png")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert chart.exists() and chart.stat().st_size > 0


def test_e2e_failed_worker_gives_an_error_row(tmp_path, monkeypatch):
    # a worker that dies: its row says so, with the log's tail, and the parent does not raise
    monkeypatch.setattr(e2e, "_worker_args", lambda *a, **k: ["--variant", "nope"])
    rows = e2e.run(e2e.torch.device("cpu"), quick=True, batches=[1], variants=["eager"], progress=False,
                   work_dir=tmp_path)
    (row,) = rows
    assert row["error"].startswith("worker exited with status") and "invalid choice" in row["log_tail"]


def test_e2e_settings():
    cpu, cuda = e2e.torch.device("cpu"), e2e.torch.device("cuda")
    assert e2e.settings(cpu) == dict(batches=(1, 4), steps=20, size=256, variants=("eager", "patched", "compiled"))
    assert e2e.settings(cuda)["size"] == 512
    quick = e2e.settings(cpu, quick=True, batches=[1], variants=["patched", "eager"])
    assert quick == dict(batches=(1,), steps=3, size=32, variants=("eager", "patched"))
    with pytest.raises(ValueError, match="unknown e2e variant"):
        e2e.settings(cpu, variants=["fast"])


def test_plain_bench_leaves_e2e_out():
    from fastgen.bench._runner import DEFAULT_SUITES, SUITES

    assert "e2e" in SUITES and "e2e" not in DEFAULT_SUITES


def test_e2e_compare_with_compiled():
    # the parent's ratios and pixel differences, on made-up worker results (a real compiled run takes minutes)
    np = e2e.np
    base = np.full((1, 8, 8, 3), 0.2, dtype=np.float32)  # 51 of 255
    images = {"eager": base, "patched": base + 1e-4, "compiled": base + 0.02}  # 51.03 and 56.1 of 255
    rows = [dict(variant="eager", steady_s=4.0, time_to_first_image_s=5.0),
            dict(variant="patched", steady_s=2.0, time_to_first_image_s=2.5),
            dict(variant="compiled", steady_s=3.0, time_to_first_image_s=60.0)]
    e2e._compare(rows, images)
    eager, patched, compiled = rows
    assert patched["speedup_vs_eager"] == 2.0 and patched["speedup_vs_compiled"] == 1.5
    assert patched["first_image_speedup_vs_eager"] == 2.0 and patched["first_image_speedup_vs_compiled"] == 24.0
    assert compiled["speedup_vs_eager"] == 4.0 / 3.0
    assert abs(patched["max_abs_diff_vs_eager"] - 1e-4) < 1e-6 and patched["max_abs_diff_vs_eager_255"] == 0
    assert abs(compiled["max_abs_diff_vs_eager"] - 0.02) < 1e-6 and compiled["max_abs_diff_vs_eager_255"] == 5
    assert "max_abs_diff_vs_eager" not in eager


def test_e2e_chart_with_compiled(tmp_path):
    pytest.importorskip("matplotlib")
    rows = []
    for batch in (1, 4):
        for variant, spi, ttfi in (("eager", 4.0, 5.0), ("patched", 2.0, 2.5), ("compiled", 3.0, 60.0)):
            rows.append(dict(suite="e2e", case="sd15 pipeline", variant=variant, batch=batch, size=256, steps=20,
                             dtype="float32", threads=2, seconds_per_image=spi, time_to_first_image_s=ttfi))
        rows[-2].update(speedup_vs_eager=2.0, speedup_vs_compiled=1.5, first_image_speedup_vs_compiled=24.0)
    rows.append(dict(suite="e2e", variant="compiled", batch=8, error="worker timed out after 3600 s"))
    path = e2e.save_chart(rows, tmp_path / "chart.png", device="test CPU")
    assert path is not None and path.stat().st_size > 0


def test_e2e_worker_timeout_gives_an_error_row(tmp_path):
    rows = e2e.run(e2e.torch.device("cpu"), quick=True, batches=[1], variants=["eager"], progress=False,
                   timeout_s=1, work_dir=tmp_path)
    (row,) = rows
    assert row["error"] == "worker timed out after 1 s" and row["variant"] == "eager"
