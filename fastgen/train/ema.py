"""Exponential moving average of a model's weights (the weights sampled from, as in DDPM, StyleGAN, SD)."""

from __future__ import annotations

import torch
from torch import Tensor


class EMA:
    """Shadow copies of every floating-point parameter and buffer, updated after each optimizer step with
    ``shadow = decay * shadow + (1 - decay) * param``; warmed up as ``min(decay, (1 + n) / (10 + n))`` so an early
    checkpoint is not dominated by the random initialisation (the schedule of diffusers' EMAModel with
    ``use_ema_warmup=False``'s predecessor, TF's ``ExponentialMovingAverage(num_updates=...)``)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = float(decay)
        self.updates = 0
        self.shadow: dict[str, Tensor] = {k: v.detach().clone() for k, v in model.state_dict().items()
                                          if v.is_floating_point()}

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        d = self.current_decay()
        state = model.state_dict()
        for k, s in self.shadow.items():
            s.lerp_(state[k].detach().to(s.dtype), 1.0 - d)
        self.updates += 1

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        """Write the averaged weights into ``model`` (integer buffers such as BatchNorm's counters stay)."""
        state = model.state_dict()
        for k, s in self.shadow.items():
            state[k].copy_(s)

    def state_dict(self) -> dict[str, Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, tensors: dict[str, Tensor], updates: int) -> None:
        missing = sorted(set(self.shadow) - set(tensors))
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} tensors, e.g. {missing[:3]}")
        for k, s in self.shadow.items():
            if tensors[k].shape != s.shape:
                raise ValueError(f"EMA tensor {k!r} has shape {tuple(tensors[k].shape)}, the model's is "
                                 f"{tuple(s.shape)}")
            s.copy_(tensors[k])
        self.updates = int(updates)
