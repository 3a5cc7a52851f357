"""The per-step math shared by the sampler functions and the scheduler classes.

Every method is written once here, over *noise levels in the state's own space*: a state ``x`` at level
``Level(alpha, sigma)`` means ``x = alpha * x0 + sigma * eps``. The diffusers-style schedulers of the
DDPM/DDIM/DPM-Solver family keep ``x`` in VP space (``alpha = sqrt(abar)``, ``sigma = sqrt(1 - abar)``);
the k-diffusion-style sampler functions and the Euler/Heun schedulers keep it in VE space (``alpha = 1``,
``sigma = sqrt((1 - abar) / abar)``). The formulas below are invariant to that choice (the two states differ
by a per-level scale), so the same function serves both, and its float64 coefficients go through one call
of :func:`fastgen.ops.sampling.sampling_step` per model evaluation.

A model output becomes a prediction of x0 through the affine map ``x0 = c0 * x + c1 * e``
(:func:`x0_coeffs`), which the fused kernel applies together with classifier-free guidance and clipping.
Identities the module relies on (all exact in exact arithmetic):

* Euler (VE) is DDIM with eta=0; Euler ancestral (VE) is DDIM with eta; DDPM's posterior mean is DDIM's
  with eta=1; DPM-Solver++ first order is DDIM with eta=0 written with ``expm1``.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from ..ops.sampling import sampling_step

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class Level(NamedTuple):
    """A noise level in the state's own space: ``x = alpha * x0 + sigma * eps``."""

    alpha: float
    sigma: float

    @property
    def r(self) -> float:
        """Scale from VP space to this space (``x_vp = x / r``); 1 in VP, ``sqrt(1 + sigma^2)`` in VE."""
        return math.hypot(self.alpha, self.sigma)

    @property
    def abar(self) -> float:
        a2 = self.alpha * self.alpha
        return a2 / (a2 + self.sigma * self.sigma)

    @property
    def lam(self) -> float:
        """Half log-SNR ``log(alpha / sigma)`` (DPM-Solver's lambda); +inf at sigma = 0."""
        return math.inf if self.sigma == 0 else math.log(self.alpha) - math.log(self.sigma)


def vp_level(abar: float) -> Level:
    abar = float(abar)
    return Level(math.sqrt(abar), math.sqrt(1.0 - abar))


def vp_level_from_sigma(sigma: float) -> Level:
    """The VP level with VE noise level ``sigma`` (diffusers' ``_sigma_to_alpha_sigma_t``)."""
    alpha = 1.0 / math.sqrt(float(sigma) ** 2 + 1.0)
    return Level(alpha, float(sigma) * alpha)


def ve_level(sigma: float) -> Level:
    return Level(1.0, float(sigma))


def check_prediction_type(prediction_type: str) -> str:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}: expected one of {', '.join(PREDICTION_TYPES)}")
    return prediction_type


def x0_coeffs(prediction_type: str, level: Level) -> tuple[float, float]:
    """``(c0, c1)`` with ``x0 = c0 * x + c1 * model_output`` for a network predicting eps, v or x0."""
    a, s = level
    if prediction_type == "epsilon":
        return 1.0 / a, -s / a
    if prediction_type == "v_prediction":
        # v = a_vp * eps - s_vp * x0 in VP units, where x_vp = x / r: x0 = a_vp * x_vp - s_vp * v
        r2 = a * a + s * s
        return a / r2, -s / math.sqrt(r2)
    if prediction_type == "sample":
        return 0.0, 1.0
    check_prediction_type(prediction_type)
    raise AssertionError


class Prediction(NamedTuple):
    """A model output and the affine map to x0 (``x0 = c0 * x + c1 * output``).

    With ``guidance_scale`` set, ``output`` is the ``[uncond; cond]`` batch (2N) and the kernel forms
    ``uncond + g * (cond - uncond)`` itself.
    """

    output: Tensor
    c0: float
    c1: float
    guidance_scale: Optional[float] = None


