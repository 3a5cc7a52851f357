"""Activation names of diffusers' configs, and the feed-forward gates of its transformer blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops import geglu

_ACTIVATIONS = {
    "swish": torch.nn.SiLU,
    "silu": torch.nn.SiLU,
    "mish": torch.nn.Mish,
    "gelu": torch.nn.GELU,
    "relu": torch.nn.ReLU,
}

# The names whose GroupNorm + activation pair runs as one fused group_norm(activation="silu") call.
SILU_NAMES = ("silu", "swish")


def get_activation(name: str) -> torch.nn.Module:
    try:
        return _ACTIVATIONS[name.lower()]()
    except (KeyError, AttributeError):
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(_ACTIVATIONS)}") from None


class GEGLU(torch.nn.Module):
    """diffusers' ``GEGLU`` (``proj`` to 2x features, ``hidden * gelu(gate)``) on fastgen's fused geglu op."""

    def __init__(self, dim_in: int, dim_out: int, approximate: str = "none", bias: bool = True):
        super().__init__()
        self.proj = torch.nn.Linear(dim_in, dim_out * 2, bias=bias)
        self.approximate = approximate

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        return geglu(self.proj(hidden_states), approximate=self.approximate)


class GELU(torch.nn.Module):
    """diffusers' ``GELU`` (a ``proj`` Linear, then gelu) for ``activation_fn="gelu"`` / ``"gelu-approximate"``."""

    def __init__(self, dim_in: int, dim_out: int, approximate: str = "none", bias: bool = True):
        super().__init__()
        self.proj = torch.nn.Linear(dim_in, dim_out, bias=bias)
        self.approximate = approximate

    def forward(self, hidden_states: Tensor) -> Tensor:
        return F.gelu(self.proj(hidden_states), approximate=self.approximate)


class FeedForward(torch.nn.Module):
    """diffusers' ``FeedForward``: ``net = [gate, Dropout, Linear(inner, dim_out)(, Dropout)]``."""

    def __init__(
        self,
        dim: int,
        dim_out: int | None = None,
        mult: int = 4,
        dropout: float = 0.0,
        activation_fn: str = "geglu",
        final_dropout: bool = False,
        inner_dim: int | None = None,
        bias: bool = True,
    ):
        super().__init__()
        inner_dim = inner_dim if inner_dim is not None else int(dim * mult)
        dim_out = dim_out if dim_out is not None else dim
        gates = {
            "geglu": lambda: GEGLU(dim, inner_dim, bias=bias),
            "geglu-approximate": lambda: GEGLU(dim, inner_dim, approximate="tanh", bias=bias),
            "gelu": lambda: GELU(dim, inner_dim, bias=bias),
            "gelu-approximate": lambda: GELU(dim, inner_dim, approximate="tanh", bias=bias),
        }
        if activation_fn not in gates:
            raise NotImplementedError(
                f"FeedForward: activation_fn={activation_fn!r} is not supported by fastgen (supported: {sorted(gates)})"
            )
        layers = [gates[activation_fn](), torch.nn.Dropout(dropout), torch.nn.Linear(inner_dim, dim_out, bias=bias)]
        if final_dropout:
            layers.append(torch.nn.Dropout(dropout))
        self.net = torch.nn.ModuleList(layers)

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        for module in self.net:
            hidden_states = module(hidden_states)
        return hidden_states
