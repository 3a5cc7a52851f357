"""Expectations of diffusers' own scheduler test suites (tests/schedulers/ in the diffusers repository, for
DDPM, DDIM, Euler, Euler ancestral, Heun and DPM-Solver multistep), restated here and run against fastgen's
classes — compared with diffusers' classes on the same inputs where that is what the expectation means.

Also the table contract of docs/schedulers.md: the per-step float tables are built where the tensors are
written (constructor, ``set_timesteps``, assignment), never per step.
"""

from __future__ import annotations

import inspect
import warnings

import numpy as np
import pytest
import torch

import fastgen.schedulers as F

diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SHAPE = (4, 3, 8, 8)  # diffusers' dummy_sample
SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
ALL = ["DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
       "HeunDiscreteScheduler", "DPMSolverMultistepScheduler"]
SIGMA_TABLE = ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler")


def sample_deter(shape=SHAPE):
    """diffusers' dummy_sample_deter: a deterministic ramp in [0, 1)."""
    n, c, h, w = shape
    s = torch.arange(n * c * h * w).reshape(c, h, w, n) / (n * c * h * w)
    return s.permute(3, 0, 1, 2).contiguous()


def model(sample, t):
    """diffusers' dummy_model: sample * t / (t + 1)."""
    t = torch.as_tensor(t, dtype=sample.dtype)
    return sample * t / (t + 1)


def both(name, **config):
    return getattr(diffusers, name)(**config), getattr(F, name)(**config)


def accepts(fn, name):
    return name in inspect.signature(fn).parameters


def full_loop(s, *, x=None, seed=0, model=model):
    x = sample_deter() * float(s.init_noise_sigma) if x is None else x
    g = torch.Generator().manual_seed(seed)
    for t in s.timesteps:
        kw = dict(generator=g) if accepts(s.step, "generator") else {}
        x = s.step(model(s.scale_model_input(x, t), t), t, x, **kw).prev_sample
    return x


def close(a, b, tol=1e-5):
    err = (a.double() - b.double()).abs().max().item()
    assert err <= tol * max(1.0, b.abs().max().item()), err


# ------------------------------------------------------------------ DPM-Solver: set_timesteps(num_train_timesteps)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_dpm_solver_set_timesteps_to_num_train_timesteps(spacing):
    """diffusers' test_duplicated_timesteps: T inference steps give T timesteps (fastgen raised for linspace and
    leading). The timesteps are diffusers' own."""
    ref, ours = both("DPMSolverMultistepScheduler", timestep_spacing=spacing)
    ref.set_timesteps(1000)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ours.set_timesteps(ours.config.num_train_timesteps)
    assert len(ours.timesteps) == ours.num_inference_steps == 1000
    assert torch.equal(ours.timesteps, ref.timesteps)
    torch.testing.assert_close(ours.sigmas, ref.sigmas.double(), rtol=2e-6, atol=1e-6)
    # leading spacing over T + 1 points has step ratio 0: every timestep is 0 (diffusers' result): said once
    assert any("timestep 0" in str(w.message) for w in seen) == (spacing == "leading")


@pytest.mark.parametrize("spacing", ["linspace", "leading"])
def test_dpm_solver_num_train_timesteps_loop_finishes_where_diffusers_does_not(spacing):
    """With linspace spacing and T steps a timestep repeats: diffusers' zero-length step gives NaN, fastgen's
    keeps the state (h = 0), so the loop finishes with a finite sample. With leading spacing (all timesteps 0)
    diffusers' loop runs off its sigmas; fastgen's finishes."""
    ref, ours = both("DPMSolverMultistepScheduler", timestep_spacing=spacing)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for s in (ref, ours):
            s.set_timesteps(1000)
    x = sample_deter()
    assert torch.isfinite(full_loop(ours, x=x)).all()
    if spacing == "linspace":
        assert not torch.isfinite(full_loop(ref, x=x)).all()
    else:
        with pytest.raises(IndexError):
            full_loop(ref, x=x)


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "HeunDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_first_timestep_off_the_schedule_is_a_clear_error_where_diffusers_fails(name):
    ref, ours = both(name)
    for s in (ref, ours):
        s.set_timesteps(10)
    x = sample_deter()
    t = ours.timesteps[1] + 0.5 if ours.timesteps.is_floating_point() else ours.timesteps[1] + 1
    if name == "DPMSolverMultistepScheduler":  # diffusers silently takes the schedule's last step instead
        ref.step(0.1 * x, t, x)
        assert ref.step_index == len(ref.timesteps)
    else:
        with pytest.raises(IndexError):
            ref.step(0.1 * x, t, x)
    with pytest.raises(ValueError, match="not in the schedule"):
        ours.step(0.1 * x, t, x)


