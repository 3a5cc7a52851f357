"""fastgen's model building blocks and, in later releases, whole models."""

from .blocks import GroupNorm

__all__ = ["GroupNorm"]
