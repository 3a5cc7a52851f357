"""fastgen.ops.group_norm: every backend against the fp32 reference and PyTorch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastgen
from fastgen.ops import group_norm, group_norm_reference
from fastgen.ops.group_norm import _op as _group_norm

_group_norm_op = _group_norm.custom_op

from helpers import LOWP, all_backends, assert_compiled_matches_eager, assert_lowp_close, kernel_backends

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (shape, groups): N=1, C=G, C=3*G, G=1, 1x1 and 7x13 spatial, 1-D and 3-D
# spatial, (N, C) alone.
SHAPES = [
    ((1, 4, 2, 3), 4),
    ((2, 6, 1, 1), 2),
    ((3, 6, 7, 13), 2),
    ((2, 12, 5, 3, 2), 4),
    ((2, 8), 2),
    ((1, 30, 17), 10),
    ((2, 5, 4, 4), 1),
]
SD_SHAPE = ((2, 320, 64, 64), 32)


def _inputs(shape, dtype, *, layout="contiguous", residual=False, seed=0, mean=0.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 2 + mean).to(dtype)
    c = shape[1]
    w = (torch.randn(c, generator=g) + 1).to(dtype)
    b = torch.randn(c, generator=g).to(dtype)
    r = torch.randn(shape, generator=g).to(dtype) if residual else None
    if layout == "channels_last" and x.dim() > 2:  # (N, C) alone has a single layout
        fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
        if fmt is None:  # 3-D (N, C, L): channels-last is the (N, L, C) transpose
            x = x.transpose(1, 2).contiguous().transpose(1, 2)
            r = r.transpose(1, 2).contiguous().transpose(1, 2) if r is not None else None
        else:
            x = x.contiguous(memory_format=fmt)
            r = r.contiguous(memory_format=fmt) if r is not None else None
    elif layout == "strided":  # a non-contiguous view (every other column)
        x = torch.cat([x, x], dim=-1)[..., ::2]
        r = torch.cat([r, r], dim=-1)[..., ::2] if r is not None else None
    return x, w, b, r


def _torch_eager(x, groups, w, b, act, r):
    y = F.group_norm(x, groups, w, b, 1e-5)
    if act == "silu":
        y = F.silu(y)
    return y + r if r is not None else y


def _check_forward(backend, shape, groups, dtype, layout, act, residual):
    x, w, b, r = _inputs(shape, dtype, layout=layout, residual=residual)
    out = group_norm(x, groups, w, b, activation=act, residual=r, backend=backend)
    assert out.dtype == dtype and out.shape == x.shape
    ref = group_norm_reference(x.float(), groups, w.float(), b.float(), activation=act,
                               residual=r.float() if r is not None else None)
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref)
    else:
        assert_lowp_close(out, ref, _torch_eager(x, groups, w, b, act, r), what=f"{backend} {dtype}")
    if layout == "channels_last" and x.dim() == 4 and x.shape[2] * x.shape[3] > 1:
        assert out.is_contiguous(memory_format=torch.channels_last), "output must keep the input's layout"


# ---------------------------------------------------------------- reference


@pytest.mark.parametrize("shape,groups", SHAPES)
def test_reference_matches_pytorch(shape, groups):
    x, w, b, r = _inputs(shape, torch.float64, residual=True)
    for act in (None, "silu"):
        ref = group_norm_reference(x, groups, w, b, activation=act, residual=r)
        # The reference computes in fp32 whatever the input: fp32 tolerances.
        torch.testing.assert_close(ref, _torch_eager(x, groups, w, b, act, r), rtol=1.3e-6, atol=1e-5)


# ------------------------------------------------------------------ forward


@pytest.mark.parametrize("backend", all_backends())
@pytest.mark.parametrize("shape,groups", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_forward(backend, shape, groups, dtype, layout):
    _check_forward(backend, shape, groups, dtype, layout, "silu", residual=True)


@pytest.mark.parametrize("backend", all_backends())
@pytest.mark.parametrize("act,residual", [(None, False), ("silu", False), (None, True)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_forward_variants(backend, act, residual, layout):
    _check_forward(backend, (2, 12, 6, 5), 3, torch.float32, layout, act, residual)
    _check_forward(backend, (2, 12, 6, 5), 3, torch.bfloat16, layout, act, residual)


@pytest.mark.parametrize("backend", all_backends())
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_forward_sd_shape(backend, layout):
    (shape, groups) = SD_SHAPE
    _check_forward(backend, shape, groups, torch.float32, layout, "silu", residual=True)


@pytest.mark.parametrize("backend", all_backends())
def test_forward_sd_shape_bf16(backend):
    (shape, groups) = SD_SHAPE
    _check_forward(backend, shape, groups, torch.bfloat16, "channels_last", "silu", residual=False)


@pytest.mark.parametrize("backend", all_backends())
def test_large_mean_is_stable(backend):
    # E[x^2] - E[x]^2 would lose every significant digit of the variance here.
    x, w, b, _ = _inputs((2, 8, 16, 16), torch.float32, mean=1000.0)
    out = group_norm(x, 4, w, b, backend=backend)
    ref = F.group_norm(x.double(), 4, w.double(), b.double())
    torch.testing.assert_close(out.double(), ref, atol=2e-3, rtol=1e-3)


def test_no_affine_matches_pytorch():
    x, _, _, _ = _inputs((2, 6, 5, 5), torch.float32)
    torch.testing.assert_close(group_norm(x, 3), F.group_norm(x, 3))


# ----------------------------------------------------------------- backward


def _grads(fn, x, w, b, r, dy):
    leaves = [t for t in (x, w, b, r) if t is not None]
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    it = iter(leaves)
    args = [next(it) if t is not None else None for t in (x, w, b, r)]
    fn(*args).backward(dy)
    return [t.grad for t in leaves]


@pytest.mark.parametrize("backend", all_backends())
@pytest.mark.parametrize("shape,groups", [SHAPES[1], SHAPES[2], SHAPES[3], ((2, 64, 9, 9), 8)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_backward(backend, shape, groups, dtype, layout):
    x, w, b, r = _inputs(shape, dtype, layout=layout, residual=True, seed=1)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    grads = _grads(lambda x, w, b, r: group_norm(x, groups, w, b, activation="silu", residual=r, backend=backend), x, w, b, r, dy)
    refs = _grads(lambda x, w, b, r: _torch_eager(x, groups, w, b, "silu", r), *(t.double() for t in (x, w, b, r)), dy.double())
    names = ["dx", "dweight", "dbias", "dresidual"]
    if dtype == torch.float32:
        for name, got, ref in zip(names, grads, refs):
            torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")
    else:
        lowp = _grads(lambda x, w, b, r: _torch_eager(x, groups, w, b, "silu", r), x, w, b, r, dy)
        for name, got, ref, tl in zip(names, grads, refs, lowp):
            assert got.dtype == dtype
            assert_lowp_close(got, ref, tl, what=f"{backend} {name}")


@pytest.mark.parametrize("backend", all_backends())
def test_backward_without_affine_or_activation(backend):
    x, _, _, _ = _inputs((2, 6, 4, 3), torch.float32)
    dy = torch.randn_like(x)
    (gx,) = _grads(lambda x, *_: group_norm(x, 2, backend=backend), x, None, None, None, dy)
    (rx,) = _grads(lambda x, *_: F.group_norm(x, 2), x.double(), None, None, None, dy.double())
    torch.testing.assert_close(gx.double(), rx, rtol=1e-4, atol=1e-4)


def test_reference_backward_formula_matches_autograd():
    # The torch backend's hand-written backward against fp64 autograd of PyTorch's own op.
    x, w, b, r = _inputs((2, 6, 3, 2), torch.float64, residual=True)
    args = [t.requires_grad_(True) for t in (x, w, b, r)]
    x32, w32, b32, r32 = (t.detach().float().requires_grad_(True) for t in args)
    y = group_norm(x32, 3, w32, b32, activation="silu", residual=r32, backend="torch")
    ref = _torch_eager(*args[:1], 3, *args[1:3], "silu", args[3])
    g = torch.randn_like(ref)
    got = torch.autograd.grad(y, (x32, w32, b32, r32), g.float())
    want = torch.autograd.grad(ref, args, g)
    for a, e in zip(got, want):
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-4)


# ------------------------------------------------ custom op / torch.compile


@pytest.mark.parametrize("backend", all_backends())
def test_opcheck(backend):
    x, w, b, r = _inputs((2, 6, 3, 5), torch.float32, residual=True)
    args = (x.requires_grad_(True), w.requires_grad_(True), b, r, 3, 1e-5, True, backend)
    torch.library.opcheck(_group_norm_op, args)
    x_cl, _, _, _ = _inputs((2, 6, 3, 5), torch.float32, layout="channels_last")
    torch.library.opcheck(_group_norm_op, (x_cl, w, torch.zeros_like(w), None, 3, 1e-5, False, backend))


def test_torch_compile_matches_eager():
    block = fastgen.models.GroupNorm(4, 16, activation="silu")
    conv = torch.nn.Conv2d(16, 16, 3, padding=1)

    def f(x):
        return block(conv(x), residual=x)

    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    assert_compiled_matches_eager(f, x)


# ------------------------------------------------------------------ module


def test_module_is_drop_in_for_nn_groupnorm():
    ref = torch.nn.GroupNorm(8, 32)
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
    mod = fastgen.models.GroupNorm(8, 32, activation="silu")
    assert list(mod.state_dict()) == list(ref.state_dict())
    mod.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 32, 5, 5)
    torch.testing.assert_close(mod(x), F.silu(ref(x)))
    plain = fastgen.models.GroupNorm.from_torch(ref)
    assert plain.weight is ref.weight  # shares, never copies
    torch.testing.assert_close(plain(x), ref(x))
    skip = torch.randn_like(x)
    torch.testing.assert_close(mod(x, skip), F.silu(ref(x)) + skip)
    assert "activation='silu'" in repr(mod)


def test_module_rejects_unknown_activation():
    with pytest.raises(ValueError, match="activation"):
        fastgen.models.GroupNorm(2, 4, activation="gelu")


# -------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda: (torch.randn(2, 6, 4, 4), 4, {}), ValueError, "divisible"),
        (lambda: (torch.randn(6), 2, {}), ValueError, "shape"),
        (lambda: (torch.randn(1, 2, 2, 2, 2, 2), 2, {}), ValueError, "shape"),
        (lambda: (torch.randn(2, 6, 4, 4), 0, {}), ValueError, "positive"),
        (lambda: (torch.randn(2, 6, 4, 4), 3, {"residual": torch.randn(2, 6, 4, 5)}), ValueError, "residual"),
        (lambda: (torch.randn(2, 6, 4, 4), 3, {"residual": torch.randn(2, 6, 4, 4).double()}), TypeError, "residual"),
        (lambda: (torch.randn(2, 6, 4, 4), 3, {"weight": torch.randn(5)}), ValueError, "weight"),
        (lambda: (torch.randn(2, 6, 4, 4), 3, {"bias": torch.randn(6, 1)}), ValueError, "bias"),
        (lambda: (torch.ones(2, 6, 4, 4, dtype=torch.int64), 3, {}), TypeError, "dtype"),
        (lambda: (torch.randn(2, 6, 4, 4).double(), 3, {}), TypeError, "dtype"),
        (lambda: (torch.randn(2, 6, 4, 4), 3, {"activation": "relu"}), ValueError, "activation"),
        (lambda: ("not a tensor", 3, {}), TypeError, "Tensor"),
        (lambda: (torch.randn(2, 6, 4, 4), 3, {"weight": torch.randn(6, device="meta")}), ValueError, "device"),
    ],
)
def test_bad_input_raises_clear_error(make, exc, match):
    x, groups, kwargs = make()
    with pytest.raises(exc, match=match):
        group_norm(x, groups, **kwargs)


def test_empty_batch():
    out = group_norm(torch.randn(0, 4, 3, 3), 2)
    assert out.shape == (0, 4, 3, 3)


@pytest.mark.parametrize("backend", kernel_backends())
def test_kernel_backends_are_exercised(backend):
    # Guards against a suite that silently tests only the reference: on this
    # machine the C++ kernel (CI builds it) and the Triton interpreter run.
    x, w, b, _ = _inputs((1, 4, 3, 3), torch.float32)
    assert group_norm(x, 2, w, b, backend=backend).shape == x.shape


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gpu_forward_backward(backend, dtype, layout):
    shape, groups = SD_SHAPE
    x, w, b, r = (t.cuda() for t in _inputs(shape, dtype, layout=layout, residual=True))
    out = group_norm(x, groups, w, b, activation="silu", residual=r, backend=backend)
    ref = group_norm_reference(x.float(), groups, w.float(), b.float(), activation="silu", residual=r.float())
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref)
    else:
        assert_lowp_close(out, ref, _torch_eager(x, groups, w, b, "silu", r))
    dy = torch.randn_like(x)
    g = _grads(lambda x, w, b, r: group_norm(x, groups, w, b, activation="silu", residual=r, backend=backend), x, w, b, r, dy)
    e = _grads(lambda x, w, b, r: _torch_eager(x, groups, w, b, "silu", r), x.float(), w.float(), b.float(), r.float(), dy.float())
    for got, ref in zip(g, e):
        torch.testing.assert_close(got.float(), ref, rtol=5e-2 if dtype in LOWP else 1e-3, atol=5e-2 if dtype in LOWP else 1e-3)


@pytest.mark.parametrize("backend", all_backends())
def test_inference_fast_path_matches_custom_op(backend):
    # Without autograd or torch.compile the op skips the custom-op dispatch;
    # both paths must run the same kernel and give identical results.
    x, w, b, r = _inputs((2, 12, 5, 4), torch.float32, residual=True)
    fast = group_norm(x, 3, w, b, activation="silu", residual=r, backend=backend)
    via_op, _, _ = _group_norm_op(x, w, b, r, 3, 1e-5, True, backend)
    assert torch.equal(fast, via_op)


@pytest.mark.parametrize("backend", all_backends())
@pytest.mark.parametrize("needs", ["x", "weight", "x+residual", "all"])
def test_eager_autograd_matches_custom_op_autograd(backend, needs):
    # Eager autograd goes through a plain autograd.Function (the custom op's
    # autograd wrapper costs ~100 us a call); torch.compile goes through the
    # custom op. Both must give the same gradients for any subset of inputs.
    x, w, b, r = _inputs((2, 12, 5, 4), torch.float32, residual=True, seed=3)
    dy = torch.randn_like(x)
    wanted = {"x": "x", "weight": "w", "x+residual": "xr", "all": "xwbr"}[needs]

    def run(fn):
        leaves = [t.detach().clone().requires_grad_(k in wanted) for k, t in zip("xwbr", (x, w, b, r))]
        fn(*leaves).backward(dy)
        return [t.grad for t in leaves]

    eager = run(lambda x, w, b, r: group_norm(x, 3, w, b, activation="silu", residual=r, backend=backend))
    via_op = run(lambda x, w, b, r: _group_norm_op(x, w, b, r, 3, 1e-5, True, backend)[0])
    for k, got, want in zip("xwbr", eager, via_op):
        assert (got is None) == (k not in wanted)
        if got is not None:
            assert torch.equal(got, want), k
