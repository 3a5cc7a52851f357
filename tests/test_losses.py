"""fastgen.losses: every GAN loss against numbers worked out by hand, their gradients, R1 and WGAN-GP through
double backward (also through fastgen.ops.bias_act), and the argument checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastgen import losses
from fastgen.ops import bias_act

REAL = [0.5, -1.0, 2.0]
FAKE = [0.3, -2.0, -0.5]


def _softplus(v: float) -> float:
    return math.log1p(math.exp(v))


def _sigmoid(v: float) -> float:
    return 1 / (1 + math.exp(-v))


def _mean(vs) -> float:
    vs = list(vs)
    return sum(vs) / len(vs)


def _logits(values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype, requires_grad=True)


def _close(t: torch.Tensor, expected) -> None:
    torch.testing.assert_close(t.detach().double(), torch.as_tensor(expected, dtype=torch.float64),
                               rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- unconditional losses


def test_nonsaturating_values_and_gradients():
    real, fake = _logits(REAL), _logits(FAKE)
    d = losses.d_loss_nonsaturating(real, fake)
    _close(d, _mean(_softplus(-r) for r in REAL) + _mean(_softplus(f) for f in FAKE))
    d.backward()
    # d softplus(-r) / dr = -sigmoid(-r); d softplus(f) / df = sigmoid(f); each term is a mean over 3
    _close(real.grad, [-_sigmoid(-r) / 3 for r in REAL])
    _close(fake.grad, [_sigmoid(f) / 3 for f in FAKE])

    fake = _logits(FAKE)
    g = losses.g_loss_nonsaturating(fake)
    _close(g, _mean(_softplus(-f) for f in FAKE))
    g.backward()
    _close(fake.grad, [-_sigmoid(-f) / 3 for f in FAKE])


def test_nonsaturating_is_bce_on_a_two_logit_case():
    # log(1 + e^-0.5) + log(1 + e^-1): BCE with label 1 on 0.5 and label 0 on -1.0
    d = losses.d_loss_nonsaturating(torch.tensor([0.5]), torch.tensor([-1.0]))
    assert d.item() == pytest.approx(math.log1p(math.exp(-0.5)) + math.log1p(math.exp(-1.0)), rel=1e-6)


def test_hinge_values_and_gradients():
    real, fake = _logits(REAL), _logits(FAKE)
    d = losses.d_loss_hinge(real, fake)
    # relu(1 - r) = [0.5, 2.0, 0.0], relu(1 + f) = [1.3, 0.0, 0.5]
    _close(d, 2.5 / 3 + 1.8 / 3)
    d.backward()
    _close(real.grad, [-1 / 3, -1 / 3, 0.0])  # r = 2.0 is past the margin
    _close(fake.grad, [1 / 3, 0.0, 1 / 3])    # f = -2.0 is past the margin

    fake = _logits(FAKE)
    g = losses.g_loss_hinge(fake)
    _close(g, 2.2 / 3)
    g.backward()
    _close(fake.grad, [-1 / 3] * 3)


def test_lsgan_values_and_gradients():
    real, fake = _logits(REAL), _logits(FAKE)
    d = losses.d_loss_lsgan(real, fake)
    # (r - 1)^2 = [0.25, 4.0, 1.0]; f^2 = [0.09, 4.0, 0.25]
    _close(d, 0.5 * (5.25 / 3 + 4.34 / 3))
    d.backward()
    _close(real.grad, [(r - 1) / 3 for r in REAL])
    _close(fake.grad, [f / 3 for f in FAKE])

    fake = _logits(FAKE)
    g = losses.g_loss_lsgan(fake)
    # (f - 1)^2 = [0.49, 9.0, 2.25]
    _close(g, 0.5 * 11.74 / 3)
    g.backward()
    _close(fake.grad, [(f - 1) / 3 for f in FAKE])


def test_wgan_values():
    real, fake = _logits(REAL), _logits(FAKE)
    _close(losses.d_loss_wgan(real, fake), -2.2 / 3 - 1.5 / 3)
    _close(losses.g_loss_wgan(fake), 2.2 / 3)


def test_losses_average_patch_maps_and_unequal_batches():
    # a PatchGAN map (N, 1, H', W') is averaged over every patch; real and fake batches need not match
    real = torch.full((2, 1, 3, 3), 0.5)
    fake = torch.full((5, 1), -1.0)
    assert losses.d_loss_hinge(real, fake).item() == pytest.approx(0.5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_logits(dtype):
    real, fake = torch.tensor(REAL, dtype=dtype), torch.tensor(FAKE, dtype=dtype)
    for d in (losses.d_loss_nonsaturating, losses.d_loss_hinge, losses.d_loss_lsgan, losses.d_loss_wgan):
        out = d(real, fake)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), d(real.float(), fake.float()), rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------- WGAN-GP


class _Linear(torch.nn.Module):
    """D(x) = sum(w * x) per sample: its input gradient is w everywhere."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = torch.nn.Parameter(w)

    def forward(self, x):
        return (self.w * x).flatten(1).sum(1)


