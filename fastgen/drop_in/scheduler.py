"""Swap a diffusers pipeline's scheduler for fastgen's class of the same name, built from its live config.

fastgen's six scheduler classes take diffusers' config keys and give the same timesteps, sigmas and steps
(docs/schedulers.md), with one fused ``sampling_step`` kernel per step. The new scheduler is built from the
live scheduler's config *as it stands*: diffusers pipelines rewrite some keys when they are constructed
(``steps_offset``, ``clip_sample``), and a plain ``from_config`` would put those keys back to their defaults
because diffusers lists them in ``_use_default_values`` (they were defaults when the config was first
made). So the key is dropped before building, and every value the pipeline runs with is kept. Pipelines
call ``set_timesteps`` at the start of every run, so the new scheduler needs no state from the old one.
"""

from __future__ import annotations

from typing import Any, Union

from .. import schedulers as _schedulers

FASTGEN_SCHEDULERS = {
    name: getattr(_schedulers, name)
    for name in (
        "DDIMScheduler",
        "DDPMScheduler",
        "DPMSolverMultistepScheduler",
        "EulerDiscreteScheduler",
        "EulerAncestralDiscreteScheduler",
        "HeunDiscreteScheduler",
    )
}


def live_config(scheduler: Any) -> dict:
    """The scheduler's config as the pipeline runs it (without ``_use_default_values``)."""
    return {k: v for k, v in dict(scheduler.config).items() if k != "_use_default_values"}


def fastgen_scheduler_for(scheduler: Any) -> Union[Any, str]:
    """fastgen's scheduler equivalent to ``scheduler``, or a string saying why there is none."""
    name = type(scheduler).__name__
    cls = FASTGEN_SCHEDULERS.get(name)
    if cls is None:
        return f"fastgen has no {name} (it has {', '.join(sorted(FASTGEN_SCHEDULERS))})"
    if type(scheduler).__module__.split(".")[0] != "diffusers":
        return f"{type(scheduler).__module__}.{name} is not diffusers' class"
    try:
        new = cls.from_config(live_config(scheduler))
    except (NotImplementedError, ValueError, TypeError) as err:
        return f"{name}'s config is not covered: {err}"
    return new
