"""The three routes into an op's kernels (fastgen/ops/_dispatch.py) agree, and tracing sees the custom op.

Eager calls skip torch.library's dispatch (inference: the kernel directly; autograd: an
autograd.Function built from the op's own setup_context/backward); anything that traces goes
through the custom op. Same kernels, so the results must be bit-identical.
"""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from fastgen.ops import attention, geglu, group_norm, vae_postprocess
from fastgen.ops.attention import _op as _attention
from fastgen.ops.geglu import _op as _geglu
from fastgen.ops.group_norm import _op as _group_norm
from fastgen.ops.vae_postprocess import _op as _vae_postprocess

_attention_op, _geglu_op, _group_norm_op = _attention.custom_op, _geglu.custom_op, _group_norm.custom_op

from helpers import all_backends


def _case(name, backend):
    g = torch.Generator().manual_seed(7)
    if name == "geglu":
        x = torch.randn(3, 5, 2 * 24, generator=g)
        return (x,), (lambda x: geglu(x, backend=backend)), (lambda x: _geglu_op(x, False, backend))
    if name == "vae_postprocess":
        x = torch.randn(2, 3, 5, 7, generator=g) * 1.5
        return (x,), (lambda x: vae_postprocess(x, backend=backend)), (
            lambda x: _vae_postprocess.custom_op(x, False, backend)
        )
    if name == "attention":
        q, k, v = (torch.randn(1, 2, n, 32, generator=g) for n in (9, 7, 7))
        return (q, k, v), (lambda q, k, v: attention(q, k, v, scale=0.3, backend=backend)), (
            lambda q, k, v: _attention_op(q, k, v, 0.3, backend)[0]
        )
    x, w, b = torch.randn(2, 12, 5, 3, generator=g), torch.randn(12, generator=g), torch.randn(12, generator=g)
    return (x, w, b), (lambda x, w, b: group_norm(x, 4, w, b, activation="silu", backend=backend)), (
        lambda x, w, b: _group_norm_op(x, w, b, None, 4, 1e-5, True, backend)[0]
    )


OPS = ["geglu", "attention", "group_norm", "vae_postprocess"]


@pytest.mark.parametrize("backend", all_backends())
@pytest.mark.parametrize("name", OPS)
def test_eager_routes_match_the_custom_op(name, backend):
    if name == "attention" and backend == "cuda":
        pytest.skip("covered by the GPU tests")
    inputs, eager, via_op = _case(name, backend)
    with torch.no_grad():
        assert torch.equal(eager(*inputs), via_op(*inputs))
    grads = []
    for fn in (eager, via_op):
        leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
        out = fn(*leaves)
        out.backward(torch.ones_like(out) * 0.5)
        grads.append([t.grad for t in leaves])
    for got, want in zip(*grads):
        assert torch.equal(got, want)


@pytest.mark.parametrize("name", OPS)
def test_tracing_records_the_custom_op(name):
    inputs, eager, _ = _case(name, "torch")
    graph = make_fx(eager)(*inputs).code
    assert f"fastgen.{name}" in graph, graph