def _apply(pred: Prediction, x: Tensor, c2=0.0, c3=0.0, c4=0.0, c5=0.0, c6=0.0, *, c_e=0.0, extra1=None, extra2=None,
           noise=None, clip=None, return_x0=False):
    """One fused kernel call: ``out = c2 x + c3 x0 + c4 extra1 + c5 extra2 + c6 noise + c_e e``.

    A term in the raw (guided) model output ``e`` is routed through the extra slots: ``extra1 = e`` or, with
    guidance, ``extra1 = uncond, extra2 = cond`` (contiguous views of the doubled batch, no copy).
    """
    if c_e != 0.0:
        if extra1 is not None or extra2 is not None:
            raise AssertionError("a raw model-output term needs the extra slots free")
        out = pred.output
        if pred.guidance_scale is None:
            extra1, c4 = out, c_e
        else:
            n, g = x.shape[0], float(pred.guidance_scale)
            extra1, extra2, c4, c5 = out[:n], out[n:], c_e * (1.0 - g), c_e * g
    coeffs = [pred.c0, pred.c1, c2, c3, c4, c5, c6]
    res = sampling_step(
        x, pred.output, coeffs, extra1=extra1, extra2=extra2, noise=noise,
        guidance_scale=pred.guidance_scale, clip=clip, return_x0=return_x0,
    )
    return res if return_x0 else (res, None)


# ------------------------------------------------------------------ DDIM family (DDIM, DDPM, Euler, Euler ancestral)


def posterior_std(cur: Level, nxt: Level) -> float:
    """Std of q(x_next | x_cur, x0) in the next state's space (DDIM's sigma_t at eta=1; Euler ancestral's sigma_up)."""
    if cur.sigma == 0:
        return 0.0
    a_ts = cur.alpha / nxt.alpha  # alpha of x_cur given x_next
    var_ts = max(cur.sigma**2 - (a_ts * nxt.sigma) ** 2, 0.0)
    return nxt.sigma / cur.sigma * math.sqrt(var_ts)


def ddim_step(
    pred: Prediction,
    x: Tensor,
    cur: Level,
    nxt: Level,
    *,
    eta: float = 0.0,
    noise: Optional[Tensor] = None,
    noise_std: Optional[float] = None,
    clip: Optional[float] = None,
    eps_from_clipped: bool = False,
    return_x0: bool = False,
):
    """``x_next = alpha_n x0 + sqrt(sigma_n^2 - std^2) eps_hat + std z`` with ``std = eta * posterior_std``.

    ``eps_hat = (x - alpha x0') / sigma`` where x0' is the clipped x0 when ``eps_from_clipped`` (DDPM, Euler,
    Heun, DDIM's use_clipped_model_output) and the unclipped one otherwise (DDIM). ``noise_std`` overrides the
    std of the added noise without changing the mean (DDPM's variance types). Returns ``(x_next, x0 or None)``.
    """
    std = min(eta * posterior_std(cur, nxt), nxt.sigma)  # eta > 1 would ask for more noise than the level has
    k = math.sqrt(max(nxt.sigma**2 - std**2, 0.0))
    c6 = 0.0
    if noise is not None:
        c6 = std if noise_std is None else float(noise_std)
    a, s = cur
    if clip is not None and not eps_from_clipped:
        # eps from the raw x0 = c0 x + c1 e: (1 - a c0)/s * x - a c1/s * e; the e term uses the extra slots.
        return _apply(pred, x, c2=k * (1.0 - a * pred.c0) / s, c3=nxt.alpha, c6=c6, c_e=-k * a * pred.c1 / s,
                      noise=noise, clip=clip, return_x0=return_x0)
    # eps_hat is linear in (x, x0): fold it into the x and x0 coefficients.
    return _apply(pred, x, c2=k / s, c3=nxt.alpha - k * a / s, c6=c6, noise=noise, clip=clip, return_x0=return_x0)


DDPM_VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")


def ddpm_variances(cur: Level, nxt: Level) -> tuple[float, float]:
    """(posterior variance clamped at 1e-20, beta_t), in VP units, as diffusers' DDPM computes them."""
    beta = 1.0 - cur.abar / nxt.abar
    small = (1.0 - nxt.abar) / (1.0 - cur.abar) * beta
    return max(small, 1e-20), beta


def ddpm_noise_std(cur: Level, nxt: Level, variance_type: str = "fixed_small") -> float:
    """Std of DDPM's added noise in the next state's space for the fixed variance types."""
    small, beta = ddpm_variances(cur, nxt)
    if variance_type in ("fixed_small", "fixed_small_log"):
        std = math.sqrt(small)
    elif variance_type in ("fixed_large", "fixed_large_log"):
        # diffusers' fixed_large_log takes sqrt(log(beta)), a NaN; the intended log-variance is log(beta).
        std = math.sqrt(beta)
    else:
        raise ValueError(f"variance_type must be one of {', '.join(DDPM_VARIANCE_TYPES[:4])} here, got {variance_type!r}")
    return std * nxt.r


