"""fastgen.ops.geglu: every backend against the fp32 reference, diffusers' formula and PyTorch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastgen._backend import BackendUnavailable
from fastgen.ops.geglu import _op as _geglu, geglu, geglu_reference

_geglu_op, _geglu_backward_op = _geglu.custom_op, _geglu.backward_op

from helpers import all_backends, assert_compiled_matches_eager, assert_lowp_close, kernel_backends

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
APPROX = ["none", "tanh"]

# x shapes (..., 2H): H = 1, SD1.5's 40-wide toy blocks with CLIP's 77 tokens,
# 320, odd H (7, 333), a 1-D input and a 4-D one.
SHAPES = [
    (1, 1, 2),
    (2, 77, 2 * 40),
    (3, 5, 2 * 320),
    (2, 3, 2 * 7),
    (5, 2 * 333),
    (2 * 7,),
    (2, 3, 1, 2 * 7),
]
SD_SHAPE = (4096, 2 * 1280)  # one SD1.5 64x64 block's tokens (batch 1), its hidden size


def _inputs(shape, dtype, *, layout="contiguous", seed=0):
    g = torch.Generator().manual_seed(seed)
    # scaled so that the gate covers gelu's curved region and its tails
    x = (torch.randn(shape, generator=g) * 2).to(dtype)
    if layout == "strided":  # every other element of the last dim
        x = torch.cat([x, x], dim=-1)[..., ::2]
        assert not x.is_contiguous()
    elif layout == "transposed":  # a permuted view with a unit-stride last dim
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
        assert not x.is_contiguous()
    return x


def _diffusers_formula(x, approximate="none"):
    """What diffusers' GEGLU module runs after its proj Linear, in x's dtype."""
    hidden, gate = x.chunk(2, dim=-1)
    return hidden * F.gelu(gate, approximate=approximate)


def _check_forward(backend, shape, dtype, approximate="none", layout="contiguous"):
    x = _inputs(shape, dtype, layout=layout)
    out = geglu(x, approximate=approximate, backend=backend)
    h = shape[-1] // 2
    assert out.dtype == dtype and out.shape == (*shape[:-1], h)
    assert out.is_contiguous()
    ref = geglu_reference(x.float(), approximate=approximate)
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(out, _diffusers_formula(x, approximate))
    else:
        assert_lowp_close(out, ref, _diffusers_formula(x, approximate), what=f"{backend} {dtype}")


# ---------------------------------------------------------------- reference


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("approximate", APPROX)
def test_reference_matches_diffusers_formula(shape, approximate):
    x = _inputs(shape, torch.float64)
    ref = geglu_reference(x, approximate=approximate)
    assert ref.dtype == torch.float64
    # The reference computes in fp32 whatever the input: fp32 tolerances.
    torch.testing.assert_close(ref, _diffusers_formula(x, approximate), rtol=1.3e-6, atol=1e-5)


def test_matches_diffusers_geglu_module():
    activations = pytest.importorskip("diffusers.models.activations")
    torch.manual_seed(0)
    module = activations.GEGLU(32, 40)
    x = torch.randn(2, 77, 32)
    with torch.no_grad():
        torch.testing.assert_close(geglu(module.proj(x)), module(x))


# ------------------------------------------------------------------ forward


@pytest.mark.parametrize("backend", all_backends())
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward(backend, shape, dtype):
    _check_forward(backend, shape, dtype)


@pytest.mark.parametrize("backend", all_backends())
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[4], SHAPES[5]])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_tanh(backend, shape, dtype):
    _check_forward(backend, shape, dtype, approximate="tanh")


@pytest.mark.parametrize("backend", all_backends())
@pytest.mark.parametrize("layout", ["strided", "transposed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_forward_non_contiguous(backend, layout, dtype):
    _check_forward(backend, (3, 5, 2 * 24), dtype, layout=layout)


@pytest.mark.parametrize("backend", all_backends())
def test_forward_sd_shape(backend):
    _check_forward(backend, SD_SHAPE, torch.float32)


@pytest.mark.parametrize("backend", all_backends())
@pytest.mark.parametrize("approximate", APPROX)
def test_gelu_accuracy_over_a_dense_grid(backend, approximate):
    # hidden = 1 isolates gelu(gate): every gate value from -12 to 12, the
    # far negative tail included, against fp64 PyTorch.
    gate = torch.linspace(-12, 12, 20001)
    x = torch.stack([torch.ones_like(gate), gate], dim=-1)
    out = geglu(x, approximate=approximate, backend=backend)[:, 0]
    torch.testing.assert_close(out.double(), F.gelu(gate.double(), approximate=approximate), rtol=1.3e-6, atol=1e-6)


@pytest.mark.parametrize("backend", all_backends())
@pytest.mark.parametrize("approximate", APPROX)
def test_nan_propagates(backend, approximate):
    x = torch.tensor([[float("nan"), 1.0, 2.0, 0.5], [1.0, 3.0, 0.5, float("nan")]])
    out = geglu(x, approximate=approximate, backend=backend)
    assert out[0, 0].isnan() and out[1, 1].isnan()
    torch.testing.assert_close(out[0, 1], _diffusers_formula(x, approximate)[0, 1])


# ----------------------------------------------------------------- backward


def _grad(fn, x, dout):
    x = x.detach().clone().requires_grad_(True)
    fn(x).backward(dout)
    return x.grad


@pytest.mark.parametrize("backend", all_backends())
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1], SHAPES[3], SHAPES[4], SHAPES[5]])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("approximate", APPROX)
def test_backward(backend, shape, dtype, approximate):
    x = _inputs(shape, dtype, seed=1)
    dout = torch.randn((*shape[:-1], shape[-1] // 2), generator=torch.Generator().manual_seed(2)).to(dtype)
    got = _grad(lambda t: geglu(t, approximate=approximate, backend=backend), x, dout)
    assert got.dtype == dtype and got.shape == x.shape
    ref = _grad(lambda t: _diffusers_formula(t, approximate), x.double(), dout.double())
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref.float())
    else:
        lowp = _grad(lambda t: _diffusers_formula(t, approximate), x, dout)
        assert_lowp_close(got, ref, lowp, what=f"{backend} {dtype} dx")


@pytest.mark.parametrize("backend", all_backends())
def test_backward_non_contiguous_and_broadcast_grad(backend):
    # out.sum() hands the backward an expanded (stride-0) gradient.
    x = _inputs((3, 5, 2 * 24), torch.float32, layout="strided")
    got = _grad(lambda t: geglu(t, backend=backend).sum(), x, None)
    ref = _grad(lambda t: _diffusers_formula(t).sum(), x.double(), None)
    torch.testing.assert_close(got, ref.float())


@pytest.mark.parametrize("backend", all_backends())
def test_backward_sd_shape(backend):
    x = _inputs(SD_SHAPE, torch.float32, seed=3)
    dout = torch.randn(SD_SHAPE[0], SD_SHAPE[1] // 2, generator=torch.Generator().manual_seed(4))
    got = _grad(lambda t: geglu(t, backend=backend), x, dout)
    ref = _grad(_diffusers_formula, x.double(), dout.double())
    torch.testing.assert_close(got, ref.float())


def test_reference_backward_formula_matches_autograd():
    # The torch backend's hand-written backward against fp64 autograd.
    x = _inputs((4, 2 * 9), torch.float64)
    dout = torch.randn(4, 9, dtype=torch.float64)
    for approximate in APPROX:
        got = _grad(lambda t: geglu(t, approximate=approximate, backend="torch"), x.float(), dout.float())
        ref = _grad(lambda t: _diffusers_formula(t, approximate), x, dout)
        torch.testing.assert_close(got, ref.float())


# ------------------------------------------------ custom op / torch.compile


@pytest.mark.parametrize("backend", all_backends())
@pytest.mark.parametrize("approximate_tanh", [False, True])
def test_opcheck(backend, approximate_tanh):
    x = _inputs((2, 3, 2 * 5), torch.float32).requires_grad_(True)
    torch.library.opcheck(_geglu_op, (x, approximate_tanh, backend))
    dout = torch.randn(2, 3, 5)
    torch.library.opcheck(_geglu_backward_op, (dout, x.detach(), approximate_tanh, backend))


def test_torch_compile_matches_eager():
    proj = torch.nn.Linear(16, 2 * 24)

    def f(x):
        return geglu(proj(x))

    x = torch.randn(2, 7, 16, requires_grad=True)
    assert_compiled_matches_eager(f, x)


# -------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda: (torch.randn(2, 5), {}), ValueError, "even"),
        (lambda: (torch.randn(3), {}), ValueError, "even"),
        (lambda: (torch.tensor(1.0), {}), ValueError, "0-D"),
        (lambda: (torch.randn(2, 4), {"approximate": "erf"}), ValueError, "approximate"),
        (lambda: (torch.randn(2, 4), {"approximate": None}), ValueError, "approximate"),
        (lambda: (torch.ones(2, 4, dtype=torch.int64), {}), TypeError, "dtype"),
        (lambda: (torch.randn(2, 4).double(), {}), TypeError, "dtype"),
        (lambda: ([[1.0, 2.0]], {}), TypeError, "Tensor"),
        (lambda: (torch.randn(2, 4), {"backend": "nope"}), ValueError, "backend"),
    ],
)
def test_bad_input_raises_clear_error(make, exc, match):
    x, kwargs = make()
    with pytest.raises(exc, match=match):
        geglu(x, **kwargs)


def test_unavailable_backend_raises():
    with pytest.raises(BackendUnavailable, match="cuda"):
        geglu(torch.randn(2, 4), backend="cuda")


@pytest.mark.parametrize("shape", [(0, 8), (3, 0), (2, 0, 6)])
def test_empty(shape):
    x = torch.randn(shape, requires_grad=True)
    out = geglu(x)
    assert out.shape == (*shape[:-1], shape[-1] // 2)
    out.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("backend", kernel_backends())
def test_kernel_backends_are_exercised(backend):
    # Guards against a suite that silently tests only the reference: on this
    # machine the C++ kernel (CI builds it) and the Triton interpreter run.
    x = _inputs((3, 2 * 5), torch.float32)
    assert geglu(x, backend=backend).shape == (3, 5)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("shape", [(2, 4096, 2 * 1280), (2, 77, 2 * 333), (3, 2 * 7)])
def test_gpu_forward_backward(backend, dtype, approximate, shape):
    x = _inputs(shape, dtype).cuda()
    out = geglu(x, approximate=approximate, backend=backend)
    ref = geglu_reference(x.float(), approximate=approximate)
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref)
    else:
        assert_lowp_close(out, ref, _diffusers_formula(x, approximate))
    dout = torch.randn_like(out)
    got = _grad(lambda t: geglu(t, approximate=approximate, backend=backend), x, dout)
    want = _grad(lambda t: _diffusers_formula(t, approximate), x.double(), dout.double())
    if dtype == torch.float32:
        torch.testing.assert_close(got, want.float())
    else:
        assert_lowp_close(got, want, _grad(lambda t: _diffusers_formula(t, approximate), x, dout))
