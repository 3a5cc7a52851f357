"""Fused sampler step: every native backend against the torch reference.

Backends under test (kernel level, i.e. the entry points that
``fastgen._backend.native_kernel("sampling", "sampling_step", backend)``
returns):

* ``triton``: kernels/sampling.py, on CUDA tensors when there is a GPU and on
  CPU tensors under the Triton interpreter otherwise (TRITON_INTERPRET=1 is
  set below, before triton is imported, when there is no GPU);
* ``cpu``: ``fastgen._C.sampling_step_cpu``; skipped when the extension is
  missing or predates the op. With FASTGEN_TEST_JIT_SAMPLING=1 the test builds
  csrc/cpu/sampling.cpp itself with torch.utils.cpp_extension.load instead
  (about a minute), to test the source tree without reinstalling;
* ``cuda``: ``fastgen._C.sampling_step_cuda`` when there is a GPU.

The kernels compute in the reference's order without FMA contraction, so in
practice they are bit-identical to it; the tolerances below still allow one
ulp of the output dtype so that a platform that rounds differently somewhere
does not fail spuriously.

(tests/test_cuda_compile.py compiles csrc/cuda/sampling.cu with nvcc.) Also the public op (``fastgen.ops.sampling``) on every backend it
declares in ``_supported_backends()``.
"""

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Must happen before triton is first imported (for the jit decorators).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastgen import _backend  # noqa: E402
from fastgen.ops import sampling as sampling_ops  # noqa: E402
from fastgen.ops.sampling import _reference_step  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Sizes with per-sample element counts that are odd, not a multiple of the
# vector width (8) or of a block, and a 1-element-per-sample case.
SHAPES = [(1, 4, 8, 8), (3, 4, 7, 13), (2, 16, 5, 5), (3, 5, 7), (5, 3, 3, 3), (4, 1)]
# Tolerance per output dtype: one ulp (plus a little for fp32).
TOL = {
    torch.float32: dict(rtol=2e-6, atol=2e-6),
    torch.float16: dict(rtol=1e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=8e-3, atol=8e-3),
}


# ------------------------------------------------------------------ backends


