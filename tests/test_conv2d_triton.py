"""kernels/conv2d.py (the Triton implicit-GEMM convolution) against the kernel contract ``_reference_fwd``.

Without a GPU this runs through the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), which is
slow per program and per op: shapes are small, but cover odd sizes (7x13 and 1x1 images, prime channel
counts, batch 1) and, in one case, several M, N and C blocks of the kernel's tiles. The interpreter's
``tl.dot`` is wrong for bf16 operands (docs/design.md), so bf16 is tested on a GPU only.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastgen import _backend
from fastgen.ops.conv2d import _reference_fwd, conv2d, conv2d_reference

from helpers import assert_lowp_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_WHY = _backend.unavailable_reason("triton", torch.device(DEVICE))
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"triton backend unavailable: {_WHY}")

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
LAYOUTS = ["contiguous", "channels_last"]

# (R, stride, (pad_t, pad_b, pad_l, pad_r)): the ResNet 3x3, the VAE Downsample2D's F.pad(0, 1, 0, 1) + 3x3 s2,
# the UNet's 3x3 s2 p1 downsampler and the 1x1 shortcut.
GEOMETRIES = {
    "3x3s1p1": (3, 1, (1, 1, 1, 1)),
    "3x3s2p0101": (3, 2, (0, 1, 0, 1)),
    "3x3s2p1": (3, 2, (1, 1, 1, 1)),
    "1x1": (1, 1, (0, 0, 0, 0)),
}
# (N, C, K, H, W)
SHAPES = {
    "b1_c5k7_7x13": (1, 5, 7, 7, 13),
    "b2_c7k5_1x1": (2, 7, 5, 1, 1),
    "b2_c3k4_6x5": (2, 3, 4, 6, 5),
}
# More than one tile along M (2*9*11 = 198 pixels), N (37 channels) and the C loop (40 channels).
MULTI_BLOCK = (2, 40, 37, 9, 11)


def _kernel():
    from fastgen.kernels.conv2d import conv2d_fwd

    return conv2d_fwd


def _out_hw(h, w, r, stride, pads):
    pt, pb, pl, pr = pads
    return (h + pt + pb - r) // stride + 1, (w + pl + pr - r) // stride + 1


def _inputs(shape, r, stride, pads, dtype, layout, *, bias=True, residual=True, seed=0):
    n, c, k, h, w = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g)
    # PyTorch's default init scale: outputs O(1), so fp32 absolute and relative tolerances both mean something.
    wt = torch.randn(k, c, r, r, generator=g) / (c * r * r) ** 0.5
    b = torch.randn(k, generator=g) if bias else None
    ho, wo = _out_hw(h, w, r, stride, pads)
    res = torch.randn(n, k, ho, wo, generator=g) if residual else None
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = x.to(DEVICE, dtype).contiguous(memory_format=fmt)
    wt = wt.to(DEVICE, dtype)
    b = None if b is None else b.to(DEVICE)
    if res is not None:  # the contract: the output's strides, which follow x's layout
        res = res.to(DEVICE, dtype).contiguous(memory_format=torch.contiguous_format if x.is_contiguous() else fmt)
    return x, wt, b, res


def _eager_lowp(x, wt, b, res, stride, pads, scale):
    """What a diffusers block computes in x's dtype: F.pad + F.conv2d, + residual, * scale."""
    pt, pb, pl, pr = pads
    y = F.conv2d(F.pad(x, (pl, pr, pt, pb)), wt, None if b is None else b.to(x.dtype), stride=stride)
    if res is not None:
        y = y + res
    return y * scale if scale != 1.0 else y


def _check(shape, geometry, dtype, layout, *, bias=True, residual=True, scale=0.7):
    r, stride, pads = GEOMETRIES[geometry]
    if min(_out_hw(shape[3], shape[4], r, stride, pads)) <= 0:
        pytest.skip("the kernel does not fit this image")
    x, wt, b, res = _inputs(shape, r, stride, pads, dtype, layout, bias=bias, residual=residual)
    args = (stride, stride, *pads, scale, "")
    out = _kernel()(x, wt, b, res, None, *args)
    ref = _reference_fwd(x, wt, b, res, None, *args)  # computes in fp32, rounds once to x's dtype
    assert out.dtype == dtype and out.shape == ref.shape
    assert out.stride() == ref.stride(), "the output must have the reference's memory format"
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref)
    else:
        ref32 = _reference_fwd(x.float(), wt.float(), b, None if res is None else res.float(), None, *args)
        assert_lowp_close(out, ref32, _eager_lowp(x, wt, b, res, stride, pads, scale),
                          what=f"conv2d triton {geometry} {dtype}")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_matches_reference(geometry, shape, dtype, layout):
    _check(shape, geometry, dtype, layout)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias,residual,scale", [
    (False, False, 1.0), (True, False, 1.0), (False, True, 1.0), (False, False, 0.7), (True, True, 1.0),
])
def test_epilogue_combinations(bias, residual, scale, dtype, layout):
    _check(SHAPES["b1_c5k7_7x13"], "3x3s1p1", dtype, layout, bias=bias, residual=residual, scale=scale)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("geometry", ["3x3s1p1", "3x3s2p0101", "1x1"])
def test_multiple_tiles(geometry, dtype, layout):
    _check(MULTI_BLOCK, geometry, dtype, layout)


@pytest.mark.parametrize("shape,geometry,layout", [
    ((2, 3, 4, 5, 6), "3x3s1p1", "contiguous"),
    ((2, 3, 4, 5, 6), "3x3s2p0101", "channels_last"),
    ((2, 3, 4, 1, 1), "3x3s1p1", "channels_last"),  # 1x1 image: channels-last and contiguous coincide
    ((2, 3, 1, 4, 4), "1x1", "channels_last"),  # K = 1
    ((1, 1, 4, 4, 4), "3x3s2p1", "channels_last"),  # C = 1: x is contiguous too, so the output is
])
def test_output_strides_match_reference(shape, geometry, layout):
    r, stride, pads = GEOMETRIES[geometry]
    x, wt, b, res = _inputs(shape, r, stride, pads, torch.float32, layout)
    args = (stride, stride, *pads, 1.0, "")
    out = _kernel()(x, wt, b, res, None, *args)
    ref = _reference_fwd(x, wt, b, res, None, *args)
    assert out.stride() == ref.stride()
    assert out.is_contiguous(memory_format=torch.contiguous_format if x.is_contiguous() else torch.channels_last)
    torch.testing.assert_close(out, ref)


def test_residual_with_other_strides_is_rejected():
    x, wt, b, res = _inputs((1, 3, 4, 5, 6), 3, 1, (1, 1, 1, 1), torch.float32, "channels_last")
    with pytest.raises(AssertionError, match="residual"):
        _kernel()(x, wt, b, res.contiguous(), None, 1, 1, 1, 1, 1, 1, 1.0, "")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_public_op_runs_the_triton_kernel(layout):
    """fastgen.ops.conv2d.conv2d(backend="triton") reaches kernels/conv2d.py, padding in F.pad's order, and
    differentiates (the backward is torch's)."""
    x, wt, b, res = _inputs((2, 5, 6, 7, 9), 3, 2, (0, 1, 0, 1), torch.float32, layout)
    x.requires_grad_(True)
    kw = dict(stride=2, padding=(0, 1, 0, 1), residual=res, output_scale=0.7)  # (left, right, top, bottom)
    out = conv2d(x, wt, b, backend="triton", **kw)
    ref = conv2d_reference(x.detach(), wt, b, **kw)
    assert out.stride() == ref.stride()
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