def ddpm_learned_std(cur: Level, nxt: Level, variance_type: str, predicted_variance: Tensor) -> Tensor:
    """Per-element noise std (next state's space) from a model that predicts its variance (improved DDPM)."""
    small, beta = ddpm_variances(cur, nxt)
    v = predicted_variance.float()
    if variance_type == "learned":
        std = v.sqrt()
    elif variance_type == "learned_range":
        frac = (v + 1) / 2  # interpolate the log-variance between beta_tilde and beta
        std = torch.exp(0.5 * (frac * math.log(beta) + (1 - frac) * math.log(small)))
    else:
        raise ValueError(f"variance_type must be learned or learned_range, got {variance_type!r}")
    return std * nxt.r


def ddpm_step(pred, x, cur, nxt, *, variance_type="fixed_small", noise=None, predicted_variance=None, clip=None,
              return_x0=False):
    """DDPM ancestral step: the eta=1 posterior mean (clipped x0) plus noise of the chosen variance."""
    if noise is not None and variance_type in ("learned", "learned_range"):
        if predicted_variance is None:
            raise ValueError(f"variance_type={variance_type!r} needs the model's predicted variance")
        noise = noise * ddpm_learned_std(cur, nxt, variance_type, predicted_variance).to(noise.dtype)
        std = 1.0
    else:
        std = ddpm_noise_std(cur, nxt, variance_type if variance_type not in ("learned", "learned_range") else "fixed_small")
    return ddim_step(pred, x, cur, nxt, eta=1.0, noise=noise, noise_std=std, clip=clip, eps_from_clipped=True,
                     return_x0=return_x0)


def euler_step(pred, x, sigma_hat: float, sigma_next: float, *, clip=None, return_x0=False):
    """Euler step of the probability-flow ODE in VE space (``x + (x - x0)/sigma * (sigma_next - sigma)``)."""
    return ddim_step(pred, x, ve_level(sigma_hat), ve_level(sigma_next), clip=clip, eps_from_clipped=True,
                     return_x0=return_x0)


