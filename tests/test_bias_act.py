"""fastgen.ops.bias_act: every backend against the fp64 reference and the eager chain, first and second
derivatives (gradcheck / gradgradcheck in fp64, double backward as R1 runs it), layouts, clamps and errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastgen._backend import BackendUnavailable
from fastgen.ops.bias_act import (ACT_CODES, ACTIVATIONS, _grad_op, _op, act_derivative_reference,
                                  act_reference, bias_act, bias_act_reference)

from helpers import all_backends, assert_compiled_matches_eager, assert_lowp_close, kernel_backends

ACTS = [a.name for a in ACTIVATIONS]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (shape, dim, layout): NCHW and channels-last with the bias on C, the last dim, a middle dim, 2-D (N, C),
# 1-D, a dim of size 1 and a permuted dense tensor.
CASES = [
    ((3, 5, 7, 9), 1, "contiguous"),
    ((3, 5, 7, 9), 1, "channels_last"),
    ((2, 3, 4, 33), -1, "contiguous"),
    ((2, 3, 6, 5), 2, "contiguous"),
    ((4, 17), 1, "contiguous"),
    ((37,), 0, "contiguous"),
    ((2, 1, 5, 3), 1, "contiguous"),
    ((3, 4, 5), 1, "permuted"),
    ((3, 6, 5), 1, "strided"),
]


def _x(shape, dtype=torch.float32, layout="contiguous", scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "permuted":  # dense, dims in the order (2, 0, 1) in memory
        x = x.permute(2, 0, 1).contiguous().permute(1, 2, 0)
        assert not x.is_contiguous()
    elif layout == "strided":  # every other element of the last dim: not dense, copied by the op
        x = torch.cat([x, x], dim=-1)[..., ::2]
    return x.to(dtype)


def _b(n, seed=1):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _clamp_for(act):
    return {"tanh": 0.5, "sigmoid": 0.8, "lrelu": 2.0, "gelu": 1.5}.get(act, 3.0)


def _eager64(x, b, dim, act, clamp):
    """The eager chain in fp64: the truth every backend is held to."""
    return bias_act_reference(x.double(), None if b is None else b.double(), dim, act, clamp=clamp)


# ---------------------------------------------------------------- reference


@pytest.mark.parametrize("act", ACTS)
def test_derivative_formulas_match_autograd(act):
    z = torch.linspace(-25, 25, 2001, dtype=torch.float64).requires_grad_()
    code, alpha = ACT_CODES[act], ACTIVATIONS[ACT_CODES[act]].default_alpha
    (d1,) = torch.autograd.grad(act_reference(z, code, alpha).sum(), z, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), z) if d1.requires_grad else (torch.zeros_like(z),)
    torch.testing.assert_close(act_derivative_reference(z.detach(), code, alpha, 1), d1.detach())
    torch.testing.assert_close(act_derivative_reference(z.detach(), code, alpha, 2), d2)


def test_default_gains_and_alphas_are_stylegan2s():
    x = _x((2, 3, 4, 4))
    b = _b(3).float()
    z = x + b.view(1, 3, 1, 1)
    s2 = math.sqrt(2)
    torch.testing.assert_close(bias_act(x, b, act="lrelu"), F.leaky_relu(z, 0.2) * s2)
    torch.testing.assert_close(bias_act(x, b, act="relu"), F.relu(z) * s2)
    torch.testing.assert_close(bias_act(x, b, act="swish"), F.silu(z) * s2)
    torch.testing.assert_close(bias_act(x, b, act="elu"), F.elu(z, 1.0))
    torch.testing.assert_close(bias_act(x, b), z)
    torch.testing.assert_close(bias_act(x, b, act="lrelu", alpha=0.1, gain=1.0, clamp=0.5),
                               F.leaky_relu(z, 0.1).clamp(-0.5, 0.5))


# ---------------------------------------------------------------- forward


@pytest.mark.parametrize("backend", all_backends())
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape,dim,layout", CASES[:4])
def test_forward_fp32(backend, act, shape, dim, layout):
    x = _x(shape, layout=layout)
    b = _b(x.shape[dim]).float()
    for clamp in (None, _clamp_for(act)):
        y = bias_act(x, b, dim, act, clamp=clamp, backend=backend)
        assert y.dtype == x.dtype and y.shape == x.shape and y.stride() == x.stride()
        torch.testing.assert_close(y.double(), _eager64(x, b, dim, act, clamp), rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("backend", all_backends())
@pytest.mark.parametrize("shape,dim,layout", CASES)
def test_forward_layouts(backend, shape, dim, layout):
    x = _x(shape, layout=layout)
    b = _b(x.shape[dim]).float()
    y = bias_act(x, b, dim, "lrelu", clamp=2.0, backend=backend)
    torch.testing.assert_close(y.double(), _eager64(x, b, dim, "lrelu", 2.0), rtol=2e-6, atol=2e-6)
    if layout != "strided":
        assert y.stride() == x.stride()
    y = bias_act(x, None, dim, "silu", backend=backend)
    torch.testing.assert_close(y.double(), _eager64(x, None, dim, "silu", None), rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("backend", all_backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act", ACTS)
def test_forward_low_precision(backend, dtype, act):
    x = _x((3, 5, 7, 9), dtype, "channels_last" if act in ("gelu", "tanh") else "contiguous")
    b = _b(5).to(dtype)
    y = bias_act(x, b, 1, act, clamp=_clamp_for(act), backend=backend)
    assert y.dtype == dtype and y.stride() == x.stride()
    # One rounding of the fp32 result: at most 2x the error of the eager chain in that dtype, which rounds
    # after every step.
    eager = bias_act_reference(x, b, 1, act, clamp=_clamp_for(act))
    assert_lowp_close(y, _eager64(x.float(), b.float(), 1, act, _clamp_for(act)), eager,
                      what=f"{backend} {act}")


@pytest.mark.parametrize("backend", all_backends())
@pytest.mark.parametrize("act", ACTS)
def test_accuracy_over_a_dense_grid(backend, act):
    # The tails: where sigmoid, tanh and softplus saturate, exp(z) - 1 cancels, erf's branches meet.
    z = torch.cat([torch.linspace(-40, 40, 40001), torch.linspace(-1e-3, 1e-3, 2001)]).view(1, -1)
    code, alpha = ACT_CODES[act], ACTIVATIONS[ACT_CODES[act]].default_alpha
    y = bias_act(z, act=act, gain=1.0, backend=backend).double()
    ref = act_reference(z.double(), code, alpha)
    # torch's own fp32 functions lose accuracy in the tails (gelu's 1 + erf cancels below z = -5, and the
    # reference's derivative formulas take 1 - sigmoid(z) near 1); the kernels compute those pieces from
    # exp(-|z|) and are held to tighter bounds.
    torch.testing.assert_close(y, ref, rtol=4e-7, atol=1e-6 if backend == "torch" else 1e-7)
    dy = torch.ones_like(z)
    atol = 1e-5 if backend == "torch" else 2e-7
    for order in (1, 2):
        dx = _grad_op.kernel(backend)(dy, z, None, 1, code, alpha, 1.0, -1.0, order)[0].double()
        torch.testing.assert_close(dx, act_derivative_reference(z.double(), code, alpha, order),
                                   rtol=2e-6, atol=atol)


@pytest.mark.parametrize("backend", all_backends())
@pytest.mark.parametrize("act", ACTS)
def test_nan_and_inf_follow_torch(backend, act):
    x = torch.tensor([[float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-30]])
    y = bias_act(x, act=act, gain=1.0, backend=backend)
    ref = act_reference(x, ACT_CODES[act], ACTIVATIONS[ACT_CODES[act]].default_alpha)
    torch.testing.assert_close(y, ref, equal_nan=True)
    yc = bias_act(x, act=act, gain=1.0, clamp=0.5, backend=backend)
    torch.testing.assert_close(yc, ref.clamp(-0.5, 0.5), equal_nan=True)


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("clamp", [None, 0.7])
def test_gradcheck_and_gradgradcheck_fp64(act, clamp):
    # fp64 runs on the torch backend, through the same two autograd-recorded ops as the kernels.
    x = _x((2, 3, 4), torch.float64, scale=1.5).requires_grad_()
    b = _b(3).requires_grad_()
    gain = 0.7

    def f(x, b):
        return bias_act(x, b, 1, act, gain=gain, clamp=clamp, backend="torch")

    assert torch.autograd.gradcheck(f, (x, b))
    assert torch.autograd.gradgradcheck(f, (x, b))


def _double_backward(fn, x, b, w):
    """R1's pattern: ||d(fn(x, b) * w).sum() / dx||^2, differentiated again w.r.t. x and b."""
    x = x.detach().requires_grad_()
    b = b.detach().requires_grad_()
    y = fn(x, b)
    (gx,) = torch.autograd.grad((y * w).sum(), x, create_graph=True)
    gb = torch.autograd.grad((y * w).sum(), b, create_graph=True)[0]
    loss = gx.double().pow(2).sum() + (gb.double() * 0.3).sum()
    if not loss.requires_grad:  # eager autograd knows a linear chain's gradient is constant
        return y, gx, gb, torch.zeros_like(x), torch.zeros_like(b)
    dx, db = torch.autograd.grad(loss, (x, b), allow_unused=True, materialize_grads=True)
    return y, gx, gb, dx, db