# ------------------------------------------------------------------ zero terminal SNR with epsilon prediction


ZERO_SNR = [dict(SD, rescale_betas_zero_snr=True, timestep_spacing="trailing"),
            # beta_end = 1 makes the last level exactly zero; over T = 1000 float32 underflows many more (below)
            dict(beta_schedule="linear", beta_start=0.0001, beta_end=1.0, timestep_spacing="trailing",
                 num_train_timesteps=20)]


@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler"])
@pytest.mark.parametrize("cfg", ZERO_SNR, ids=["rescaled", "beta_end_1"])
def test_epsilon_step_at_zero_abar_with_clipping_matches_diffusers(name, cfg):
    """At abar_t = 0 diffusers' x0 = (x - eps) / 0 is +-inf and clip_sample clamps it: a finite step, which
    fastgen reproduces (it raised a bare ZeroDivisionError)."""
    cfg = dict(cfg, prediction_type="epsilon", clip_sample=True)
    ref, ours = both(name, **cfg)
    assert float(ours.alphas_cumprod[-1]) == 0.0
    for s in (ref, ours):
        s.set_timesteps(10)
    assert int(ours.timesteps[0]) == ours.config.num_train_timesteps - 1
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    x_ref, x_ours = full_loop(ref, x=x), full_loop(ours, x=x)
    assert torch.isfinite(x_ref).all()
    close(x_ours, x_ref)
    # the first step's x0 is the clamp of +-inf: +-clip_sample_range, as diffusers reports it
    for s in (ref, ours):
        s.set_timesteps(10)
    t = ours.timesteps[0]
    eps = model(x, t)
    kw = dict(generator=torch.Generator().manual_seed(1))
    out_ref = ref.step(eps, t, x, **kw)
    out_ours = ours.step(eps, t, x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out_ours.pred_original_sample.abs(), torch.ones_like(x))
    torch.testing.assert_close(out_ours.pred_original_sample, out_ref.pred_original_sample)


def test_ddim_eps_at_zero_abar_with_eta_and_clipped_output_matches_diffusers():
    cfg = dict(ZERO_SNR[0], prediction_type="epsilon", clip_sample=True)
    for kw in (dict(eta=0.5), dict(eta=0.0, use_clipped_model_output=True)):
        ref, ours = both("DDIMScheduler", **cfg)
        for s in (ref, ours):
            s.set_timesteps(8)
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
        xs = []
        for s in (ref, ours):
            y, g = x, torch.Generator().manual_seed(4)
            for t in s.timesteps:
                y = s.step(model(y, t), t, y, generator=g, **kw).prev_sample
            xs.append(y)
        close(xs[1], xs[0])


@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler"])
def test_epsilon_step_at_zero_abar_without_clipping_is_a_clear_error(name):
    """Without clipping diffusers' result is inf/NaN: fastgen says why instead (a ValueError, not a bare
    ZeroDivisionError)."""
    cfg = dict(ZERO_SNR[0], prediction_type="epsilon", clip_sample=False)
    ref, ours = both(name, **cfg)
    for s in (ref, ours):
        s.set_timesteps(10)
    x = sample_deter()
    t = ours.timesteps[0]
    assert not torch.isfinite(ref.step(model(x, t), t, x).prev_sample).all()
    with pytest.raises(ValueError, match="zero terminal SNR"):
        ours.step(model(x, t), t, x)


