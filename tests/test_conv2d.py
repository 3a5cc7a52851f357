"""fastgen.ops.conv2d: the CPU paths and the torch backend against the fp64 convolution, every SD1.5 U-Net and
SD VAE conv shape, gradients (second order too), the packed-weight cache, autocast, bad input, and the
models' Conv2d module. The Triton kernel has its own file (test_conv2d_triton.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastgen import _backend
from fastgen.bench.conv import UNET_SHAPES, VAE_SHAPES
from fastgen.models.blocks import Conv2d
from fastgen.ops import _conv2d_cpu_choice as choice
from fastgen.ops.conv2d import PACK_ATTR, conv2d, conv2d_reference, release_packed_weights
from helpers import assert_lowp_close

pytestmark = pytest.mark.skipif(_backend.extension() is None, reason="the C++ extension is not built")

ALGOS = ["winograd4", "winograd2", "direct", "direct_fp32"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture
def force_algo(monkeypatch):
    def force(algo):
        monkeypatch.setattr(choice, "choose", lambda *a: algo)
    return force


def _inputs(n, c, k, h, w, r=3, dtype=torch.float32, channels_last=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g)
    wt = torch.randn(k, c, r, r, generator=g) / (c * r * r) ** 0.5
    b = torch.randn(k, generator=g)
    x, wt = x.to(dtype), wt.to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x, wt, b


def _ref64(x, w, b, residual=None, scale=1.0, **kw):
    y = F.conv2d(x.double(), w.double(), None if b is None else b.double(), **kw)
    if residual is not None:
        y = y + residual.double()
    return y * scale


def assert_fp32_conv_close(y, ref64, eager32, what=""):
    """docs/design.md: an fp32 conv2d's max error against fp64 is at most 8x PyTorch's fp32 convolution's
    (Winograd F(4,3) measures ~2-5x; the floor is 2 fp32 ulps of the output's magnitude)."""
    err = (y.double() - ref64).abs().max().item()
    eager_err = (eager32.double() - ref64).abs().max().item()
    floor = 2 * torch.finfo(torch.float32).eps * max(ref64.abs().max().item(), 1.0)
    assert err <= 8 * max(eager_err, floor), f"{what}: max error {err:.3g} > 8 x PyTorch's {eager_err:.3g}"


def _same_layout(y, like):
    assert y.shape == like.shape and y.dtype == like.dtype
    assert y.is_contiguous() == like.is_contiguous()
    assert y.is_contiguous(memory_format=torch.channels_last) == like.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", [(1, 16, 16, 7, 13), (2, 17, 19, 5, 6), (1, 20, 24, 1, 1), (2, 32, 40, 9, 9)],
                         ids=lambda s: "x".join(map(str, s)))
def test_cpu_paths_match_reference(force_algo, algo, dtype, channels_last, shape):
    force_algo(algo)
    n, c, k, h, w = shape
    x, wt, b = _inputs(n, c, k, h, w, dtype=dtype, channels_last=channels_last)
    res = torch.randn(n, k, h, w).to(dtype)
    y = conv2d(x, wt, b, padding=1, residual=res, output_scale=0.7, backend="cpu")
    _same_layout(y, conv2d_reference(x, wt, b, padding=1, residual=res, output_scale=0.7))
    if dtype == torch.float32:
        eager = (F.conv2d(x, wt, b, padding=1) + res) * 0.7
        assert_fp32_conv_close(y, _ref64(x, wt, b, res, 0.7, padding=1), eager, algo)
    else:
        ref32 = (F.conv2d(x.float(), wt.float(), b, padding=1) + res.float()) * 0.7
        eager = (F.conv2d(x, wt, b.to(dtype), padding=1) + res) * 0.7
        assert_lowp_close(y, ref32, eager, what=algo)


def _shape_cases():
    seen, out = set(), []
    for s in UNET_SHAPES + VAE_SHAPES:
        key = (s.c, s.k, min(s.h, 16), s.r, s.stride, s.padding, s.residual)
        if key not in seen:
            seen.add(key)
            out.append(pytest.param(s, id=f"{s.role.replace(' ', '_')}-{s.c}-{s.k}-{s.h}-{s.r}x{s.r}s{s.stride}"))
    return out


@pytest.mark.parametrize("shape", _shape_cases())
def test_sd_shapes(shape):
    # Every (channels, kernel, stride) of the SD1.5 U-Net and SD VAE; batch 1 and at most 16x16 so the suite
    # stays fast, which keeps both Winograd tile sizes in play (8x8 picks F(2,3), 16x16 F(4,3)).
    h = min(shape.h, 16)
    x, wt, b = _inputs(1, shape.c, shape.k, h, h, r=shape.r)
    kw = dict(stride=shape.stride, padding=shape.padding)
    ho = (h + 2 * shape.padding - shape.r) // shape.stride + 1
    res = torch.randn(1, shape.k, ho, ho) if shape.residual else None
    y = conv2d(x, wt, b, residual=res, **kw)
    eager = F.conv2d(x, wt, b, **kw) + (0 if res is None else res)
    assert_fp32_conv_close(y, _ref64(x, wt, b, res, **kw), eager, shape.role)


