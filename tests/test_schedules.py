"""Noise schedules: beta tables, sigma tables, spacings, the sigma <-> timestep maps, and the noise-level
algebra the step functions are built on."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fastgen.schedulers as F
from fastgen.schedulers import steps

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")

# diffusers 0.42 + numpy 2 warn about np.array(tensor, copy=False) inside their schedulers
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


# ------------------------------------------------------------------ betas and tables


@pytest.mark.parametrize("kw", [
    dict(beta_schedule="linear"), SD, dict(beta_schedule="squaredcos_cap_v2"), dict(beta_schedule="sigmoid"),
    dict(beta_schedule="laplace"), dict(SD, rescale_betas_zero_snr=True), dict(beta_schedule="linear", num_train_timesteps=37),
])
def test_betas_match_diffusers_exactly(kw):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(**kw)
    betas = F.make_betas(**kw)
    assert betas.dtype == torch.float32 and torch.equal(betas, ref.betas)
    assert torch.equal(F.alphas_cumprod_from_betas(betas), ref.alphas_cumprod)


def test_trained_betas_and_table_properties():
    trained = np.linspace(1e-4, 0.02, 50)
    betas = F.make_betas(50, trained_betas=trained)
    torch.testing.assert_close(betas, torch.tensor(trained, dtype=torch.float32))
    sched = F.DiscreteSchedule.from_betas(betas)
    assert sched.num_train_timesteps == 50 and sched.sigmas.dtype == torch.float64
    ac = sched.alphas_cumprod.double()
    torch.testing.assert_close(sched.sigmas, ((1 - ac) / ac).sqrt())
    assert bool((sched.sigmas[1:] > sched.sigmas[:-1]).all())  # ascending in t
    assert sched.sigma_min == float(sched.sigmas[0]) and sched.sigma_max == float(sched.sigmas[-1])


def test_zero_terminal_snr_rescaling():
    betas = F.make_betas(**SD)
    ac = F.alphas_cumprod_from_betas(betas)
    ac0 = F.alphas_cumprod_from_betas(F.rescale_zero_terminal_snr(betas))
    assert float(ac0[-1]) == 0.0  # zero SNR at t = T-1
    assert float(ac0[0]) == pytest.approx(float(ac[0]), rel=1e-6)  # first level kept
    assert bool((ac0[1:] < ac0[:-1]).all())
    assert math.isinf(F.DiscreteSchedule(ac0).sigma_max)


def test_sigma_t_maps():
    sched = F.DiscreteSchedule.from_config(**SD)
    ts = torch.tensor([0.0, 1.0, 17.0, 500.0, 998.0, 999.0])
    torch.testing.assert_close(sched.sigma_to_t(sched.t_to_sigma(ts)), ts.double(), atol=1e-4, rtol=0)
    # fractional t: linear in sigma one way, linear in log-sigma back: both stay within the same interval
    half = sched.sigma_to_t(sched.t_to_sigma(torch.tensor([10.5])))
    assert 10.0 < float(half) < 11.0
    assert float(sched.sigma_to_t(sched.t_to_sigma(torch.tensor([10.4])), quantize=True)) == 10.0
    # clamped outside the table
    assert float(sched.sigma_to_t(torch.tensor([1e-6]))) == 0.0
    assert float(sched.sigma_to_t(torch.tensor([1e6]))) == 999.0


# ------------------------------------------------------------------ timestep spacings


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("n", [1, 7, 10, 50, 999, 1000])
@pytest.mark.parametrize("offset", [0, 1])
def test_spaced_timesteps_match_diffusers(spacing, n, offset):
    diffusers = pytest.importorskip("diffusers")
    ddim = diffusers.DDIMScheduler(timestep_spacing=spacing, steps_offset=offset)
    ddim.set_timesteps(n)
    ts = F.spaced_timesteps(n, 1000, spacing, offset)
    assert ts.dtype == np.int64 and np.array_equal(ts, ddim.timesteps.numpy())
    euler = diffusers.EulerDiscreteScheduler(timestep_spacing=spacing, steps_offset=offset)
    euler.set_timesteps(n)
    ts = F.spaced_timesteps(n, 1000, spacing, offset, integer=False)
    assert ts.dtype == np.float32 and np.array_equal(ts, euler.timesteps.numpy())


def test_spacings_descend_within_range():
    for spacing in F.TIMESTEP_SPACINGS:
        ts = F.spaced_timesteps(13, 1000, spacing)
        assert len(ts) == 13 and np.all(np.diff(ts) < 0) and ts[0] <= 999 and ts[-1] >= 0


# ------------------------------------------------------------------ sigma spacings (k-diffusion)


def test_karras_sigmas():
    s = F.get_sigmas_karras(10, 0.03, 14.6, rho=7.0)
    assert s.dtype == torch.float64 and len(s) == 11 and float(s[-1]) == 0.0
    assert float(s[0]) == pytest.approx(14.6, rel=1e-12) and float(s[-2]) == pytest.approx(0.03, rel=1e-12)
    ramp = torch.linspace(0, 1, 10, dtype=torch.float64)  # k-diffusion's formula
    ref = (14.6 ** (1 / 7) + ramp * (0.03 ** (1 / 7) - 14.6 ** (1 / 7))) ** 7
    torch.testing.assert_close(s[:-1], ref, rtol=1e-12, atol=0)
    assert len(F.get_sigmas_karras(4, 0.1, 1.0, append_zero=False)) == 4


def test_exponential_and_polyexponential_sigmas():
    e = F.get_sigmas_exponential(8, 0.05, 10.0)
    assert float(e[-1]) == 0.0
    logs = e[:-1].log()
    torch.testing.assert_close(logs[1:] - logs[:-1], torch.full((7,), (math.log(0.05) - math.log(10)) / 7, dtype=torch.float64))
    torch.testing.assert_close(F.get_sigmas_polyexponential(8, 0.05, 10.0, rho=1.0), e)
    p = F.get_sigmas_polyexponential(8, 0.05, 10.0, rho=2.0)
    assert float(p[0]) == pytest.approx(10.0) and float(p[-2]) == pytest.approx(0.05)
    assert bool((p[1:-2] < e[1:-2]).all())  # rho > 1 spends more of the steps at low noise


# ------------------------------------------------------------------ noise-level algebra


@pytest.mark.parametrize("space", ["vp", "ve"])
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_x0_coeffs_recover_x0(space, pred):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(100, generator=g, dtype=torch.float64), torch.randn(100, generator=g, dtype=torch.float64)
    abar = 0.3
    level = steps.vp_level(abar) if space == "vp" else steps.ve_level(math.sqrt((1 - abar) / abar))
    x = level.alpha * x0 + level.sigma * eps
    v = math.sqrt(abar) * eps - math.sqrt(1 - abar) * x0  # the v target is defined in VP units
    out = {"epsilon": eps, "v_prediction": v, "sample": x0}[pred]
    c0, c1 = steps.x0_coeffs(pred, level)
    torch.testing.assert_close(c0 * x + c1 * out, x0)
    assert level.abar == pytest.approx(abar)


def test_dpm_solver_order_schedule():
    orders = [steps.dpm_solver_order(i, 10, 3, min(i, 3)) for i in range(10)]
    assert orders == [1, 2, 3, 3, 3, 3, 3, 3, 2, 1]  # warm-up, then lower orders at the end of short runs
    orders = [steps.dpm_solver_order(i, 20, 3, min(i, 3), final_sigma_zero=False) for i in range(20)]
    assert orders[-1] == 3 and orders[:3] == [1, 2, 3]


# ------------------------------------------------------------------ errors


def test_schedule_errors():
    with pytest.raises(ValueError, match="beta_schedule"):
        F.make_betas(beta_schedule="cubic")
    with pytest.raises(ValueError, match="trained_betas"):
        F.make_betas(10, trained_betas=[0.1] * 9)
    with pytest.raises(TypeError, match="num_train_timesteps"):
        F.make_betas(10.0)
    with pytest.raises(ValueError, match="alpha_transform_type"):
        F.betas_for_alpha_bar(10, alpha_transform_type="sqrt")
    with pytest.raises(ValueError, match="timestep_spacing"):
        F.spaced_timesteps(10, 1000, "uniform")
    for n in (0, 1001):
        with pytest.raises(ValueError, match="num_inference_steps"):
            F.spaced_timesteps(n, 1000)
    with pytest.raises(TypeError, match="num_inference_steps"):
        F.spaced_timesteps(True, 1000)
    with pytest.raises(ValueError, match="sigma_min"):
        F.get_sigmas_karras(10, 0.0, 14.6)
    with pytest.raises(ValueError, match="sigma_min"):
        F.get_sigmas_exponential(10, 2.0, 1.0)
    with pytest.raises(ValueError, match="at least 2"):
        F.DiscreteSchedule([0.5])