@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler"])
def test_step_between_two_zero_snr_levels_is_a_clear_error(name):
    """beta_end near 1 over 1000 timesteps: hundreds of float32 alphas_cumprod underflow to 0 and diffusers'
    steps between them are NaN; fastgen says so (it raised a bare ZeroDivisionError)."""
    cfg = dict(beta_schedule="linear", beta_end=0.999, timestep_spacing="trailing", clip_sample=True)
    ref, ours = both(name, **cfg)
    assert int((ours.alphas_cumprod == 0).sum()) > 100
    for s in (ref, ours):
        s.set_timesteps(10)
    x = sample_deter()
    assert not torch.isfinite(full_loop(ref, x=x)).all()
    t = ours.timesteps[0]
    with pytest.raises(ValueError, match="underflow to zero SNR"):
        ours.step(model(x, t), t, x)


# ------------------------------------------------------------------ types: init_noise_sigma, previous_timestep, outputs


@pytest.mark.parametrize("name", ALL)
def test_init_noise_sigma_has_diffusers_type(name):
    ref, ours = both(name, **SD)
    for stage in ("constructed", "set"):
        if stage == "set":
            ref.set_timesteps(10)
            ours.set_timesteps(10)
        assert type(ours.init_noise_sigma) is type(ref.init_noise_sigma), stage
        if isinstance(ref.init_noise_sigma, torch.Tensor):
            assert ours.init_noise_sigma.dtype == ref.init_noise_sigma.dtype and ours.init_noise_sigma.dim() == 0
        assert float(ours.init_noise_sigma) == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)


def test_ddpm_previous_timestep_has_diffusers_types():
    ref, ours = both("DDPMScheduler")
    for t in (10, torch.tensor(10)):  # before set_timesteps: t - 1, of the type passed in
        assert type(ours.previous_timestep(t)) is type(ref.previous_timestep(t))
        assert int(ours.previous_timestep(t)) == int(ref.previous_timestep(t)) == 9
    ref.set_timesteps(10)
    ours.set_timesteps(10)
    for t in (int(ref.timesteps[3]), ref.timesteps[3], int(ref.timesteps[-1])):
        got, want = ours.previous_timestep(t), ref.previous_timestep(t)
        assert isinstance(got, torch.Tensor) and isinstance(want, torch.Tensor)
        assert got.dtype == want.dtype and int(got) == int(want)


