"""DCGANTrainer and Pix2PixTrainer on the digits: training moves the right way, fit's files, export round trip,
class-conditional runs, bitwise resume, data errors, every GAN loss, fp16/bf16."""

import json

import pytest
import torch

pytest.importorskip("sklearn")

from fastgen.data import load_digits  # noqa: E402
from fastgen.models.gan import DCGANGenerator, Pix2PixGenerator  # noqa: E402
from fastgen.train.gan import DCGANTrainer, GANOptions, default_config, generate  # noqa: E402
from fastgen.train.pix2pix import Pix2PixOptions, Pix2PixTrainer  # noqa: E402
from fastgen.train.pix2pix import default_config as p2p_config  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield




@pytest.fixture(scope="module")
def digits32():
    return load_digits(32, "train")


TINY = dict(ngf=16, ndf=16, latent_dim=32)


def _cfg(**kw):
    values = dict(steps=60, batch_size=32, log_every=1, progress=False)
    values.update(kw)
    return default_config(**values)


def _mean(history, key, sl):
    vals = [r[key] for r in history[sl]]
    return sum(vals) / len(vals)


def _mean_image_distance(images, data):
    return float((images.mean(0) - data.mean(0)).square().mean().sqrt())


def test_default_config_is_dcgans():
    c = default_config(steps=5)
    assert (c.lr, c.beta1, c.beta2, c.max_grad_norm, c.steps) == (2e-4, 0.5, 0.999, None, 5)


def test_dcgan_learns_and_fit_writes_everything(digits, tmp_path):
    trainer = DCGANTrainer(digits, GANOptions(**TINY), _cfg(out_dir=str(tmp_path)))
    data = digits.images
    before = _mean_image_distance(trainer.generate(256, seed=5), data)
    history = trainer.fit()
    assert len(history) == 60
    assert all(torch.isfinite(torch.tensor([r["d_loss"], r["g_loss"]])).all() for r in history)
    # D learns to separate real from fake: its real-fake logit gap widens
    gap = [r["d_real"] - r["d_fake"] for r in history]
    assert sum(gap[-5:]) / 5 > sum(gap[:5]) / 5 + 1.0, gap
    # and G moves towards the data: the mean image of its samples is closer to the data's
    after = _mean_image_distance(trainer.generate(256, seed=5), data)
    assert after < before - 0.02, (before, after)

    assert (tmp_path / "samples" / "step-00000060.png").is_file()
    assert (tmp_path / "curves.png").is_file()
    manifest = json.loads((tmp_path / "model" / "fastgen_model.json").read_text())
    assert manifest["kind"] == "dcgan" and manifest["options"]["ngf"] == 16
    assert (tmp_path / "model" / "discriminator" / "config.json").is_file()
    loaded = DCGANGenerator.from_pretrained(tmp_path / "model" / "generator").eval()
    with torch.no_grad():
        exported = generate(loaded, 8, seed=2)
    assert torch.equal(exported, trainer.generate(8, seed=2))  # the EMA generator, eval mode
    assert set(trainer.emas) == {"generator"}


def test_class_conditional(digits, tmp_path):
    opts = GANOptions(num_classes=10, **TINY)
    trainer = DCGANTrainer(digits, opts, _cfg(steps=8, out_dir=str(tmp_path)))
    trainer.fit()
    z, labels = trainer.sample_inputs()
    assert z.shape == (100, 32) and labels.tolist() == [c for c in range(10) for _ in range(10)]
    assert torch.equal(z[:10], z[10:20])  # one latent per column, shared down the rows
    assert trainer.grid_rows() == 10
    from PIL import Image

    w, h = Image.open(tmp_path / "samples" / "step-00000008.png").size
    assert w == h  # 10 x 10 tiles
    images = trainer.generate(5, class_labels=3, seed=0)
    assert images.shape == (5, 1, 16, 16)
    assert not torch.equal(images, trainer.generate(5, class_labels=4, seed=0))
    loaded = DCGANGenerator.from_pretrained(tmp_path / "model" / "generator").eval()
    assert loaded.num_classes == 10
    assert torch.equal(generate(loaded, 5, class_labels=[1, 2, 3, 4, 5]),
                       trainer.generate(5, class_labels=[1, 2, 3, 4, 5]))
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        trainer.generate(2, class_labels=10)


def test_dcgan_resume_is_bitwise(digits, tmp_path):
    opts = GANOptions(**TINY)
    a = DCGANTrainer(digits, opts, _cfg(steps=20, checkpoint_every=10, out_dir=str(tmp_path / "a")))
    a.fit()
    b = DCGANTrainer(digits, opts, _cfg(steps=10, checkpoint_every=10, out_dir=str(tmp_path / "b")))
    b.fit()
    b2 = DCGANTrainer(digits, opts, _cfg(steps=20, checkpoint_every=10, out_dir=str(tmp_path / "b")))
    b2.fit(resume=True)
    for name in ("generator", "discriminator"):
        sa, sb = a.models[name].state_dict(), b2.models[name].state_dict()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), (name, k)
    for k, v in a.emas["generator"].shadow.items():
        assert torch.equal(v, b2.emas["generator"].shadow[k]), k
    assert [r["g_loss"] for r in a.history] == [r["g_loss"] for r in b2.history]


