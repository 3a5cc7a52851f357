"""The CPU kernels' instruction-set variants (csrc/cpu/dispatch.h).

Every op's CPU kernel runs under every variant this machine can run
(``fastgen._C.cpu_isas_supported()``), against a plain torch reference and
against the portable variant (tight tolerances: the variants differ only in
vector width, FMA contraction and the order of partial sums). The
FASTGEN_CPU_ISA variable is checked in subprocesses, since it is read when
fastgen._C is imported.
"""

from __future__ import annotations

import os
import subprocess

import pytest
import torch
import torch.nn.functional as F

from fastgen.ops._conv2d_cpu_choice import pack_weight
from helpers import python

C = pytest.importorskip("fastgen._C", reason="the C++ extension is not built")

ISAS = C.cpu_isas_supported()
NAMES = C.cpu_isa_names()


@pytest.fixture(params=ISAS)
def isa(request):
    before = C.cpu_isa()
    assert C.set_cpu_isa(request.param) == request.param
    assert C.cpu_isa() == request.param
    yield request.param
    C.set_cpu_isa(before)


def run_under(name, fn):
    before = C.cpu_isa()
    C.set_cpu_isa(name)
    try:
        return fn()
    finally:
        C.set_cpu_isa(before)


def per_variant(fn):
    """{variant: fn()} for every variant this machine runs."""
    return {name: run_under(name, fn) for name in ISAS}


def assert_variants_agree(results, rtol, atol):
    ref = results["portable"]
    for name, got in results.items():
        for a, b in zip(got, ref):
            if a is None:
                continue
            torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=atol, msg=lambda m: f"{name} vs portable: {m}")


def tol(dtype):
    # vs the fp32 reference: the output rounding of the dtype plus fp32 noise
    return {torch.float32: (2e-5, 2e-5), torch.bfloat16: (1.6e-2, 1e-2), torch.float16: (2e-3, 2e-3)}[dtype]


def variant_tol(dtype):
    # between variants: fp32 noise, or one rounding step of a 16-bit output
    return {torch.float32: (1e-5, 1e-5), torch.bfloat16: (8e-3, 8e-3), torch.float16: (1e-3, 1e-3)}[dtype]