@pytest.mark.parametrize("name", ALL)
def test_scheduler_output_behaves_like_diffusers_base_output(name):
    """diffusers' test_scheduler_outputs_equivalence and BaseOutput's dict surface."""
    ref, ours = both(name, **SD)
    for s in (ref, ours):
        s.set_timesteps(10)
    x = sample_deter()
    t = ours.timesteps[0]

    def one_step(s, **kw):
        s.set_timesteps(10)
        if accepts(s.step, "generator"):
            kw["generator"] = torch.Generator().manual_seed(0)
        return s.step(0.1 * x, t, x, **kw)

    out, tup = one_step(ours), one_step(ours, return_dict=False)
    ref_out = one_step(ref)
    assert isinstance(out, dict) and isinstance(tup, tuple)
    assert len(tup) == len(one_step(ref, return_dict=False))
    for a, b in zip(tup, out.values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert list(out.keys())[: len(ref_out.keys())] == list(ref_out.keys())
    assert [k for k, _ in out.items()] == list(out.keys())
    assert out[0] is out.prev_sample is out["prev_sample"]
    assert out.to_tuple() == tuple(out.values())
    torch.testing.assert_close(out.prev_sample, ref_out.prev_sample, atol=1e-5, rtol=1e-5)


def test_scheduler_output_fields_none_and_setters_like_base_output():
    x = torch.zeros(1)
    out = F.SchedulerOutput(prev_sample=x)
    assert list(out.keys()) == ["prev_sample"] and out.to_tuple() == (x,) and out.pred_original_sample is None
    y = torch.ones(1)
    out.prev_sample = y
    assert out["prev_sample"] is y and out[0] is y
    out["pred_original_sample"] = x
    assert out.pred_original_sample is x and list(out.keys()) == ["prev_sample", "pred_original_sample"]
    with pytest.raises(TypeError):
        del out["prev_sample"]
    with pytest.raises(TypeError):
        out.pop("prev_sample")


# ------------------------------------------------------------------ DDPM before set_timesteps


def test_ddpm_steps_before_set_timesteps_like_diffusers():
    """diffusers' DDPM constructor sets the full T-step schedule: step() works before set_timesteps (each step
    to t - 1), as diffusers' own DDPM tests use it."""
    ref, ours = both("DDPMScheduler")
    assert torch.equal(ours.timesteps, ref.timesteps) and ours.num_inference_steps is None
    x = sample_deter()
    xs = []
    for s in (ref, ours):
        y, g = x, torch.Generator().manual_seed(0)
        # (the high timesteps: near t = 0 diffusers' float32 beta_t = 1 - abar_t / abar_t-1 cancels, 1e-4)
        for t in s.timesteps[:8]:
            y = s.step(model(y, t), t, y, generator=g).prev_sample
        xs.append(y)
    close(xs[1], xs[0])


@pytest.mark.parametrize("bad,match", [([100, 87, 50, 51, 0], "descending"), ([1000, 50, 0], r"\[0, 999\]")])
def test_ddpm_custom_timesteps_errors(bad, match):
    """diffusers' test_custom_timesteps_increasing_order / _too_large / _passing_both."""
    s = F.DDPMScheduler()
    with pytest.raises(ValueError, match=match):
        s.set_timesteps(timesteps=bad)
    with pytest.raises(ValueError):
        s.set_timesteps(num_inference_steps=3, timesteps=[100, 50, 0])


def test_ddpm_custom_timesteps_previous_timestep_like_diffusers():
    ref, ours = both("DDPMScheduler")
    ts = [100, 87, 50, 1, 0]
    for s in (ref, ours):
        s.set_timesteps(timesteps=ts)
    for i, t in enumerate(ts):
        want = ts[i + 1] if i + 1 < len(ts) else -1
        assert int(ours.previous_timestep(t)) == int(ref.previous_timestep(t)) == want


# ------------------------------------------------------------------ DDIM


def test_ddim_steps_offset_like_diffusers():
    s = F.DDIMScheduler(steps_offset=1)
    s.set_timesteps(5)
    assert torch.equal(s.timesteps, torch.LongTensor([801, 601, 401, 201, 1]))


@pytest.mark.parametrize("t", [1, 10, 49, 500])
def test_ddim_steps_from_timesteps_off_the_schedule_like_diffusers(t):
    """diffusers' test_time_indices steps DDIM at timesteps that are not in the schedule (a DDIM jump from t to
    t - T // n): fastgen does the same instead of refusing."""
    ref, ours = both("DDIMScheduler")
    for s in (ref, ours):
        s.set_timesteps(50)
    x = sample_deter()
    close(ours.step(0.1 * x, t, x).prev_sample, ref.step(0.1 * x, t, x).prev_sample)
    assert ours.previous_timestep(t) == t - 20


# ------------------------------------------------------------------ Euler / Heun custom timesteps and sigmas


def _custom_loop(name, how, **cfg):
    """diffusers' full_loop_custom_timesteps / _sigmas: the default schedule's timesteps (or sigmas) passed back."""
    outs = []
    for lib in (diffusers, F):
        first = getattr(lib, name)(**cfg)
        first.set_timesteps(10)
        s = getattr(lib, name)(**cfg)
        s.set_timesteps(num_inference_steps=None, **{how: getattr(first, how)})
        outs.append((s, full_loop(s)))
    return outs


@pytest.mark.parametrize("pred", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
@pytest.mark.parametrize("how", ["timesteps", "sigmas"])
def test_euler_custom_timesteps_and_sigmas(pred, final, how):
    cfg = dict(SD, prediction_type=pred, final_sigmas_type=final)
    (ref, x_ref), (ours, x_ours) = _custom_loop("EulerDiscreteScheduler", how, **cfg)
    default = F.EulerDiscreteScheduler(**cfg)
    default.set_timesteps(10)
    torch.testing.assert_close(ours.sigmas, default.sigmas, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.timesteps, ref.timesteps, rtol=0, atol=1.5e-4)
    close(x_ours, x_ref)
    close(x_ours, full_loop(default), tol=1e-4)  # diffusers' expectation: the same sample as the default loop


@pytest.mark.parametrize("pred", ["epsilon", "sample", "v_prediction"])
def test_heun_custom_timesteps(pred):
    cfg = dict(prediction_type=pred)
    (ref, x_ref), (ours, x_ours) = _custom_loop("HeunDiscreteScheduler", "timesteps", **cfg)
    # (Heun's timesteps after the first are listed twice; passing them back lists them twice again, in both)
    assert torch.equal(ours.timesteps, ref.timesteps)
    torch.testing.assert_close(ours.sigmas, ref.sigmas.double(), rtol=2e-6, atol=1e-6)
    close(x_ours, x_ref)


def test_heun_custom_timesteps_equal_default_loop():
    default = F.HeunDiscreteScheduler()
    default.set_timesteps(10)
    custom = F.HeunDiscreteScheduler()
    custom.set_timesteps(timesteps=default.timesteps[::2])  # the 10 distinct timesteps
    assert torch.equal(custom.timesteps, default.timesteps)
    close(full_loop(custom), full_loop(default))


def _retrieve_timesteps(scheduler, **kw):
    """What diffusers' pipelines do in ``retrieve_timesteps`` (restated: importing it needs transformers): pass
    custom ``timesteps`` / ``sigmas`` to set_timesteps when its signature has them, then read the schedule."""
    for key in kw:
        if key not in inspect.signature(scheduler.set_timesteps).parameters:
            raise ValueError(f"{type(scheduler).__name__} does not support custom {key}")
    scheduler.set_timesteps(device="cpu", **kw)
    return scheduler.timesteps, len(scheduler.timesteps)


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "HeunDiscreteScheduler"])
def test_retrieve_timesteps_of_diffusers_pipelines_accepts_fastgen_schedulers(name):
    ref, ours = both(name, **SD)
    custom = [999.0, 700.0, 400.0, 100.0]
    ts_ours, n_ours = _retrieve_timesteps(ours, timesteps=custom)
    ts_ref, n_ref = _retrieve_timesteps(ref, timesteps=custom)
    assert n_ours == n_ref and torch.equal(ts_ours, ts_ref)
    torch.testing.assert_close(ours.sigmas, ref.sigmas.double(), rtol=2e-6, atol=1e-6)
    close(full_loop(ours), full_loop(ref))
    if name == "EulerDiscreteScheduler":
        sig = [14.6, 6.0, 2.0, 0.5, 0.1, 0.0]
        ts_ours, n_ours = _retrieve_timesteps(ours, sigmas=sig)
        ts_ref, n_ref = _retrieve_timesteps(ref, sigmas=sig)
        assert n_ours == n_ref == 5
        torch.testing.assert_close(ts_ours, ts_ref, rtol=0, atol=1.5e-4)
        torch.testing.assert_close(ours.sigmas, torch.tensor(sig, dtype=torch.float64))
        close(full_loop(ours), full_loop(ref))


