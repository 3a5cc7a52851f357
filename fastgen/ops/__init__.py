"""fastgen's ops: one file per op, each with checks, a torch reference, dispatch
to the Triton / CUDA / C++ CPU kernels, and a torch.library custom op."""

from .group_norm import group_norm, group_norm_reference

__all__ = ["group_norm", "group_norm_reference"]