def randn(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


# ------------------------------------------------------------ the variants


def test_portable_is_always_there_and_the_default_is_the_best():
    assert NAMES == ["portable", "avx2", "avx512", "avx512_bf16"]
    assert ISAS[0] == "portable"
    assert set(ISAS) <= set(C.cpu_isas_built()) <= set(NAMES)
    env = os.environ.get("FASTGEN_CPU_ISA", "")
    if env in ("", "auto"):
        assert C.cpu_isa() == ISAS[-1]


def test_set_cpu_isa_rejects_unknown_and_unrunnable():
    before = C.cpu_isa()
    with pytest.raises(ValueError, match="unknown CPU ISA"):
        C.set_cpu_isa("sse9")
    for name in NAMES:
        if name not in ISAS:
            with pytest.raises(ValueError):
                C.set_cpu_isa(name)
    assert C.cpu_isa() == before
    assert C.set_cpu_isa("auto") == ISAS[-1]
    C.set_cpu_isa(before)


# ------------------------------------------------------------------- geglu


def _geglu_ref(x, dout, tanh):
    xr = x.double().requires_grad_(True)
    h, g = xr.chunk(2, dim=-1)
    out = h * F.gelu(g, approximate="tanh" if tanh else "none")
    out.backward(dout.double())
    return out.detach(), xr.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tanh", [False, True])
@pytest.mark.parametrize("shape", [(3, 70), (2, 5, 2 * 517), (1, 2 * 8)])
def test_geglu(isa, dtype, tanh, shape):
    x = (randn(*shape) * 3).to(dtype)
    x.view(-1)[:4] = torch.tensor([0.0, -30.0, 30.0, -1.0]).to(dtype)  # tails and the |z| = 1 seam
    dout = randn(*shape[:-1], shape[-1] // 2, seed=1).to(dtype)
    out = C.geglu_fwd_cpu(x, tanh)
    dx = C.geglu_bwd_cpu(dout, x, tanh)
    ref_out, ref_dx = _geglu_ref(x, dout, tanh)
    rtol, atol = tol(dtype)
    torch.testing.assert_close(out.double(), ref_out, rtol=rtol, atol=atol, check_dtype=False)
    torch.testing.assert_close(dx.double(), ref_dx, rtol=rtol, atol=atol, check_dtype=False)
    assert out.dtype == dtype and dx.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_geglu_variants_agree(dtype):
    x = (randn(4, 3, 2 * 300) * 2).to(dtype)
    dout = randn(4, 3, 300, seed=2).to(dtype)
    res = per_variant(lambda: (C.geglu_fwd_cpu(x, False), C.geglu_bwd_cpu(dout, x, False), C.geglu_fwd_cpu(x, True)))
    assert_variants_agree(res, *variant_tol(dtype))


# -------------------------------------------------------------- group_norm


def _gn_ref(x, G, w, b, eps, silu, res, dy):
    xr = x.double().requires_grad_(True)
    wr = w.double().requires_grad_(True)
    br = b.double().requires_grad_(True)
    y = F.group_norm(xr, G, wr, br, eps)
    if silu:
        y = F.silu(y)
    if res is not None:
        y = y + res.double()
    y.backward(dy.double())
    return y.detach(), xr.grad, wr.grad, br.grad


GN_CASES = [
    ((2, 32, 8, 8), 8, False),  # contiguous
    ((2, 32, 8, 8), 8, True),  # channels-last
    ((1, 64, 5, 7), 32, True),  # fewer (n, g) than usual, odd spatial size
    ((3, 12, 33), 4, False),  # 1 spatial dim, tails
    ((2, 40), 5, False),  # no spatial dims (S == 1)
    ((1, 16, 2, 3, 4), 4, True),  # 3 spatial dims
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("shape,G,cl", GN_CASES)
def test_group_norm(isa, dtype, silu, shape, G, cl):
    x = (randn(*shape) * 2 + 0.5).to(dtype)
    if cl and x.dim() >= 4:
        x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    elif cl:
        x = x.transpose(1, -1).contiguous().transpose(1, -1)
    C_ = shape[1]
    w = randn(C_, seed=3) * 0.5 + 1
    b = randn(C_, seed=4) * 0.1
    res = torch.empty_strided(x.shape, x.stride(), dtype=dtype).copy_(randn(*shape, seed=5)) if silu else None
    dy = torch.empty_strided(x.shape, x.stride(), dtype=dtype).copy_(randn(*shape, seed=6))
    y, mean, rstd = C.group_norm_fwd_cpu(x, w, b, res, G, 1e-5, silu)
    assert y.stride() == x.stride() and y.dtype == dtype
    dx, dw, db = C.group_norm_bwd_cpu(dy, x, w, b, mean, rstd, G, silu)
    assert dx.stride() == x.stride()
    ry, rdx, rdw, rdb = _gn_ref(x, G, w, b, 1e-5, silu, res, dy)
    rtol, atol = tol(dtype)
    torch.testing.assert_close(y.double(), ry, rtol=rtol, atol=atol * 4, check_dtype=False)
    xd = x.double().reshape(shape[0], G, -1)
    torch.testing.assert_close(mean.double(), xd.mean(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rstd.double(), (xd.var(-1, unbiased=False) + 1e-5).rsqrt(), rtol=1e-4, atol=1e-5)
    gtol = {torch.float32: 1e-4, torch.bfloat16: 4e-2, torch.float16: 1e-2}[dtype]
    torch.testing.assert_close(dx.double(), rdx, rtol=gtol, atol=gtol * 4, check_dtype=False)
    scale = max(1.0, rdw.abs().max().item())
    torch.testing.assert_close(dw.double(), rdw, rtol=gtol, atol=gtol * scale * 4, check_dtype=False)
    torch.testing.assert_close(db.double(), rdb, rtol=gtol, atol=gtol * scale * 4, check_dtype=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cl", [False, True])
def test_group_norm_variants_agree(dtype, cl):
    x = (randn(2, 64, 9, 9) * 3 + 1).to(dtype)
    if cl:
        x = x.to(memory_format=torch.channels_last)
    w, b = randn(64, seed=1) + 1, randn(64, seed=2)
    dy = torch.empty_like(x).copy_(randn(2, 64, 9, 9, seed=3))

    def run():
        y, mean, rstd = C.group_norm_fwd_cpu(x, w, b, None, 32, 1e-6, True)
        return (y, mean, rstd) + tuple(C.group_norm_bwd_cpu(dy, x, w, b, mean, rstd, 32, True))

    rtol, atol = variant_tol(dtype)
    assert_variants_agree(per_variant(run), rtol, atol * 10)


# --------------------------------------------------------------- attention


def _attn_ref(q, k, v, scale, do):
    qr, kr, vr = (t.double().requires_grad_(True) for t in (q, k, v))
    s = (qr @ kr.transpose(-1, -2)) * scale
    lse = torch.logsumexp(s, dim=-1)
    o = torch.softmax(s, dim=-1) @ vr
    o.backward(do.double())
    return o.detach(), lse.detach(), qr.grad, kr.grad, vr.grad


ATTN_SHAPES = [(1, 2, 37, 45, 40), (2, 1, 64, 64, 64), (1, 1, 5, 130, 16), (1, 2, 19, 23, 8), (1, 1, 70, 33, 80)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,H,Nq,Nk,D", ATTN_SHAPES)
def test_attention(isa, dtype, B, H, Nq, Nk, D):
    q = randn(B, H, Nq, D, seed=1).to(dtype)
    k = randn(B, H, Nk, D, seed=2).to(dtype)
    v = randn(B, H, Nk, D, seed=3).to(dtype)
    do = randn(B, H, Nq, D, seed=4).to(dtype)
    scale = D**-0.5
    o, lse = C.attention_fwd_cpu(q, k, v, scale)
    dq, dk, dv = C.attention_bwd_cpu(do, q, k, v, o, lse, scale)
    ro, rlse, rdq, rdk, rdv = _attn_ref(q, k, v, scale, do)
    t = {torch.float32: 2e-4, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(o.double(), ro, rtol=t, atol=t, check_dtype=False)
    torch.testing.assert_close(lse.double(), rlse, rtol=1e-4, atol=1e-4 if dtype == torch.float32 else 3e-2)
    for got, want in ((dq, rdq), (dk, rdk), (dv, rdv)):
        torch.testing.assert_close(got.double(), want, rtol=t * 2, atol=t * 2, check_dtype=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_variants_agree(dtype):
    q, k, v, do = (randn(1, 2, 50, 64, seed=s).to(dtype) for s in range(4))

    def run():
        o, lse = C.attention_fwd_cpu(q, k, v, 0.125)
        return (o, lse) + tuple(C.attention_bwd_cpu(do, q, k, v, o, lse, 0.125))

    res = per_variant(run)
    if dtype == torch.bfloat16 and "avx512_bf16" in res:
        # vdpbf16ps rounds P and dS to bf16 before the GEMMs (as SDPA does):
        # compare that path with the reference only (test_attention).
        del res["avx512_bf16"]
    rtol, atol = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1.6e-2, 1.6e-2)}[dtype]
    assert_variants_agree(res, rtol, atol)


# ----------------------------------------------------------- sampling_step


def _step_ref(x, mo, coeffs, e1, e2, nz, g, clip):
    f = lambda t: None if t is None else t.float()
    x, mo, e1, e2, nz = map(f, (x, mo, e1, e2, nz))
    n = x.shape[0]
    c = coeffs.expand(n, 7).reshape(n, 7, *([1] * (x.dim() - 1)))
    e = mo
    if g is not None:
        u, cond = mo[:n], mo[n:]
        e = u + g * (cond - u)
    x0 = c[:, 0] * x + c[:, 1] * e
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    out = c[:, 2] * x + c[:, 3] * x0
    for k, t in ((4, e1), (5, e2), (6, nz)):
        if t is not None:
            out = out + c[:, k] * t
    return out, x0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cfg", [False, True])
@pytest.mark.parametrize("full", [False, True])
def test_sampling_step(isa, dtype, cfg, full):
    N, shape = 2, (4, 9, 11)
    x = randn(N, *shape).to(dtype)
    mo = randn(2 * N if cfg else N, *shape, seed=1).to(dtype)
    coeffs = randn(N, 7, seed=2)
    e1 = randn(N, *shape, seed=3).to(dtype) if full else None
    e2 = randn(N, *shape, seed=4) if full else None  # fp32 beside a 16-bit sample
    nz = randn(N, *shape, seed=5).to(dtype) if full else None
    g = 7.5 if cfg else None
    clip = 1.5 if full else None
    out, x0 = C.sampling_step_cpu(x, mo, coeffs, e1, e2, nz, g, clip, True)
    ro, rx0 = _step_ref(x, mo, coeffs, e1, e2, nz, g, clip)
    if dtype == torch.float32:
        torch.testing.assert_close(out, ro, rtol=0, atol=0)  # bit-identical by design
        torch.testing.assert_close(x0, rx0, rtol=0, atol=0)
    else:
        torch.testing.assert_close(out, ro.to(dtype), rtol=0, atol=0)
        torch.testing.assert_close(x0, rx0.to(dtype), rtol=0, atol=0)


def test_sampling_step_channels_last_keeps_layout(isa):
    x = randn(2, 4, 6, 6).to(memory_format=torch.channels_last)
    mo = torch.empty_like(x).copy_(randn(2, 4, 6, 6, seed=1))
    out, x0 = C.sampling_step_cpu(x, mo, randn(7, seed=2), None, None, None, None, None, False)
    assert x0 is None and out.stride() == x.stride()
    torch.testing.assert_close(out, _step_ref(x, mo, randn(7, seed=2), None, None, None, None, None)[0], rtol=0, atol=0)


# --------------------------------------------------------- vae_postprocess


def _vae_ref(x, dy):
    xr = x.float().requires_grad_(True)
    y = (xr / 2 + 0.5).clamp(0, 1)
    y.backward(dy.float())
    img = (y.detach() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    return y.detach().to(x.dtype), img, xr.grad.to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cl", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 17, 23), (1, 4, 9, 65), (1, 1, 5, 7), (3, 5, 1, 1)])
def test_vae_postprocess(isa, dtype, cl, shape):
    x = (randn(*shape) * 0.8).to(dtype)
    x.view(-1)[:4] = torch.tensor([-1.0, 1.0, 3.0, -3.0]).to(dtype)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    dy = torch.empty_like(x).copy_(randn(*shape, seed=1))
    y = C.vae_postprocess_fwd_cpu(x, False)
    img = C.vae_postprocess_fwd_cpu(x, True)
    dx = C.vae_postprocess_bwd_cpu(dy, x)
    ry, rimg, rdx = _vae_ref(x, dy)
    assert y.stride() == x.stride() and dx.stride() == x.stride() and img.is_contiguous()
    # bit-identical on every variant: no reductions, one rounding per output
    assert torch.equal(y, ry) and torch.equal(img, rimg) and torch.equal(dx, rdx)


def test_vae_postprocess_variants_agree():
    x = randn(2, 3, 40, 50) * 0.9
    res = per_variant(lambda: (C.vae_postprocess_fwd_cpu(x, False), C.vae_postprocess_fwd_cpu(x, True),
                               C.vae_postprocess_bwd_cpu(x, x)))
    for name, got in res.items():
        for a, b in zip(got, res["portable"]):
            assert torch.equal(a, b), name


# ---------------------------------------------------------------- bias_act


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cl", [False, True])
@pytest.mark.parametrize("act", range(10))
def test_bias_act(isa, dtype, cl, act):
    from fastgen.ops.bias_act import _reference_fwd, _reference_grad

    x = (randn(3, 20, 7, 9) * 3).to(dtype)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    dy = torch.empty_like(x).copy_(randn(3, 20, 7, 9, seed=1))
    b = randn(20, seed=2)
    y = C.bias_act_fwd_cpu(x, b, 1, act, 0.2, 1.3, 2.5)
    assert y.stride() == x.stride()
    tol = dict(rtol=2e-6, atol=2e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(y.float(), _reference_fwd(x.double(), b.double(), 1, act, 0.2, 1.3, 2.5).float(),
                               **tol)
    for order in (1, 2):
        dx, db = C.bias_act_grad_cpu(dy, x, b, 1, act, 0.2, 1.3, 2.5, order)
        rdx, rdb = _reference_grad(dy.double(), x.double(), b.double(), 1, act, 0.2, 1.3, 2.5, order)
        assert dx.stride() == x.stride() and db.dtype == torch.float32
        torch.testing.assert_close(dx.float(), rdx.float(), **tol)
        torch.testing.assert_close(db.double(), rdb, rtol=2e-5, atol=2e-4)


def test_bias_act_variants_agree():
    x = randn(4, 32, 40, 50) * 3
    b = randn(32, seed=1)
    res = per_variant(lambda: (C.bias_act_fwd_cpu(x, b, 1, 6, 0.0, 1.0, -1.0),
                               *C.bias_act_grad_cpu(x, x, b, 1, 5, 0.0, 1.4, -1.0, 2)))
    assert_variants_agree(res, rtol=1e-6, atol=1e-6)


# ----------------------------------------------- preconditions, not copies


def test_entry_points_reject_layouts_instead_of_copying():
    x = randn(2, 8, 4, 4)
    w, b = torch.ones(8), torch.zeros(8)
    with pytest.raises(RuntimeError, match="contiguous or channels-last"):
        C.group_norm_fwd_cpu(x.transpose(2, 3), w, b, None, 4, 1e-5, False)
    with pytest.raises(RuntimeError, match="strides"):
        C.group_norm_fwd_cpu(x, w, b, x.to(memory_format=torch.channels_last), 4, 1e-5, False)
    with pytest.raises(RuntimeError, match="contiguous"):
        C.group_norm_fwd_cpu(x, torch.ones(16)[::2], b, None, 4, 1e-5, False)
    with pytest.raises(RuntimeError, match="contiguous"):
        C.geglu_fwd_cpu(randn(4, 6).t(), False)
    with pytest.raises(RuntimeError, match="contiguous or channels-last"):
        C.vae_postprocess_fwd_cpu(x.transpose(2, 3), True)
    with pytest.raises(RuntimeError, match="strides"):
        C.vae_postprocess_bwd_cpu(x.to(memory_format=torch.channels_last), x)
    with pytest.raises(RuntimeError, match="contiguous"):
        C.attention_fwd_cpu(randn(1, 1, 4, 8).transpose(2, 3), randn(1, 1, 8, 4), randn(1, 1, 8, 4), 1.0)
    s = randn(2, 3, 4)
    with pytest.raises(RuntimeError, match="batch dim outermost"):
        C.sampling_step_cpu(s.transpose(0, 1).contiguous().transpose(0, 1), s, randn(7), None, None, None, None, None, False)
    with pytest.raises(RuntimeError, match="strides"):
        C.sampling_step_cpu(s, s.transpose(1, 2).contiguous().transpose(1, 2), randn(7), None, None, None, None, None, False)


# ---------------------------------------------------------- FASTGEN_CPU_ISA


def _run_with_env(value, code):
    env = dict(os.environ)
    env["FASTGEN_CPU_ISA"] = value
    return subprocess.run([python(), "-c", code], capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize("name", ISAS)
def test_env_forces_a_variant(name):
    out = _run_with_env(name, "import fastgen._C as C; print(C.cpu_isa())")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == name


def test_env_above_the_cpu_falls_back_with_a_warning():
    above = [n for n in NAMES if n not in ISAS]
    if not above:
        pytest.skip("this machine runs every variant")
    out = _run_with_env(above[-1], "import warnings; warnings.simplefilter('always'); import fastgen._C as C; print(C.cpu_isa())")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ISAS[-1]
    assert "FASTGEN_CPU_ISA" in out.stderr and "RuntimeWarning" in out.stderr


def test_env_unknown_value_is_an_error():
    out = _run_with_env("avx9000", "import fastgen._C")
    assert out.returncode != 0
    assert "FASTGEN_CPU_ISA=avx9000" in out.stderr and "portable" in out.stderr


def test_env_auto_is_the_default():
    out = _run_with_env("auto", "import fastgen._C as C; print(C.cpu_isa())")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ISAS[-1]


def test_info_shows_the_isa():
    out = _run_with_env("portable", "from fastgen.cli import main; main(['info'])")
    assert out.returncode == 0, out.stderr
    line = next(l for l in out.stdout.splitlines() if l.strip().startswith("cpu isa"))
    assert "portable" in line
    built = next(l for l in out.stdout.splitlines() if "cpu isas" in l)
    assert all(n in built for n in C.cpu_isas_built())


def test_per_isa_sources_include_no_torch_headers():
    # csrc/cpu/kernels/common.h: the per-ISA objects share no inline code with
    # the baseline, so they must not include ATen / c10 / torch headers.
    from helpers import ROOT

    for path in sorted((ROOT / "csrc" / "cpu" / "kernels").iterdir()):
        for line in path.read_text().splitlines():
            if line.startswith("#include"):
                assert not any(h in line for h in ("ATen/", "c10/", "torch/", '"ops.h"')), f"{path.name}: {line}"


@pytest.mark.skipif(not __import__("shutil").which("objdump"), reason="objdump not found")
def test_only_the_isa_variants_use_wide_instructions():
    # The extension must run on any x86-64 CPU: AVX (VEX / EVEX encoded,
    # v-prefixed mnemonics) only inside fastgen::cpu::avx2 / avx512 /
    # avx512_bf16, and zmm registers only inside the avx512 ones.
    import platform
    import re

    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("x86-64 only")
    out = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", C.__file__], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    bad_vex, bad_zmm = set(), set()
    fn = ""
    head = re.compile(r"^[0-9a-f]+ <(.*)>:$")
    for line in out.stdout.splitlines():
        m = head.match(line)
        if m:
            fn = m.group(1)
            continue
        parts = line.split("\t")
        if len(parts) < 2:
            continue
        insn = parts[1]
        if insn.startswith("v") and "fastgen::cpu::avx" not in fn:
            bad_vex.add(fn)
        if "zmm" in line and "fastgen::cpu::avx512" not in fn:
            bad_zmm.add(fn)
    assert not bad_vex, f"AVX instructions outside the ISA variants: {sorted(bad_vex)[:10]}"
    assert not bad_zmm, f"AVX-512 registers outside the avx512 variants: {sorted(bad_zmm)[:10]}"


def test_cpu_kernel_is_fast():
    for name in ISAS:
        def check():
            for op in ("geglu", "group_norm", "attention", "sampling_step", "vae_postprocess", "bias_act"):
                for dt in ("float32", "float16", "bfloat16"):
                    fast = C.cpu_kernel_is_fast(op, dt)
                    portable_fast = op == "sampling_step" or (op == "vae_postprocess" and dt == "float32")
                    assert fast == (name != "portable" or portable_fast), (name, op, dt)
        run_under(name, check)
    with pytest.raises(ValueError):
        C.cpu_kernel_is_fast("conv", "float32")
    with pytest.raises(ValueError):
        C.cpu_kernel_is_fast("geglu", "float64")


def test_automatic_choice_takes_eager_where_the_variant_is_slower():
    # On the portable variant only sampling_step's kernel beats eager PyTorch (the extension says so),
    # so the automatic choice takes the torch backend for the others there; a named backend still runs
    # the kernel.
    from fastgen import _backend
    from fastgen.ops import geglu

    cpu = torch.device("cpu")

    def choices():
        return {op: _backend.resolve(op, cpu, dtype=torch.float32)
                for op in ("geglu", "group_norm", "attention", "sampling_step")}

    best = C.cpu_isa()
    portable = run_under("portable", choices)
    assert portable == {"geglu": "torch", "group_norm": "torch", "attention": "torch", "sampling_step": "cpu"}
    x = torch.randn(3, 70)
    want = geglu(x, backend="torch")
    torch.testing.assert_close(run_under("portable", lambda: geglu(x, backend="cpu")), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(run_under("portable", lambda: geglu(x)), want, rtol=0, atol=0)
    if best != "portable":
        assert choices() == dict.fromkeys(portable, "cpu")
    # vae_postprocess: the portable kernel is used for fp32 only (software fp16, slow bf16 float output)
    vae = lambda: {dt: _backend.resolve("vae_postprocess", cpu, dtype=dt)
                   for dt in (torch.float32, torch.float16, torch.bfloat16)}
    assert run_under("portable", vae) == {torch.float32: "cpu", torch.float16: "torch", torch.bfloat16: "torch"}
    if best != "portable":
        assert set(vae().values()) == {"cpu"}


# ----------------------------------------------------------------- conv2d


@pytest.mark.parametrize("algo", ["winograd4", "winograd2", "direct_fp32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_conv2d_variants_agree(algo, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 19, 9, 10, generator=g).to(dtype)
    w = (torch.randn(13, 19, 3, 3, generator=g) / 13).to(dtype)
    b = torch.randn(13, generator=g)
    res = torch.randn(2, 13, 9, 10, generator=g).to(dtype)
    packed = pack_weight(w, algo) if algo.startswith("winograd") else None

    def run():
        outs = []
        for xi, ri in ((x, res), (x.to(memory_format=torch.channels_last), res.to(memory_format=torch.channels_last))):
            outs.append(C.conv2d_fwd_cpu(xi, w, b, ri, packed, 1, 1, 1, 1, 1, 1, 0.5, algo))
        return outs

    results = per_variant(run)
    assert_variants_agree(results, rtol=1e-5, atol=1e-5 if dtype == torch.float32 else 1e-2)
