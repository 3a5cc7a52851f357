"""fastgen.ops.attention: every backend against the fp32 reference and SDPA."""

from __future__ import annotations

import subprocess
import textwrap

import pytest
import torch
import torch.nn.functional as F

import fastgen
from fastgen.ops import attention, attention_reference
from fastgen.ops.attention import TRITON_MAX_HEAD_DIM, _op as _attention

_attention_op = _attention.custom_op

from helpers import assert_lowp_close, all_backends, python

HEAD_DIMS = [32, 40, 64, 80, 96, 128, 160]
# (B, H, Nq, Nk): single tokens, text-length cross-attention, odd self-attention,
# and B*H from 1 to 16.
SIZES = [(1, 1, 1, 77), (2, 3, 77, 1), (1, 2, 333, 333), (2, 8, 33, 77)]


def _backends_for(d: int, dtype: torch.dtype) -> list[str]:
    names = all_backends()
    if d > TRITON_MAX_HEAD_DIM and "triton" in names:
        names.remove("triton")
    return names


def _qkv(b, h, nq, nk, d, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, h, nq, d, generator=g) * scale).to(dtype)
    k = (torch.randn(b, h, nk, d, generator=g) * scale).to(dtype)
    v = torch.randn(b, h, nk, d, generator=g).to(dtype)
    return q, k, v


def _check(backend, q, k, v, scale=None):
    out = attention(q, k, v, scale=scale, backend=backend)
    assert out.shape == q.shape and out.dtype == q.dtype
    ref = attention_reference(q.float(), k.float(), v.float(), scale)
    if q.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-5)
    else:
        sdpa = F.scaled_dot_product_attention(q, k, v, scale=scale)
        assert_lowp_close(out, ref, sdpa, what=f"{backend} {q.dtype}")


@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
def test_forward_fp32(d, size):
    q, k, v = _qkv(*size, d, torch.float32)
    for backend in _backends_for(d, torch.float32):
        _check(backend, q, k, v)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("d", [40, 64, 160])
def test_forward_low_precision(dtype, d):
    q, k, v = _qkv(2, 2, 77, 77, d, dtype)
    for backend in _backends_for(d, dtype):
        if backend == "triton" and dtype == torch.bfloat16 and not torch.cuda.is_available():
            # Seen with triton 3.9: the interpreter's tl.dot on bf16 operands returns
            # garbage, so bf16 Triton attention is verified by the GPU tests only.
            continue
        _check(backend, q, k, v)


@pytest.mark.parametrize("backend", [b for b in all_backends() if b != "triton"])
def test_vae_single_head_512(backend):
    q, k, v = _qkv(1, 1, 64, 64, 512, torch.float32)
    _check(backend, q, k, v)


@pytest.mark.parametrize("backend", all_backends())
def test_large_logits_do_not_overflow(backend):
    # scale * |q.k| around 1e4: a softmax without the running max overflows exp.
    q, k, v = _qkv(1, 2, 45, 77, 64, torch.float32, scale=12.0)
    out = attention(q, k, v, backend=backend)
    assert torch.isfinite(out).all()
    # Logits near 1e4 carry fp32 rounding of ~1e-3 into the softmax: judge the
    # kernel against fp64 by the error SDPA itself makes in fp32.
    scale = q.shape[-1] ** -0.5
    ref64 = torch.softmax(q.double() @ k.double().transpose(-1, -2) * scale, -1) @ v.double()
    assert_lowp_close(out, ref64, F.scaled_dot_product_attention(q, k, v), what=backend)
    q16, k16, v16 = (t.half() for t in (q, k, v))
    assert torch.isfinite(attention(q16, k16, v16, backend=backend)).all()


@pytest.mark.parametrize("backend", all_backends())
def test_custom_scale(backend):
    q, k, v = _qkv(1, 2, 19, 23, 40, torch.float32)
    _check(backend, q, k, v, scale=0.37)


# ----------------------------------------------------------------- backward


def _grads(fn, q, k, v, do):
    qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    fn(qq, kk, vv).backward(do)
    return qq.grad, kk.grad, vv.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("d,size", [(40, (1, 2, 77, 77)), (64, (2, 1, 33, 77)), (160, (1, 1, 50, 17))])
def test_backward(dtype, d, size):
    q, k, v = _qkv(*size, d, dtype, seed=3)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(4)).to(dtype)
    ref = _grads(lambda q, k, v: attention_reference(q, k, v), q.double(), k.double(), v.double(), do.double())
    lowp = _grads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), q, k, v, do)
    for backend in _backends_for(d, dtype):
        got = _grads(lambda q, k, v: attention(q, k, v, backend=backend), q, k, v, do)
        for name, g, r, t in zip(("dq", "dk", "dv"), got, ref, lowp):
            assert g.dtype == dtype, name
            if dtype == torch.float32:
                torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-4, msg=lambda m: f"{backend} {name}: {m}")
            else:
                assert_lowp_close(g, r, t, what=f"{backend} {name}")


