"""Replacement forward for diffusers' ``GEGLU`` (the SD transformer feed-forward's gate) on fastgen's
fused ``geglu``: ``proj`` is still the module's own (a ``Linear`` or a peft LoRA wrapper), then one pass
computes ``hidden * gelu(gate)`` instead of chunk + gelu + multiply."""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops.geglu import geglu
from ._rebind import mark

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


@mark("feed_forward")
def geglu_forward(self: torch.nn.Module, hidden_states: Tensor, *args, **kwargs) -> Tensor:
    if args or kwargs.get("scale", None) is not None or hidden_states.dtype not in _FLOATS:
        # diffusers' deprecation path, or a dtype the kernels lack (fp64): diffusers' own forward
        return type(self).forward(self, hidden_states, *args, **kwargs)
    return geglu(self.proj(hidden_states))