@pytest.mark.parametrize("backend", all_backends())
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape,dim,layout", [CASES[0], CASES[1], CASES[2]])
def test_first_and_second_derivatives(backend, act, shape, dim, layout):
    x = _x(shape, layout=layout, scale=1.5)
    b = _b(x.shape[dim]).float()
    w = _x(shape, layout=layout, seed=3)
    clamp = _clamp_for(act)
    got = _double_backward(lambda x, b: bias_act(x, b, dim, act, clamp=clamp, backend=backend), x, b, w)
    ref = _double_backward(lambda x, b: bias_act_reference(x, b, dim, act, clamp=clamp), x.double(), b.double(),
                           w.double())
    for name, g, r in zip(("y", "dL/dx", "dL/db", "d2/dx", "d2/db"), got, ref):
        torch.testing.assert_close(g.double(), r, rtol=3e-5, atol=3e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", all_backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gradients_low_precision(backend, dtype):
    x = _x((4, 8, 5, 5), dtype).requires_grad_()
    b = _b(8).to(dtype).requires_grad_()
    y = bias_act(x, b, act="lrelu", clamp=3.0, backend=backend)
    dy = _x((4, 8, 5, 5), dtype, seed=5)
    gx, gb = torch.autograd.grad(y, (x, b), dy)
    assert gx.dtype == dtype and gb.dtype == dtype
    x64, b64 = x.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    rx, rb = torch.autograd.grad(_eager64(x64, b64, 1, "lrelu", 3.0), (x64, b64), dy.double())
    ex, eb = torch.autograd.grad(bias_act_reference(x, b, act="lrelu", clamp=3.0), (x, b), dy)
    assert_lowp_close(gx, rx, ex, what=f"{backend} dx")
    torch.testing.assert_close(gb.double(), rb, rtol=2e-2, atol=2e-2 * math.sqrt(x.numel() / 8))


@pytest.mark.parametrize("backend", all_backends())
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_gradient_of_a_large_tensor(backend, layout, dtype):
    # Large enough that the CPU kernel splits the bias-gradient sums over several parts and threads.
    x = _x((4, 48, 33, 31), dtype, layout).requires_grad_()
    b = _b(48).float().requires_grad_()
    dy = _x((4, 48, 33, 31), dtype, layout, seed=7)
    gx, gb = torch.autograd.grad(bias_act(x, b, act="silu", backend=backend), (x, b), dy)
    x64 = x.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_()
    rx, rb = torch.autograd.grad(_eager64(x64, b64, 1, "silu", None), (x64, b64), dy.double())
    # db is summed in fp32 from the unrounded dx: within fp32 summation error of the fp64 sum even for
    # fp16 / bf16 inputs, on the CPU kernel (other backends sum the rounded dx).
    tol = 1e-5 if dtype == torch.float32 or backend == "cpu" else 2e-2
    torch.testing.assert_close(gb.double(), rb, rtol=tol, atol=tol * math.sqrt(x.numel() / 48))
    if dtype == torch.float32:
        torch.testing.assert_close(gx.double(), rx, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", all_backends())
def test_clamp_gradient_mask_is_torch_clamps(backend):
    # Inclusive bounds: an output exactly at the clamp keeps its gradient, as torch.clamp's does.
    x = torch.tensor([[-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0]], requires_grad=True)
    y = bias_act(x, act="linear", clamp=1.0, backend=backend)
    y.sum().backward()
    assert x.grad.tolist() == [[0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]]


@pytest.mark.parametrize("backend", all_backends())
def test_broadcast_and_strided_output_gradients(backend):
    x = _x((2, 4, 3, 3), layout="channels_last").requires_grad_()
    b = _b(4).float().requires_grad_()
    y = bias_act(x, b, act="gelu", backend=backend)
    y.sum().backward()  # a stride-0 gradient
    x64 = x.detach().double().requires_grad_()
    _eager64(x64, b, 1, "gelu", None).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-6)
    assert b.grad.shape == (4,)
    x.grad = None
    y = bias_act(x, b, act="gelu", backend=backend)
    y.backward(torch.ones(2, 4, 3, 3).transpose(2, 3))  # a gradient in another layout than x
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-6)