def test_custom_schedule_errors():
    s = F.EulerDiscreteScheduler(use_karras_sigmas=True)
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        s.set_timesteps(timesteps=[999.0, 500.0])
    s = F.EulerDiscreteScheduler()
    with pytest.raises(ValueError, match="Only one"):
        s.set_timesteps(timesteps=[999.0], sigmas=[1.0, 0.0])
    with pytest.raises(ValueError, match="Can only pass one"):
        s.set_timesteps(10, sigmas=[1.0, 0.0])
    with pytest.raises(ValueError, match="exactly one"):
        s.set_timesteps()
    with pytest.raises(ValueError, match="at least 2"):
        s.set_timesteps(sigmas=[1.0])


# ------------------------------------------------------------------ common expectations (test_schedulers.py)


def _step_kwargs(s):
    return dict(generator=torch.manual_seed(0)) if accepts(s.step, "generator") else {}


@pytest.mark.parametrize("name", ALL)
def test_save_config_from_pretrained_gives_identical_steps(name, tmp_path):
    """check_over_configs / test_from_save_pretrained: a saved and reloaded scheduler steps identically."""
    s = getattr(F, name)(**SD)
    s.save_config(tmp_path)
    again = getattr(F, name).from_pretrained(tmp_path)
    x = sample_deter()
    outs = []
    for sched in (s, again):
        sched.set_timesteps(10)
        t = sched.timesteps[0]
        outs.append(sched.step(0.1 * x, t, x, **_step_kwargs(sched)).prev_sample)
    assert torch.sum(torch.abs(outs[0] - outs[1])) < 1e-5


