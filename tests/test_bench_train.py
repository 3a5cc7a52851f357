"""`fastgen bench train`: the tiny U-Net's training step through the normal suite path, fastgen's losses and
gradients against diffusers' on the same weights; and which case sets plain / named `fastgen bench` runs."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from fastgen.bench import _runner
from fastgen.cli import build_parser, main

needs_diffusers = pytest.mark.skipif(importlib.util.find_spec("diffusers") is None,
                                     reason="diffusers is not installed")
CPU = torch.device("cpu")


@needs_diffusers
def test_quick_train_suite_runs(tmp_path, capsys):
    assert main(["bench", "train", "--quick", "--device", "cpu", "--out", str(tmp_path)]) == 0
    assert "speedup_vs_diffusers" in capsys.readouterr().out
    (saved,) = tmp_path.glob("train-*.json")
    payload = json.loads(saved.read_text())
    assert payload["quick"] is True
    rows = payload["rows"]
    from fastgen.bench.train import dtypes

    assert [r["dtype"] for r in rows] == ["float32" if d == torch.float32 else "bf16 autocast" for d in dtypes(CPU)]
    for r in rows:
        assert r["suite"] == "train" and r["model"] == "unet tiny" and r["shape"] == "1x4x16x16 + 1x77x32"
        for key in ("fastgen_ms", "diffusers_ms", "speedup_vs_diffusers", "gflop", "peak_rss_gib"):
            assert math.isfinite(r[key]) and r[key] > 0, key


@pytest.fixture(scope="module")
def tiny():
    pytest.importorskip("diffusers")
    from fastgen.bench import train

    ref, ours = train.build_pair(train.TINY_CONFIG, CPU)
    return train, ref, ours, train.make_batch(train.TINY_CONFIG, CPU)


def _loss_and_grads(train, model, batch, dtype):
    loss = train.train_step(model, batch, CPU, dtype, free_grads=False)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def _errors(grads, ref_grads):
    """(worst per-tensor relative error, with 1e-5 of the global norm as its floor; global relative error)."""
    norm = torch.cat([g.flatten() for g in ref_grads.values()]).norm()
    worst = max(((grads[n] - g).norm() / (g.norm() + 1e-5 * norm)).item() for n, g in ref_grads.items())
    total = torch.cat([(grads[n] - g).flatten() for n, g in ref_grads.items()]).norm() / norm
    return worst, total.item()


@needs_diffusers
def test_tiny_losses_and_grads_match_diffusers(tiny):
    train, ref, ours, batch = tiny
    assert dict(ours.named_parameters()).keys() == dict(ref.named_parameters()).keys()
    loss_ref, g_ref = _loss_and_grads(train, ref, batch, torch.float32)
    loss_ours, g_ours = _loss_and_grads(train, ours, batch, torch.float32)
    assert loss_ref > 0 and all(g.abs().sum() > 0 for g in g_ref.values() if g.numel() > 1)
    assert abs(loss_ours - loss_ref) <= 1e-5 * loss_ref  # measured 1e-7
    worst, total = _errors(g_ours, g_ref)
    assert worst < 5e-3 and total < 1e-4  # measured 7e-4, 4.5e-6

    # bf16 autocast: fastgen's gradients as close to the fp32 ones as diffusers' bf16 ones are (measured 2.3e-2
    # against diffusers' 2.6e-2), and close to diffusers' bf16 ones
    loss_ref16, g_ref16 = _loss_and_grads(train, ref, batch, torch.bfloat16)
    loss_ours16, g_ours16 = _loss_and_grads(train, ours, batch, torch.bfloat16)
    assert abs(loss_ours16 - loss_ref16) <= 1e-2 * loss_ref16 and abs(loss_ours16 - loss_ref) <= 1e-2 * loss_ref
    _, ours_vs_fp32 = _errors(g_ours16, g_ref)
    _, ref_vs_fp32 = _errors(g_ref16, g_ref)
    assert ours_vs_fp32 < max(2 * ref_vs_fp32, 1e-3)
    assert _errors(g_ours16, g_ref16)[1] < 0.1  # measured 2.8e-2


@needs_diffusers
def test_step_frees_grads_and_bumps_weight_versions(tiny):
    train, _, ours, batch = tiny
    before = {n: p._version for n, p in ours.named_parameters()}
    loss = train.train_step(ours, batch, CPU, torch.float32)
    assert math.isfinite(loss.item())
    assert all(p.grad is None for p in ours.parameters())  # one model's gradients in memory at a time
    # as an optimizer's in-place update would: fastgen's cached conv weight transforms are redone every step
    assert all(p._version > before[n] for n, p in ours.named_parameters())


def test_train_and_e2e_run_only_when_named():
    assert "train" in _runner.SUITES and "e2e" in _runner.SUITES
    assert "train" not in _runner.DEFAULT_SUITES and "e2e" not in _runner.DEFAULT_SUITES
    assert {"models", "drop_in", "conv", "group_norm"} <= set(_runner.DEFAULT_SUITES)


def test_resolve_quick():
    rq = _runner.resolve_quick
    assert rq(named=False) is True and rq(named=True) is False  # plain run reduced; named suites full
    assert rq(named=False, full=True) is False and rq(named=True, quick=True) is True
    assert rq(named=False, quick=True) is True and rq(named=True, full=True) is False
    with pytest.raises(ValueError):
        rq(named=False, quick=True, full=True)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--quick", "--full"])


@pytest.mark.parametrize("argv, quick", [
    ([], True), (["--quick"], True), (["--full"], False),
    (["models"], False), (["models", "--quick"], True), (["models", "group_norm", "--full"], False),
    (["e2e"], False), (["e2e", "--quick"], True), (["e2e", "--full"], False),
])
def test_cli_passes_one_quick_to_every_suite(monkeypatch, capsys, argv, quick):
    import fastgen.bench
    from fastgen.bench import e2e

    calls = []
    monkeypatch.setattr(fastgen.bench, "run_suites",
                        lambda names, device, quick=False, **kw: calls.append(("suites", tuple(names), quick)) or [])
    monkeypatch.setattr(e2e, "run", lambda device, quick=False, **kw: calls.append(("e2e", None, quick)) or [])
    assert main(["bench", *argv, "--device", "cpu", "--no-save"]) == 0
    named = [a for a in argv if not a.startswith("--")]
    others = tuple(s for s in named if s != "e2e") if named else tuple(_runner.DEFAULT_SUITES)
    expected = ([("suites", others, quick)] if others else []) + ([("e2e", None, quick)] if "e2e" in named else [])
    assert calls == expected
    assert ("(full)" in capsys.readouterr().out) is (not quick)