@pytest.mark.parametrize("padding,stride", [((0, 1, 0, 1), 2), (1, 2), (0, 1), ((1, 0), 1), ((2, 0, 1, 3), 1)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_strides_and_paddings(padding, stride, channels_last):
    x, wt, b = _inputs(2, 24, 20, 11, 8, channels_last=channels_last)
    y = conv2d(x, wt, b, stride=stride, padding=padding)
    ref = conv2d_reference(x, wt, b, stride=stride, padding=padding)
    _same_layout(y, ref)
    torch.testing.assert_close(y, ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("algo", ["gemm", "direct", "direct_fp32"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_one_by_one_paths(force_algo, algo, dtype, channels_last):
    force_algo(algo)
    x, wt, b = _inputs(2, 19, 23, 5, 7, r=1, dtype=dtype, channels_last=channels_last)
    res = torch.randn(2, 23, 5, 7).to(dtype)
    y = conv2d(x, wt, b, residual=res, output_scale=0.5, backend="cpu")
    _same_layout(y, conv2d_reference(x, wt, b, residual=res, output_scale=0.5))
    ref32 = (F.conv2d(x.float(), wt.float(), b) + res.float()) * 0.5
    if dtype == torch.float32:
        assert_fp32_conv_close(y, _ref64(x, wt, b, res, 0.5), ref32, algo)
    else:
        assert_lowp_close(y, ref32, (F.conv2d(x, wt, b.to(dtype)) + res) * 0.5, what=algo)


def test_winograd_memory_switch(monkeypatch):
    args = (2, 320, 320, 64, 64, 3, 3, 1, 1, (1, 1, 1, 1), torch.float32)
    assert choice.choose(*args) == "winograd4"
    monkeypatch.setenv(choice.WINOGRAD_ENV, "f2")
    assert choice.choose(*args) == "winograd2"
    monkeypatch.setenv(choice.WINOGRAD_ENV, "off")
    assert choice.choose(*args) == "direct"
    monkeypatch.setenv(choice.WINOGRAD_ENV, "fast")
    with pytest.raises(ValueError, match="FASTGEN_CONV_WINOGRAD='fast'"):
        choice.choose(*args)


def test_training_weights_take_the_direct_path():
    """A weight an optimizer updates every step would be re-transformed every step: train on the direct path,
    infer (no grad, or a frozen weight) on Winograd."""
    args = (2, 320, 320, 64, 64, 3, 3, 1, 1, (1, 1, 1, 1), torch.float32)
    assert choice.choose(*args, training=True) == "direct"
    assert choice.choose(*args, training=False) == "winograd4"
    conv = torch.nn.Conv2d(16, 16, 3, padding=1)
    x = torch.randn(1, 16, 12, 12)
    conv2d(x, conv.weight, conv.bias, padding=1, backend="cpu").sum().backward()
    assert not getattr(conv.weight, PACK_ATTR, None)  # nothing packed for a training step
    with torch.no_grad():
        conv2d(x, conv.weight, conv.bias, padding=1, backend="cpu")
    assert getattr(conv.weight, PACK_ATTR, None)


def test_one_by_one_and_non_contiguous_input():
    x, wt, b = _inputs(2, 30, 31, 6, 7, r=1)
    xt = x.transpose(2, 3).contiguous().transpose(2, 3)  # neither contiguous nor channels-last
    assert not xt.is_contiguous() and not xt.is_contiguous(memory_format=torch.channels_last)
    res = torch.randn(2, 31, 6, 7).to(memory_format=torch.channels_last)  # other layout than the output's
    torch.testing.assert_close(conv2d(xt, wt, b, residual=res), F.conv2d(x, wt, b) + res, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("algo", ["winograd4", "winograd2", "direct"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_gradients_match_autograd_of_reference(force_algo, algo, channels_last):
    force_algo(algo)
    x, wt, b = _inputs(2, 16, 12, 9, 7, channels_last=channels_last)
    res = torch.randn(2, 12, 9, 7)
    leaves = [t.clone().requires_grad_() for t in (x, wt, b, res)]
    refs = [t.clone().requires_grad_() for t in (x, wt, b, res)]
    dy = torch.randn(2, 12, 9, 7)
    y = conv2d(leaves[0], leaves[1], leaves[2], padding=1, residual=leaves[3], output_scale=0.5, backend="cpu")
    ry = (F.conv2d(refs[0], refs[1], refs[2], padding=1) + refs[3]) * 0.5
    (y * dy).sum().backward()
    (ry * dy).sum().backward()
    for name, ours, ref in zip(("x", "weight", "bias", "residual"), leaves, refs):
        torch.testing.assert_close(ours.grad, ref.grad, atol=1e-4, rtol=1e-4, msg=name)


def test_second_derivatives_through_input_gradient():
    # An R1 penalty differentiates |d out / d x|^2 again, here with respect to the weight.
    x, wt, b = _inputs(2, 8, 6, 7, 7)

    def r1_weight_grad(fn):
        xi, wi = x.clone().requires_grad_(), wt.clone().requires_grad_()
        (gx,) = torch.autograd.grad(fn(xi, wi).square().sum(), xi, create_graph=True)
        gx.square().sum().backward()
        return wi.grad

    ours = r1_weight_grad(lambda x, w: conv2d(x, w, b, stride=2, padding=(0, 1, 0, 1)))
    ref = r1_weight_grad(lambda x, w: F.conv2d(F.pad(x, (0, 1, 0, 1)), w, b, stride=2))
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_packed_weight_follows_in_place_updates(force_algo):
    force_algo("winograd4")
    conv = torch.nn.Conv2d(16, 16, 3, padding=1)
    x = torch.randn(1, 16, 12, 12)

    def check():
        y = conv2d(x, conv.weight, conv.bias, padding=1, backend="cpu")
        ref = F.conv2d(x, conv.weight, conv.bias, padding=1)  # a stale transform would be off by O(|ref|)
        torch.testing.assert_close(y, ref, atol=1e-5 * ref.abs().max().item(), rtol=1e-5)

    with torch.no_grad():
        check()
        packed = getattr(conv.weight, PACK_ATTR)["winograd4"][2]
        check()
        assert getattr(conv.weight, PACK_ATTR)["winograd4"][2] is packed  # reused while the weight is unchanged
    opt = torch.optim.SGD(conv.parameters(), lr=0.01)
    conv2d(x, conv.weight, conv.bias, padding=1).square().sum().backward()
    opt.step()  # in place, bumps the version counter
    with torch.no_grad():
        check()
        conv.weight.data += 0.1 * torch.randn_like(conv.weight)  # a LoRA merge: .data, no version bump
        check()
        conv.weight.data = 0.05 * torch.randn_like(conv.weight)  # new storage
        check()
    assert release_packed_weights(conv) == 1 and not hasattr(conv.weight, PACK_ATTR)


def test_autocast_casts_like_f_conv2d():
    x, wt, b = _inputs(1, 16, 16, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv2d(x, wt, b, padding=1)
        eager = F.conv2d(x, wt, b, padding=1)
    assert y.dtype == eager.dtype == torch.bfloat16
    assert_lowp_close(y, F.conv2d(x.bfloat16().float(), wt.bfloat16().float(), b, padding=1), eager)


def test_bad_input_errors():
    x, wt, b = _inputs(1, 8, 4, 6, 6)
    with pytest.raises(ValueError, match="4-D"):
        conv2d(x[0], wt)
    with pytest.raises(ValueError, match="input channels"):
        conv2d(x, torch.randn(4, 5, 3, 3))
    with pytest.raises(TypeError, match="dtype"):
        conv2d(x.long(), wt.long())
    with pytest.raises(TypeError, match="weight must have x's dtype"):
        conv2d(x, wt.double())
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\)"):
        conv2d(x, wt, torch.randn(5))
    with pytest.raises(ValueError, match="residual must have the output's shape"):
        conv2d(x, wt, padding=1, residual=torch.randn(1, 4, 5, 5))
    with pytest.raises(ValueError, match="one device"):
        conv2d(x, wt.to("meta"))
    with pytest.raises(ValueError, match="does not fit"):
        conv2d(torch.randn(1, 8, 2, 2), wt)
    with pytest.raises(TypeError, match="padding"):
        conv2d(x, wt, padding=(1, 2, 3))
    five = torch.randn(4, 8, 5, 5)
    with pytest.raises(_backend.BackendUnavailable, match="5x5 kernel.*torch backend"):
        conv2d(x, five, backend="cpu")
    torch.testing.assert_close(conv2d(x, five, padding=2), F.conv2d(x, five, padding=2), atol=1e-5, rtol=1e-5)


def test_conv2d_module_is_a_drop_in():
    torch.manual_seed(0)
    ref = torch.nn.Conv2d(12, 10, 3, stride=1, padding=1)
    ours = Conv2d(12, 10, 3, stride=1, padding=1)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, res = torch.randn(2, 12, 9, 9), torch.randn(2, 10, 9, 9)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours(x, residual=res, output_scale=0.5), (ref(x) + res) * 0.5, atol=1e-5, rtol=1e-5)
    grouped = Conv2d(12, 12, 3, padding=1, groups=3)  # not fastgen's kernel: torch's forward, same epilogue
    torch.testing.assert_close(grouped(x, residual=x), torch.nn.Conv2d.forward(grouped, x) + x)


def test_compiles_as_one_custom_op():
    x, wt, b = _inputs(1, 16, 16, 8, 8)
    fn = torch.compile(lambda x: conv2d(x, wt, b, padding=1, residual=x), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(fn(x), conv2d(x, wt, b, padding=1, residual=x), atol=1e-5, rtol=1e-5)
