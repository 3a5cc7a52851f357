"""fastgen's scheduler classes against diffusers' classes of the same name.

Same config -> same ``timesteps``, ``sigmas`` and a whole sampling loop with a deterministic dummy model,
within 1e-5 (fp32 samples of magnitude ~1). fastgen keeps sigma tables in float64 where diffusers rounds them
to float32, so sigmas agree to float32 rounding and fractional (Karras) timesteps to one float32 ulp.
"""

from __future__ import annotations

import itertools
import json
import warnings

import pytest
import torch

import fastgen.schedulers as F
from fastgen.schedulers import steps as steps_mod

diffusers = pytest.importorskip("diffusers")

# diffusers 0.42 + numpy 2 warn about np.array(tensor, copy=False) inside their schedulers
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SHAPE = (2, 4, 8, 8)
ATOL = 1e-5
FIXED = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1234))
SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def dummy_model(x, t):
    """Deterministic stand-in for a U-Net: depends on the input and the timestep, keeps samples O(1)."""
    t = torch.as_tensor(t, dtype=torch.float32)
    t = t.reshape(-1, *([1] * (x.dim() - 1))) if t.dim() else t
    fixed = FIXED[: x.shape[0]] if x.shape[0] <= FIXED.shape[0] else FIXED.repeat(2, 1, 1, 1)[: x.shape[0]]
    return x * (0.9 + 0.05 * t / 1000) + 0.1 * fixed * torch.cos(t / 300)


def init_noise(scheduler, seed=5, shape=SHAPE):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * float(scheduler.init_noise_sigma)


def run_loop(scheduler, n, *, seed=None, step_kwargs=None, model=dummy_model, x=None, generator=None):
    scheduler.set_timesteps(n)
    x = init_noise(scheduler) if x is None else x
    g = torch.Generator().manual_seed(seed) if seed is not None else generator
    kw = dict(step_kwargs or {})
    if g is not None:
        kw["generator"] = g
    x0 = None
    for t in scheduler.timesteps:
        out = scheduler.step(model(scheduler.scale_model_input(x, t), t), t, x, **kw)
        x, x0 = out.prev_sample, getattr(out, "pred_original_sample", None)
    return x, x0


def compare(name, config, n=10, *, seed=None, step_kwargs=None, check_x0=True):
    ref = getattr(diffusers, name).from_config(config)
    ours = getattr(F, name).from_config(config)
    x_ref, x0_ref = run_loop(ref, n, seed=seed, step_kwargs=step_kwargs)
    x_ours, x0_ours = run_loop(ours, n, seed=seed, step_kwargs=step_kwargs)
    assert ours.timesteps.dtype == ref.timesteps.dtype
    if ref.timesteps.dtype.is_floating_point:
        torch.testing.assert_close(ours.timesteps, ref.timesteps, rtol=0, atol=1.5e-4)  # one fp32 ulp at ~999
    else:
        assert torch.equal(ours.timesteps, ref.timesteps)
    if hasattr(ref, "sigmas") and ref.sigmas is not None:
        assert ours.sigmas.dtype == torch.float64
        torch.testing.assert_close(ours.sigmas, ref.sigmas.double(), rtol=2e-6, atol=1e-6)
    assert float(ours.init_noise_sigma) == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)
    assert torch.isfinite(x_ref).all()
    err = (x_ours - x_ref).abs().max().item()
    assert err <= tol(x_ref), f"{name} {config} {step_kwargs}: max |diff| {err:.3g} (max |x| {x_ref.abs().max():.3g})"
    if check_x0 and x0_ref is not None:
        assert (x0_ours - x0_ref).abs().max().item() <= tol(x0_ref)
    return err, x_ref.abs().max().item()


def tol(ref):
    """1e-5 for samples of magnitude <= 1; proportionally more where the dummy model drives them far from
    the data range (eps-prediction at the cosine schedule's near-zero terminal SNR divides by alpha ~ 5e-5)."""
    return ATOL * max(1.0, ref.abs().max().item())


