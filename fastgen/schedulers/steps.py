"""The per-step math shared by the sampler functions and the scheduler classes.

Every method is written once here, over *noise levels in the state's own space*: a state ``x`` at level
``Level(alpha, sigma)`` means ``x = alpha * x0 + sigma * eps``. The diffusers-style schedulers of the
DDPM/DDIM/DPM-Solver family keep ``x`` in VP space (``alpha = sqrt(abar)``, ``sigma = sqrt(1 - abar)``);
the k-diffusion-style sampler functions and the Euler/Heun schedulers keep it in VE space (``alpha = 1``,
``sigma = sqrt((1 - abar) / abar)``). The formulas below are invariant to that choice (the two states differ
by a per-level scale), so the same function serves both, and its float64 coefficients go through one call
of :func:`fastgen.ops.sampling.sampling_step` per model evaluation.

Each method returns (or applies) a :class:`~fastgen.ops.sampling.StepUpdate`, the step written as the math
it is: how x0 is formed from the model output (an :class:`~fastgen.ops.sampling.X0From`, carried by the
:class:`Prediction`), the coefficients of the state and of x0, at most two ``(coefficient, tensor)`` terms
and the noise coefficient. For example DPM-Solver++(2M) (midpoint), with ``D1 = (m0 - m1) / r0``::

    StepUpdate(pred.x0_from, sample=sigma_n / sigma, x0=alpha_n * p + w, terms=((-w, m1),))
    #  x_next = (sigma_n / sigma) x + alpha_n p m0 + w (m0 - m1) / r0 ... with w = alpha_n p / (2 r0)

:func:`fastgen.ops.sampling.sampling_step` flattens it into the kernel's row and applies it together with the
model-output-to-x0 map, classifier-free guidance and clipping. Identities the module relies on (all exact in exact arithmetic):

* Euler (VE) is DDIM with eta=0; Euler ancestral (VE) is DDIM with eta; DDPM's posterior mean is DDIM's
  with eta=1; DPM-Solver++ first order is DDIM with eta=0 written with ``expm1``.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from ..ops.sampling import StepUpdate, X0From, sampling_step

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
        if a == 0:
            raise ValueError(ZERO_SNR_EPS)
        return 1.0 / a, -s / a
    if prediction_type == "v_prediction":
        # v = a_vp * eps - s_vp * x0 in VP units, where x_vp = x / r: x0 = a_vp * x_vp - s_vp * v
        r2 = a * a + s * s
        return a / r2, -s / math.sqrt(r2)
    if prediction_type == "sample":
        return 0.0, 1.0
    check_prediction_type(prediction_type)
    raise AssertionError


ZERO_SNR_EPS = (
    "an epsilon-prediction step at alphas_cumprod = 0 (zero terminal SNR, or beta_end = 1) has no finite x0 = "
    "(x - sqrt(1 - abar) eps) / sqrt(abar): diffusers returns inf/NaN there. Use prediction_type='v_prediction' "
    "(what zero-terminal-SNR models are trained with), clip_sample=True, or a timestep_spacing that does not "
    "start at the last trained timestep"
)

# Stand-in for 1 / sqrt(abar) = inf at abar = 0 when x0 is clamped: x0 = 2^100 (x - eps) stays finite in
# float32 for |x|, |eps| < 2^27 and clamps to clip * sign(x - eps), which is diffusers' clamp(inf * (x - eps)).
_INF_SCALE = 2.0**100


def x0_from(prediction_type: str, level: Level, *, clip: Optional[float] = None) -> X0From:
    """How x0 is formed from a network predicting eps, v or x0 at ``level`` (:func:`x0_coeffs`, named).

    At ``alpha = 0`` an eps-prediction has no finite x0; with ``clip`` it is the clamp of ``inf * (x - eps)``
    as in diffusers, without it a clear ``ValueError`` (diffusers' result is inf/NaN)."""
    if prediction_type == "epsilon" and level.alpha == 0 and clip is not None:
        return X0From(_INF_SCALE, -_INF_SCALE * level.sigma)
    c0, c1 = x0_coeffs(prediction_type, level)
    return X0From(c0, c1)


class Prediction(NamedTuple):
    """A model output ``e`` and how the step forms x0 from it (``x0 = x0_from.sample * x + x0_from.output * e``).

    With ``guidance_scale`` set, ``output`` is the ``[uncond; cond]`` batch (2N) and the kernel forms
    ``e = uncond + g * (cond - uncond)`` itself. ``prediction_type`` (when known) lets a step that needs the
    raw eps take it exactly from an eps-predicting model instead of through x0.
    """

    output: Tensor
    x0_from: X0From
    guidance_scale: Optional[float] = None
    prediction_type: Optional[str] = None


def predict(output: Tensor, prediction_type: str, level: Level, guidance_scale: Optional[float] = None, *,
            clip: Optional[float] = None) -> Prediction:
    """The :class:`Prediction` of a network predicting ``prediction_type`` at ``level`` (``clip``: the step
    clamps x0, see :func:`x0_from`)."""
    return Prediction(output, x0_from(prediction_type, level, clip=clip), guidance_scale, prediction_type)


def output_terms(pred: Prediction, n: int, coef: float) -> tuple:
    """``coef * e`` as ``(coefficient, tensor)`` terms of a :class:`StepUpdate`: one term on the model output,
    or under guidance ``coef (1 - g) uncond + coef g cond`` on the two halves of the ``[uncond; cond]`` batch
    (contiguous views, no copy), since the guided ``e`` itself is never materialised."""
    if pred.guidance_scale is None:
        return ((coef, pred.output),)
    g = float(pred.guidance_scale)
    return ((coef * (1.0 - g), pred.output[:n]), (coef * g, pred.output[n:]))


def eps_from(pred: Prediction, level: Level) -> tuple[float, float]:
    """``(d0, d1)`` with the raw eps ``= d0 * x + d1 * e``: the model output itself for an eps-predicting model,
    else ``(x - alpha x0) / sigma`` through the unclipped x0."""
    if pred.prediction_type == "epsilon":
        return 0.0, 1.0
    a, s = level
    f0, f1 = pred.x0_from
    return (1.0 - a * f0) / s, -a * f1 / s


def apply(pred: Prediction, x: Tensor, update: StepUpdate, *, noise: Optional[Tensor] = None,
          clip: Optional[float] = None, return_x0: bool = False):
    """One fused kernel call for ``update`` on state ``x``: ``(x_next, x0 or None)``."""
    res = sampling_step(x, pred.output, update, noise=noise, guidance_scale=pred.guidance_scale, clip=clip,
                        return_x0=return_x0)
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
    k = math.sqrt(max(nxt.sigma**2 - std**2, 0.0))  # the weight of eps_hat
    z = 0.0 if noise is None else (std if noise_std is None else float(noise_std))
    a, s = cur
    if clip is not None and not eps_from_clipped:
        # eps_hat is the raw eps = d0 x + d1 e, not the clipped x0's: its e term rides as (coefficient, tensor)
        d0, d1 = eps_from(pred, cur)
        update = StepUpdate(pred.x0_from, sample=k * d0, x0=nxt.alpha, terms=output_terms(pred, x.shape[0], k * d1),
                            noise=z)
    else:
        # eps_hat = (x - a x0) / s is linear in (x, x0): x_next = (k/s) x + (alpha_n - k a/s) x0 + std z
        update = StepUpdate(pred.x0_from, sample=k / s, x0=nxt.alpha - k * a / s, noise=z)
    return apply(pred, x, update, noise=noise, clip=clip, return_x0=return_x0)


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
        # x + std z: z goes in as the "model output", so x0_from forms std z and the update adds it to x
        std = s_noise * math.sqrt(sigma_hat**2 - sigma**2)
        pred = Prediction(draw_noise(), X0From(sample=0.0, output=std))
        x = apply(pred, x, StepUpdate(pred.x0_from, sample=1.0, x0=1.0))[0]
    return x, sigma_hat


# ------------------------------------------------------------------ Heun (VE space)


def heun_correct_step(pred2, x_mid, x, x0_first, sigma: float, sigma_next: float, *, clip=None, return_x0=False):
    """Heun's second stage: ``x + dt/2 * ((x - x0_1)/sigma + (x_mid - x0_2)/sigma_next)`` in VE space.

    The state is ``x_mid`` (the Euler predictor), x0_2 comes from ``pred2`` at ``x_mid``; ``x`` and the first
    stage's x0 are the two terms.
    """
    dt = sigma_next - sigma
    h1, h2 = dt / (2 * sigma), dt / (2 * sigma_next)
    # = (1 + h1) x - h1 x0_1 + h2 x_mid - h2 x0_2
    update = StepUpdate(pred2.x0_from, sample=h2, x0=-h2, terms=((1.0 + h1, x), (-h1, x0_first)))
    return apply(pred2, x_mid, update, clip=clip, return_x0=return_x0)


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


def dpmpp_update(pred: Prediction, nxt: Level, levels: Sequence[Level], history: Sequence[Tensor], *, order: int,
                 solver_type: str = "midpoint", sde: bool = False) -> StepUpdate:
    """DPM-Solver++ (Lu et al. 2022), multistep, over the x0 predictions ``m0`` (this step's, from ``pred``) and
    ``history = (m1, m2)`` (earlier ones) at ``levels`` (newest first), with ``h = lambda_next - lambda``::

        ODE:  x_next = (sigma_n / sigma) x          + alpha_n (1 - e^-h)  D + 0
        SDE:  x_next = (sigma_n / sigma) e^-h x     + alpha_n (1 - e^-2h) D + sigma_n sqrt(1 - e^-2h) z

    where ``D`` is ``m0`` at first order (= DDIM) and adds the differences of the history at second and third.
    """
    s0 = levels[0]
    at, st = nxt
    lam0 = s0.lam
    h = nxt.lam - lam0
    if abs(h) <= 1e-12:  # a zero-length step (Karras sigmas ending on sigma_min, then sigma_min again): x stays
        return StepUpdate(pred.x0_from, sample=1.0)
    if sde:  # the linear part integrated exactly over 2h, plus the matching fresh noise
        hh, decay, z = 2.0 * h, st / s0.sigma * math.exp(-h), st * math.sqrt(-math.expm1(-2.0 * h))
    else:
        hh, decay, z = h, st / s0.sigma, 0.0
    p = -math.expm1(-hh)  # 1 - e^-hh, accurate for short steps; exactly 1 on the step to sigma = 0
    # A repeated level in the history (T steps over T timesteps repeat one) has no difference to take: the
    # order drops to what is defined (diffusers divides by zero there and returns NaN).
    lam1 = levels[1].lam if order >= 2 else lam0
    r0 = (lam0 - lam1) / h
    if order == 1 or r0 == 0:
        return StepUpdate(pred.x0_from, sample=decay, x0=at * p, noise=z)
    # (only from here on: at sigma_next = 0, h = inf and the higher terms are undefined)
    m1 = history[0]
    lam2 = levels[2].lam if order == 3 else lam1
    if order == 3 and lam2 == lam1:
        order = 2
    phi2 = at * (1.0 - p / hh)  # the phi_2 weight of a first difference
    if order == 2:
        # x_next = decay x + alpha_n p m0 + w (m0 - m1) / r0;  w = alpha_n p / 2 (midpoint) or phi2 (heun)
        w = (0.5 * at * p if solver_type == "midpoint" else phi2) / r0
        return StepUpdate(pred.x0_from, sample=decay, x0=at * p + w, terms=((-w, m1),), noise=z)
    m2 = history[1]
    r1 = (lam1 - lam2) / h
    # D1_0 = (m0 - m1)/r0, D1_1 = (m1 - m2)/r1, dD = D1_0 - D1_1
    # x_next = decay x + alpha_n p m0 + phi2 (D1_0 + r0/(r0 + r1) dD) + w2 dD/(r0 + r1)
    # with w2 = -alpha_n phi_3 = alpha_n ((p - hh)/hh^2 + 1/2); diffusers' SDE variant writes - 1/2 (kept, for parity)
    w2 = at * ((p - hh) / hh**2 + (-0.5 if sde else 0.5))
    w_dd = (phi2 * r0 + w2) / (r0 + r1)
    k0 = at * p + phi2 / r0 + w_dd / r0
    k1 = -phi2 / r0 - w_dd * (1.0 / r0 + 1.0 / r1)
    k2 = w_dd / r1
    return StepUpdate(pred.x0_from, sample=decay, x0=k0, terms=((k1, m1), (k2, m2)), noise=z)


def dpmpp_step(pred, x, nxt: Level, levels: Sequence[Level], history: Sequence[Tensor], *, order: int,
               solver_type="midpoint", sde=False, noise=None, return_x0=True):
    """One DPM-Solver++ multistep update (:func:`dpmpp_update`); ``history`` = (m1, m2) as needed by ``order``."""
    if sde and noise is None:
        raise ValueError("SDE-DPM-Solver++ needs noise")
    update = dpmpp_update(pred, nxt, levels, history, order=order, solver_type=solver_type, sde=sde)
    return apply(pred, x, update, noise=noise if sde else None, return_x0=return_x0)


def dpmpp_2s_correct_step(pred2, x_mid, x, sigma: float, sigma_down: float, sigma_up: float, *, noise=None,
                          return_x0=False):
    """Second stage of DPM-Solver++(2S) ancestral in VE space: ``(sd/s) x - expm1(-h) x0_2 + sigma_up z``."""
    ratio = sigma_down / sigma  # e^-h
    update = StepUpdate(pred2.x0_from, x0=1.0 - ratio, terms=((ratio, x),), noise=sigma_up if noise is not None else 0.0)
    return apply(pred2, x_mid, update, noise=noise, return_x0=return_x0)