@pytest.mark.parametrize("options", [
    dict(loss="hinge", r1_gamma=1.0),
    dict(loss="lsgan"),
    dict(loss="wgan-gp", d_steps=2),
    dict(loss="nonsaturating", num_classes=10, condition_type="concat", r1_gamma=0.5),
])
def test_every_loss_runs(digits, options):
    trainer = DCGANTrainer(digits, GANOptions(**TINY, **options), _cfg(steps=3))
    history = trainer.fit()
    last = history[-1]
    assert all(torch.isfinite(torch.tensor(v)) for k, v in last.items())
    if options.get("r1_gamma"):
        assert last["r1"] > 0
    if options["loss"] == "wgan-gp":
        assert last["gp"] > 0


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_dcgan_low_precision_runs(digits, precision):
    trainer = DCGANTrainer(digits, GANOptions(**TINY, r1_gamma=1.0), _cfg(steps=3, precision=precision))
    history = trainer.fit()
    assert all(torch.isfinite(torch.tensor([r["d_loss"], r["g_loss"]])).all() for r in history)


def test_dcgan_data_errors(digits):
    with pytest.raises(ValueError, match=r"data gives 1-channel 16x16 images, the model expects 3-channel 16x16"):
        DCGANTrainer(digits, GANOptions(channels=3, **TINY), _cfg(steps=1)).fit()
    with pytest.raises(ValueError, match=r"labels reach \[0, \d\], the model has num_classes=5"):
        DCGANTrainer(digits, GANOptions(num_classes=5, **TINY), _cfg(steps=1)).fit()
    images_only = [digits.images[i] for i in range(64)]
    with pytest.raises(ValueError, match="needs a dataset of \\(image, int label\\) pairs"):
        DCGANTrainer(images_only, GANOptions(num_classes=10, **TINY), _cfg(steps=1)).fit()
    with pytest.raises(ValueError, match="loss must be one of"):
        GANOptions(loss="wgan")


# ---------------------------------------------------------------------------- pix2pix

P2P = dict(ngf=8, ndf=8)


def test_pix2pix_l1_falls_and_fit_writes_everything(digits32, tmp_path):
    trainer = Pix2PixTrainer(digits32, Pix2PixOptions(**P2P), p2p_config(steps=30, batch_size=32, log_every=1,
                                                                         progress=False, out_dir=str(tmp_path)))
    history = trainer.fit()
    first, last = _mean(history, "l1", slice(0, 5)), _mean(history, "l1", slice(-5, None))
    assert last < 0.93 * first, (first, last)
    assert all(torch.isfinite(torch.tensor(r["d_loss"])) for r in history)
    assert (tmp_path / "samples" / "step-00000030.png").is_file()
    assert (tmp_path / "curves.png").is_file()
    assert json.loads((tmp_path / "model" / "fastgen_model.json").read_text())["kind"] == "pix2pix"
    grid = trainer.sample_grid()
    assert grid.shape == (24, 1, 32, 32) and trainer.grid_rows() == 3
    cond, target = trainer.fixed_pairs(8)
    assert torch.equal(grid[2::3], target) and torch.equal(grid[0::3], cond)
    assert trainer.save_triplets(tmp_path / "triplets.png").is_file()
    loaded = Pix2PixGenerator.from_pretrained(tmp_path / "model" / "generator").eval()
    with torch.no_grad():
        assert torch.equal(loaded(cond), trainer.translate(cond))
    assert trainer.translate(cond[0]).shape == (1, 32, 32)


def test_pix2pix_paired_data_and_resume(digits32, tmp_path):
    # (condition, target) pairs are used as they are: here the "condition" is the image flipped upside down
    pairs = [(digits32.images[i].flip(-2), digits32.images[i]) for i in range(96)]
    opts = Pix2PixOptions(condition=None, gan_mode="lsgan", **P2P)

    def cfg(steps, sub):
        return p2p_config(steps=steps, batch_size=32, log_every=1, progress=False, checkpoint_every=4,
                          out_dir=str(tmp_path / sub))

    a = Pix2PixTrainer(pairs, opts, cfg(8, "a"))
    a.fit()
    cond, target = a.fixed_pairs(2)
    assert torch.equal(cond, torch.stack([p[0] for p in pairs[:2]]))
    Pix2PixTrainer(pairs, opts, cfg(4, "b")).fit()
    b2 = Pix2PixTrainer(pairs, opts, cfg(8, "b"))
    b2.fit(resume=True)
    for name in ("generator", "discriminator"):
        sa, sb = a.models[name].state_dict(), b2.models[name].state_dict()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), (name, k)


def test_pix2pix_data_errors(digits, digits32):
    images_only = [digits32.images[i] for i in range(32)]
    with pytest.raises(ValueError, match="condition is None"):
        Pix2PixTrainer(images_only, Pix2PixOptions(condition=None, **P2P),
                       p2p_config(steps=1, batch_size=32, progress=False)).fit()
    with pytest.raises(ValueError, match=r"data gives 1-channel 32x32 target images, the model expects 3-channel"):
        Pix2PixTrainer(digits32, Pix2PixOptions(in_channels=3, out_channels=3, **P2P),
                       p2p_config(steps=1, batch_size=32, progress=False)).fit()
    with pytest.raises(ValueError, match="unknown condition"):
        Pix2PixOptions(condition="sketch")
