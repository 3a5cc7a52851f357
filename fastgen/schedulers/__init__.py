"""Noise schedules, k-diffusion-style sampler functions and diffusers-compatible scheduler classes.

One implementation serves both APIs: the per-step math lives in :mod:`fastgen.schedulers.steps` (each step a
``StepUpdate`` of float64 coefficients over noise levels, applied by one fused
``fastgen.ops.sampling.sampling_step`` call per model evaluation); the sampler functions (:mod:`.sampling`)
loop over it, and the scheduler classes are thin stateful wrappers that compute the same levels from
diffusers' configs. Module layout: ``_config`` (config and serialisation), ``_base`` (outputs, tables,
checks), ``_vp`` (DDPM/DDIM base), ``_sigma_table`` (step index, VE sigma-table base), one module per
scheduler. See docs/schedulers.md.
"""

from ._base import SchedulerOutput
from ._config import FrozenConfig
from .ddim import DDIMScheduler
from .ddpm import DDPMScheduler
from .denoisers import CFGDenoiser, DiscreteDenoiser, EpsDenoiser, VDenoiser, X0Denoiser
from .dpm_solver import DPMSolverMultistepScheduler
from .euler import EulerDiscreteScheduler
from .euler_ancestral import EulerAncestralDiscreteScheduler
from .heun import HeunDiscreteScheduler
from .noise import make_generators, randn_tensor
from .sampling import (
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_dpmpp_2s_ancestral,
    sample_dpmpp_3m,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
)
from .schedules import (
    BETA_SCHEDULES,
    TIMESTEP_SPACINGS,
    DiscreteSchedule,
    alphas_cumprod_from_betas,
    betas_for_alpha_bar,
    get_sigmas_exponential,
    get_sigmas_karras,
    get_sigmas_polyexponential,
    make_betas,
    rescale_zero_terminal_snr,
    spaced_timesteps,
)
from .steps import Prediction

__all__ = [
    # scheduler classes (diffusers-compatible)
    "DDPMScheduler",
    "DDIMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "SchedulerOutput",
    "FrozenConfig",
    # sampler functions (k-diffusion style)
    "sample_ddpm",
    "sample_ddim",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "sample_dpmpp_2m",
    "sample_dpmpp_3m",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_2s_ancestral",
    # denoiser adapters
    "DiscreteDenoiser",
    "EpsDenoiser",
    "VDenoiser",
    "X0Denoiser",
    "CFGDenoiser",
    "Prediction",
    # schedules
    "BETA_SCHEDULES",
    "TIMESTEP_SPACINGS",
    "DiscreteSchedule",
    "make_betas",
    "betas_for_alpha_bar",
    "rescale_zero_terminal_snr",
    "alphas_cumprod_from_betas",
    "spaced_timesteps",
    "get_sigmas_karras",
    "get_sigmas_exponential",
    "get_sigmas_polyexponential",
    # noise
    "randn_tensor",
    "make_generators",
]