def _jit_cpu_module(tmp_dir: Path):
    from torch.utils.cpp_extension import load

    bind = tmp_dir / "bind.cpp"
    bind.write_text(
        '#include <torch/extension.h>\n#include "ops.h"\n'
        "PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {\n"
        '  m.def("sampling_step_cpu", &fastgen::sampling_step_cpu);\n}\n'
    )
    build = tmp_dir / "build"
    build.mkdir(exist_ok=True)
    return load(
        name="fastgen_sampling_test_jit",
        sources=[str(bind), str(ROOT / "csrc" / "cpu" / "sampling.cpp")],
        extra_include_paths=[str(ROOT / "csrc")],
        extra_cflags=["-O3", "-march=native", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        build_directory=str(build),
    )


def _triton_kernel():
    why = _backend.unavailable_reason("triton", torch.device(DEVICE))
    if why is not None:
        pytest.skip(f"triton: {why}")
    from fastgen.kernels.sampling import sampling_step

    return sampling_step


@pytest.fixture(scope="module", params=["triton", "cpu", "cuda"])
def kernel(request, tmp_path_factory):
    """(launcher, device) for one backend."""
    name = request.param
    if name == "triton":
        return _triton_kernel(), DEVICE
    if name == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("cuda: no GPU")
        ext = _backend.extension()
        if ext is None or not hasattr(ext, "sampling_step_cuda"):
            pytest.skip("cuda: fastgen._C has no sampling_step_cuda")
        return ext.sampling_step_cuda, "cuda"
    ext = _backend.extension()
    if ext is not None and hasattr(ext, "sampling_step_cpu"):
        return ext.sampling_step_cpu, "cpu"
    if os.environ.get("FASTGEN_TEST_JIT_SAMPLING") == "1":
        return _jit_cpu_module(tmp_path_factory.mktemp("sampling_jit")).sampling_step_cpu, "cpu"
    reason = "fastgen._C is not available" if ext is None else "fastgen._C has no sampling_step_cpu"
    pytest.skip(f"cpu: {reason} (FASTGEN_TEST_JIT_SAMPLING=1 builds it for the test)")


# ------------------------------------------------------------------ helpers


def _inputs(shape, dtypes, device, *, cfg, extras, per_sample=True, seed=0):
    """dtypes: (sample, model_output, extra1, extra2, noise)."""
    gen = torch.Generator().manual_seed(seed)
    n = shape[0]

    def rnd(shp, dt):
        return torch.randn(shp, generator=gen).to(device=device, dtype=dt)

    sample = rnd(shape, dtypes[0])
    mo = rnd((2 * n if cfg else n, *shape[1:]), dtypes[1])
    opt = [rnd(shape, dt) if on else None for on, dt in zip(extras, dtypes[2:])]
    if per_sample:
        coeffs = torch.randn(n, 7, generator=gen)
    else:
        coeffs = torch.randn(1, 7, generator=gen).expand(n, 7)
    coeffs = coeffs.to(device).contiguous()
    return sample, mo, coeffs, *opt


def _check(fn, args, *, guidance_scale, clip, return_x0, ref_coeffs=None):
    sample, mo, coeffs, e1, e2, nz = args
    out, x0 = fn(sample, mo, coeffs, e1, e2, nz, guidance_scale, clip, return_x0)
    rc = coeffs if ref_coeffs is None else ref_coeffs
    ref_out, ref_x0 = _reference_step(sample, mo, rc, e1, e2, nz, guidance_scale, clip, return_x0)
    assert out.dtype == sample.dtype and out.shape == sample.shape and out.device == sample.device
    torch.testing.assert_close(out, ref_out, **TOL[sample.dtype])
    if return_x0:
        assert x0 is not None and x0.dtype == sample.dtype and x0.shape == sample.shape
        torch.testing.assert_close(x0, ref_x0, **TOL[sample.dtype])
    else:
        assert x0 is None
    return out, x0


# ------------------------------------------------------------------ tests


@pytest.mark.parametrize("flags", range(64), ids=lambda f: f"flags{f:02d}")
def test_every_variant(kernel, flags):
    """All 2^6 combinations of CFG, clip, x0, extra1, extra2, noise (fp32)."""
    fn, device = kernel
    cfg, clip, x0, e1, e2, nz = (bool(flags >> b & 1) for b in range(6))
    args = _inputs((3, 4, 7, 13), (torch.float32,) * 5, device, cfg=cfg, extras=(e1, e2, nz), seed=flags)
    _check(fn, args, guidance_scale=7.5 if cfg else None, clip=0.8 if clip else None, return_x0=x0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("full", [False, True], ids=["minimal", "everything"])
def test_shapes_dtypes(kernel, shape, dtype, full):
    fn, device = kernel
    args = _inputs(shape, (dtype,) * 5, device, cfg=full, extras=(full,) * 3, seed=len(shape))
    _check(fn, args, guidance_scale=5.0 if full else None, clip=1.0 if full else None, return_x0=full)


@pytest.mark.parametrize("per_sample", [True, False], ids=["per_sample", "broadcast"])
@pytest.mark.parametrize("cfg", [False, True], ids=["no_cfg", "cfg"])
@pytest.mark.parametrize("clip", [None, 0.5], ids=["no_clip", "clip"])
def test_coefficients_cfg_clip(kernel, per_sample, cfg, clip):
    fn, device = kernel
    args = _inputs((3, 4, 7, 13), (torch.float32,) * 5, device, cfg=cfg, extras=(True, False, True),
                   per_sample=per_sample)
    out, _ = _check(fn, args, guidance_scale=3.0 if cfg else None, clip=clip, return_x0=True)
    if not per_sample:
        # A single (1, 7) row is also accepted and broadcast by the kernel.
        sample, mo, coeffs, e1, e2, nz = args
        out1, _ = fn(sample, mo, coeffs[:1].contiguous(), e1, e2, nz, 3.0 if cfg else None, clip, True)
        torch.testing.assert_close(out1, out, rtol=0, atol=0)


MIXED = [
    (torch.float16, torch.float32, torch.bfloat16, torch.float32, torch.float16),
    (torch.bfloat16, torch.float16, torch.float32, torch.bfloat16, torch.float32),
    (torch.float32, torch.bfloat16, torch.float16, torch.float16, torch.bfloat16),
    (torch.float32, torch.float16, torch.float32, torch.float32, torch.float32),
]


@pytest.mark.parametrize("dtypes", MIXED, ids=lambda d: "-".join(str(t).split(".")[-1] for t in d))
@pytest.mark.parametrize("shape", [(2, 16, 5, 5), (3, 4, 7, 13)], ids=str)
def test_mixed_dtypes(kernel, dtypes, shape):
    fn, device = kernel
    args = _inputs(shape, dtypes, device, cfg=True, extras=(True, True, True))
    _check(fn, args, guidance_scale=7.5, clip=1.5, return_x0=True)


def _native_backends():
    """Every backend of the public op (skipped where it cannot run), for the cases moved there."""
    out = []
    for name in _backend.BACKENDS:
        device = torch.device("cuda" if name == "cuda" else DEVICE)
        why = None if name == "torch" else _backend.unavailable_reason(name, device)
        out.append(pytest.param(name, marks=(pytest.mark.skip(reason=why),) if why else (), id=name))
    return out


def _op_fn(backend):
    """The public op with the launchers' positional signature: the (N, 7) coefficient rows become the
    StepUpdate they flatten back into (exactly), and the op checks and arranges layouts before the kernel."""
    from fastgen.ops.sampling import StepUpdate, X0From

    def fn(sample, mo, coeffs, e1, e2, nz, guidance_scale, clip, return_x0):
        c = coeffs.unbind(dim=1)
        terms = tuple((c[4 + j], t) for j, t in enumerate((e1, e2)) if t is not None)
        update = StepUpdate(X0From(c[0], c[1]), sample=c[2], x0=c[3], terms=terms, noise=c[6])
        got = sampling_ops.sampling_step(sample, mo, update, noise=nz, guidance_scale=guidance_scale, clip=clip,
                                         return_x0=return_x0, backend=backend)
        return got if return_x0 else (got, None)

    return fn


def _layout_cases(sample, mo, e1, e2, nz):
    cl = torch.channels_last
    return {
        "all channels-last": (sample.to(memory_format=cl), mo.to(memory_format=cl),
                              e1.to(memory_format=cl), e2.to(memory_format=cl), nz.to(memory_format=cl)),
        "sample channels-last, rest contiguous": (sample.to(memory_format=cl), mo, e1, e2, nz),
        "sample contiguous, rest channels-last": (sample, mo.to(memory_format=cl), e1.to(memory_format=cl),
                                                  e2, nz.to(memory_format=cl)),
        "transposed / sliced / expanded": (
            sample.transpose(2, 3).contiguous().transpose(2, 3),
            torch.cat([mo, mo], dim=1)[:, ::2],
            e1.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3),
            e2[:1].expand(sample.shape),
            nz.flip(0),
        ),
    }


def test_layouts(kernel):
    """A launcher takes sample contiguous or channels-last with every other tensor in sample's
    strides (what the public op hands over), uses them in place and keeps the layout."""
    fn, device = kernel
    shape = (2, 4, 6, 5)
    sample, mo, coeffs, e1, e2, nz = _inputs(shape, (torch.float32,) * 5, device, cfg=True,
                                             extras=(True, True, True))
    cl = torch.channels_last
    cases = _layout_cases(sample, mo, e1, e2, nz)
    cases = {"all contiguous": (sample, mo, e1, e2, nz), "all channels-last": cases["all channels-last"]}
    for name, (s, m, a, b, c) in cases.items():
        out, x0 = _check(fn, (s, m, coeffs, a, b, c), guidance_scale=2.0, clip=None, return_x0=True)
        if s.is_contiguous(memory_format=cl) and not s.is_contiguous():
            assert out.is_contiguous(memory_format=cl) and x0.is_contiguous(memory_format=cl), name


@pytest.mark.parametrize("backend", _native_backends())
def test_layouts_through_op(backend):
    """Mixed layouts go through the public op: channels-last is used in place (and kept); other strides
    are copied into sample's layout before the kernel runs."""
    device = "cuda" if backend == "cuda" else DEVICE
    fn = _op_fn(backend)
    shape = (2, 4, 6, 5)
    sample, mo, coeffs, e1, e2, nz = _inputs(shape, (torch.float32,) * 5, device, cfg=True,
                                             extras=(True, True, True))
    cl = torch.channels_last
    for name, (s, m, a, b, c) in _layout_cases(sample, mo, e1, e2, nz).items():
        out, x0 = _check(fn, (s, m, coeffs, a, b, c), guidance_scale=2.0, clip=None, return_x0=True)
        if s.is_contiguous(memory_format=cl) and not s.is_contiguous():
            assert out.is_contiguous(memory_format=cl) and x0.is_contiguous(memory_format=cl), name


def test_clip_propagates_nan(kernel):
    fn, device = kernel
    sample, mo, coeffs, *_ = _inputs((2, 3, 4, 4), (torch.float32,) * 5, device, cfg=False, extras=(0, 0, 0))
    sample = sample.clone()
    sample[0, 0, 0, :2] = float("nan")
    sample[1, 0, 0, :2] = torch.tensor([float("inf"), -float("inf")])
    out, x0 = fn(sample, mo, coeffs, None, None, None, None, 0.25, True)
    ref_out, ref_x0 = _reference_step(sample, mo, coeffs, None, None, None, None, 0.25, True)
    torch.testing.assert_close(x0, ref_x0, equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(out, ref_out, equal_nan=True, **TOL[torch.float32])


def test_empty(kernel):
    fn, device = kernel
    sample = torch.empty(2, 4, 0, 3, device=device)
    out, x0 = fn(sample, sample, torch.zeros(2, 7, device=device), None, None, None, None, None, True)
    assert out.shape == sample.shape and x0.shape == sample.shape


def _bad_cases(sample, mo, coeffs, e1):
    return [
        (sample, mo[:1], coeffs, None, None),           # model_output batch
        (sample, mo, coeffs, e1[:, :2], None),          # extra1 shape
        (sample, mo, coeffs[:, :5].contiguous(), None, None),  # coeffs width
        (sample, mo, coeffs.double(), None, None),      # coeffs dtype
        (sample, mo, coeffs, None, 2.0),                # CFG needs a (2N, ...) model_output
        (sample.to(torch.int32), mo, coeffs, None, None),
    ]


def test_bad_inputs(kernel):
    # A launcher refuses what the public op never hands over: the Triton launcher by a precondition
    # assert, the C++ ones by TORCH_CHECK (the clear messages are the op's, below).
    fn, device = kernel
    sample, mo, coeffs, e1, *_ = _inputs((2, 4, 3, 3), (torch.float32,) * 5, device, cfg=False,
                                         extras=(True, False, False))
    for s, m, c, a, g in _bad_cases(sample, mo, coeffs, e1):
        with pytest.raises((ValueError, TypeError, RuntimeError, AssertionError)):
            fn(s, m, c, a, None, None, g, None, False)


@pytest.mark.parametrize("backend", _native_backends())
def test_bad_inputs_through_op(backend):
    device = "cuda" if backend == "cuda" else DEVICE
    fn = _op_fn(backend)
    sample, mo, coeffs, e1, *_ = _inputs((2, 4, 3, 3), (torch.float32,) * 5, device, cfg=False,
                                         extras=(True, False, False))
    for s, m, c, a, g in _bad_cases(sample, mo, coeffs, e1):
        if c.shape[1] != 7:  # a StepUpdate always flattens to seven coefficients
            continue
        if c.dtype == torch.float64:
            # The op takes coefficients of any float dtype (as Python floats or tensors) and rounds
            # them to the kernels' float32 row.
            torch.testing.assert_close(fn(s, m, c, a, None, None, g, None, False)[0],
                                       fn(s, m, c.float(), a, None, None, g, None, False)[0], rtol=0, atol=0)
            continue
        with pytest.raises((ValueError, TypeError)):
            fn(s, m, c, a, None, None, g, None, False)


# ------------------------------------------------------------------ public op


def _op_backends():
    out = []
    for name in sampling_ops._op.backends:
        if name == "torch":
            continue
        marks = ()
        why = _backend.unavailable_reason(name, torch.device("cuda" if name == "cuda" else DEVICE))
        if why is not None:
            marks = (pytest.mark.skip(reason=why),)
        out.append(pytest.param(name, marks=marks, id=name))
    return out or [pytest.param(None, marks=pytest.mark.skip(reason="the op declares no native backend yet"))]


@pytest.mark.parametrize("backend", _op_backends())
def test_public_op(backend):
    device = "cuda" if backend == "cuda" else DEVICE
    gen = torch.Generator().manual_seed(3)
    shape = (2, 4, 7, 9)
    x = torch.randn(shape, generator=gen).to(device)
    mo = torch.randn((4, *shape[1:]), generator=gen).to(device, torch.float16)
    e1 = torch.randn(shape, generator=gen).to(device)
    nz = torch.randn(shape, generator=gen).to(device, torch.bfloat16)
    update = sampling_ops.StepUpdate(sampling_ops.X0From(0.9, -0.4), sample=0.3, x0=0.7, terms=((0.1, e1),),
                                     noise=0.2)
    for rx in (False, True):
        got = sampling_ops.sampling_step(x, mo, update, noise=nz, guidance_scale=4.0, clip=1.0,
                                         return_x0=rx, backend=backend)
        want = sampling_ops.sampling_step(x, mo, update, noise=nz, guidance_scale=4.0, clip=1.0,
                                          return_x0=rx, backend="torch")
        if rx:
            assert isinstance(got, tuple) and len(got) == 2
            for g_, w_ in zip(got, want):
                torch.testing.assert_close(g_, w_, **TOL[torch.float32])
        else:
            assert isinstance(got, torch.Tensor)
            torch.testing.assert_close(got, want, **TOL[torch.float32])
    a = torch.rand(2, generator=gen).to(device)
    x0, noise = torch.randn(shape, generator=gen).to(device), torch.randn(shape, generator=gen).to(device)
    for f in (sampling_ops.q_sample, sampling_ops.v_target):
        torch.testing.assert_close(f(x0, noise, a.sqrt(), (1 - a).sqrt(), backend=backend),
                                   f(x0, noise, a.sqrt(), (1 - a).sqrt(), backend="torch"), **TOL[torch.float32])
