"""fastgen.ops.vae_postprocess: every backend against the reference, diffusers' VaeImageProcessor and autograd."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastgen._backend import BackendUnavailable
from fastgen.ops.vae_postprocess import _op as _vae, vae_postprocess, vae_postprocess_reference

from helpers import all_backends, kernel_backends

_vae_op, _vae_backward_op = _vae.custom_op, _vae.backward_op

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
OUTPUTS = ["float", "uint8"]
SHAPES = [(1, 3, 1, 1), (2, 3, 17, 23), (1, 4, 64, 65)]
LAYOUTS = ["contiguous", "channels_last", "strided"]


def _inputs(shape, dtype=torch.float32, *, layout="contiguous", seed=0):
    g = torch.Generator().manual_seed(seed)
    # a decoder's output: mostly in [-1, 1], with overshoots on both sides clamped
    x = (torch.randn(shape, generator=g) * 0.7).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":  # every other column of a twice-as-wide tensor
        x = torch.stack([x, torch.zeros_like(x)], dim=-1).select(-1, 0)
        assert not x.is_contiguous()
    return x


def _diffusers_formula(x):
    """diffusers' VaeImageProcessor.denormalize, in x's dtype."""
    return (x / 2 + 0.5).clamp(0, 1)


def _numpy_uint8(x):
    """diffusers' numpy path: postprocess(output_type="np") then numpy_to_pil's rounding."""
    image_processor = pytest.importorskip("diffusers.image_processor")
    images = image_processor.VaeImageProcessor().postprocess(x.float(), output_type="np")
    assert images.dtype == np.float32
    return (images * 255).round().astype("uint8")


def _ties():
    """fp32 inputs x whose x * 0.5 + 0.5 = v has fl32(v * 255) == k + 0.5 exactly, for many k: the uint8
    path must round them half to even. Includes v whose exact product is not k + 0.5 but rounds to it, where
    a fused multiply-add in the rounding would go the other way."""
    xs, ks, inexact = [], [], 0
    for k in range(255):
        v0 = np.float32((k + 0.5) / 255)
        for step in range(-4, 5):
            v = v0
            for _ in range(abs(step)):
                v = np.nextafter(v, np.float32(np.inf if step > 0 else -np.inf), dtype=np.float32)
            x = np.float32(np.float32(2) * v - np.float32(1))
            if np.float32(x * np.float32(0.5) + np.float32(0.5)) != v or np.float32(v * np.float32(255)) != k + 0.5:
                continue
            xs.append(x)
            ks.append(k)
            inexact += float(v) * 255 != k + 0.5
    return torch.tensor(np.array(xs, dtype=np.float32)), torch.tensor(ks), inexact


# ---------------------------------------------------------------- reference


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_is_diffusers_denormalize(dtype):
    # x * 0.5 is exact, so the fp32 computation rounded once equals diffusers' ops in x's own dtype.
    x = _inputs((2, 3, 33, 17), dtype) * 1.5
    assert torch.equal(vae_postprocess_reference(x), _diffusers_formula(x))


def test_reference_uint8_is_diffusers_numpy_path():
    x = _inputs((2, 3, 17, 23))
    img = vae_postprocess_reference(x, output="uint8")
    assert img.dtype == torch.uint8 and img.shape == (2, 17, 23, 3) and img.is_contiguous()
    np.testing.assert_array_equal(img.numpy(), _numpy_uint8(x))


# ------------------------------------------------------------------ forward


@pytest.mark.parametrize("backend", all_backends())
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_forward(backend, shape, dtype, layout):
    x = _inputs(shape, dtype, layout=layout)
    y = vae_postprocess(x, backend=backend)
    assert y.dtype == dtype and y.shape == shape
    if layout == "strided":
        assert y.is_contiguous()
    else:
        assert y.stride() == x.stride()
    # bit-identical: one fp32 FMA (x * 0.5 is exact) and one clamp, rounded once
    assert torch.equal(y, vae_postprocess_reference(x.contiguous()))
    assert torch.equal(y, _diffusers_formula(x))
    img = vae_postprocess(x, output="uint8", backend=backend)
    B, C, H, W = shape
    assert img.dtype == torch.uint8 and img.shape == (B, H, W, C) and img.is_contiguous()
    assert torch.equal(img, vae_postprocess_reference(x.contiguous(), output="uint8"))


@pytest.mark.parametrize("backend", all_backends())
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_uint8_matches_diffusers_exactly(backend, layout):
    x = _inputs((2, 3, 24, 20), layout=layout) * 1.3
    img = vae_postprocess(x, output="uint8", backend=backend)
    np.testing.assert_array_equal(img.numpy(), _numpy_uint8(x))
    # and through diffusers' own numpy_to_pil (RGB images)
    image_processor = pytest.importorskip("diffusers.image_processor")
    pils = image_processor.VaeImageProcessor.numpy_to_pil(
        image_processor.VaeImageProcessor().postprocess(x, output_type="np"))
    for got, pil in zip(img.numpy(), pils):
        np.testing.assert_array_equal(got, np.asarray(pil))


@pytest.mark.parametrize("backend", all_backends())
def test_uint8_rounds_exact_ties_half_to_even(backend):
    xs, ks, inexact = _ties()
    assert len(ks) >= 190 and inexact >= 10 and len(set(ks.tolist())) >= 190
    want = torch.where(ks % 2 == 0, ks, ks + 1).to(torch.uint8)
    # as a 1 x 1 x n x 1 image (a linear walk) and as n x 3 channels-first pixels (the transposing path)
    img = vae_postprocess(xs.reshape(1, 1, -1, 1), output="uint8", backend=backend).flatten()
    assert torch.equal(img, want), (xs[img != want], ks[img != want])
    x3 = xs.reshape(1, 1, -1, 1).expand(1, 3, -1, 2).contiguous()
    img3 = vae_postprocess(x3, output="uint8", backend=backend)
    assert torch.equal(img3, want.reshape(1, -1, 1, 1).expand(1, -1, 2, 3))
    np.testing.assert_array_equal(img3.numpy(), _numpy_uint8(x3))


@pytest.mark.parametrize("backend", all_backends())
def test_every_level_and_the_bounds(backend):
    # every uint8 level's centre and both bounds, beyond them, infinities and NaN
    centres = torch.arange(256, dtype=torch.float32) / 255 * 2 - 1
    special = torch.tensor([-1.0, 1.0, -1.5, 1.5, -1e30, 1e30, float("inf"), float("-inf"), -0.0, float("nan")])
    x = torch.cat([centres, special]).reshape(1, 1, 1, -1)
    y = vae_postprocess(x, backend=backend)
    ref = _diffusers_formula(x)
    assert torch.equal(y[..., :-1], ref[..., :-1]) and y[..., -1].isnan().all()
    img = vae_postprocess(x, output="uint8", backend=backend).flatten()
    assert torch.equal(img[:256], torch.arange(256, dtype=torch.uint8))
    # -0.0 maps to 127.5, a tie: to even, 128; NaN -> 0
    assert img[256:].tolist() == [0, 255, 0, 255, 0, 255, 255, 0, 128, 0]


# ----------------------------------------------------------------- backward


def _grad(fn, x, dy):
    x = x.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
    fn(x).backward(dy)
    return x.grad


def _edges(dtype):
    """-1, 1, the neighbours of both in dtype, NaN."""
    eps = torch.finfo(dtype).eps
    return torch.tensor([-1.0, 1.0, 1.0 + eps, -1.0 - eps, 1.0 - eps / 2, -1.0 + eps / 2, float("nan")]).to(dtype)


def _boundary_inputs(shape, dtype, layout):
    x = _inputs(shape, dtype, seed=1) * 1.5
    n = min(x.numel(), 7)
    x.view(-1)[:n] = _edges(dtype)[:n]
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


@pytest.mark.parametrize("backend", all_backends())
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_backward_is_autograd_of_the_reference(backend, shape, dtype, layout):
    x = _boundary_inputs(shape, dtype, layout)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    got = _grad(lambda t: vae_postprocess(t, backend=backend), x, dy)
    assert got.dtype == dtype and got.stride() == x.stride()
    # exactly autograd of the fp32 reference: the clamp's mask (bounds included) times 0.5
    want = _grad(lambda t: (t.float() / 2 + 0.5).clamp(0, 1).to(dtype), x, dy)
    assert torch.equal(got, want)
    if dtype == torch.float32:
        assert torch.equal(got, _grad(_diffusers_formula, x, dy))


def test_backward_boundary_convention():
    # torch.clamp passes the gradient at its bounds: x = -1 and x = 1 get 0.5 * dy; in fp32 so does the next
    # float above 1 (x * 0.5 + 0.5 rounds to 1); the next float below -1 does not.
    one = torch.tensor(1.0)
    x = torch.stack([-one, one, torch.nextafter(one, 2 * one), torch.nextafter(-one, -2 * one),
                     torch.tensor(1.0 + 2.0**-22), torch.tensor(float("nan"))]).reshape(1, 1, 1, -1)
    for backend in all_backends():
        got = _grad(lambda t: vae_postprocess(t, backend=backend), x, torch.ones_like(x))
        assert got.flatten().tolist() == [0.5, 0.5, 0.5, 0.0, 0.0, 0.0], backend


@pytest.mark.parametrize("backend", all_backends())
def test_backward_strided_input_and_broadcast_grad(backend):
    # y.sum() hands the backward an expanded (stride-0) gradient; x is copied to contiguous.
    x = _inputs((2, 3, 5, 7), layout="strided") * 1.5
    got = _grad(lambda t: vae_postprocess(t, backend=backend).sum(), x, None)
    assert torch.equal(got, _grad(lambda t: _diffusers_formula(t).sum(), x, None))
    # a gradient in another memory order than x's
    xc = _inputs((2, 3, 5, 7), layout="channels_last") * 1.5
    dy = torch.randn(2, 3, 5, 7, generator=torch.Generator().manual_seed(3))
    got = _grad(lambda t: vae_postprocess(t, backend=backend), xc, dy)
    assert torch.equal(got, _grad(_diffusers_formula, xc, dy))


@pytest.mark.parametrize("backend", all_backends())
def test_uint8_output_carries_no_gradient(backend):
    x = _inputs((1, 3, 4, 5)).requires_grad_(True)
    img = vae_postprocess(x, output="uint8", backend=backend)
    assert img.dtype == torch.uint8 and not img.requires_grad and img.grad_fn is None
    assert torch.equal(img, vae_postprocess_reference(x.detach(), output="uint8"))


# ------------------------------------------------ custom op / torch.compile


@pytest.mark.parametrize("backend", all_backends())
@pytest.mark.parametrize("to_uint8", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck(backend, to_uint8, layout):
    x = _inputs((2, 3, 4, 5), layout=layout).requires_grad_(not to_uint8)
    torch.library.opcheck(_vae_op, (x, to_uint8, backend))
    dy = torch.empty_like(x.detach()).copy_(torch.randn(2, 3, 4, 5))
    torch.library.opcheck(_vae_backward_op, (dy, x.detach(), backend))


def test_torch_compile_matches_eager():
    # One compiled graph with both outputs (each torch.compile costs seconds on 2 cores).
    conv = torch.nn.Conv2d(4, 3, 3, padding=1)

    def f(x):
        h = conv(x)
        return vae_postprocess(h), vae_postprocess(h, output="uint8")

    x = torch.randn(2, 4, 9, 11, requires_grad=True)
    y, img = torch.compile(f, fullgraph=True)(x)
    y_eager, img_eager = f(x)
    torch.testing.assert_close(y, y_eager)
    assert img.dtype == torch.uint8 and torch.equal(img, img_eager) and not img.requires_grad
    y.sum().backward()
    g_compiled = x.grad.clone()
    x.grad = None
    y_eager.sum().backward()
    torch.testing.assert_close(g_compiled, x.grad)


# -------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda: (torch.randn(3, 8, 8), {}), ValueError, "4-D"),
        (lambda: (torch.randn(1, 1, 3, 8, 8), {}), ValueError, "4-D"),
        (lambda: (torch.tensor(1.0), {}), ValueError, "4-D"),
        (lambda: (torch.randn(1, 3, 4, 4), {"output": "pil"}), ValueError, "output"),
        (lambda: (torch.randn(1, 3, 4, 4), {"output": None}), ValueError, "output"),
        (lambda: (torch.ones(1, 3, 4, 4, dtype=torch.uint8), {}), TypeError, "dtype"),
        (lambda: (torch.randn(1, 3, 4, 4).double(), {}), TypeError, "dtype"),
        (lambda: (np.zeros((1, 3, 4, 4), dtype=np.float32), {}), TypeError, "Tensor"),
        (lambda: (torch.randn(1, 3, 4, 4), {"backend": "nope"}), ValueError, "backend"),
    ],
)
def test_bad_input_raises_clear_error(make, exc, match):
    x, kwargs = make()
    with pytest.raises(exc, match=match):
        vae_postprocess(x, **kwargs)


def test_unavailable_backend_raises():
    with pytest.raises(BackendUnavailable, match="cuda"):
        vae_postprocess(torch.randn(1, 3, 4, 4), backend="cuda")


@pytest.mark.parametrize("backend", all_backends())
@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 3, 0, 5), (1, 0, 2, 2)])
def test_empty(backend, shape):
    x = torch.randn(shape, requires_grad=True)
    y = vae_postprocess(x, backend=backend)
    assert y.shape == shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    img = vae_postprocess(x, output="uint8", backend=backend)
    assert img.shape == (shape[0], shape[2], shape[3], shape[1]) and img.dtype == torch.uint8


@pytest.mark.parametrize("backend", kernel_backends())
def test_kernel_backends_are_exercised(backend):
    # Guards against a suite that silently tests only the reference: on this machine the C++ kernel and
    # the Triton interpreter run.
    assert _vae.kernel(backend) is not _vae.kernel("torch")
    assert vae_postprocess(_inputs((1, 3, 2, 2)), output="uint8", backend=backend).shape == (1, 2, 2, 3)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(1, 3, 1024, 1024), (2, 3, 17, 23), (1, 4, 64, 65)])
def test_gpu_forward_backward(backend, dtype, layout, shape):
    x = _inputs(shape, dtype, layout=layout).cuda()
    assert torch.equal(vae_postprocess(x, backend=backend), _diffusers_formula(x))
    assert torch.equal(vae_postprocess(x, output="uint8", backend=backend),
                       vae_postprocess_reference(x, output="uint8"))
    xs, ks, _ = _ties()
    want = torch.where(ks % 2 == 0, ks, ks + 1).to(torch.uint8).cuda()
    x3 = xs.reshape(1, 1, -1, 1).expand(1, 3, -1, 2).contiguous().cuda()
    assert torch.equal(vae_postprocess(x3, output="uint8", backend=backend),
                       want.reshape(1, -1, 1, 1).expand(1, -1, 2, 3))
    dy = torch.randn_like(x)
    got = _grad(lambda t: vae_postprocess(t, backend=backend), x, dy)
    assert torch.equal(got, _grad(lambda t: (t.float() / 2 + 0.5).clamp(0, 1).to(dtype), x, dy))
