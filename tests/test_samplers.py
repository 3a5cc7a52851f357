"""The k-diffusion-style sampler functions: same results as the scheduler classes (one implementation), as
straightforward float64 re-statements of k-diffusion's loops, per-sample determinism, adapters and CFG."""

from __future__ import annotations

import math

import pytest
import torch

import fastgen.schedulers as F
from fastgen.schedulers import steps as steps_mod

SHAPE = (2, 4, 8, 8)
ATOL = 1e-5
FIXED = torch.randn(SHAPE[1:], generator=torch.Generator().manual_seed(99))  # one per-sample pattern
SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def dummy_model(x, t, encoder_hidden_states=None):
    """Deterministic per-sample stand-in for a U-Net (sample i's output depends on sample i only)."""
    t = torch.as_tensor(t, dtype=torch.float32)
    t = t.reshape(-1, *([1] * (x.dim() - 1))) if t.dim() else t
    out = x * (0.9 + 0.05 * t / 1000) + 0.1 * FIXED * torch.cos(t / 300)
    if encoder_hidden_states is not None:
        out = out + 0.3 * encoder_hidden_states
    return out


def noise(seed, shape=SHAPE):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def denoiser_for(scheduler, model=dummy_model, **kw):
    cls = {"epsilon": F.EpsDenoiser, "v_prediction": F.VDenoiser, "sample": F.X0Denoiser}[scheduler.config.prediction_type]
    clip = scheduler.config.get("clip_sample_range", 1.0) if scheduler.config.get("clip_sample") else None
    return cls(model, scheduler, clip=clip, **kw)


def scheduler_loop(s, x, seed=None, **step_kwargs):
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    if g is not None:
        step_kwargs["generator"] = g
    for t in s.timesteps:
        x = s.step(dummy_model(s.scale_model_input(x, t), t), t, x, **step_kwargs).prev_sample
    return x


# ------------------------------------------------------------------ one implementation: functions == classes


def vp_sigmas(s):
    """The VE noise levels a DDPM/DDIM scheduler visits (its timesteps, then the final level)."""
    sig = s.schedule.sigmas[s.timesteps]
    final = 0.0 if getattr(s, "final_alpha_cumprod", torch.tensor(1.0)).item() == 1.0 else float(s.schedule.sigmas[0])
    return torch.cat([sig, torch.tensor([final], dtype=torch.float64)])


def check_same(x_fn, x_cls, sigma_final, vp):
    """Sampler functions run in VE space; a VP scheduler's state is x_ve / sqrt(1 + sigma^2)."""
    if vp:
        x_fn = x_fn / math.sqrt(1 + sigma_final**2)
    err = (x_fn - x_cls).abs().max().item()
    assert err <= ATOL * max(1.0, x_cls.abs().max().item()), err


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing,offset,alpha_one,clip", [("leading", 1, False, False), ("trailing", 0, True, True),
                                                           ("leading", 0, True, True)])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_sample_ddim_equals_ddim_scheduler(pred, spacing, offset, alpha_one, clip, eta):
    # leading/trailing with 10 | 1000: DDIM's "t - T // n" previous timestep is the next one in the schedule
    s = F.DDIMScheduler(**SD, prediction_type=pred, timestep_spacing=spacing, steps_offset=offset,
                        set_alpha_to_one=alpha_one, clip_sample=clip, clip_sample_range=1.5)
    s.set_timesteps(10)
    x = noise(0)
    x_cls = scheduler_loop(s, x, seed=3, eta=eta)
    sig = vp_sigmas(s)
    den = denoiser_for(s, quantize=True)
    x_fn = F.sample_ddim(den, x * math.sqrt(1 + float(sig[0]) ** 2), sig, generator=torch.Generator().manual_seed(3), eta=eta)
    check_same(x_fn, x_cls, float(sig[-1]), vp=True)


@pytest.mark.parametrize("pred,variance_type,clip", [("epsilon", "fixed_small", True), ("v_prediction", "fixed_large", False),
                                                     ("sample", "fixed_small_log", True)])
