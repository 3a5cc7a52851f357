import math

import pytest
import torch

from fastgen.latent import class_arithmetic, class_means, interpolate, latent_grid, latent_map, lerp, slerp


@pytest.mark.parametrize("fn", [lerp, slerp])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_endpoints_are_bit_exact(fn, dtype):
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(3, 4, 5, 5, generator=g).to(dtype) * 3 for _ in range(2))
    out = fn(a, b, [0.0, 0.3, 1.0])
    assert out.dtype == dtype and out.shape == (3, 3, 4, 5, 5)
    assert torch.equal(out[0], a) and torch.equal(out[2], b)
    assert torch.equal(fn(a, b, 0.0), a) and torch.equal(fn(a, b, 1), b)
    assert torch.equal(fn(a, b, torch.tensor(1.0)), b)


def test_slerp_geometry():
    e1, e2 = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    torch.testing.assert_close(slerp(e1, e2, 0.5), (e1 + e2) / math.sqrt(2))
    ts = torch.linspace(0, 1, 7)
    path = slerp(e1, e2, ts)
    torch.testing.assert_close(path.norm(dim=1), torch.ones(7))
    torch.testing.assert_close(path[:, :2], torch.stack([torch.cos(ts * math.pi / 2), torch.sin(ts * math.pi / 2)], 1))
    # Random unit vectors keep unit norm, where lerp would shrink them.
    a, b = torch.nn.functional.normalize(torch.randn(2, 64, generator=torch.Generator().manual_seed(1)), dim=1)
    assert abs(slerp(a, b, 0.5).norm().item() - 1) < 1e-5 and lerp(a, b, 0.5).norm() < 0.9


def test_slerp_per_sample_vs_whole():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[0.0, 1.0], [0.0, 2.0]])
    per = slerp(a, b, 0.5)  # 2-D input: each row is its own vector
    torch.testing.assert_close(per[0], torch.tensor([1.0, 1.0]) / math.sqrt(2))
    torch.testing.assert_close(per[1], torch.tensor([0.0, 2.0]))  # identical row -> lerp fallback, no NaN
    whole = slerp(a, b, 0.5, per_sample=False)
    assert whole.shape == (2, 2) and not torch.allclose(whole, per)


def test_slerp_near_parallel_and_zero_fall_back_to_lerp():
    a = torch.tensor([1.0, 0.0])
    b = torch.tensor([1.0, 1e-3])
    torch.testing.assert_close(slerp(a, b, 0.25), lerp(a, b, 0.25))
    torch.testing.assert_close(slerp(a, -a, 0.25), lerp(a, -a, 0.25))
    z = torch.zeros(2)
    torch.testing.assert_close(slerp(z, b, 0.5), lerp(z, b, 0.5))
    assert torch.isfinite(slerp(a, a, [0.1, 0.5])).all()


def test_t_shapes():
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    assert slerp(a, b, 0.5).shape == (4, 8)
    assert slerp(a, b, [0.1, 0.2]).shape == (2, 4, 8)
    assert lerp(a, b, torch.tensor([0.1, 0.2, 0.3])).shape == (3, 4, 8)
    assert slerp(a[0], b[0], (0.5,)).shape == (1, 8)
    out = interpolate(a, b, 5, method="lerp")
    assert out.shape == (5, 4, 8) and torch.equal(out[0], a) and torch.equal(out[-1], b)
    torch.testing.assert_close(out[2], (a + b) / 2)
    assert interpolate(a, b, 3).shape == (3, 4, 8)


def test_interpolation_errors():
    a = torch.randn(2, 3)
    with pytest.raises(ValueError, match="same shape"):
        slerp(a, torch.randn(3, 2), 0.5)
    with pytest.raises(TypeError, match="same dtype"):
        lerp(a, a.double(), 0.5)
    with pytest.raises(TypeError, match="floating-point"):
        lerp(a.long(), a.long(), 0.5)
    with pytest.raises(ValueError, match="1-D"):
        lerp(a, a, torch.zeros(2, 2))
    with pytest.raises(TypeError, match="t must be"):
        lerp(a, a, "half")
    with pytest.raises(ValueError, match="steps"):
        interpolate(a, a, 1)
    with pytest.raises(ValueError, match="method"):
        interpolate(a, a, 3, method="cubic")


def test_class_means_and_arithmetic():
    z = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0], [0.0, 8.0], [1.0, 1.0]])
    y = torch.tensor([0, 0, 1, 1, 2])
    m = class_means(z, y)
    torch.testing.assert_close(m, torch.tensor([[1.0, 0.0], [0.0, 6.0], [1.0, 1.0]]))
    moved = class_arithmetic(torch.tensor([1.0, 0.0]), 0, 1, m)
    torch.testing.assert_close(moved, torch.tensor([0.0, 6.0]))  # the source mean lands on the target mean
    batch = class_arithmetic(z[:2], 0, 1, m, strength=0.5)
    torch.testing.assert_close(batch, z[:2] + 0.5 * (m[1] - m[0]))
    assert class_means(z.half(), y).dtype == torch.float16
    img = torch.randn(6, 4, 2, 2)
    assert class_means(img, torch.tensor([0, 1, 0, 1, 0, 1])).shape == (2, 4, 2, 2)


def test_class_means_errors():
    z = torch.randn(4, 2)
    with pytest.raises(ValueError, match=r"\[1\]"):
        class_means(z, torch.tensor([0, 0, 2, 2]))
    with pytest.raises(ValueError, match="num_classes"):
        class_means(z, torch.tensor([0, 1, 2, 3]), num_classes=3)
    with pytest.raises(ValueError, match="shape"):
        class_means(z, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="integer"):
        class_means(z, torch.zeros(4))
    m = class_means(z, torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ValueError, match="target_class"):
        class_arithmetic(z[0], 0, 2, m)
    with pytest.raises(ValueError, match="z must have shape"):
        class_arithmetic(torch.randn(3), 0, 1, m)


def test_latent_grid_quantiles():
    g = latent_grid(5)
    assert g.shape == (25, 2) and g.dtype == torch.float32
    v = torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(0.05, 0.95, 5))
    torch.testing.assert_close(g[:5, 0], v)           # first row: z1 increasing left to right
    torch.testing.assert_close(g[::5, 1], v.flip(0))  # first column: z2 decreasing top to bottom
    assert (g[:5, 1] == g[0, 1]).all() and g[0, 1] > 0
    assert torch.equal(g[:, 0], -g.flip(0)[:, 0]) and g[12].abs().max() == 0  # exactly symmetric, centre at 0
    lin = latent_grid(3, quantiles=False, lo=-1, hi=1)
    assert lin[:3, 0].tolist() == [-1.0, 0.0, 1.0] and lin[0, 1] == 1.0
    with pytest.raises(ValueError, match="probabilities"):
        latent_grid(4, lo=0.0, hi=1.0)
    with pytest.raises(ValueError, match="n must be"):
        latent_grid(1)


def test_latent_map_batches_and_checks():
    calls = []

    def decode(z):
        calls.append(z.shape[0])
        assert not torch.is_grad_enabled() and z.shape[1] == 2
        return z.sum(1).view(-1, 1, 1, 1).expand(-1, 1, 3, 3)

    out = latent_map(decode, n=6, batch_size=10)
    assert out.shape == (36, 1, 3, 3) and calls == [10, 10, 10, 6]
    torch.testing.assert_close(out[:, 0, 0, 0], latent_grid(6).sum(1))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        latent_map(lambda z: z, n=2)
    with pytest.raises(TypeError, match="callable"):
        latent_map("decoder")
