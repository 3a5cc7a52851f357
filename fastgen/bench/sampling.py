"""Sampler steps: fastgen's fused step (CFG combine inside) against diffusers'
``scheduler.step`` plus the eager CFG combine a diffusers pipeline runs.

Each case times a whole loop over the schedule with a fixed model output (no
network), so the numbers are the per-step cost a pipeline pays on top of its
U-Net: the elementwise update, the CFG combine and the Python bookkeeping.
diffusers is optional; without it these cases are skipped.
"""

from __future__ import annotations

import torch

from ._runner import Case

LATENTS = [(2, 4, 64, 64), (8, 4, 128, 128), (1, 16, 128, 128)]
GUIDANCE = 7.5


def _schedulers():
    import diffusers

    from .. import schedulers

    return [
        ("dpm++2m", schedulers.DPMSolverMultistepScheduler, diffusers.DPMSolverMultistepScheduler),
        ("euler", schedulers.EulerDiscreteScheduler, diffusers.EulerDiscreteScheduler),
        ("ddim", schedulers.DDIMScheduler, diffusers.DDIMScheduler),
    ]


def _loop_fastgen(sched, steps, x0, model_output, guidance):
    def run():
        sched.set_timesteps(steps)
        x = x0
        for t in sched.timesteps:
            sched.scale_model_input(x, t)  # what a pipeline calls before its U-Net
            x = sched.step(model_output, t, x, guidance_scale=guidance).prev_sample
        return x

    return run


def _loop_diffusers(sched, steps, x0, model_output, guidance):
    n = x0.shape[0]

    def run():
        sched.set_timesteps(steps)
        x = x0
        for t in sched.timesteps:
            sched.scale_model_input(x, t)
            out = model_output
            if guidance is not None:
                uncond, cond = model_output[:n], model_output[n:]
                out = uncond + guidance * (cond - uncond)
            x = sched.step(out, t, x).prev_sample
        return x

    return run


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    try:
        scheds = _schedulers()
    except ImportError:
        return []
    config = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)
    out = []
    latents = LATENTS[:1] if quick else LATENTS
    kinds = scheds[:1] if quick else scheds
    g = torch.Generator().manual_seed(0)
    for shape in latents:
        x0 = torch.randn(shape, generator=g).to(device)
        mo = (0.1 * torch.randn((2 * shape[0], *shape[1:]), generator=g)).to(device)
        for name, ours, theirs in kinds:
            steps = 20
            params = {"shape": "x".join(map(str, shape)), "steps": steps, "cfg": GUIDANCE}
            out.append(
                Case(
                    "sampling",
                    f"{name} loop+cfg",
                    params,
                    _loop_fastgen(ours(**config), steps, x0, mo, GUIDANCE),
                    {"diffusers": _loop_diffusers(theirs(**config), steps, x0, mo, GUIDANCE)},
                    # Per step: read sample + both CFG halves, write the sample
                    # (DPM-Solver also reads/writes its previous x0: not counted).
                    bytes_moved=steps * 4 * x0.numel() * x0.element_size(),
                )
            )
    # Loop overhead with a no-op model: what the scheduler costs per step when
    # the network is free, at 20 and 50 steps (--quick: the 50-step loop, the
    # one the recorded >= 3x-lower-overhead-than-diffusers result is about).
    x0 = torch.randn(LATENTS[0], generator=g).to(device)
    mo = torch.zeros_like(x0)
    for steps in ((50,) if quick else (20, 50)):
        name, ours, theirs = scheds[0]
        out.append(
            Case(
                "sampling",
                f"{name} loop overhead",
                {"shape": "x".join(map(str, LATENTS[0])), "steps": steps, "cfg": None},
                _loop_fastgen(ours(**config), steps, x0, mo, None),
                {"diffusers": _loop_diffusers(theirs(**config), steps, x0, mo, None)},
            )
        )
    return out