@pytest.mark.parametrize("name", ALL)
def test_step_shape_and_public_api(name):
    """test_step_shape, test_scheduler_public_api and test_add_noise_device."""
    ref, ours = both(name, **SD)
    x = sample_deter()
    assert hasattr(ours, "init_noise_sigma") and ours.scale_model_input(x, 0.0).shape == x.shape
    for s in (ref, ours):
        s.set_timesteps(10)
    t0, t1 = ours.timesteps[0], ours.timesteps[1]
    a = ours.step(0.1 * x, t0, x).prev_sample
    b = ours.step(0.1 * x, t1, x).prev_sample
    assert a.shape == b.shape == x.shape
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    t = ours.timesteps[5][None]
    torch.testing.assert_close(ours.add_noise(x, noise, t), ref.add_noise(x, noise, t), rtol=1e-6, atol=2e-6)


@pytest.mark.parametrize("name", ALL)
def test_trained_betas_round_trip(name, tmp_path):
    """test_trained_betas, with a table of num_train_timesteps entries (fastgen refuses a table of another
    length, see docs/schedulers.md: diffusers builds a scheduler whose steps index past its tables)."""
    betas = np.linspace(0.0001, 0.02, 10)
    s = getattr(F, name)(num_train_timesteps=10, trained_betas=betas)
    s.save_pretrained(tmp_path)
    again = getattr(F, name).from_pretrained(tmp_path)
    assert s.betas.tolist() == again.betas.tolist()
    with pytest.raises(ValueError, match="trained_betas"):
        getattr(F, name)(trained_betas=np.array([0.1, 0.3]))


