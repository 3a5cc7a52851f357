"""The options every trainer shares (``TrainConfig``), checked once when a trainer is built."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

PRECISIONS = ("fp32", "bf16", "fp16")
LR_SCHEDULES = ("constant", "cosine")


@dataclass
class TrainConfig:
    """Loop options; a trainer adds its own (model size, loss weights) in its own dataclass.

    ``batch_size`` is the **global** batch: under ``torchrun`` each of the N processes takes
    ``batch_size / N`` of it, and with ``grad_accum`` each process splits its share into that many micro-batches,
    so the same seed and ``batch_size`` give the same samples, noises and updates whatever N and ``grad_accum``
    are (up to float summation order).
    """

    steps: int = 1000
    batch_size: int = 64
    lr: float = 2e-4
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    grad_accum: int = 1
    max_grad_norm: Optional[float] = 1.0
    ema_decay: Optional[float] = 0.999
    precision: str = "fp32"
    seed: int = 0
    log_every: int = 10
    sample_every: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    out_dir: Optional[str] = None
    progress: bool = True
    device: Optional[str] = None

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "log_every", "keep_checkpoints"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive int, got {value!r}")
        for name in ("warmup_steps", "sample_every", "checkpoint_every", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"TrainConfig.{name} must be an int >= 0, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"TrainConfig.precision must be one of {', '.join(PRECISIONS)}; got {self.precision!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"TrainConfig.lr_schedule must be one of {', '.join(LR_SCHEDULES)}; "
                             f"got {self.lr_schedule!r}")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"TrainConfig.ema_decay must be in [0, 1) or None, got {self.ema_decay!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"TrainConfig.max_grad_norm must be > 0 or None, got {self.max_grad_norm!r}")
        if (self.sample_every or self.checkpoint_every) and not self.out_dir:
            raise ValueError("TrainConfig: sample_every / checkpoint_every need out_dir, the folder to write to")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then constant or cosine to 0."""
        import math

        if self.warmup_steps and step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.lr_schedule == "cosine":
            span = max(1, self.steps - self.warmup_steps)
            progress = min(1.0, (step - self.warmup_steps) / span)
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.lr


def split_config(cls, options: dict):
    """(``cls`` instance, TrainConfig) from one flat dict of options: each key goes to the dataclass that has
    it; a key neither has raises a ``TypeError`` naming it and listing the valid ones."""
    loop_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    own_keys = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in options if k not in loop_keys | own_keys)
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(unknown)}; {cls.__name__} takes "
                        f"{', '.join(sorted(own_keys))} and the loop takes {', '.join(sorted(loop_keys))}")
    return (cls(**{k: v for k, v in options.items() if k in own_keys}),
            TrainConfig(**{k: v for k, v in options.items() if k in loop_keys}))
