"""fastgen's model building blocks and, in later releases, whole models."""

from .blocks import Attention, GroupNorm

__all__ = ["Attention", "GroupNorm"]