@pytest.mark.parametrize("name", ALL)
def test_getattr_and_register_to_config_like_diffusers(name):
    """test_getattr_is_correct: plain attributes, methods, config keys (with a FutureWarning) and the
    AttributeError message; register_to_config adds keys (training scripts set prediction_type with it)."""
    s = getattr(F, name)()
    s.dummy_attribute = 5
    s.register_to_config(test_attribute=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert s.dummy_attribute == 5 and getattr(s, "save_pretrained") == s.save_pretrained
    with pytest.warns(FutureWarning):
        assert s.test_attribute == 5
    with pytest.raises(AttributeError) as err:
        s.does_not_exist
    assert str(err.value) == f"'{type(s).__name__}' object has no attribute 'does_not_exist'"
    s.register_to_config(prediction_type="v_prediction")
    assert s.config.prediction_type == "v_prediction"


def test_dpm_solver_fp16_and_past_model_outputs():
    """test_fp16_support and test_step_shape of the DPM-Solver suite (past x0 predictions assigned by hand)."""
    s = F.DPMSolverMultistepScheduler()
    s.set_timesteps(10)
    x = sample_deter().half()
    for t in s.timesteps:
        x = s.step(model(x, t), t, x).prev_sample
    assert x.dtype == torch.float16 and torch.isfinite(x).all()
    ref, ours = both("DPMSolverMultistepScheduler", solver_order=2)
    x = sample_deter()
    past = [x * 0.2, x * 0.15]
    outs = []
    for s in (ref, ours):
        s.set_timesteps(10)
        s.model_outputs = list(past)
        s.lower_order_nums = 2
        a = s.step(0.1 * x, s.timesteps[5], x).prev_sample
        b = s.step(0.1 * x, s.timesteps[6], x).prev_sample
        outs.append((a, b))
    for mine, theirs in zip(outs[1], outs[0]):
        assert mine.shape == x.shape
        close(mine, theirs)


# ------------------------------------------------------------------ tables: computed where written


@pytest.mark.parametrize("name", ALL)
def test_tables_are_built_once_per_set_timesteps_not_per_step(name, monkeypatch):
    """A pipeline loop (``for t in scheduler.timesteps``, scale_model_input, step) builds the per-step float tables
    once, in set_timesteps."""
    s = getattr(F, name)(**SD)
    builds = []
    real = type(s)._build_tables
    monkeypatch.setattr(type(s), "_build_tables", lambda self: builds.append(1) or real(self))
    s.set_timesteps(8)
    assert len(builds) == 1
    full_loop(s)
    assert len(builds) == 1


@pytest.mark.parametrize("name", ALL)
def test_tables_follow_assignment_and_inference_mode(name):
    """Assigning a table rebuilds the floats before the next step; tables made under inference_mode (tensors
    without a version counter) work."""
    with torch.inference_mode():
        s = getattr(F, name)(**SD)
        s.set_timesteps(6)
        x = full_loop(s)
    assert torch.isfinite(x).all()
    if name in ("DDPMScheduler", "DDIMScheduler"):
        s = getattr(F, name)(**SD)
        s.set_timesteps(6)
        base = full_loop(s)
        s.alphas_cumprod = s.alphas_cumprod * 0.99  # assignment, as diffusers users do (e.g. to float64)
        s.set_timesteps(6)
        assert (full_loop(s) - base).abs().max() > 1e-4


# ------------------------------------------------------------------ image-to-image start (test_full_loop_with_noise)


@pytest.mark.parametrize("name", ALL)
def test_loop_from_a_noised_image_mid_schedule_matches_diffusers(name):
    """diffusers' test_full_loop_with_noise: noise a sample to a mid-schedule timestep with add_noise, then run
    the rest of the schedule (set_begin_index for the sigma-table schedulers, as img2img pipelines do)."""
    ref, ours = both(name, **SD)
    t_start = 4
    xs = []
    for s in (ref, ours):
        s.set_timesteps(10)
        start = t_start * s.order
        timesteps = s.timesteps[start:]
        if hasattr(s, "set_begin_index"):
            s.set_begin_index(start)
        noise = sample_deter().flip(0)
        x = s.add_noise(sample_deter(), noise, timesteps[:1])
        g = torch.Generator().manual_seed(0)
        for t in timesteps:
            kw = dict(generator=g) if accepts(s.step, "generator") else {}
            x = s.step(model(s.scale_model_input(x, t), t), t, x, **kw).prev_sample
        xs.append(x)
    close(xs[1], xs[0])


@pytest.mark.parametrize("name", ALL)
def test_copies_and_pickles_step_like_the_original(name):
    import copy
    import pickle

    s = getattr(F, name)(**SD)
    s.set_timesteps(6)
    for other in (copy.deepcopy(s), pickle.loads(pickle.dumps(s))):
        assert dict(other.config) == dict(s.config)
        close(full_loop(other), full_loop(copy.deepcopy(s)))
