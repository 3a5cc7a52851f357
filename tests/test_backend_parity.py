"""Every backend behaves the same on the same odd inputs: the public op decides checks and layout once, so
channels-last, strided, expanded and zero-size inputs give every backend the same result (values within
each backend's tolerance, dtype, shape and output strides) or the same error, word for word.

The kernels themselves keep only precondition asserts (docs/design.md, "Checks and layout"); this test
is what holds the Python layer to that promise.
"""

from __future__ import annotations

import pytest
import torch

from fastgen.ops import attention, geglu, group_norm, sampling_step, vae_postprocess
from fastgen.ops.sampling import StepUpdate, X0From

from helpers import all_backends

BACKENDS = all_backends("cpu")


def _layouts(t: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same values of a 4-D (N, C, H, W) tensor in the layouts users hand over."""
    out = {
        "contiguous": t,
        "channels_last": t.contiguous(memory_format=torch.channels_last),
        # every other column of a twice-as-wide tensor: not dense
        "strided": torch.stack([t, torch.zeros_like(t)], dim=-1).select(-1, 0),
        # dims permuted in memory without being channels-last
        "permuted": t.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3),
    }
    return out


def _run_everywhere(fn):
    """``fn(backend)`` on every backend: the results, or the error (type, message) each raised."""
    results = {}
    for backend in BACKENDS:
        try:
            results[backend] = fn(backend)
        except Exception as exc:  # the point is to compare errors too
            results[backend] = (type(exc), str(exc))
    return results


def _assert_same(results, rtol=1e-5, atol=1e-5):
    ref = results["torch"]
    for backend, got in results.items():
        if isinstance(ref, tuple) and isinstance(ref[0], type):
            assert got == ref, f"{backend} raised {got}, torch raised {ref}"
            continue
        assert not (isinstance(got, tuple) and isinstance(got[0], type)), f"{backend} raised {got}"
        gots, refs = (got, ref) if isinstance(ref, tuple) else ((got,), (ref,))
        for g, r in zip(gots, refs):
            assert g.shape == r.shape and g.dtype == r.dtype, backend
            assert g.stride() == r.stride(), f"{backend}: strides {g.stride()} != torch's {r.stride()}"
            torch.testing.assert_close(g, r, rtol=rtol, atol=atol, msg=lambda m: f"{backend}: {m}")


def _seeded(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ group_norm


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided", "permuted"])
def test_group_norm_layouts(layout):
    x = _layouts(_seeded(2, 6, 5, 3))[layout]
    r = _layouts(_seeded(2, 6, 5, 3, seed=1))["strided" if layout == "contiguous" else "contiguous"]
    w, b = _seeded(6, seed=2), _seeded(6, seed=3)
    _assert_same(_run_everywhere(lambda be: group_norm(x, 3, w, b, activation="silu", residual=r, backend=be)))


def test_group_norm_expanded_and_zero_size():
    x = _seeded(1, 6, 1, 1).expand(2, 6, 4, 3)  # stride 0 in three dims
    _assert_same(_run_everywhere(lambda be: group_norm(x, 2, backend=be)))
    empty = torch.empty(0, 6, 4, 4)
    _assert_same(_run_everywhere(lambda be: group_norm(empty, 2, backend=be)))
    # a zero-size spatial dim, channels-last
    empty_cl = torch.empty(2, 6, 0, 4).contiguous(memory_format=torch.channels_last)
    _assert_same(_run_everywhere(lambda be: group_norm(empty_cl, 2, backend=be)))


def test_group_norm_bad_input_same_error():
    x = _seeded(2, 6, 4, 4)
    _assert_same(_run_everywhere(lambda be: group_norm(x, 4, backend=be)))  # 6 channels, 4 groups
    _assert_same(_run_everywhere(lambda be: group_norm(x.to(torch.int32), 2, backend=be)))
    _assert_same(_run_everywhere(lambda be: group_norm(x, 2, residual=x[:1], backend=be)))


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_group_norm_gradients_layouts(layout):
    x0 = _layouts(_seeded(2, 6, 4, 3))[layout]
    dy = _layouts(_seeded(2, 6, 4, 3, seed=5))["permuted"]

    def grads(be):
        x = x0.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
        w = _seeded(6, seed=2).requires_grad_(True)
        group_norm(x, 3, w, None, activation="silu", backend=be).backward(dy)
        return x.grad, w.grad

    _assert_same(_run_everywhere(grads), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ geglu


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided", "permuted"])
def test_geglu_layouts(layout):
    x = _layouts(_seeded(2, 3, 5, 8))[layout]
    _assert_same(_run_everywhere(lambda be: geglu(x, backend=be)))


def test_geglu_expanded_zero_size_and_errors():
    _assert_same(_run_everywhere(lambda be: geglu(_seeded(1, 8).expand(3, 8), backend=be)))
    _assert_same(_run_everywhere(lambda be: geglu(torch.empty(0, 4, 8), backend=be)))
    _assert_same(_run_everywhere(lambda be: geglu(_seeded(3, 7), backend=be)))  # odd last dim


def test_geglu_gradient_broadcast_dout():
    def grads(be):
        x = _seeded(3, 5, 8).requires_grad_(True)
        geglu(x, backend=be).sum().backward()  # dout is an expanded tensor of ones
        return x.grad

    _assert_same(_run_everywhere(grads))


# ------------------------------------------------------------------ attention


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided", "permuted"])
def test_attention_layouts(layout):
    q = _layouts(_seeded(1, 2, 9, 32))[layout]
    k = _layouts(_seeded(1, 2, 7, 32, seed=1))["permuted" if layout == "contiguous" else layout]
    v = _seeded(1, 2, 7, 32, seed=2).transpose(-1, -2).contiguous().transpose(-1, -2)
    _assert_same(_run_everywhere(lambda be: attention(q, k, v, backend=be)), rtol=1e-4, atol=1e-4)


def test_attention_expanded_zero_batch_and_errors():
    k = _seeded(1, 2, 7, 32).expand(3, 2, 7, 32)
    q = _seeded(3, 2, 5, 32, seed=1)
    _assert_same(_run_everywhere(lambda be: attention(q, k, k, backend=be)), rtol=1e-4, atol=1e-4)
    empty = torch.empty(0, 2, 5, 32)
    _assert_same(_run_everywhere(lambda be: attention(empty, empty, empty, backend=be)))
    no_keys = torch.empty(1, 2, 0, 32)
    _assert_same(_run_everywhere(lambda be: attention(q[:1], no_keys, no_keys, backend=be)))
    _assert_same(_run_everywhere(lambda be: attention(q, k.double(), k.double(), backend=be)))


# ------------------------------------------------------------------ sampling_step


def _update(e1, e2):
    return StepUpdate(X0From(0.9, -0.4), sample=0.7, x0=1.3, terms=((0.2, e1), (-0.5, e2)), noise=0.1)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided", "permuted"])
@pytest.mark.parametrize("guidance", [None, 3.0])
def test_sampling_step_layouts(layout, guidance):
    views = _layouts(_seeded(2, 4, 5, 3))
    x = views[layout]
    mo = _layouts(_seeded(4 if guidance else 2, 4, 5, 3, seed=1))["strided" if layout != "strided" else "channels_last"]
    e1, e2, z = views["permuted"], views["channels_last"], views["strided"]
    _assert_same(_run_everywhere(lambda be: sampling_step(
        x, mo, _update(e1, e2), noise=z, guidance_scale=guidance, clip=1.5, return_x0=True, backend=be)))


def test_sampling_step_expanded_zero_size_and_errors():
    x = _seeded(1, 4, 1, 3).expand(2, 4, 5, 3)
    mo = _seeded(2, 4, 5, 3, seed=1)
    _assert_same(_run_everywhere(lambda be: sampling_step(x, mo, _update(mo, x), backend=be)))
    empty = torch.empty(2, 4, 0, 3)
    _assert_same(_run_everywhere(lambda be: sampling_step(empty, empty, _update(None, None), return_x0=True,
                                                         backend=be)))
    bad = _seeded(3, 4, 5, 3)
    _assert_same(_run_everywhere(lambda be: sampling_step(x, bad, _update(None, None), backend=be)))
    _assert_same(_run_everywhere(lambda be: sampling_step(x, mo, _update(None, None), guidance_scale=2.0,
                                                         backend=be)))


def test_sampling_step_gradients_every_backend():
    views = _layouts(_seeded(2, 4, 5, 3))

    def grads(be):
        x = views["channels_last"].detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
        mo = _seeded(4, 4, 5, 3, seed=1).requires_grad_(True)
        e1 = _seeded(2, 4, 5, 3, seed=2).requires_grad_(True)
        out, x0 = sampling_step(x, mo, _update(e1, None), guidance_scale=2.5, clip=1.0, return_x0=True, backend=be)
        (out * views["strided"]).sum().backward(retain_graph=True)
        x0.sum().backward()
        return x.grad, mo.grad, e1.grad

    _assert_same(_run_everywhere(grads), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ vae_postprocess


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided", "permuted"])
@pytest.mark.parametrize("output", ["float", "uint8"])
def test_vae_postprocess_layouts(layout, output):
    x = _layouts(_seeded(2, 3, 5, 7))[layout]
    _assert_same(_run_everywhere(lambda be: vae_postprocess(x, output=output, backend=be)), rtol=0, atol=0)


def test_vae_postprocess_expanded_zero_size_and_errors():
    x = _seeded(1, 3, 1, 1).expand(2, 3, 4, 5)  # stride 0 in three dims
    for output in ("float", "uint8"):
        _assert_same(_run_everywhere(lambda be: vae_postprocess(x, output=output, backend=be)), rtol=0, atol=0)
        empty = torch.empty(2, 3, 0, 4).contiguous(memory_format=torch.channels_last)
        _assert_same(_run_everywhere(lambda be: vae_postprocess(empty, output=output, backend=be)))
    _assert_same(_run_everywhere(lambda be: vae_postprocess(_seeded(3, 4, 5), backend=be)))  # 3-D
    _assert_same(_run_everywhere(lambda be: vae_postprocess(x.double(), backend=be)))
    _assert_same(_run_everywhere(lambda be: vae_postprocess(x, output="pil", backend=be)))


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_vae_postprocess_gradients_layouts(layout):
    x0 = _layouts(_seeded(2, 3, 4, 5) * 1.5)[layout]
    dy = _layouts(_seeded(2, 3, 4, 5, seed=5))["permuted"]

    def grads(be):
        x = x0.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
        vae_postprocess(x, backend=be).backward(dy)
        return x.grad

    _assert_same(_run_everywhere(grads), rtol=0, atol=0)