def cases(**axes):
    keys = list(axes)
    return [dict(zip(keys, vals)) for vals in itertools.product(*axes.values())]


BETAS = [dict(SD), dict(beta_schedule="linear"), dict(beta_schedule="squaredcos_cap_v2")]
PRED = ["epsilon", "v_prediction", "sample"]
SPACING = ["leading", "linspace", "trailing"]
COS = "squaredcos_cap_v2"


def well_conditioned(c):
    """The cosine schedule's last trained level has abar = 2.4e-9 (sigma = 2e4): sigma-space samplers starting
    there hold ~6e4-sized states whose float32 rounding (4e-3) no implementation can keep to 1e-5. Those start
    at t=999 with linspace/trailing spacing (and Karras' sigma_max); ``leading`` starts at t=900 (sigma = 6.4)."""
    return not (c["betas"].get("beta_schedule") == COS and (c["spacing"] != "leading" or c.get("karras") or c.get("sigmas", "table") != "table"))


# ------------------------------------------------------------------ DDPM / DDIM


@pytest.mark.parametrize("c", cases(betas=BETAS + [dict(beta_schedule="sigmoid")], pred=PRED, spacing=SPACING))
def test_ddpm_matches_diffusers(c):
    i = (len(c["pred"]) + len(c["spacing"])) % 3
    cfg = dict(**c["betas"], prediction_type=c["pred"], timestep_spacing=c["spacing"], clip_sample=i != 0,
               variance_type=["fixed_small", "fixed_large", "fixed_small_log"][i], steps_offset=int(c["spacing"] == "leading"))
    compare("DDPMScheduler", cfg, n=10, seed=7)


def test_ddpm_learned_range_and_per_sample_generators_match_diffusers():
    cfg = dict(SD, variance_type="learned_range", clip_sample=False)

    def model(x, t):  # 2C channels: eps and the variance interpolation in [-1, 1]
        return torch.cat([dummy_model(x, t), torch.tanh(dummy_model(x, t))], dim=1)

    outs = []
    for lib in (diffusers, F):
        s = lib.DDPMScheduler.from_config(cfg)
        gens = [torch.Generator().manual_seed(s_) for s_ in (3, 4)]  # diffusers draws per sample from a list too
        outs.append(run_loop(s, 8, model=model, generator=gens)[0])
    assert (outs[0] - outs[1]).abs().max().item() <= tol(outs[0])


def test_ddpm_thousand_steps_is_closer_to_float64_than_diffusers():
    """Over 1000 steps diffusers' float32 coefficients (beta_t = 1 - abar_t / abar_prev cancels) drift by ~2e-5;
    fastgen's float64 coefficients stay within 1e-5 of diffusers run in float64."""
    cfg = dict(SD, clip_sample=False)
    x_ours = run_loop(F.DDPMScheduler.from_config(cfg), 1000, seed=0)[0]
    x_ref = run_loop(diffusers.DDPMScheduler.from_config(cfg), 1000, seed=0)[0]
    ref64 = diffusers.DDPMScheduler.from_config(cfg)
    ref64.alphas_cumprod, ref64.one = ref64.alphas_cumprod.double(), ref64.one.double()
    model = lambda x, t: dummy_model(x.float(), t)  # noqa: E731  fp32 output -> the same fp32 noise draws
    x64 = run_loop(ref64, 1000, seed=0, model=model, x=init_noise(ref64).double())[0]
    err_ours, err_ref = (x_ours.double() - x64).abs().max().item(), (x_ref.double() - x64).abs().max().item()
    assert err_ours <= ATOL and err_ours <= err_ref, (err_ours, err_ref)


