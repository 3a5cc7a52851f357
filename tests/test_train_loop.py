"""The shared training loop: checkpoints that survive kills, bitwise resume, signals, errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")

from fastgen.io.files import CheckpointError  # noqa: E402
from fastgen.train import checkpoint as ckpt  # noqa: E402
from fastgen.train.config import TrainConfig  # noqa: E402
from fastgen.train.vae import VAEOptions, VAETrainer  # noqa: E402

TINY = dict(block_out_channels=(8, 16), norm_num_groups=4)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield




def _trainer(digits, **loop):
    loop.setdefault("progress", False)
    loop.setdefault("batch_size", 16)
    loop.setdefault("log_every", 1)
    return VAETrainer(digits, VAEOptions(**TINY), TrainConfig(**loop))


def _state(trainer):
    out = {f"model.{k}": v.clone() for k, v in trainer.models["vae"].state_dict().items()}
    out.update({f"ema.{k}": v.clone() for k, v in trainer.emas["vae"].shadow.items()})
    return out


def test_loss_falls(digits):
    t = _trainer(digits, steps=30, lr=3e-3)
    h = t.fit()
    first = sum(r["loss"] for r in h[:5]) / 5
    last = sum(r["loss"] for r in h[-5:]) / 5
    assert last < 0.8 * first, (first, last)


def test_resume_is_bitwise(digits, tmp_path):
    straight = _trainer(digits, steps=6, lr=3e-3)
    straight.fit()
    first = _trainer(digits, steps=3, lr=3e-3, checkpoint_every=3, out_dir=str(tmp_path))
    first.fit()
    resumed = _trainer(digits, steps=6, lr=3e-3, checkpoint_every=3, out_dir=str(tmp_path))
    resumed.fit(resume=True)
    a, b = _state(straight), _state(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in straight.history] == [r["loss"] for r in resumed.history]
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))


def test_interrupted_checkpoint_write_keeps_the_previous_one(digits, tmp_path, monkeypatch):
    t = _trainer(digits, steps=2, checkpoint_every=1, out_dir=str(tmp_path), keep_checkpoints=5)
    t.train_step()
    good = t.save_checkpoint()
    t.train_step()
    real = ckpt._save_tensors
    calls = []

    def dying(path, tensors):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed mid-write")
        real(path, tensors)

    monkeypatch.setattr(ckpt, "_save_tensors", dying)
    with pytest.raises(KeyboardInterrupt):
        t.save_checkpoint()
    assert ckpt.latest_checkpoint(tmp_path) == good
    assert ckpt.load_checkpoint(good)["state"]["step"] == 1
    # a half-written folder left behind by a hard kill is never read
    (tmp_path / "checkpoints" / "step-00000002.tmp-999").mkdir()
    assert ckpt.list_checkpoints(tmp_path) == [good]


def test_sigkill_at_any_moment_leaves_a_loadable_checkpoint(tmp_path):
    code = (
        "import torch; torch.set_num_threads(1)\n"
        "from fastgen.data import load_digits\n"
        "from fastgen.train.config import TrainConfig\n"
        "from fastgen.train.vae import VAEOptions, VAETrainer\n"
        f"t = VAETrainer(load_digits(16), VAEOptions(**{TINY!r}), TrainConfig(steps=100000, batch_size=8, "
        f"checkpoint_every=1, keep_checkpoints=2, progress=False, out_dir={str(tmp_path)!r}))\n"
        "t.fit()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(ckpt.list_checkpoints(tmp_path)) < 3:
            time.sleep(0.2)
        time.sleep(0.37)  # somewhere inside a step or a checkpoint write
    finally:
        proc.kill()
        proc.wait()
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest is not None
    loaded = ckpt.load_checkpoint(latest)
    assert loaded["state"]["step"] >= 1 and "vae" in loaded["models"]
    t = VAETrainer(__import__("fastgen.data", fromlist=["load_digits"]).load_digits(16), VAEOptions(**TINY),
                   TrainConfig(steps=loaded["state"]["step"] + 1, batch_size=8, progress=False, out_dir=str(tmp_path)))
    assert t.resume() == latest and t.step == loaded["state"]["step"]


def test_sigterm_saves_the_current_step(digits, tmp_path):
    t = _trainer(digits, steps=50, out_dir=str(tmp_path))
    original = t.train_step

    def step_then_signal():
        logs = original()
        if t.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return logs

    t.train_step = step_then_signal
    with pytest.raises(KeyboardInterrupt, match="after step 3"):
        t.fit()
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))["state"]["step"] == 3
    assert signal.getsignal(signal.SIGTERM) is not None


def test_malformed_checkpoints_name_the_file(digits, tmp_path):
    t = _trainer(digits, steps=1, checkpoint_every=1, out_dir=str(tmp_path))
    t.fit()
    path = ckpt.latest_checkpoint(tmp_path)
    weights = path / "model-vae.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="model-vae.safetensors"):
        ckpt.load_checkpoint(path)
    (path / "trainer_state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="trainer_state.json"):
        ckpt.load_checkpoint(path)
    with pytest.raises(CheckpointError, match="is not a fastgen trainer checkpoint"):
        ckpt.load_checkpoint(tmp_path)


def test_resume_refuses_another_trainer_or_batch(digits, tmp_path):
    _trainer(digits, steps=1, checkpoint_every=1, out_dir=str(tmp_path)).fit()
    with pytest.raises(CheckpointError, match="global batch_size 16"):
        _trainer(digits, steps=2, batch_size=8, out_dir=str(tmp_path)).fit(resume=True)
    other = VAETrainer(digits, VAEOptions(block_out_channels=(8, 8), norm_num_groups=4),
                       TrainConfig(steps=2, batch_size=16, progress=False, out_dir=str(tmp_path)))
    with pytest.raises(CheckpointError, match="do not fit"):
        other.fit(resume=True)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs(digits, precision):
    h = _trainer(digits, steps=3, precision=precision).fit()
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in h)


def test_config_errors(digits):
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp8")
    with pytest.raises(ValueError, match="need out_dir"):
        TrainConfig(checkpoint_every=10)
    with pytest.raises(ValueError, match="divisible"):
        _trainer(digits, steps=1, batch_size=10, grad_accum=3)
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)


def test_warmup_and_cosine_schedule():
    c = TrainConfig(steps=110, lr=1.0, warmup_steps=10, lr_schedule="cosine")
    assert c.lr_at(0) == pytest.approx(0.1) and c.lr_at(9) == pytest.approx(1.0)
    assert c.lr_at(60) == pytest.approx(0.5) and c.lr_at(110) == pytest.approx(0.0, abs=1e-12)


def test_channel_mismatch_is_a_clear_error(digits):
    t = VAETrainer(digits, VAEOptions(channels=3, **TINY), TrainConfig(steps=1, batch_size=8, progress=False))
    with pytest.raises(ValueError, match="gives 1-channel images, the model expects 3"):
        t.fit()


def test_fit_writes_samples_curves_and_an_exported_model(digits, tmp_path):
    pytest.importorskip("matplotlib")
    from fastgen.models import AutoencoderKL

    t = _trainer(digits, steps=4, sample_every=2, out_dir=str(tmp_path))
    t.fit()
    assert (tmp_path / "samples" / "step-00000002.png").is_file()
    assert (tmp_path / "samples" / "step-00000004.png").is_file()
    assert (tmp_path / "curves.png").is_file()
    vae = AutoencoderKL.from_pretrained(tmp_path / "model" / "vae")
    # exported: the EMA weights, with the measured latent scale
    ema = t.emas["vae"].shadow
    assert all(torch.equal(v, ema[k]) for k, v in vae.state_dict().items() if k in ema)
    manifest = json.loads((tmp_path / "model" / "fastgen_model.json").read_text())
    assert manifest["kind"] == "vae" and vae.config.scaling_factor == pytest.approx(manifest["scaling_factor"])
