"""ConvVAE (Kingma & Welling 2014): shapes, the reparameterisation, the closed-form KL, save/load, errors."""

import math

import pytest
import torch

from fastgen.models.conv_vae import ConvVAE, kl_divergence


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.mark.parametrize("latent_dim,image_size,channels", [(2, 16, 1), (16, 16, 1), (16, 32, 3), (3, 64, 1)])
def test_shapes(latent_dim, image_size, channels):
    torch.manual_seed(0)
    m = ConvVAE(in_channels=channels, image_size=image_size, latent_dim=latent_dim, base_channels=8)
    x = torch.rand(3, channels, image_size, image_size) * 2 - 1
    mu, logvar = m.encode(x)
    assert mu.shape == logvar.shape == (3, latent_dim)
    y = m.decode(mu)
    assert y.shape == x.shape
    assert y.abs().max() <= 1.0
    recon, mu2, logvar2 = m(x, torch.randn(3, latent_dim))
    assert recon.shape == x.shape and torch.equal(mu2, mu) and torch.equal(logvar2, logvar)
    # no noise: the posterior mean is decoded
    torch.testing.assert_close(m(x)[0], y)
    logits, _, _ = m(x, return_logits=True)
    torch.testing.assert_close(torch.tanh(logits), y)


def test_reparameterize_and_bce_logits():
    m = ConvVAE(latent_dim=2, base_channels=4)
    mu = torch.tensor([[1.0, -2.0]])
    logvar = torch.tensor([[0.0, math.log(4.0)]])
    noise = torch.tensor([[0.5, 1.0]])
    torch.testing.assert_close(m.reparameterize(mu, logvar, noise), torch.tensor([[1.5, 0.0]]))
    # the decoder's pre-tanh h: (tanh(h) + 1) / 2 == sigmoid(2 h), so 2h are the [0, 1] image's logits
    h = torch.linspace(-5, 5, 101)
    torch.testing.assert_close((torch.tanh(h) + 1) / 2, torch.sigmoid(2 * h))


def test_kl_closed_form_by_hand():
    mu = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    logvar = torch.tensor([[0.0, math.log(2.0)], [0.0, 0.0]])
    # KL = 1/2 sum(mu^2 + var - 1 - logvar): (1 + 1 - 1 - 0)/2 + (0 + 2 - 1 - ln 2)/2; the prior itself: 0
    expected = torch.tensor([0.5 + 0.5 * (1.0 - math.log(2.0)), 0.0])
    torch.testing.assert_close(kl_divergence(mu, logvar), expected)
    # and torch.distributions agrees on a random example
    mu, logvar = torch.randn(4, 5), torch.randn(4, 5)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros(4, 5), torch.ones(4, 5))
    torch.testing.assert_close(kl_divergence(mu, logvar), torch.distributions.kl_divergence(q, p).sum(1))


def test_save_load_roundtrip(tmp_path):
    torch.manual_seed(1)
    m = ConvVAE(in_channels=1, image_size=16, latent_dim=2, base_channels=8).eval()
    m.save_pretrained(tmp_path / "vae")
    loaded = ConvVAE.from_pretrained(tmp_path / "vae").eval()
    assert dict(loaded.config) == dict(m.config) == {"in_channels": 1, "image_size": 16, "latent_dim": 2,
                                                      "base_channels": 8}
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    noise = torch.randn(2, 2)
    for a, b in zip(m(x, noise), loaded(x, noise)):
        assert torch.equal(a, b)
    z = torch.randn(5, 2)
    assert torch.equal(m.decode(z), loaded.decode(z))


def test_errors():
    m = ConvVAE(in_channels=1, image_size=16, latent_dim=4, base_channels=4)
    with pytest.raises(ValueError, match="3 channels, the model expects in_channels=1"):
        m.encode(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"must be 16x16.*got 32x32"):
        m(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        m.encode(torch.zeros(1, 16, 16))
    with pytest.raises(ValueError, match=r"z must be \(N, 4\)"):
        m.decode(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="noise must have mu's shape"):
        m(torch.zeros(2, 1, 16, 16), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="power of two"):
        ConvVAE(image_size=24)
    with pytest.raises(ValueError, match="latent_dim must be a positive int"):
        ConvVAE(latent_dim=0)
    with pytest.raises(ValueError, match="kl_divergence"):
        kl_divergence(torch.zeros(2, 3), torch.zeros(2, 4))
