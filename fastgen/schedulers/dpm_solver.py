"""``DPMSolverMultistepScheduler``: diffusers-compatible DPM-Solver++ (1st-3rd order multistep, ODE or SDE).

The sample is in VP space; each step converts the model output to x0 inside the kernel, combines it with up
to two earlier x0 predictions (the multistep history, kept as tensors here) and the sample
(:func:`.steps.dpmpp_step`). The order per step follows diffusers (:func:`.steps.dpm_solver_order`).
"""

from __future__ import annotations

import warnings
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ..ops.sampling import q_sample
from ._base import SchedulerOutput, float_list
from ._config import register_to_config
from ._sigma_table import SigmaSchedulerBase, SigmaTables
from .schedules import check_num_inference_steps, exponential_sigmas, karras_sigmas, spaced_timesteps
from .steps import dpm_solver_order, dpmpp_step, predict, vp_level_from_sigma

__all__ = ["DPMSolverMultistepScheduler"]

_ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++")


class DPMSolverMultistepScheduler(SigmaSchedulerBase):
    """DPM-Solver++ multistep (Lu et al. 2022), with diffusers' config keys (``dpmsolver++`` and ``sde-dpmsolver++``)."""

    order = 1
    _unsupported = {"thresholding": False, "use_beta_sigmas": False, "use_flow_sigmas": False,
                    "use_dynamic_shifting": False}

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        solver_order: int = 2,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        algorithm_type: str = "dpmsolver++",
        solver_type: str = "midpoint",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        use_karras_sigmas: Optional[bool] = False,
        use_exponential_sigmas: Optional[bool] = False,
        use_beta_sigmas: Optional[bool] = False,
        use_lu_lambdas: Optional[bool] = False,
        use_flow_sigmas: Optional[bool] = False,
        flow_shift: Optional[float] = 1.0,
        final_sigmas_type: Optional[str] = "zero",
        lambda_min_clipped: float = -float("inf"),
        variance_type: Optional[str] = None,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
    ):
        if sum(bool(v) for v in (use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas)) > 1:
            raise ValueError("Only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas can be used.")
        if algorithm_type == "deis":  # diffusers maps these configs of other solvers onto DPM-Solver++ ...
            if final_sigmas_type == "zero":  # ... after refusing this combination, as diffusers does
                raise ValueError("final_sigmas_type 'zero' is not supported for algorithm_type 'deis'; use 'sigma_min'")
            self._register(algorithm_type="dpmsolver++")
        elif algorithm_type in ("dpmsolver", "sde-dpmsolver"):
            raise NotImplementedError(f"algorithm_type {algorithm_type!r} is deprecated in diffusers; use 'dpmsolver++' or 'sde-dpmsolver++'")
        elif algorithm_type not in _ALGORITHMS:
            raise ValueError(f"unknown algorithm_type {algorithm_type!r}: expected one of {', '.join(_ALGORITHMS)}")
        if solver_type in ("logrho", "bh1", "bh2"):
            self._register(solver_type="midpoint")
        elif solver_type not in ("midpoint", "heun"):
            raise ValueError(f"unknown solver_type {solver_type!r}: expected 'midpoint' or 'heun'")
        if solver_order not in (1, 2, 3):
            raise ValueError(f"solver_order must be 1, 2 or 3, got {solver_order}")
        if final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {final_sigmas_type!r}")
        if variance_type not in (None, "learned", "learned_range"):
            raise ValueError(f"variance_type must be None, 'learned' or 'learned_range', got {variance_type!r}")
        self._init_schedule(zero_snr_floor=True)
        self.init_noise_sigma = 1.0
        self.sigmas = self.schedule.sigmas.clone()
        self.timesteps = torch.from_numpy(np.linspace(0, num_train_timesteps - 1, num_train_timesteps, dtype=np.float32)[::-1].copy())
        self.model_outputs = [None] * solver_order
        self.lower_order_nums = 0
        self._reset_index()  # (tables are built by set_timesteps: diffusers' DPM-Solver cannot step before it)

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None, mu=None, timesteps=None) -> None:
        """Timesteps (int64) and sigmas (float64, final sigma appended), as diffusers builds them."""
        cfg = self.config
        T = cfg.num_train_timesteps
        if mu is not None:
            raise NotImplementedError("dynamic shifting (mu) is not supported by fastgen")
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps or timesteps")
        table = self.schedule.sigmas.numpy()
        log_table = self.schedule.log_sigmas.numpy()
        respaced = cfg.use_karras_sigmas or cfg.use_lu_lambdas or cfg.use_exponential_sigmas
        if timesteps is not None:
            if respaced:
                raise ValueError("custom timesteps cannot be combined with Karras, exponential or Lu sigmas")
            ts = np.asarray(timesteps, dtype=np.int64).flatten()
            if ts.size == 0 or ts.max() >= T or ts.min() < 0:
                raise ValueError(f"custom timesteps must be non-empty and lie in [0, {T - 1}]")
            n = len(ts)
        else:
            n = num_inference_steps
            check_num_inference_steps(n, T)
            ts = self._spaced(n)
        round_t = cfg.beta_schedule != "squaredcos_cap_v2"
        if timesteps is None and cfg.use_karras_sigmas:
            sigmas = karras_sigmas(n, table[0], table[-1])
            ts = self.schedule.sigma_to_t(sigmas, quantize=round_t).numpy()
        elif timesteps is None and cfg.use_lu_lambdas:
            # uniform in log-sigma between the table's ends (Lu et al.'s uniform logSNR)
            sigmas = np.exp(np.linspace(log_table[-1], log_table[0], n))
            ts = self.schedule.sigma_to_t(sigmas, quantize=round_t).numpy()
        elif timesteps is None and cfg.use_exponential_sigmas:
            sigmas = exponential_sigmas(n, table[0], table[-1])
            ts = self.schedule.sigma_to_t(sigmas).numpy()
        else:
            sigmas = np.interp(ts, np.arange(T), table)
        last = 0.0 if cfg.final_sigmas_type == "zero" else float(table[0])
        self.sigmas = torch.from_numpy(np.append(sigmas, last).astype(np.float64))
        # int64 like diffusers (which truncates the fractional exponential-sigma timesteps)
        self.timesteps = torch.from_numpy(np.asarray(ts)).to(device=device, dtype=torch.int64)
        self.num_inference_steps = len(self.timesteps)
        self.model_outputs = [None] * cfg.solver_order
        self.lower_order_nums = 0
        self._reset_index()
        self._step_tables()

    def _spaced(self, n: int) -> np.ndarray:
        cfg = self.config
        T = cfg.num_train_timesteps
        ac = self._alphas_cumprod.double()
        lambdas = 0.5 * (ac.log() - (1 - ac).log())  # log(alpha / sigma), descending in t
        clipped = int(torch.searchsorted(lambdas.flip(0), torch.tensor([float(cfg.lambda_min_clipped)], dtype=torch.float64)))
        last = T - clipped
        # DPM-Solver spaces n + 1 points and drops t = 0, so its last step still lands on a trained level; with
        # n = num_train_timesteps that is one point more than there are levels (diffusers' formulas, unchecked)
        if cfg.timestep_spacing == "linspace":
            return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
        if cfg.timestep_spacing == "leading":
            ratio = last // (n + 1)
            if ratio == 0:
                warnings.warn(
                    f"DPMSolverMultistepScheduler: timestep_spacing='leading' with {n} steps over {last} timesteps "
                    "gives every step timestep 0 (as diffusers does); use 'linspace' or 'trailing'",
                    stacklevel=3,
                )
            return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64) + cfg.steps_offset
        if cfg.timestep_spacing == "trailing":
            return np.arange(last, 0, -T / n).round().astype(np.int64) - 1
        return spaced_timesteps(n, T, cfg.timestep_spacing)  # raises the unknown-spacing error

    def _build_tables(self) -> SigmaTables:
        """The sigmas and timesteps as floats, and the VP level of every sigma."""
        sigmas = float_list(self._sigmas)
        return SigmaTables(sigmas, float_list(self._timesteps), [vp_level_from_sigma(s) for s in sigmas])

    def scale_model_input(self, sample: Tensor, *args, **kwargs) -> Tensor:
        """The sample goes to the model unscaled."""
        return sample

    def step(self, model_output: Tensor, timestep, sample: Tensor, generator=None,
             variance_noise: Optional[Tensor] = None, return_dict: bool = True, *,
             guidance_scale: Optional[float] = None):
        """One multistep update; returns ``(prev_sample,)`` with ``return_dict=False`` like diffusers."""
        cfg = self.config
        self._check_step_inputs(model_output, sample)
        i, tables = self._enter_step(timestep)
        if cfg.variance_type in ("learned", "learned_range") and cfg.prediction_type == "epsilon" and (
            model_output.dim() > 1 and model_output.shape[1] == 2 * sample.shape[1]
        ):  # learned variance: keep the eps half
            model_output = model_output[:, : sample.shape[1]].contiguous()
        n = len(tables.timesteps)
        k = dpm_solver_order(i, n, cfg.solver_order, self.lower_order_nums, lower_order_final=cfg.lower_order_final,
                             euler_at_final=cfg.euler_at_final, final_sigma_zero=cfg.final_sigmas_type == "zero")
        levels_all = tables.levels
        cur = levels_all[i]
        pred = predict(model_output, cfg.prediction_type, cur, guidance_scale)
        sde = cfg.algorithm_type == "sde-dpmsolver++"
        noise = None
        if sde:
            if variance_noise is not None:
                noise = variance_noise.to(device=sample.device, dtype=torch.float32)
            else:
                noise = self._noise_for(generator).randn(sample.shape, sample.device, torch.float32)
            noise = noise.to(sample.dtype)
        levels = levels_all[max(i - 2, 0) : i + 1][::-1]  # this step's level, then earlier ones (newest first)
        history = self.model_outputs[::-1]  # earlier x0 predictions, newest first: m1, m2 (as the order needs)
        prev_sample, x0 = dpmpp_step(pred, sample, levels_all[i + 1], levels, history, order=k,
                                     solver_type=cfg.solver_type, sde=sde, noise=noise)
        self.model_outputs = self.model_outputs[1:] + [x0]
        self.lower_order_nums = min(self.lower_order_nums + 1, cfg.solver_order)
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps) -> Tensor:
        """``alpha_t x0 + sigma_t noise`` (VP) for timesteps of the schedule (or at the begin index when set)."""
        sigma = self._add_noise_sigmas(original_samples, timesteps)
        alpha = 1.0 / (sigma**2 + 1).sqrt()
        return q_sample(original_samples, noise, alpha.to(original_samples.device), (sigma * alpha).to(original_samples.device))
