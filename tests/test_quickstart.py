"""``fastgen quickstart`` in its reduced (--quick) mode: every phase runs and every file the README promises
is written. The full run's quality (recognisable rows) is measured in benchmarks/results, not here."""

import json
import subprocess
import sys

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("transformers")
pytest.importorskip("torchmetrics")


def test_quickstart_cli_quick(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fastgen", "quickstart", "--quick", "--out", str(tmp_path),
                           "--no-progress"], capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("samples.png", "interpolation.png", "curves.png", "report.json"):
        assert (tmp_path / name).is_file(), name
        assert str(tmp_path / name) in proc.stdout  # it prints where the files are
    report = json.loads((tmp_path / "report.json").read_text())
    assert {"train AutoencoderKL", "train latent diffusion U-Net", "sample 10x10 grid",
            "FID and accuracy"} <= set(report["phase_seconds"])
    assert report["metrics"]["n_real"] == 300 and len(report["metrics"]["per_class_accuracy"]) == 10
    assert (tmp_path / "run" / "diffusion" / "model" / "fastgen_model.json").is_file()
    from PIL import Image

    grid = Image.open(tmp_path / "samples.png")
    assert grid.height > 10 * 16 * 4  # ten rows of 4x-enlarged 16 px digits


@pytest.mark.parametrize("mode", ["gan", "pix2pix"])
def test_quickstart_other_modes(tmp_path, mode):
    import torch

    from fastgen.quickstart import run

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = run(str(tmp_path), mode=mode, quick=True, progress=False, echo=lambda *a: None)
    finally:
        torch.set_num_threads(n)
    assert (tmp_path / "samples.png").is_file() and (tmp_path / "report.json").is_file()
    assert report["metrics"]["fid"] > 0 and report["mode"] == mode


def test_quickstart_refuses_an_unknown_mode(tmp_path):
    from fastgen.quickstart import run

    with pytest.raises(ValueError, match="mode must be one of"):
        run(str(tmp_path), mode="flow")