def ancestral_sigmas(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up) of an ancestral step in VE space (k-diffusion's ``get_ancestral_step``)."""
    up = min(sigma_next, eta * posterior_std(ve_level(sigma), ve_level(sigma_next)))
    return math.sqrt(max(sigma_next**2 - up**2, 0.0)), up


def euler_ancestral_step(pred, x, sigma: float, sigma_next: float, *, eta=1.0, noise=None, s_noise=1.0,
                         return_x0=False):
    """Euler ancestral step in VE space: DDIM with eta, i.e. Euler to sigma_down plus sigma_up noise."""
    std = s_noise * ancestral_sigmas(sigma, sigma_next, eta)[1]
    return ddim_step(pred, x, ve_level(sigma), ve_level(sigma_next), eta=eta, noise=noise, noise_std=std,
                     eps_from_clipped=True, return_x0=return_x0)


def churn(x: Tensor, sigma: float, num_steps: int, draw_noise, *, s_churn: float, s_tmin: float, s_tmax: float,
          s_noise: float) -> tuple[Tensor, float]:
    """Karras' stochastic churn: ``(x + std * z, sigma_hat)``, raising the level from sigma to sigma_hat with
    fresh noise from ``draw_noise()`` (``x`` untouched and nothing drawn when ``s_churn`` is 0 or sigma is
    outside [s_tmin, s_tmax]). The add goes through the same fused kernel."""
    gamma = min(s_churn / num_steps, 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    sigma_hat = sigma * (gamma + 1)
    if gamma > 0:
        pred = Prediction(draw_noise(), 0.0, s_noise * math.sqrt(sigma_hat**2 - sigma**2))
        x = _apply(pred, x, c2=1.0, c3=1.0)[0]
    return x, sigma_hat


# ------------------------------------------------------------------ Heun (VE space)


def heun_correct_step(pred2, x_mid, x, x0_first, sigma: float, sigma_next: float, *, clip=None, return_x0=False):
    """Heun's second stage: ``x + dt/2 * ((x - x0_1)/sigma + (x_mid - x0_2)/sigma_next)`` in VE space.

    ``x`` and the first stage's x0 ride in the extra slots; x0_2 comes from ``pred2`` at ``x_mid``.
    """
    dt = sigma_next - sigma
    h1, h2 = dt / (2 * sigma), dt / (2 * sigma_next)
    return _apply(pred2, x_mid, c2=h2, c3=-h2, c4=1.0 + h1, c5=-h1, extra1=x, extra2=x0_first, clip=clip,
                  return_x0=return_x0)


# ------------------------------------------------------------------ DPM-Solver++ (multistep, and 2S)


def dpm_solver_order(step_index: int, num_steps: int, solver_order: int, lower_order_nums: int, *,
                     lower_order_final: bool = True, euler_at_final: bool = False, final_sigma_zero: bool = True) -> int:
    """The order diffusers' DPMSolverMultistep uses at a step: warm-up from 1, and lower orders at the end
    (short schedules are unstable with high orders there; a final zero sigma makes the last step first order)."""
    last = step_index == num_steps - 1
    lower_final = last and (euler_at_final or (lower_order_final and num_steps < 15) or final_sigma_zero)
    lower_second = step_index == num_steps - 2 and lower_order_final and num_steps < 15
    if solver_order == 1 or lower_order_nums < 1 or lower_final:
        return 1
    if solver_order == 2 or lower_order_nums < 2 or lower_second:
        return 2
    return 3


def dpmpp_coeffs(order: int, nxt: Level, levels: Sequence[Level], *, solver_type: str = "midpoint", sde: bool = False):
    """DPM-Solver++ (Lu et al. 2022) written over the x0 history ``(m0, m1, m2)`` at ``levels`` (newest first).

    Returns ``(cx, [k0, k1, k2], c_noise)`` with ``x_next = cx x + k0 m0 + k1 m1 + k2 m2 + c_noise z``.
    """
    s0 = levels[0]
    at, st = nxt
    h = nxt.lam - s0.lam
    if abs(h) <= 1e-12:  # a zero-length step (Karras sigmas ending on sigma_min, then sigma_min again): x stays
        return 1.0, [0.0, 0.0, 0.0], 0.0
    if sde:  # SDE-DPM-Solver++: the linear part integrated exactly (over 2h), plus the matching fresh noise
        hh, cx, c_noise = 2.0 * h, st / s0.sigma * math.exp(-h), st * math.sqrt(-math.expm1(-2.0 * h))
    else:
        hh, cx, c_noise = h, st / s0.sigma, 0.0
    p = -math.expm1(-hh)  # 1 - exp(-hh), accurate for short steps; exactly 1 on the step to sigma = 0
    k = [at * p, 0.0, 0.0]  # first order: DDIM
    if order >= 2:  # (only here: at sigma_next = 0, h = inf and the higher terms are undefined)
        r0 = (s0.lam - levels[1].lam) / h
        d1_0 = [1.0 / r0, -1.0 / r0, 0.0]  # (m0 - m1) / r0
        a1 = at * (1.0 - p / hh)  # phi_2 weight of the first difference
        if order == 2:
            a = 0.5 * at * p if solver_type == "midpoint" else a1
            k = [k[j] + a * d1_0[j] for j in range(3)]
        else:
            r1 = (levels[1].lam - levels[2].lam) / h
            d1_1 = [0.0, 1.0 / r1, -1.0 / r1]
            diff = [d1_0[j] - d1_1[j] for j in range(3)]
            d1 = [d1_0[j] + r0 / (r0 + r1) * diff[j] for j in range(3)]
            d2 = [diff[j] / (r0 + r1) for j in range(3)]
            # weight of D2: -phi_3 = (p - hh)/hh^2 + 1/2; diffusers' SDE variant writes - 1/2 (kept, for parity)
            a2 = at * ((p - hh) / hh**2 + (-0.5 if sde else 0.5))
            k = [k[j] + a1 * d1[j] + a2 * d2[j] for j in range(3)]
    return cx, k, c_noise


def dpmpp_step(pred, x, nxt: Level, levels: Sequence[Level], history: Sequence[Tensor], *, order: int,
               solver_type="midpoint", sde=False, noise=None, return_x0=True):
    """One DPM-Solver++ multistep update; ``history`` = (m1, m2) earlier x0 predictions as needed by ``order``."""
    if sde and noise is None:
        raise ValueError("SDE-DPM-Solver++ needs noise")
    cx, k, c_noise = dpmpp_coeffs(order, nxt, levels, solver_type=solver_type, sde=sde)
    e1 = history[0] if order >= 2 else None
    e2 = history[1] if order >= 3 else None
    return _apply(pred, x, c2=cx, c3=k[0], c4=k[1], c5=k[2], c6=c_noise, extra1=e1, extra2=e2,
                  noise=noise if sde else None, return_x0=return_x0)


def dpmpp_2s_correct_step(pred2, x_mid, x, sigma: float, sigma_down: float, sigma_up: float, *, noise=None,
                          return_x0=False):
    """Second stage of DPM-Solver++(2S) ancestral in VE space: ``(sd/s) x - expm1(-h) x0_2 + sigma_up z``."""
    ratio = sigma_down / sigma  # exp(-h)
    return _apply(pred2, x_mid, c3=1.0 - ratio, c4=ratio, c6=sigma_up if noise is not None else 0.0, extra1=x,
                  noise=noise, return_x0=return_x0)