def test_sample_ddpm_equals_ddpm_scheduler(pred, variance_type, clip):
    s = F.DDPMScheduler(**SD, prediction_type=pred, variance_type=variance_type, clip_sample=clip)
    s.set_timesteps(12)
    x_cls = scheduler_loop(s, noise(0), seed=5)
    sig = vp_sigmas(s)
    x_fn = F.sample_ddpm(denoiser_for(s, quantize=True), noise(0) * math.sqrt(1 + float(sig[0]) ** 2), sig,
                         generator=torch.Generator().manual_seed(5), variance_type=variance_type)
    check_same(x_fn, x_cls, 0.0, vp=True)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("karras", [False, True])
def test_sample_euler_equals_euler_scheduler(pred, karras):
    s = F.EulerDiscreteScheduler(**SD, prediction_type=pred, use_karras_sigmas=karras,
                                 timestep_spacing="leading" if not karras else "linspace", steps_offset=1)
    s.set_timesteps(10)
    x = noise(0) * s.init_noise_sigma
    x_cls = scheduler_loop(s, x)
    x_fn = F.sample_euler(denoiser_for(s, quantize=not karras), x, s.sigmas)
    check_same(x_fn, x_cls, 0.0, vp=False)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_sample_euler_ancestral_equals_scheduler(pred):
    s = F.EulerAncestralDiscreteScheduler(**SD, prediction_type=pred, timestep_spacing="trailing")
    s.set_timesteps(10)
    x = noise(0) * s.init_noise_sigma
    x_cls = scheduler_loop(s, x, seed=8)
    x_fn = F.sample_euler_ancestral(denoiser_for(s, quantize=True), x, s.sigmas, generator=torch.Generator().manual_seed(8))
    check_same(x_fn, x_cls, 0.0, vp=False)


@pytest.mark.parametrize("pred,karras,clip", [("epsilon", True, False), ("v_prediction", False, False), ("sample", True, True)])
def test_sample_heun_equals_heun_scheduler(pred, karras, clip):
    s = F.HeunDiscreteScheduler(**SD, prediction_type=pred, use_karras_sigmas=karras, clip_sample=clip,
                                clip_sample_range=2.0, timestep_spacing="linspace" if karras else "trailing")
    s.set_timesteps(8)
    x = noise(0) * s.init_noise_sigma
    x_cls = scheduler_loop(s, x)
    sigmas = torch.unique_consecutive(s.sigmas)  # the scheduler lists each sigma after the first twice
    x_fn = F.sample_heun(denoiser_for(s, quantize=not karras), x, sigmas)
    check_same(x_fn, x_cls, 0.0, vp=False)


@pytest.mark.parametrize("fn,cfg,n", [
    (F.sample_dpmpp_2m, dict(use_karras_sigmas=True), 10),
    (F.sample_dpmpp_2m, dict(prediction_type="v_prediction", final_sigmas_type="sigma_min"), 8),
    (F.sample_dpmpp_2m, dict(solver_type="heun", lower_order_final=False), 16),
    (F.sample_dpmpp_3m, dict(solver_order=3, use_karras_sigmas=True), 12),
    (F.sample_dpmpp_3m, dict(solver_order=3, prediction_type="sample"), 20),
    (F.sample_dpmpp_2m_sde, dict(algorithm_type="sde-dpmsolver++"), 10),
    (F.sample_dpmpp_2m_sde, dict(algorithm_type="sde-dpmsolver++", use_karras_sigmas=True, solver_type="heun"), 10),
])
def test_sample_dpmpp_equals_dpm_solver_scheduler(fn, cfg, n):
    s = F.DPMSolverMultistepScheduler(**SD, **cfg)
    s.set_timesteps(n)
    x_cls = scheduler_loop(s, noise(0), seed=6)
    sig0, sig_final = float(s.sigmas[0]), float(s.sigmas[-1])
    kw = {k: cfg[k] for k in ("solver_type", "lower_order_final") if k in cfg}
    if fn is F.sample_dpmpp_3m:
        kw.pop("solver_type", None)
    x_fn = fn(denoiser_for(s, quantize=True), noise(0) * math.sqrt(1 + sig0**2), s.sigmas,
              generator=torch.Generator().manual_seed(6), **kw)
    check_same(x_fn, x_cls, sig_final, vp=True)