@pytest.mark.parametrize("c", cases(betas=BETAS, pred=PRED, spacing=SPACING))
def test_ddim_matches_diffusers(c):
    i = (len(c["pred"]) + len(c["spacing"])) % 4
    cfg = dict(**c["betas"], prediction_type=c["pred"], timestep_spacing=c["spacing"], clip_sample=i % 2 == 0,
               set_alpha_to_one=i < 2, steps_offset=int(c["spacing"] == "leading"))
    compare("DDIMScheduler", cfg, n=10)


@pytest.mark.parametrize("eta,clipped", [(0.5, False), (1.0, True), (0.3, False)])
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_ddim_eta_matches_diffusers(eta, clipped, pred):
    cfg = dict(SD, clip_sample=True, prediction_type=pred, set_alpha_to_one=False)
    compare("DDIMScheduler", cfg, n=10, seed=11, step_kwargs=dict(eta=eta, use_clipped_model_output=clipped))


@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler"])
def test_zero_terminal_snr_matches_diffusers(name):
    cfg = dict(SD, rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing", clip_sample=False)
    compare(name, cfg, n=10, seed=2)


# ------------------------------------------------------------------ Euler / Euler ancestral / Heun


@pytest.mark.parametrize("c", [c for c in cases(betas=BETAS, pred=PRED, spacing=SPACING, karras=[False, True]) if well_conditioned(c)])
def test_euler_matches_diffusers(c):
    cfg = dict(**c["betas"], prediction_type=c["pred"], timestep_spacing=c["spacing"], use_karras_sigmas=c["karras"],
               steps_offset=int(c["spacing"] == "leading"))
    compare("EulerDiscreteScheduler", cfg, n=10)


@pytest.mark.parametrize("extra", [
    dict(use_exponential_sigmas=True),
    dict(final_sigmas_type="sigma_min"),
    dict(use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0),
    dict(timestep_type="continuous", prediction_type="v_prediction"),
    dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"),
])
def test_euler_options_match_diffusers(extra):
    compare("EulerDiscreteScheduler", dict(SD, **extra), n=12)


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"])
@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
def test_cosine_schedule_from_sigma_2e4_agrees_to_float32_rounding(name, spacing):
    """Starting at sigma = 2e4 (see well_conditioned), agreement is limited by float32 rounding of the largest
    state on the trajectory: require 1e-7 of it (seen: ~2e-8)."""
    cfg = dict(beta_schedule=COS, timestep_spacing=spacing, prediction_type="v_prediction")
    outs = []
    for lib in (diffusers, F):
        s = getattr(lib, name).from_config(cfg)
        outs.append(run_loop(s, 10, seed=1)[0])
    largest = 3 * 2.1e4 * 5  # |init noise| <= ~5 sigma_max
    assert (outs[0] - outs[1]).abs().max().item() <= 1e-7 * largest


def test_euler_churn_matches_diffusers():
    compare("EulerDiscreteScheduler", dict(SD), n=10, seed=3, step_kwargs=dict(s_churn=1.0, s_tmin=0.5, s_tmax=8.0),
            check_x0=False)  # diffusers' x0 under churn is reported before its noise; prev_sample must agree


@pytest.mark.parametrize("c", [c for c in cases(betas=BETAS, pred=["epsilon", "v_prediction"], spacing=SPACING) if well_conditioned(c)])
def test_euler_ancestral_matches_diffusers(c):
    cfg = dict(**c["betas"], prediction_type=c["pred"], timestep_spacing=c["spacing"], steps_offset=1)
    compare("EulerAncestralDiscreteScheduler", cfg, n=10, seed=9)


@pytest.mark.parametrize("c", [c for c in cases(betas=BETAS, pred=PRED, spacing=SPACING, sigmas=["table", "karras", "exponential"]) if well_conditioned(c)])
def test_heun_matches_diffusers(c):
    cfg = dict(**c["betas"], prediction_type=c["pred"], timestep_spacing=c["spacing"],
               use_karras_sigmas=c["sigmas"] == "karras", use_exponential_sigmas=c["sigmas"] == "exponential",
               clip_sample=c["pred"] == "sample", clip_sample_range=2.0)
    compare("HeunDiscreteScheduler", cfg, n=8)


# ------------------------------------------------------------------ DPM-Solver++


@pytest.mark.parametrize("c", [c for c in cases(betas=BETAS, pred=PRED, spacing=SPACING, karras=[False, True])
                               if not (c["karras"] and c["betas"].get("beta_schedule") == COS)])
def test_dpm_solver_matches_diffusers(c):
    cfg = dict(**c["betas"], prediction_type=c["pred"], timestep_spacing=c["spacing"], use_karras_sigmas=c["karras"],
               steps_offset=int(c["spacing"] == "leading"))
    compare("DPMSolverMultistepScheduler", cfg, n=10)


@pytest.mark.parametrize("c", cases(order=[1, 2, 3], solver=["midpoint", "heun"], n=[6, 20],
                                    lower_order_final=[True, False], final=["zero", "sigma_min"]))
def test_dpm_solver_orders_match_diffusers(c):
    # (Karras sigmas end on sigma_min, so with final_sigmas_type="sigma_min" the last step has length 0:
    #  see test_dpm_solver_zero_length_final_step)
    cfg = dict(SD, solver_order=c["order"], solver_type=c["solver"], lower_order_final=c["lower_order_final"],
               final_sigmas_type=c["final"], use_karras_sigmas=c["n"] == 20 and c["final"] == "zero")
    compare("DPMSolverMultistepScheduler", cfg, n=c["n"])


@pytest.mark.parametrize("order,solver", [(2, "midpoint"), (2, "heun"), (3, "midpoint")])
def test_dpm_solver_zero_length_final_step(order, solver):
    """Karras sigmas + final_sigmas_type="sigma_min" repeat sigma_min: fastgen's last step keeps x (h = 0), as
    diffusers' midpoint update does through inf/0 arithmetic; diffusers' heun and 3rd-order updates give NaN."""
    cfg = dict(SD, solver_order=order, solver_type=solver, use_karras_sigmas=True, final_sigmas_type="sigma_min",
               lower_order_final=False)
    ours = F.DPMSolverMultistepScheduler.from_config(cfg)
    x, _ = run_loop(ours, 20)
    assert float(ours.sigmas[-1]) == pytest.approx(float(ours.sigmas[-2]), rel=1e-14) and torch.isfinite(x).all()
    x_ref, _ = run_loop(diffusers.DPMSolverMultistepScheduler.from_config(cfg), 20)
    if (order, solver) == (2, "midpoint"):
        assert (x - x_ref).abs().max().item() <= ATOL
    else:
        assert not torch.isfinite(x_ref).all()


@pytest.mark.parametrize("extra", [
    dict(algorithm_type="sde-dpmsolver++"),
    dict(algorithm_type="sde-dpmsolver++", solver_order=3, use_karras_sigmas=True),
    dict(algorithm_type="sde-dpmsolver++", solver_type="heun", prediction_type="v_prediction"),
    dict(euler_at_final=True),
    dict(use_lu_lambdas=True),
    dict(use_exponential_sigmas=True),
    dict(lambda_min_clipped=-5.1, timestep_spacing="trailing"),
    dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"),
    dict(algorithm_type="deis", final_sigmas_type="sigma_min"),
])
def test_dpm_solver_options_match_diffusers(extra):
    compare("DPMSolverMultistepScheduler", dict(SD, **extra), n=10, seed=4)


def test_dpm_solver_karras_on_cosine_schedule_runs_where_diffusers_overruns():
    """Karras sigmas on the cosine schedule start with a repeated timestep (999, 999, ...): diffusers starts at
    the second one and indexes past its sigmas; fastgen starts at the first and finishes."""
    cfg = dict(beta_schedule=COS, use_karras_sigmas=True)
    s = F.DPMSolverMultistepScheduler.from_config(cfg)
    x, _ = run_loop(s, 10)
    assert s.timesteps[0] == s.timesteps[1] and torch.isfinite(x).all()
    with pytest.raises(IndexError):
        run_loop(diffusers.DPMSolverMultistepScheduler.from_config(cfg), 10)


# ------------------------------------------------------------------ classifier-free guidance


ALL = ["DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
       "HeunDiscreteScheduler", "DPMSolverMultistepScheduler"]


CLIPPING = ("DDPMScheduler", "DDIMScheduler", "HeunDiscreteScheduler")


@pytest.mark.parametrize("name,clip", [(n, False) for n in ALL] + [(n, True) for n in CLIPPING])
def test_cfg_step_matches_diffusers_on_combined_prediction(name, clip):
    """step(model_output=[uncond; cond], guidance_scale=g) == diffusers' step on uncond + g (cond - uncond).
    DDIM runs with eta=0.5; with clip_sample its eps comes from the raw guided output (the extra-slot path)."""
    g = 7.5
    cfg = dict(SD, clip_sample=clip) if name in CLIPPING else dict(SD)
    ref, ours = getattr(diffusers, name).from_config(cfg), getattr(F, name).from_config(cfg)
    ref.set_timesteps(8)
    ours.set_timesteps(8)
    x_ref = x_ours = init_noise(ref)
    g_ref, g_ours = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    accepts_gen = name not in ("HeunDiscreteScheduler",)
    for t in ref.timesteps:
        both = [dummy_model(torch.cat([s.scale_model_input(x, t)] * 2), t) for s, x in ((ref, x_ref), (ours, x_ours))]
        both = [torch.cat([b[:2], b[2:] + 0.3 * FIXED]) for b in both]  # make cond differ from uncond
        u, c = both[0].chunk(2)
        kw_ref = dict(generator=g_ref) if accepts_gen else {}
        kw_ours = dict(generator=g_ours) if accepts_gen else {}
        if name == "DDIMScheduler":
            kw_ref["eta"] = kw_ours["eta"] = 0.5
        x_ref = ref.step(u + g * (c - u), t, x_ref, **kw_ref).prev_sample
        x_ours = ours.step(both[1], t, x_ours, guidance_scale=g, **kw_ours).prev_sample
    err = (x_ours - x_ref).abs().max().item()
    assert err <= tol(x_ref), err


# ------------------------------------------------------------------ one fused kernel call per step


@pytest.mark.parametrize("name", ALL)
def test_one_sampling_step_call_per_step(name, monkeypatch):
    calls = []
    real = steps_mod.sampling_step
    monkeypatch.setattr(steps_mod, "sampling_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    s = getattr(F, name).from_config(dict(SD, solver_order=3) if "DPM" in name else SD)
    run_loop(s, 6, seed=None if "Heun" in name else 0)
    assert len(calls) == len(s.timesteps)


# ------------------------------------------------------------------ add_noise, velocity, outputs, config



@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler"])
@pytest.mark.parametrize("edit", ["in_place", "replaced"])
def test_steps_follow_sigma_tables_edited_mid_run(name, edit):
    """The schedulers keep Python-float copies of their tables for speed; an edit must still take effect."""
    ref, ours = getattr(diffusers, name).from_config(SD), getattr(F, name).from_config(SD)
    xs = []
    for sched in (ref, ours):
        sched.set_timesteps(8)
        x = init_noise(sched)
        for i, t in enumerate(sched.timesteps):
            if i == 3:
                if edit == "in_place":
                    sched.sigmas[4:].mul_(0.8)
                else:
                    sched.sigmas = torch.cat([sched.sigmas[:4], 0.8 * sched.sigmas[4:]])
            x = sched.step(dummy_model(sched.scale_model_input(x, t), t), t, x).prev_sample
        xs.append(x)
    unedited = run_loop(getattr(F, name).from_config(SD), 8)[0]
    assert (xs[1] - unedited).abs().max() > 1e-3  # the edit changed the trajectory ...
    assert (xs[1] - xs[0]).abs().max() <= tol(xs[0])  # ... exactly as it changes diffusers'

@pytest.mark.parametrize("name", ALL)
def test_add_noise_matches_diffusers(name):
    ref, ours = getattr(diffusers, name).from_config(SD), getattr(F, name).from_config(SD)
    ref.set_timesteps(10)
    ours.set_timesteps(10)
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    t = ref.timesteps[[1, 4]]
    torch.testing.assert_close(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), rtol=1e-6, atol=2e-6)


def test_get_velocity_matches_diffusers():
    ref, ours = diffusers.DDPMScheduler.from_config(SD), F.DDPMScheduler.from_config(SD)
    x0, noise, t = torch.randn(SHAPE), torch.randn(SHAPE), torch.tensor([10, 900])
    torch.testing.assert_close(ours.get_velocity(x0, noise, t), ref.get_velocity(x0, noise, t), rtol=1e-6, atol=1e-6)


def test_outputs_like_diffusers():
    s = F.DDIMScheduler()
    s.set_timesteps(5)
    x = torch.randn(SHAPE)
    out = s.step(dummy_model(x, s.timesteps[0]), s.timesteps[0], x)
    assert out[0] is out.prev_sample and out["pred_original_sample"] is out.pred_original_sample
    tup = s.step(dummy_model(x, s.timesteps[0]), s.timesteps[0], x, return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == 2 and torch.equal(tup[0], out.prev_sample)
    d = F.DPMSolverMultistepScheduler()
    d.set_timesteps(5)
    tup = d.step(dummy_model(x, d.timesteps[0]), d.timesteps[0], x, return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == 1  # diffusers' DPM-Solver returns (prev_sample,)


@pytest.mark.parametrize("name", ALL)
def test_config_keys_match_diffusers(name):
    import inspect

    ref = set(inspect.signature(getattr(diffusers, name).__init__).parameters) - {"self"}
    assert set(getattr(F, name).config_keys()) == ref
    ours, theirs = getattr(F, name)(), getattr(diffusers, name)()
    for k in ref:
        assert ours.config[k] == theirs.config[k], k
    assert ours.order == theirs.order and len(ours) == len(theirs)


def test_from_config_accepts_diffusers_config_and_warns_on_unknown_keys():
    sd_config = {  # Stable Diffusion 1.5's scheduler_config.json (a PNDM config)
        "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
        "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
        "clip_sample": False,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # keys of other diffusers schedulers are dropped silently
        s = F.EulerDiscreteScheduler.from_config(sd_config)
    assert s.config.steps_offset == 1 and "skip_prk_steps" not in s.config
    with pytest.warns(UserWarning, match="not_a_key"):
        s = F.DDIMScheduler.from_config({**sd_config, "not_a_key": 3}, timestep_spacing="trailing")
    assert s.config["timestep_spacing"] == "trailing" and s.config.set_alpha_to_one is False
    # a diffusers scheduler's config (FrozenDict) and a fastgen scheduler both work as sources
    theirs = diffusers.DPMSolverMultistepScheduler.from_config(sd_config)
    ours = F.DPMSolverMultistepScheduler.from_config(theirs.config)
    assert all(theirs.config[k] == v for k, v in ours.config.items())  # diffusers also keeps the PNDM keys
    assert F.DDPMScheduler.from_config(ours).config.beta_schedule == "scaled_linear"
    # and diffusers accepts ours
    assert diffusers.EulerDiscreteScheduler.from_config(dict(s.config)).config.steps_offset == 1
    with pytest.raises(TypeError, match="read-only"):
        s.config["steps_offset"] = 3
    with pytest.warns(UserWarning, match="extra"):
        s, unused = F.DDIMScheduler.from_config(sd_config, return_unused_kwargs=True, extra=1)
    assert unused == {"extra": 1}
    s._internal_dict = {**s.config, "steps_offset": 0}  # what diffusers' pipelines do to fix old configs
    assert s.config.steps_offset == 0


def test_save_and_load_pretrained(tmp_path):
    s = F.DPMSolverMultistepScheduler(use_karras_sigmas=True, solver_order=3, **SD)
    s.save_pretrained(tmp_path / "scheduler")
    data = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    assert data["_class_name"] == "DPMSolverMultistepScheduler"
    again = F.DPMSolverMultistepScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    assert dict(again.config) == dict(s.config)
    theirs = diffusers.DPMSolverMultistepScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    assert theirs.config.solver_order == 3


# ------------------------------------------------------------------ errors


def test_bad_config_raises_clear_errors():
    with pytest.raises(ValueError, match="beta_schedule"):
        F.DDIMScheduler(beta_schedule="cubic")
    with pytest.raises(ValueError, match="prediction_type"):
        F.EulerDiscreteScheduler(prediction_type="noise")
    with pytest.raises(ValueError, match="variance_type"):
        F.DDPMScheduler(variance_type="huge")
    with pytest.raises(ValueError, match="solver_order"):
        F.DPMSolverMultistepScheduler(solver_order=4)
    with pytest.raises(ValueError, match="trained_betas"):
        F.DDPMScheduler(trained_betas=[0.1, 0.2])
    with pytest.raises(NotImplementedError, match="thresholding"):
        F.DDPMScheduler(thresholding=True)


@pytest.mark.parametrize("name", ALL)
def test_bad_steps_raise_clear_errors(name):
    s = getattr(F, name)()
    x = torch.randn(SHAPE)
    t0 = float(s.timesteps[0]) if s.timesteps.dtype.is_floating_point else int(s.timesteps[0])
    if name == "DDPMScheduler":
        # diffusers' DDPM constructor sets the full schedule, so it steps before set_timesteps (to t - 1): so
        # does fastgen's (issue 8, item 7), on the same numbers (test_ddpm_steps_before_set_timesteps_like_diffusers)
        assert s.step(x, torch.tensor(t0), x, generator=torch.Generator().manual_seed(0)).prev_sample.shape == x.shape
    else:
        with pytest.raises(ValueError, match="set_timesteps"):
            s.step(x, torch.tensor(t0), x)
    for bad in (0, 1001):
        with pytest.raises(ValueError, match="num_inference_steps"):
            s.set_timesteps(bad)
    with pytest.raises(TypeError, match="num_inference_steps"):
        s.set_timesteps(2.5)
    s.set_timesteps(10)
    t = s.timesteps[0]
    if name == "DDIMScheduler":
        # diffusers' DDIM steps from any trained timestep t to t - T // n, a well-defined DDIM jump, and fastgen's
        # does the same (issue 8, item 7: the error stays only where diffusers' result would be wrong); a
        # timestep that is no trained one still raises
        ref = diffusers.DDIMScheduler()
        ref.set_timesteps(10)
        torch.testing.assert_close(s.step(x, t - 1, x).prev_sample, ref.step(x, t - 1, x).prev_sample, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="not in the schedule"):
            s.step(x, t.double() - 0.5, x)
    else:
        with pytest.raises(ValueError, match="not in the schedule"):
            s.step(x, t - 0.5 if t.is_floating_point() else t - 1, x)
    with pytest.raises(ValueError, match="shape"):
        s.step(x[:, :3], t, x)
    with pytest.raises(ValueError, match="uncond; cond"):
        s.step(x, t, x, guidance_scale=5.0)
    if name not in ("DDPMScheduler", "DDIMScheduler"):  # stateful schedulers also check the order
        s.step(x, t, x)
        with pytest.raises(ValueError, match="expects timestep"):
            s.step(x, t, x)
