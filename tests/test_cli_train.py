"""``fastgen train | sample | evaluate`` from the command line: a run end to end on tiny settings, and the
clear errors a user gets for bad input."""

import json

import pytest
import torch

pytest.importorskip("sklearn")

from fastgen.cli import main  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def test_train_sample_evaluate(tmp_path, capsys):
    vae = tmp_path / "vae"
    assert main(["train", "vae", "--out", str(vae), "--steps", "3", "--batch-size", "16", "--no-progress"]) == 0
    assert (vae / "model" / "vae" / "config.json").is_file()
    diff = tmp_path / "diff"
    assert main(["train", "diffusion", "--vae", str(vae / "model" / "vae"), "--conditioning", "class",
                 "--out", str(diff), "--steps", "3", "--batch-size", "16", "--no-progress",
                 "--checkpoint-every", "2"]) == 0
    assert (diff / "checkpoints" / "step-00000003").is_dir()
    # resume past the end: continues from step 3 to 4
    assert main(["train", "diffusion", "--vae", str(vae / "model" / "vae"), "--conditioning", "class",
                 "--out", str(diff), "--steps", "4", "--batch-size", "16", "--no-progress", "--resume",
                 "--checkpoint-every", "2"]) == 0
    assert "for 4 steps" in capsys.readouterr().out
    out = tmp_path / "s.png"
    assert main(["sample", "--model", str(diff / "model"), "--class", "seven", "--num", "3", "--steps", "2",
                 "--output", str(out)]) == 0
    assert out.is_file()
    scores = tmp_path / "scores.json"
    assert main(["evaluate", "--model", str(diff / "model"), "--num", "20", "--steps", "2", "--json",
                 str(scores)]) == 0
    data = json.loads(scores.read_text())
    assert data["n_fake"] == 20 and data["fid"] > 0 and len(data["per_class_accuracy"]) == 10


def test_gan_and_conv_vae_from_the_cli(tmp_path):
    assert main(["train", "gan", "--class-conditional", "--out", str(tmp_path / "g"), "--steps", "2",
                 "--batch-size", "16", "--no-progress"]) == 0
    assert main(["sample", "--model", str(tmp_path / "g" / "model"), "--class", "3", "--num", "2",
                 "--output", str(tmp_path / "g.png")]) == 0
    assert main(["train", "conv-vae", "--latent-dim", "2", "--out", str(tmp_path / "v"), "--steps", "2",
                 "--batch-size", "16", "--no-progress"]) == 0
    assert main(["sample", "--model", str(tmp_path / "v" / "model"), "--num", "4",
                 "--output", str(tmp_path / "v.png")]) == 0


def test_errors_are_clear(tmp_path, capsys):
    assert main(["train", "vae", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "neither 'digits' nor an existing folder" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", "vae", "--data", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert "empty" in capsys.readouterr().err
    assert main(["sample", "--model", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["sample", "--model", str(empty)]) == 2
    assert "fastgen_model.json is missing" in capsys.readouterr().err
    assert main(["train", "diffusion", "--out", str(tmp_path / "d"), "--steps", "1", "--channels", "3",
                 "--vae", str(tmp_path / "novae")]) == 2
