"""sampling_step is differentiable through its kernels: every backend's gradients match autograd through a
plain float64 formula of the step, for shared and per-sample coefficients, with guidance, clipping and the
x0 output; the custom ops pass opcheck, and q_sample trains under torch.compile."""

from __future__ import annotations

import pytest
import torch

from fastgen.ops import q_sample, sampling_step
from fastgen.ops.sampling import StepUpdate, X0From, _op

from helpers import all_backends


def _plain(x, e, coefs, e1, e2, z, g, clip, want_x0):
    n = x.shape[0]
    c = [torch.as_tensor(v, dtype=torch.float64).reshape(-1, *([1] * (x.dim() - 1))).expand(n, *([1] * (x.dim() - 1)))
         for v in coefs]
    if g is not None:
        e = e[:n] + g * (e[n:] - e[:n])
    x0 = c[0] * x + c[1] * e
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    out = c[2] * x + c[3] * x0 + c[4] * e1 + c[5] * e2 + c[6] * z
    return (out, x0) if want_x0 else (out,)


def _weights(t, seed):
    return torch.randn(t.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("backend", all_backends())
@pytest.mark.parametrize("guidance", [None, 3.0])
@pytest.mark.parametrize("clip", [None, 0.8])
@pytest.mark.parametrize("return_x0", [False, True])
@pytest.mark.parametrize("per_sample", [False, True])
def test_gradients_match_autograd_of_the_formula(backend, guidance, clip, return_x0, per_sample):
    gen = torch.Generator().manual_seed(11)
    n = 3
    x = torch.randn(n, 4, 5, 2, generator=gen, dtype=torch.float64)
    e = torch.randn((2 * n if guidance else n), 4, 5, 2, generator=gen, dtype=torch.float64)
    e1, e2, z = (torch.randn(x.shape, generator=gen, dtype=torch.float64) for _ in range(3))
    coefs = [0.9, -0.4, 0.7, 1.3, 0.2, -0.5, 0.1]
    if per_sample:  # one row per sample, as a training step's per-sample timesteps give
        coefs = [torch.tensor([v, 0.5 * v, -v], dtype=torch.float64) for v in coefs]

    leaves = [t.float().requires_grad_(True) for t in (x, e, e1, e2, z)]
    c = coefs
    update = StepUpdate(X0From(c[0], c[1]), sample=c[2], x0=c[3], terms=((c[4], leaves[2]), (c[5], leaves[3])),
                        noise=c[6])
    res = sampling_step(leaves[0], leaves[1], update, noise=leaves[4], guidance_scale=guidance, clip=clip,
                        return_x0=return_x0, backend=backend)
    outs = res if return_x0 else (res,)
    sum((o.double() * _weights(o, i)).sum() for i, o in enumerate(outs)).backward()

    ref_leaves = [t.clone().requires_grad_(True) for t in (x, e, e1, e2, z)]
    ref = _plain(ref_leaves[0], ref_leaves[1], coefs, *ref_leaves[2:], guidance, clip, return_x0)
    sum((o * _weights(o, i)).sum() for i, o in enumerate(ref)).backward()

    for name, got, want in zip(("sample", "model_output", "terms[0]", "terms[1]", "noise"), leaves, ref_leaves):
        assert got.grad is not None, name
        assert got.grad.dtype == torch.float32, name
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", all_backends())
def test_half_precision_gradients_keep_their_dtypes(backend):
    x = torch.randn(2, 3, 4).to(torch.bfloat16).requires_grad_(True)
    e = torch.randn(2, 3, 4).to(torch.float16).requires_grad_(True)
    out = sampling_step(x, e, StepUpdate(X0From(1.0, -0.5), sample=0.3, x0=0.7), backend=backend)
    out.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and e.grad.dtype == torch.float16
    torch.testing.assert_close(x.grad.float(), torch.full(x.shape, 0.3 + 0.7 * 1.0), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(e.grad.float(), torch.full(e.shape, 0.7 * -0.5), rtol=1e-2, atol=1e-2)


def test_q_sample_gradient_is_sqrt_alpha():
    x0 = torch.randn(4, 3, 2, 2, requires_grad=True)
    noise = torch.randn(4, 3, 2, 2, requires_grad=True)
    a, s = torch.rand(4), torch.rand(4)
    q_sample(x0, noise, a, s).sum().backward()
    torch.testing.assert_close(x0.grad, a.reshape(4, 1, 1, 1).expand_as(x0).contiguous())
    torch.testing.assert_close(noise.grad, s.reshape(4, 1, 1, 1).expand_as(noise).contiguous())


@pytest.mark.parametrize("backend", all_backends())
def test_opcheck(backend):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 4, generator=gen).requires_grad_(True)
    e = torch.randn(4, 3, 4, generator=gen).requires_grad_(True)
    rows = torch.randn(2, 7, generator=gen)
    torch.library.opcheck(_op.custom_op, (x, e, rows, None, None, None, 2.0, None, True, backend))
    torch.library.opcheck(_op.custom_op, (x, e[:2], rows, x.detach(), None, None, None, 0.5, False, backend))


def test_q_sample_under_torch_compile():
    x0 = torch.randn(3, 2, 4, 4, requires_grad=True)
    noise = torch.randn(3, 2, 4, 4)
    a, s = torch.rand(3), torch.rand(3)

    def loss(x0):
        return (q_sample(x0, noise, a, s) ** 2).sum()

    compiled = torch.compile(loss, fullgraph=True)
    got = compiled(x0)
    (g_compiled,) = torch.autograd.grad(got, x0)
    want = loss(x0)
    (g_eager,) = torch.autograd.grad(want, x0)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g_compiled, g_eager)