def test_gradient_penalty_of_a_linear_critic():
    w = torch.tensor([[[3.0, 0.0], [0.0, 4.0]]], dtype=torch.float64)  # ||w|| = 5
    d = _Linear(w.clone())
    real = torch.randn(4, 1, 2, 2, dtype=torch.float64)
    fake = torch.randn(4, 1, 2, 2, dtype=torch.float64, requires_grad=True)
    gp = losses.gradient_penalty(d, real, fake, weight=10.0)
    _close(gp, 10.0 * (5 - 1) ** 2)
    gp.backward()
    # d/dw [10 (||w|| - 1)^2] = 20 (||w|| - 1) w / ||w||: the penalty trains D
    _close(d.w.grad, 20 * 4 * w / 5)
    assert fake.grad is None  # the penalty never reaches G


def test_gradient_penalty_interpolates_with_the_given_generator():
    # D(x) = sum(x^2) has input gradient 2 x_hat, so the value depends on the draws of eps
    real = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    fake = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    gp = losses.gradient_penalty(lambda x: x.square().flatten(1).sum(1), real, fake, weight=2.0,
                                 generator=torch.Generator().manual_seed(7))
    eps = torch.rand((3, 1, 1, 1), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    x_hat = eps * real + (1 - eps) * fake
    expected = 2.0 * ((2 * x_hat).flatten(1).norm(dim=1) - 1).square().mean()
    _close(gp, expected)


def test_gradient_penalty_checks():
    d = _Linear(torch.ones(1, 2, 2))
    x = torch.zeros(2, 1, 2, 2)
    with pytest.raises(ValueError, match="one shape"):
        losses.gradient_penalty(d, x, torch.zeros(3, 1, 2, 2))
    with pytest.raises(TypeError, match="fake must be a torch.Tensor"):
        losses.gradient_penalty(d, x, [[0.0]])
    with pytest.raises(ValueError, match="does not depend"):
        losses.gradient_penalty(lambda t: torch.ones(2, requires_grad=True), x, x)


# ---------------------------------------------------------------- R1


def test_r1_of_a_linear_discriminator():
    w = torch.tensor([[[1.0, -2.0], [0.5, 2.0]]], dtype=torch.float64)  # ||w||^2 = 9.25
    d = _Linear(w.clone())
    x = torch.randn(3, 1, 2, 2, dtype=torch.float64, requires_grad=True)
    r1 = losses.r1_penalty(d(x), x, gamma=4.0)
    _close(r1, 4.0 / 2 * 9.25)
    r1.backward()
    _close(d.w.grad, 4.0 * w)  # d/dw [gamma/2 ||w||^2] = gamma w


def test_r1_of_a_conditional_discriminator():
    wc = torch.tensor([1.0, 2.0], dtype=torch.float64)  # ||wc||^2 = 5
    wx = torch.tensor([3.0, 0.0], dtype=torch.float64)  # ||wx||^2 = 9
    cond = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    logits = (cond * wc).sum(1) + (x * wx).sum(1)
    _close(losses.r1_penalty(logits, (cond, x), gamma=1.0), 0.5 * (5 + 9))
    # a tensor D does not read contributes nothing
    unused = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    logits = (x * wx).sum(1)
    _close(losses.r1_penalty(logits, (unused, x), gamma=1.0), 0.5 * 9)


def _bias_act_cpu_error() -> str | None:
    try:
        bias_act(torch.ones(1, 1), backend="cpu")
    except Exception as e:  # the kernel may be missing from this build, or not built at all
        return f"{type(e).__name__}: {e}"
    return None


def _tiny_d(x, p, act):
    h = F.conv2d(x, p["w1"], padding=1)
    h = act(h, p["b1"])
    h = F.conv2d(h, p["w2"])
    return h.mean(dim=(1, 2, 3))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_r1_double_backward_through_bias_act(backend):
    if backend == "cpu" and (err := _bias_act_cpu_error()) is not None:
        pytest.skip(f"bias_act's cpu kernel does not run in this build: {err}")
    g = torch.Generator().manual_seed(0)
    params = {"w1": torch.randn(4, 3, 3, 3, generator=g) * 0.5, "b1": torch.randn(4, generator=g) * 0.3,
              "w2": torch.randn(1, 4, 3, 3, generator=g) * 0.5}
    x0 = torch.randn(2, 3, 6, 6, generator=g)

    def fused(h, b):
        return bias_act(h, b, act="lrelu", backend=backend)

    def eager(h, b):
        return F.leaky_relu(h + b.view(1, -1, 1, 1), 0.2) * math.sqrt(2)

    grads = []
    for act in (fused, eager):
        p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        x = x0.clone().requires_grad_(True)
        r1 = losses.r1_penalty(_tiny_d(x, p, act), x, gamma=10.0)
        r1.backward()
        grads.append({"r1": r1.detach(), **{k: v.grad for k, v in p.items()}})
    fused_grads, eager_grads = grads
    assert eager_grads["r1"] > 0 and eager_grads["w1"].abs().sum() > 0
    for k in eager_grads:
        torch.testing.assert_close(fused_grads[k], eager_grads[k], rtol=1e-5, atol=1e-6, msg=k)


def test_r1_checks():
    w = torch.ones(2)
    x = torch.randn(3, 2)
    with pytest.raises(ValueError, match="requires_grad_"):
        losses.r1_penalty((x * w).sum(1), x)
    x.requires_grad_(True)
    with torch.no_grad():
        logits = (x * w).sum(1)
    with pytest.raises(ValueError, match="does not require grad"):
        losses.r1_penalty(logits, x)
    other = torch.randn(3, 2, requires_grad=True)
    with pytest.raises(ValueError, match="does not depend on real_images"):
        losses.r1_penalty((other * w).sum(1), x)
    with pytest.raises(ValueError, match="batch size"):
        losses.r1_penalty((x * w).sum(1)[:2], x)
    with pytest.raises(TypeError, match="torch.Tensor"):
        losses.r1_penalty([1.0, 2.0], x)


# ---------------------------------------------------------------- pix2pix


def test_pix2pix_generator_loss_vanilla():
    fake_logits = _logits([0.5, -1.0])
    fake = torch.tensor([[0.2, -0.4], [1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([[0.0, 0.0], [0.5, 0.5]], dtype=torch.float64)
    total, parts = losses.pix2pix_generator_loss(fake_logits, fake, target, l1_weight=100.0)
    gan = _mean([_softplus(-0.5), _softplus(1.0)])
    l1 = (0.2 + 0.4 + 0.5 + 0.5) / 4
    _close(parts["gan"], gan)
    _close(parts["l1"], l1)
    _close(total, gan + 100.0 * l1)
    total.backward()
    _close(fake.grad, 100.0 / 4 * torch.sign(fake.detach() - target))


def test_pix2pix_generator_loss_lsgan():
    fake_logits = torch.tensor([0.5, -1.0], dtype=torch.float64)
    fake = target = torch.zeros(1, 3, 2, 2, dtype=torch.float64)
    total, parts = losses.pix2pix_generator_loss(fake_logits, fake, target, l1_weight=7.0, gan_mode="lsgan")
    # pix2pix's MSE criterion: ((0.5 - 1)^2 + (-1 - 1)^2) / 2, no 0.5 factor
    _close(parts["gan"], (0.25 + 4.0) / 2)
    _close(total, (0.25 + 4.0) / 2)


def test_pix2pix_discriminator_loss():
    real, fake = _logits(REAL), _logits(FAKE)
    vanilla = losses.pix2pix_discriminator_loss(real, fake)
    _close(vanilla, 0.5 * (_mean(_softplus(-r) for r in REAL) + _mean(_softplus(f) for f in FAKE)))
    lsgan = losses.pix2pix_discriminator_loss(real, fake, gan_mode="lsgan")
    _close(lsgan, 0.5 * (5.25 / 3 + 4.34 / 3))


def test_pix2pix_checks():
    logits = torch.zeros(2, 1, 4, 4)
    img = torch.zeros(2, 3, 8, 8)
    with pytest.raises(ValueError, match="one shape"):
        losses.pix2pix_generator_loss(logits, img, torch.zeros(2, 3, 8, 9))
    with pytest.raises(ValueError, match="gan_mode"):
        losses.pix2pix_generator_loss(logits, img, img, gan_mode="wgan")
    with pytest.raises(ValueError, match="gan_mode"):
        losses.pix2pix_discriminator_loss(logits, logits, gan_mode="hinge")
    with pytest.raises(TypeError, match="target must be a torch.Tensor"):
        losses.pix2pix_generator_loss(logits, img, img.numpy())
    with pytest.raises(TypeError, match="fake_logits must be a torch.Tensor"):
        losses.pix2pix_discriminator_loss(logits, 0.0)


def test_logit_checks():
    with pytest.raises(TypeError, match="floating-point"):
        losses.g_loss_nonsaturating(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="empty"):
        losses.d_loss_hinge(torch.zeros(0), torch.zeros(2))
    with pytest.raises(TypeError, match="real_logits must be a torch.Tensor"):
        losses.d_loss_lsgan([0.5], torch.zeros(1))
