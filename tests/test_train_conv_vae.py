"""ConvVAETrainer on the digits: the ELBO falls, fit's files, export round trip, bitwise resume, errors, fp16/bf16."""

import json

import pytest
import torch

pytest.importorskip("sklearn")

from fastgen.data import load_digits  # noqa: E402
from fastgen.models.conv_vae import ConvVAE  # noqa: E402
from fastgen.train.config import TrainConfig  # noqa: E402
from fastgen.train.conv_vae import ConvVAEOptions, ConvVAETrainer, reconstruction_loss  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield




def _config(**kw):
    values = dict(steps=40, batch_size=32, lr=2e-3, log_every=1, progress=False)
    values.update(kw)
    return TrainConfig(**values)


def _mean(history, key, sl):
    vals = [r[key] for r in history[sl]]
    return sum(vals) / len(vals)


def test_elbo_falls_and_fit_writes_everything(digits, tmp_path):
    opts = ConvVAEOptions(latent_dim=2, base_channels=8)
    trainer = ConvVAETrainer(digits, opts, _config(out_dir=str(tmp_path)))
    history = trainer.fit()
    assert len(history) == 40 and {"loss", "recon", "kl"} <= set(history[-1])
    first, last = _mean(history, "loss", slice(0, 5)), _mean(history, "loss", slice(-5, None))
    assert last < 0.85 * first, (first, last)
    for r in history:
        assert abs(r["loss"] - (r["recon"] + r["kl"])) < 1e-3 * r["loss"]
        assert r["kl"] >= 0
    assert (tmp_path / "samples" / "step-00000040.png").is_file()
    assert (tmp_path / "samples" / "latent-map-step-00000040.png").is_file()
    assert (tmp_path / "curves.png").is_file()
    manifest = json.loads((tmp_path / "model" / "fastgen_model.json").read_text())
    assert manifest["kind"] == "conv_vae" and manifest["options"]["latent_dim"] == 2
    loaded = ConvVAE.from_pretrained(tmp_path / "model" / "vae").eval()
    z = torch.randn(6, 2)
    with torch.no_grad(), trainer.averaged_weights():
        ema_out = trainer.models["vae"].eval().decode(z)
        # the EMA weights, not the training ones, were exported
        trained = {k: v.clone() for k, v in trainer.models["vae"].state_dict().items()}
    with torch.no_grad():  # the same conv path as ema_out (under grad, trainable weights skip Winograd)
        assert torch.equal(loaded.decode(z), ema_out)
    assert not all(torch.equal(trained[k], v) for k, v in trainer.models["vae"].state_dict().items())
    assert trainer.generate(4, seed=3).shape == (4, 1, 16, 16)
    assert torch.equal(trainer.generate(4, seed=3), trainer.generate(4, seed=3))
    assert trainer.reconstruct(digits.images[:3]).shape == (3, 1, 16, 16)


@pytest.mark.parametrize("recon", ["l2", "l1"])
def test_other_reconstruction_losses_fall(digits, recon):
    trainer = ConvVAETrainer(digits, ConvVAEOptions(latent_dim=8, base_channels=8, recon=recon, beta=0.5),
                             _config(steps=25))
    history = trainer.fit()
    assert _mean(history, "recon", slice(-5, None)) < _mean(history, "recon", slice(0, 5))


def test_reconstruction_loss_is_summed_per_image():
    x = torch.zeros(2, 1, 4, 4)
    logits = torch.full((2, 1, 4, 4), 0.5)
    # l2: 1/2 (tanh(.5) - 0)^2 per pixel, 16 pixels, mean over the 2 images
    torch.testing.assert_close(reconstruction_loss(logits, x, "l2"), 16 * 0.5 * torch.tanh(torch.tensor(0.5)) ** 2)
    # bce of target 1/2 at logit 2h = 1: softplus(1) - 0.5
    expected = 16 * (torch.nn.functional.softplus(torch.tensor(1.0)) - 0.5)
    torch.testing.assert_close(reconstruction_loss(logits, x, "bce"), expected)


def test_resume_is_bitwise(digits, tmp_path):
    opts = ConvVAEOptions(latent_dim=4, base_channels=4)
    a = ConvVAETrainer(digits, opts, _config(steps=20, checkpoint_every=10, out_dir=str(tmp_path / "a")))
    a.fit()
    b = ConvVAETrainer(digits, opts, _config(steps=10, checkpoint_every=10, out_dir=str(tmp_path / "b")))
    b.fit()
    b2 = ConvVAETrainer(digits, opts, _config(steps=20, checkpoint_every=10, out_dir=str(tmp_path / "b")))
    b2.fit(resume=True)
    for (k, va), vb in zip(a.models["vae"].state_dict().items(), b2.models["vae"].state_dict().values()):
        assert torch.equal(va, vb), k
    for k, v in a.emas["vae"].shadow.items():
        assert torch.equal(v, b2.emas["vae"].shadow[k]), k
    assert [r["loss"] for r in a.history] == [r["loss"] for r in b2.history]


def test_channel_and_size_mismatch(digits):
    trainer = ConvVAETrainer(digits, ConvVAEOptions(channels=3, base_channels=4), _config(steps=1))
    with pytest.raises(ValueError, match=r"data gives 1-channel 16x16 images, the model expects 3-channel 16x16"):
        trainer.fit()
    trainer = ConvVAETrainer(digits, ConvVAEOptions(image_size=32, base_channels=4), _config(steps=1))
    with pytest.raises(ValueError, match=r"data gives 1-channel 16x16 images, the model expects 1-channel 32x32"):
        trainer.fit()
    with pytest.raises(ValueError, match="recon must be one of"):
        ConvVAEOptions(recon="mse")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_runs(digits, precision):
    trainer = ConvVAETrainer(digits, ConvVAEOptions(latent_dim=4, base_channels=4), _config(steps=3,
                                                                                            precision=precision))
    history = trainer.fit()
    assert len(history) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in history)