def test_third_derivatives_raise():
    x = _x((2, 3), torch.float64).requires_grad_()
    y = bias_act(x, None, act="tanh", backend="torch")
    (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    (g2,) = torch.autograd.grad(g.sum(), x, create_graph=True)
    with pytest.raises(NotImplementedError, match="third derivatives"):
        torch.autograd.grad(g2.sum(), x)


def test_backward_memory_keeps_only_the_input():
    # The backward saves x and b (y is recomputed), so a layer's activation costs one saved tensor.
    x = _x((2, 3, 4, 4)).requires_grad_()
    b = _b(3).float().requires_grad_()
    y = bias_act(x, b, act="silu")
    saved = [t for t in (y.grad_fn.saved_tensors if hasattr(y.grad_fn, "saved_tensors") else ())]
    assert all(t.data_ptr() != y.data_ptr() for t in saved)


# ---------------------------------------------------------------- custom ops / compile


@pytest.mark.parametrize("backend", all_backends())
def test_opcheck(backend):
    x = _x((2, 3, 4, 5), layout="channels_last")
    b = _b(3).float()
    torch.library.opcheck(_op.custom_op, (x, b, 1, ACT_CODES["lrelu"], 0.2, 1.4, 2.0, backend))
    torch.library.opcheck(_grad_op.custom_op, (x.clone(), x, b, 1, ACT_CODES["gelu"], 0.0, 1.0, -1.0, 2, backend))


def test_torch_compile_matches_eager():
    b = _b(4).float()

    def f(x):
        return bias_act(x, b, act="lrelu", clamp=1.0)

    assert_compiled_matches_eager(f, _x((2, 4, 5, 5)).requires_grad_())


# ---------------------------------------------------------------- input checks


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: bias_act(torch.ones(2, 3), act="leaky"), ValueError, "unknown activation 'leaky'"),
        (lambda: bias_act(torch.ones(2, 3), torch.ones(4)), ValueError, r"length x.shape\[1\] = 3"),
        (lambda: bias_act(torch.ones(2, 3), torch.ones(1, 3)), ValueError, "1-D"),
        (lambda: bias_act(torch.ones(2, 3), torch.ones(3), dim=2), ValueError, "out of range"),
        (lambda: bias_act(torch.ones(2, 3), clamp=-1.0), ValueError, "clamp must be >= 0"),
        (lambda: bias_act(torch.ones(2, 3), gain=float("inf")), TypeError, "gain must be a finite float"),
        (lambda: bias_act(torch.ones(2, 3), alpha="0.2"), TypeError, "alpha must be a finite float"),
        (lambda: bias_act(torch.ones(2, 3), dim=1.0), TypeError, "dim must be an int"),
        (lambda: bias_act(torch.ones(2, 3, dtype=torch.int32)), TypeError, "x must have dtype"),
        (lambda: bias_act([1.0, 2.0]), TypeError, "x must be a torch.Tensor"),
        (lambda: bias_act(torch.ones(2, 3, dtype=torch.float64), backend="cpu"), BackendUnavailable,
         "float64 runs on the torch backend"),
    ],
)
def test_bad_input_raises_clear_error(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_kernel_entry_points_check_their_preconditions():
    pytest.importorskip("fastgen._C")
    from fastgen import _C

    x = torch.ones(2, 3)
    with pytest.raises(RuntimeError, match="b must be float32"):
        _C.bias_act_fwd_cpu(x, torch.ones(3, dtype=torch.float64), 1, 0, 0.0, 1.0, -1.0)
    with pytest.raises(RuntimeError, match="must be dense"):
        _C.bias_act_fwd_cpu(torch.ones(2, 6)[:, ::2], None, 1, 0, 0.0, 1.0, -1.0)
    with pytest.raises(RuntimeError, match="order must be 1 or 2"):
        _C.bias_act_grad_cpu(x, x, None, 1, 0, 0.0, 1.0, -1.0, 3)
    with pytest.raises(RuntimeError, match="unknown activation code"):
        _C.bias_act_fwd_cpu(x, None, 1, 10, 0.0, 1.0, -1.0)


@pytest.mark.parametrize("shape", [(0, 3), (2, 0, 4), ()])
def test_empty_and_scalar(shape):
    x = torch.randn(shape)
    y = bias_act(x, act="tanh")
    assert y.shape == x.shape
    torch.testing.assert_close(y, torch.tanh(x))


def test_kernel_backends_are_exercised():
    # The CPU kernel must be built in CI; a silent skip would hide a broken build.
    assert "cpu" in kernel_backends()
