"""fastgen's ops: one file per op, each with checks, a torch reference, dispatch
to the Triton / CUDA / C++ CPU kernels, and a torch.library custom op."""

from .attention import attention, attention_reference
from .geglu import geglu, geglu_reference
from .group_norm import group_norm, group_norm_reference
from .sampling import q_sample, sampling_step, v_target
from .timestep_embedding import timestep_embedding

__all__ = [
    "attention",
    "attention_reference",
    "geglu",
    "geglu_reference",
    "group_norm",
    "group_norm_reference",
    "q_sample",
    "sampling_step",
    "timestep_embedding",
    "v_target",
]
