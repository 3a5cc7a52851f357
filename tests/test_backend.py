"""Backend detection and dispatch (fastgen/_backend.py)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

import fastgen
from fastgen import _backend
from fastgen.ops import group_norm


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv("FASTGEN_BACKEND", raising=False)


def test_torch_is_always_available():
    assert "torch" in fastgen.available_backends("cpu")
    assert _backend.resolve("x", torch.device("cpu"), "torch") == "torch"


def test_unknown_backend_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown fastgen backend 'tpu'"):
        group_norm(torch.randn(1, 2, 3), 1, backend="tpu")
    with pytest.raises(ValueError, match="unknown"):
        with fastgen.use_backend("tpu"):
            pass


def test_cuda_backend_on_cpu_tensor_raises_naming_what_is_missing():
    with pytest.raises(fastgen.BackendUnavailable, match="cuda.*CUDA tensors"):
        group_norm(torch.randn(1, 2, 3), 1, backend="cuda")


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(fastgen.BackendUnavailable, match="TRITON_INTERPRET"):
        _backend.resolve("group_norm", torch.device("cpu"), "triton")


def test_missing_extension_raises_when_asked_by_name(monkeypatch):
    monkeypatch.setattr(_backend, "_load_extension", lambda: (None, "no C++ compiler found"))
    with pytest.raises(fastgen.BackendUnavailable, match="no C\\+\\+ compiler found"):
        _backend.resolve("group_norm", torch.device("cpu"), "cpu")


def test_automatic_choice_falls_back_and_warns_once(monkeypatch):
    monkeypatch.setattr(_backend, "_load_extension", lambda: (None, "no C++ compiler found"))
    monkeypatch.setattr(_backend, "_warned", set())
    with pytest.warns(RuntimeWarning, match="falls back to the 'torch' backend.*no C\\+\\+ compiler"):
        assert _backend.resolve("group_norm", torch.device("cpu")) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backend.resolve("group_norm", torch.device("cpu")) == "torch"


def test_automatic_choice_prefers_the_extension_on_cpu():
    expected = "cpu" if _backend.extension() is not None else "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert _backend.resolve("group_norm", torch.device("cpu")) == expected


def test_precedence_argument_over_context_over_env(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("FASTGEN_BACKEND", "torch")
    assert _backend.resolve("op", cpu) == "torch"
    monkeypatch.setenv("FASTGEN_BACKEND", "cuda")
    with pytest.raises(fastgen.BackendUnavailable):
        _backend.resolve("op", cpu)
    with fastgen.use_backend("torch"):
        assert _backend.resolve("op", cpu) == "torch"
        with fastgen.use_backend(None):  # None restores the environment's choice
            with pytest.raises(fastgen.BackendUnavailable):
                _backend.resolve("op", cpu)
    monkeypatch.setenv("FASTGEN_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FASTGEN_BACKEND"):
        _backend.resolve("op", cpu)
    assert _backend.resolve("op", cpu, "torch") == "torch"


def test_backend_not_implementing_op_raises():
    with pytest.raises(fastgen.BackendUnavailable, match="does not implement"):
        _backend.resolve("op", torch.device("cpu"), "cpu", supported=("torch",))


def test_unsupported_inputs_fall_back_automatically():
    if _backend.extension() is None:
        pytest.skip("needs the C++ extension")
    with pytest.warns(RuntimeWarning, match="head dim"):
        got = _backend.resolve("odd_op", torch.device("cpu"), unsupported_reason={"cpu": "head dim 7 unsupported"})
    assert got == "torch"


def test_context_manager_routes_ops():
    x = torch.randn(2, 4, 3, 3)
    with fastgen.use_backend("cuda"):
        with pytest.raises(fastgen.BackendUnavailable, match="cuda"):
            group_norm(x, 2)
        # the per-call argument still wins over the context
        assert group_norm(x, 2, backend="torch").shape == x.shape


def test_extension_built_in_ci():
    # CI installs with a compiler: a silently skipped native build must fail there.
    if os.environ.get("CI") != "true":
        pytest.skip("only enforced in CI")
    assert _backend.extension() is not None, _backend.extension_error()