def test_sampler_functions_call_the_fused_op_once_per_model_call(monkeypatch):
    calls = []
    real = steps_mod.sampling_step
    monkeypatch.setattr(steps_mod, "sampling_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    model_calls = []
    model = lambda x, t: model_calls.append(1) or dummy_model(x, t)  # noqa: E731
    s = F.EulerDiscreteScheduler(**SD)
    den = F.EpsDenoiser(model, s)
    sig = F.get_sigmas_karras(6, den.sigma_min, den.sigma_max)
    for fn in (F.sample_euler, F.sample_heun, F.sample_dpmpp_2m, F.sample_dpmpp_3m, F.sample_euler_ancestral,
               F.sample_ddim, F.sample_ddpm, F.sample_dpmpp_2s_ancestral):
        calls.clear(), model_calls.clear()
        fn(den, noise(0) * float(sig[0]), sig, generator=[1, 2])
        assert len(calls) == len(model_calls), fn.__name__


# ------------------------------------------------------------------ k-diffusion's loops, restated in float64


def kd_denoise(den, x, sigma):
    return den(x.float(), torch.full((x.shape[0],), sigma)).double()


def test_euler_with_churn_matches_k_diffusion_loop():
    s = F.EulerDiscreteScheduler(**SD)
    den = F.EpsDenoiser(dummy_model, s)
    sig = F.get_sigmas_karras(8, 0.03, 14.6)
    x = noise(0) * 14.6
    churn = dict(s_churn=2.0, s_tmin=0.1, s_tmax=5.0, s_noise=1.003)
    ours = F.sample_euler(den, x, sig, generator=[4, 5], **churn)
    gens = F.make_generators([F.noise.noise_stream_seed(4), F.noise.noise_stream_seed(5)])
    ref = x.double()
    for i in range(len(sig) - 1):  # k-diffusion's sample_euler
        sigma = float(sig[i])
        gamma = min(churn["s_churn"] / (len(sig) - 1), 2**0.5 - 1) if churn["s_tmin"] <= sigma <= churn["s_tmax"] else 0.0
        sigma_hat = sigma * (gamma + 1)
        if gamma > 0:
            eps = torch.stack([torch.randn(SHAPE[1:], generator=g) for g in gens]).double() * churn["s_noise"]
            ref = ref + eps * (sigma_hat**2 - sigma**2) ** 0.5
        d = (ref - kd_denoise(den, ref, sigma_hat)) / sigma_hat
        ref = ref + d * (float(sig[i + 1]) - sigma_hat)
    assert (ours.double() - ref).abs().max().item() <= ATOL


def test_dpmpp_2s_ancestral_matches_k_diffusion_loop():
    den = F.VDenoiser(dummy_model, F.DiscreteSchedule.from_config(**SD))
    sig = F.get_sigmas_karras(7, den.sigma_min, den.sigma_max)
    x = noise(1) * float(sig[0])
    ours = F.sample_dpmpp_2s_ancestral(den, x, sig, generator=[7, 8], eta=0.8)
    gens = F.make_generators([F.noise.noise_stream_seed(7), F.noise.noise_stream_seed(8)])
    ref = x.double()
    for i in range(len(sig) - 1):  # k-diffusion's sample_dpmpp_2s_ancestral
        sigma, sigma_next = float(sig[i]), float(sig[i + 1])
        denoised = kd_denoise(den, ref, sigma)
        sigma_up = min(sigma_next, 0.8 * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        if sigma_down == 0:
            ref = denoised
        else:
            t, t_next = -math.log(sigma), -math.log(sigma_down)
            h = t_next - t
            s_ = t + 0.5 * h
            x_2 = (math.exp(-s_) / sigma) * ref - math.expm1(-h * 0.5) * denoised
            denoised_2 = kd_denoise(den, x_2, math.exp(-s_))
            ref = (math.exp(-t_next) / sigma) * ref - math.expm1(-h) * denoised_2
        if sigma_next > 0:
            ref = ref + torch.stack([torch.randn(SHAPE[1:], generator=g) for g in gens]).double() * sigma_up
    assert (ours.double() - ref).abs().max().item() <= ATOL


def test_dpmpp_2m_matches_k_diffusion_loop():
    den = F.EpsDenoiser(dummy_model, F.DiscreteSchedule.from_config(**SD))
    sig = F.get_sigmas_exponential(9, den.sigma_min, den.sigma_max)
    x = noise(2) * float(sig[0])
    ours = F.sample_dpmpp_2m(den, x, sig)
    ref, old = x.double(), None
    for i in range(len(sig) - 1):  # k-diffusion's sample_dpmpp_2m
        denoised = kd_denoise(den, ref, float(sig[i]))
        t, t_next = -math.log(sig[i]), (math.inf if sig[i + 1] == 0 else -math.log(sig[i + 1]))
        h = t_next - t
        if old is None or sig[i + 1] == 0:
            ref = (float(sig[i + 1]) / float(sig[i])) * ref - math.expm1(-h) * denoised
        else:
            r = (t - (-math.log(sig[i - 1]))) / h
            d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
            ref = (float(sig[i + 1]) / float(sig[i])) * ref - math.expm1(-h) * d
        old = denoised
    assert (ours.double() - ref).abs().max().item() <= ATOL


# ------------------------------------------------------------------ determinism


@pytest.mark.parametrize("fn", [F.sample_euler_ancestral, F.sample_ddpm, F.sample_dpmpp_2m_sde, F.sample_dpmpp_2s_ancestral])
def test_per_sample_seeds_are_batch_independent(fn):
    den = F.EpsDenoiser(dummy_model, F.DiscreteSchedule.from_config(**SD))
    sig = F.get_sigmas_karras(6, den.sigma_min, den.sigma_max)
    seeds = [11, 12, 13]
    x3 = F.randn_tensor((3, *SHAPE[1:]), generator=seeds) * float(sig[0])
    x1 = F.randn_tensor((1, *SHAPE[1:]), generator=[12]) * float(sig[0])
    assert torch.equal(x3[1:2], x1)
    out3, out1 = fn(den, x3, sig, generator=seeds), fn(den, x1, sig, generator=[12])
    assert torch.equal(out3[1:2], out1)
    # and per-sample generators behave like seeds (same streams), while a single generator draws the batch
    gens = F.make_generators(seeds, stream=1)
    assert torch.equal(fn(den, x3, sig, generator=gens), out3)
    assert not torch.equal(fn(den, x3, sig, generator=torch.Generator().manual_seed(12)), out3)


@pytest.mark.parametrize("name", ["DDPMScheduler", "EulerAncestralDiscreteScheduler", "DDIMScheduler"])
def test_scheduler_per_sample_seeds_are_batch_independent(name):
    kw = dict(eta=1.0) if name == "DDIMScheduler" else {}
    outs = []
    for seeds in ([21, 22], [22]):
        s = getattr(F, name)(**SD)
        s.set_timesteps(6)
        x = F.randn_tensor((len(seeds), *SHAPE[1:]), generator=seeds) * float(s.init_noise_sigma)
        for t in s.timesteps:  # the same seed list at every step continues the same streams
            x = s.step(dummy_model(s.scale_model_input(x, t), t), t, x, generator=seeds, **kw).prev_sample
        outs.append(x)
    assert torch.equal(outs[0][1:], outs[1])


def test_seed_streams():
    a = F.randn_tensor((2, 3), generator=[5, 6])
    assert torch.equal(a[0], torch.randn(3, generator=torch.Generator().manual_seed(5)))
    src = F.noise.NoiseSource([5, 6])
    step_noise = src.randn((2, 3), "cpu", torch.float32)
    assert not torch.equal(step_noise, a)  # step noise is a different stream than the initial latents
    assert src.update([5, 6]) is src and src.update([5, 7]) is not src
    with pytest.raises(ValueError, match="one per sample"):
        F.randn_tensor((3, 2), generator=[1, 2])
    with pytest.raises(TypeError, match="generator"):
        F.randn_tensor((2, 2), generator="seed")


# ------------------------------------------------------------------ adapters, CFG, callbacks, errors


def test_plain_k_diffusion_denoiser_gives_same_result_as_fused_adapter():
    den = F.VDenoiser(dummy_model, F.DiscreteSchedule.from_config(**SD))
    sig = F.get_sigmas_karras(8, den.sigma_min, den.sigma_max)
    x = noise(3) * float(sig[0])
    fused = F.sample_dpmpp_2m(den, x, sig)
    plain = F.sample_dpmpp_2m(lambda x, sigma: den(x, sigma), x, sig)  # any D(x, sigma) -> x0 callable
    assert (fused - plain).abs().max().item() <= ATOL


def test_denoiser_per_sample_sigmas():
    den = F.EpsDenoiser(dummy_model, F.DiscreteSchedule.from_config(**SD))
    x = noise(4)
    sig = torch.tensor([0.5, 3.0])
    both = den(x, sig)
    for i in range(2):
        torch.testing.assert_close(both[i:i + 1], den(x[i:i + 1], float(sig[i])))
    with pytest.raises(ValueError, match="one sigma"):
        den.predict(x, sig)


def test_cfg_denoiser_fuses_guidance():
    g = 6.0
    den = F.EpsDenoiser(dummy_model, F.DiscreteSchedule.from_config(**SD))
    cond, uncond = noise(10), noise(11)
    sig = F.get_sigmas_karras(6, den.sigma_min, den.sigma_max)
    x = noise(5) * float(sig[0])

    def model_with_cond(x, t, encoder_hidden_states):
        return dummy_model(x, t, encoder_hidden_states=encoder_hidden_states)

    def eager(x, sigma):  # classifier-free guidance the usual way: two eps, combined, then x0
        s = float(sigma[0])
        x_in, t = den.model_input(x, s)
        e_u, e_c = model_with_cond(x_in, t, uncond), model_with_cond(x_in, t, cond)
        return x - s * (e_u + g * (e_c - e_u))

    cfg_den = F.CFGDenoiser(F.EpsDenoiser(model_with_cond, den.schedule), g)
    fused = F.sample_euler(cfg_den, x, sig, extra_args=dict(cond=cond, uncond=uncond))
    ref = F.sample_euler(eager, x, sig)
    assert (fused - ref).abs().max().item() <= ATOL * max(1.0, ref.abs().max().item())


def test_callback_reports_each_step():
    den = F.EpsDenoiser(dummy_model, F.DiscreteSchedule.from_config(**SD))
    sig = F.get_sigmas_karras(5, den.sigma_min, den.sigma_max)
    seen = []
    F.sample_heun(den, noise(0) * float(sig[0]), sig, callback=seen.append)
    assert [d["i"] for d in seen] == list(range(5))
    assert all(d["denoised"].shape == SHAPE and d["sigma"] == float(sig[d["i"]]) for d in seen)


def test_sampler_input_errors():
    den = F.EpsDenoiser(dummy_model, F.DiscreteSchedule.from_config(**SD))
    with pytest.raises(ValueError, match="at least 2"):
        F.sample_euler(den, noise(0), [1.0])
    with pytest.raises(ValueError, match="non-increasing"):
        F.sample_euler(den, noise(0), [1.0, 2.0, 0.0])
    with pytest.raises(TypeError, match="torch.Tensor"):
        F.sample_euler(den, [1.0], [1.0, 0.0])
    with pytest.raises(ValueError, match="x0 tensor"):
        F.sample_euler(lambda x, s: x[:1], noise(0), [1.0, 0.0])
    with pytest.raises(ValueError, match="prediction_type"):
        F.DiscreteDenoiser(dummy_model, den.schedule, "score")
    with pytest.raises(TypeError, match="predict"):
        F.CFGDenoiser(lambda x, s: x, 5.0)