# ------------------------------------------------ custom op / torch.compile


@pytest.mark.parametrize("backend", all_backends())
def test_opcheck(backend):
    q, k, v = _qkv(1, 2, 9, 7, 32, torch.float32)
    torch.library.opcheck(_attention_op, (q.requires_grad_(True), k, v, 0.2, backend))


def test_torch_compile_matches_eager():
    def f(q, k, v):
        return attention(q, k, v).sum(dim=1)

    q, k, v = _qkv(1, 2, 16, 16, 32, torch.float32)
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(q, k, v), f(q, k, v))


# ------------------------------------------------------------------ memory


@pytest.mark.skipif("cpu" not in all_backends(), reason="needs the C++ extension")
def test_no_score_matrix_in_memory():
    # A (2, 8, 16384, 64) fp32 score matrix is 8 GiB; q, k, v and o are 64 MiB
    # each. Run in a fresh process so the peak RSS belongs to this call alone.
    code = textwrap.dedent(
        """
        import resource, torch
        from fastgen.ops import attention
        torch.manual_seed(0)
        q, k, v = (torch.randn(2, 8, 16384, 64) for _ in range(3))
        for backend in ("cpu", None):
            o = attention(q, k, v, backend=backend)
            assert torch.isfinite(o).all()
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
        """
    )
    out = subprocess.run([python(), "-c", code], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    peak_mib = int(out.stdout.strip().splitlines()[-1])
    assert peak_mib < 2048, f"peak RSS {peak_mib} MiB: something materialised the score matrix"


# -------------------------------------------------------------- dispatch


def test_automatic_choice_is_valid_and_matches():
    q, k, v = _qkv(2, 8, 64, 77, 40, torch.float32)
    torch.testing.assert_close(attention(q, k, v), attention_reference(q, k, v), rtol=1e-5, atol=2e-5)


def test_triton_refuses_head_dim_512_by_name():
    if "triton" not in all_backends():
        pytest.skip("triton unavailable")
    q, k, v = _qkv(1, 1, 8, 8, 512, torch.float32)
    with pytest.raises(fastgen.BackendUnavailable, match="head dims up to"):
        attention(q, k, v, backend="triton")


# -------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "shapes,dtypes,exc,match",
    [
        (((1, 2, 4, 40), (1, 2, 4, 64), (1, 2, 4, 64)), None, ValueError, "k and v|head dim"),
        (((1, 2, 4, 40), (1, 3, 4, 40), (1, 3, 4, 40)), None, ValueError, "batch and heads"),
        (((2, 2, 4, 40), (1, 2, 4, 40), (1, 2, 4, 40)), None, ValueError, "batch and heads"),
        (((2, 4, 40), (2, 4, 40), (2, 4, 40)), None, ValueError, "4-D"),
        (((1, 1, 4, 48), (1, 1, 4, 48), (1, 1, 4, 48)), None, ValueError, "head dim 48"),
        (((1, 1, 4, 40), (1, 1, 5, 40), (1, 1, 6, 40)), None, ValueError, "same shape"),
        (((1, 1, 4, 40),) * 3, (torch.int32,) * 3, TypeError, "dtype"),
        (((1, 1, 4, 40),) * 3, (torch.float32, torch.float16, torch.float16), TypeError, "one dtype"),
    ],
)
def test_bad_input_raises_clear_error(shapes, dtypes, exc, match):
    dtypes = dtypes or (torch.float32,) * 3
    q, k, v = (torch.ones(s, dtype=dt) for s, dt in zip(shapes, dtypes))
    with pytest.raises(exc, match=match):
        attention(q, k, v)


def test_mixed_devices_raise():
    q = torch.randn(1, 1, 4, 40)
    with pytest.raises(ValueError, match="device"):
        attention(q, q.to("meta"), q)


# ---------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("nq,nk", [(4096, 4096), (4096, 77), (333, 333), (1, 77)])
def test_gpu_forward(backend, dtype, d, nq, nk):
    q, k, v = (t.cuda() for t in _qkv(2, 8, nq, nk, d, dtype))
    _check(backend, q, k, v)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("d", [40, 64, 80, 160])
def test_gpu_backward(dtype, d):
    q, k, v = (t.cuda() for t in _qkv(2, 4, 333, 77, d, dtype))
    do = torch.randn_like(q)
    ref = _grads(lambda q, k, v: attention_reference(q, k, v), q.float(), k.float(), v.float(), do.float())
    lowp = _grads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), q, k, v, do)
    got = _grads(lambda q, k, v: attention(q, k, v, backend="triton"), q, k, v, do)
    for g, r, t in zip(got, ref, lowp):
        assert_lowp_close(g, r, t)
