"""Building blocks shared by fastgen's U-Net, VAE and GAN models."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..ops import group_norm


class GroupNorm(torch.nn.GroupNorm):
    """Drop-in for :class:`torch.nn.GroupNorm` on fastgen's fused kernel.

    Same constructor, parameters and state-dict names (``weight``, ``bias``),
    so it loads any ``nn.GroupNorm`` checkpoint; ``activation="silu"`` fuses the
    SiLU that follows every GroupNorm in a diffusers ResNet block, and
    ``forward(x, residual)`` fuses a skip connection added after it.
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        device=None,
        dtype=None,
        *,
        activation: Optional[str] = None,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__(num_groups, num_channels, eps, affine, device=device, dtype=dtype)
        if activation not in (None, "silu"):
            raise ValueError(f"GroupNorm: activation must be None or 'silu', got {activation!r}")
        self.activation = activation
        self.backend = backend

    @classmethod
    def from_torch(cls, module: torch.nn.GroupNorm, *, activation: Optional[str] = None) -> "GroupNorm":
        """Wrap an existing ``nn.GroupNorm``, sharing (not copying) its parameters."""
        new = cls.__new__(cls)
        torch.nn.Module.__init__(new)
        new.num_groups, new.num_channels = module.num_groups, module.num_channels
        new.eps, new.affine = module.eps, module.affine
        new.weight, new.bias = module.weight, module.bias
        new.activation, new.backend = activation, None
        return new

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        return group_norm(
            x,
            self.num_groups,
            self.weight,
            self.bias,
            self.eps,
            activation=self.activation,
            residual=residual,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        extra = f", activation={self.activation!r}" if self.activation else ""
        return super().extra_repr() + extra
