"""fastgen.conditions: grayscale against PIL's weights, exact downsampling of constants, Sobel and Canny on
synthetic edges whose answer is known, dtypes, devices, single images and the argument checks."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest
import torch

from fastgen.conditions import canny_edges, downsample, sobel_edges, to_grayscale

from helpers import devices

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
FUNCTIONS = {
    "grayscale": to_grayscale,
    "downsample": lambda x: downsample(x, 2),
    "sobel": sobel_edges,
    "canny": canny_edges,
}


def _square(size=32, lo=0.0, hi=1.0, start=8, stop=24, channels=1):
    x = torch.full((1, channels, size, size), lo)
    x[..., start:stop, start:stop] = hi
    return x


def _random_images(shape, seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---------------------------------------------------------------- common behaviour


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", FUNCTIONS)
def test_shape_dtype_device(name, dtype, device):
    x = _random_images((2, 3, 16, 16)).to(device=device, dtype=dtype)
    y = FUNCTIONS[name](x)
    assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", FUNCTIONS)
def test_single_image_is_the_batch_of_one(name):
    # a Dataset's __getitem__ sees (C, H, W)
    x = _random_images((2, 3, 16, 16))
    batch = FUNCTIONS[name](x)
    single = FUNCTIONS[name](x[1])
    assert single.shape == x[1].shape
    torch.testing.assert_close(single, batch[1])


@pytest.mark.parametrize("name", ["grayscale", "sobel", "canny"])
def test_keep_channels(name):
    x = _random_images((2, 3, 16, 16))
    full = FUNCTIONS[name](x)
    one = {"grayscale": to_grayscale, "sobel": sobel_edges, "canny": canny_edges}[name](x, keep_channels=False)
    assert one.shape == (2, 1, 16, 16)
    assert torch.equal(full, one.expand_as(full))


# ---------------------------------------------------------------- grayscale


def test_grayscale_weights():
    # pure red, green, blue and white pixels
    x = torch.cat([torch.eye(3), torch.ones(3, 1)], dim=1).view(3, 1, 4)  # (C, H=1, W=4)
    y = to_grayscale(x, keep_channels=False)
    torch.testing.assert_close(y.flatten(), torch.tensor([0.299, 0.587, 0.114, 1.0]))


def test_grayscale_keeps_the_value_range():
    # the weights sum to 1, so black and white stay -1 and 1 for [-1, 1] images
    x = torch.cat([torch.full((3, 2, 2), -1.0), torch.ones(3, 2, 2)], dim=-1)
    torch.testing.assert_close(to_grayscale(x), x)


def test_grayscale_matches_pil():
    Image = pytest.importorskip("PIL.Image")
    rgb = np.random.default_rng(0).integers(0, 256, size=(9, 11, 3), dtype=np.uint8)
    pil = np.asarray(Image.fromarray(rgb).convert("L")).astype(np.int64)
    x = torch.from_numpy(rgb).permute(2, 0, 1).double() / 255
    ours = (to_grayscale(x, keep_channels=False)[0] * 255).round().long().numpy()
    # PIL rounds in fixed point: one level at most
    assert np.abs(ours - pil).max() <= 1


def test_grayscale_of_one_channel_is_itself():
    x = _random_images((2, 1, 4, 4))
    assert torch.equal(to_grayscale(x), x)


# ---------------------------------------------------------------- downsample


@pytest.mark.parametrize("mode", ["bicubic", "bilinear", "area", "nearest", "nearest-exact"])
@pytest.mark.parametrize("upsample_back", [True, False])
def test_downsample_keeps_constant_images(mode, upsample_back):
    x = torch.full((2, 3, 24, 36), -0.375)
    y = downsample(x, 4, mode=mode, upsample_back=upsample_back)
    assert y.shape == ((2, 3, 24, 36) if upsample_back else (2, 3, 6, 9))
    torch.testing.assert_close(y, torch.full_like(y, -0.375), rtol=0, atol=1e-6)


def test_downsample_area_is_the_block_mean():
    x = _random_images((1, 2, 8, 12))
    small = downsample(x, 4, mode="area", upsample_back=False)
    torch.testing.assert_close(small, x.reshape(1, 2, 2, 4, 3, 4).mean(dim=(3, 5)))
    # upsampled back, each block is its mean
    big = downsample(x, 4, mode="area")
    torch.testing.assert_close(big, small.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3))


def test_downsample_antialias_keeps_small_detail():
    # a one-pixel dot between the pixels a plain bilinear shrink by 4 reads (4k + 1 and 4k + 2) vanishes
    # without the low-pass filter; with it, the dot's mass survives (pixel 8 is clear of the borders' filters)
    x = torch.zeros(1, 1, 16, 16)
    x[..., 8, 8] = 1.0
    aliased = downsample(x, 4, mode="bilinear", upsample_back=False, antialias=False)
    assert torch.equal(aliased, torch.zeros_like(aliased))
    smooth = downsample(x, 4, mode="bilinear", upsample_back=False)
    assert (smooth.sum() * 16).item() == pytest.approx(1.0, rel=1e-6)


def test_downsample_factor_one_is_a_copy():
    x = _random_images((3, 5, 7))
    y = downsample(x, 1)
    assert torch.equal(y, x) and y.data_ptr() != x.data_ptr()


# ---------------------------------------------------------------- sobel


def test_sobel_finds_a_vertical_step():
    x = torch.full((1, 3, 6, 8), -1.0)
    x[..., 4:] = 1.0
    m = sobel_edges(x, keep_channels=False, value_range=(-1, 1))[0, 0]
    # the edge lies between columns 3 and 4: both see the full step, gx = 4 of the largest |(4, 2)|, and the
    # flat regions, the image borders included, see none
    on = (m + 1) / 2
    torch.testing.assert_close(on[:, 3:5], torch.full((6, 2), 4 / 20 ** 0.5))
    assert torch.equal(on[:, :3], torch.zeros(6, 3)) and torch.equal(on[:, 5:], torch.zeros(6, 3))


def test_sobel_threshold_is_binary():
    x = _square(16, lo=0.0, hi=1.0)
    b = sobel_edges(x, threshold=0.5, value_range=(0, 1))
    assert set(b.unique().tolist()) == {0.0, 1.0}
    ref = sobel_edges(x, value_range=(0, 1)) > 0.5
    assert torch.equal(b.bool(), ref)
    inv = sobel_edges(x, threshold=0.5, value_range=(0, 1), invert=True)
    assert torch.equal(inv, 1 - b)


def test_sobel_magnitude_is_at_most_one():
    # every binary 3x3 patch (the magnitude is convex in the pixels, so these include the largest), seen at
    # the centre pixel of a 3x3 image
    bits = torch.arange(512)[:, None] >> torch.arange(9) & 1
    m = sobel_edges(bits.float().view(512, 1, 3, 3), value_range=(0, 1))[:, 0, 1, 1]
    assert m.max().item() == pytest.approx(1.0) and m.min().item() == 0.0
    best = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 1.0, 1.0]]).view(1, 1, 3, 3)
    assert sobel_edges(best, value_range=(0, 1))[0, 0, 1, 1].item() == pytest.approx(1.0)


# ---------------------------------------------------------------- canny


def _reachable_from_corner(edges: np.ndarray) -> np.ndarray:
    """Pixels 4-connected to (0, 0) without crossing an edge pixel; an 8-connected closed curve stops them."""
    h, w = edges.shape
    seen = np.zeros_like(edges, dtype=bool)
    queue = deque([(0, 0)])
    seen[0, 0] = True
    while queue:
        r, c = queue.popleft()
        for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            rr, cc = r + dr, c + dc
            if 0 <= rr < h and 0 <= cc < w and not seen[rr, cc] and not edges[rr, cc]:
                seen[rr, cc] = True
                queue.append((rr, cc))
    return seen


def test_canny_outlines_a_square():
    e = canny_edges(_square(), value_range=(0, 1), keep_channels=False)[0, 0]
    assert set(e.unique().tolist()) == {0.0, 1.0}
    edges = e.bool().numpy()
    # closed: the inside is cut off from the outside
    outside = _reachable_from_corner(edges)
    assert not outside[16, 16] and not outside[9:23, 9:23].any()
    # on the square's boundary, within a pixel
    near = np.zeros_like(edges)
    near[6:26, 6:26] = True
    near[10:22, 10:22] = False
    assert not (edges & ~near).any()
    # thin: away from the corners, one pixel per side in every row and column
    for k in range(12, 20):
        assert edges[k, :16].sum() == 1 and edges[k, 16:].sum() == 1
        assert edges[:16, k].sum() == 1 and edges[16:, k].sum() == 1


def test_canny_value_range_and_invert():
    unit = canny_edges(_square(), value_range=(0, 1))
    signed = canny_edges(_square(lo=-1.0, hi=1.0), value_range=(-1, 1))
    assert torch.equal(signed, unit * 2 - 1)
    inv = canny_edges(_square(lo=-1.0, hi=1.0), value_range=(-1, 1), invert=True)
    assert torch.equal(inv, -signed)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_canny_low_precision_matches_fp32(dtype):
    # 0 and 1 are exact in every dtype and the math runs in fp32
    x = _square(channels=3)
    assert torch.equal(canny_edges(x.to(dtype), value_range=(0, 1)).float(), canny_edges(x, value_range=(0, 1)))


def test_canny_flat_image_has_no_edges():
    e = canny_edges(torch.full((2, 3, 16, 16), 0.25), low_threshold=0.0, high_threshold=0.0)
    assert torch.equal(e, torch.full_like(e, -1.0))


def test_canny_hysteresis_follows_weak_edges_from_strong_ones():
    # a horizontal step of contrast 1 on the left half continuing as contrast 0.3 on the right half: after the
    # blur the weak part's magnitude (~0.19) is between the thresholds, so only linking keeps it
    x = torch.zeros(2, 1, 32, 32)
    x[0, 0, 16:, :16] = 1.0
    x[0, 0, 16:, 16:] = 0.3
    x[1, 0, 16:, :] = 0.3  # the weak step alone, in another sample
    kwargs = dict(sigma=1.0, low_threshold=0.1, high_threshold=0.2, value_range=(0, 1))
    e = canny_edges(x, **kwargs).bool()[:, 0]
    # (the T-junction at column 16 leaves a gap, as Canny's suppression does at junctions)
    assert e[0, 14:18, 20:30].any(dim=0).all()  # the weak part is one line, linked to the strong one
    assert not e[1].any()                        # no strong seed, no edge
    seeds_only = canny_edges(x, max_iterations=0, **kwargs).bool()[:, 0]
    assert seeds_only[0, :, :14].any() and not seeds_only[0, :, 20:].any()
    one_step = canny_edges(x, max_iterations=1, **kwargs).bool()[:, 0]
    assert one_step[0, :, 19:].sum() == seeds_only[0, :, 19:].sum() + 1


def test_canny_agrees_with_skimage():
    feature = pytest.importorskip("skimage.feature")
    x = _square()
    ours = canny_edges(x, sigma=1.0, low_threshold=0.1, high_threshold=0.2, value_range=(0, 1))[0, 0].bool().numpy()
    # skimage does not divide the Sobel response by 4
    theirs = feature.canny(x[0, 0].double().numpy(), sigma=1.0, low_threshold=0.4, high_threshold=0.8)
    t = torch.from_numpy(np.stack([ours, theirs])).float().unsqueeze(1)
    grown = torch.nn.functional.max_pool2d(t, 3, stride=1, padding=1)[:, 0].bool().numpy()
    # the two may place an edge on either pixel of a tie: each lies within a pixel of the other
    assert not (ours & ~grown[1]).any() and not (theirs & ~grown[0]).any()
    assert abs(int(ours.sum()) - int(theirs.sum())) <= 8


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("name", FUNCTIONS)
def test_bad_input(name):
    f = FUNCTIONS[name]
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        f(torch.zeros(4, 4))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        f(torch.zeros(1, 1, 3, 4, 4))
    with pytest.raises(TypeError, match="floating-point"):
        f(torch.zeros(1, 3, 4, 4, dtype=torch.uint8))
    with pytest.raises(TypeError, match="torch.Tensor"):
        f(np.zeros((1, 3, 4, 4), dtype=np.float32))


@pytest.mark.parametrize("f", [to_grayscale, sobel_edges, canny_edges])
def test_bad_channel_count(f):
    with pytest.raises(ValueError, match="3 \\(RGB\\) or 1"):
        f(torch.zeros(1, 4, 8, 8))


def test_bad_arguments():
    x = torch.zeros(1, 3, 12, 12)
    with pytest.raises(ValueError, match="must divide"):
        downsample(x, 5)
    with pytest.raises(ValueError, match="positive integer"):
        downsample(x, 0)
    with pytest.raises(ValueError, match="positive integer"):
        downsample(x, 2.0)
    with pytest.raises(ValueError, match="mode"):
        downsample(x, 2, mode="lanczos")
    with pytest.raises(ValueError, match="threshold"):
        sobel_edges(x, threshold=1.5)
    with pytest.raises(ValueError, match="low_threshold"):
        canny_edges(x, low_threshold=0.3, high_threshold=0.2)
    with pytest.raises(ValueError, match="sigma"):
        canny_edges(x, sigma=-1.0)
    with pytest.raises(ValueError, match="lo < hi"):
        canny_edges(x, value_range=(1, -1))
    with pytest.raises(TypeError, match="value_range"):
        sobel_edges(x, value_range=1.0)
