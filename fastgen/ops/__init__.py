"""fastgen's ops: one file per op — its public function (the only place that checks arguments and decides
layout), its plain PyTorch reference, and one ``declare_op`` call (fastgen/ops/_dispatch.py) that routes a
call to the Triton / CUDA / C++ CPU kernels or the reference and registers the torch.library custom ops.
See docs/design.md."""

from .attention import attention, attention_reference
from .bias_act import bias_act, bias_act_reference
from .conv2d import conv2d, conv2d_reference, release_packed_weights
from .geglu import geglu, geglu_reference
from .group_norm import group_norm, group_norm_reference
from .sampling import StepUpdate, X0From, q_sample, sampling_step, v_target
from .timestep_embedding import timestep_embedding
from .vae_postprocess import vae_postprocess, vae_postprocess_reference

__all__ = [
    "StepUpdate",
    "X0From",
    "attention",
    "attention_reference",
    "bias_act",
    "bias_act_reference",
    "conv2d",
    "conv2d_reference",
    "geglu",
    "geglu_reference",
    "group_norm",
    "group_norm_reference",
    "q_sample",
    "release_packed_weights",
    "sampling_step",
    "timestep_embedding",
    "v_target",
    "vae_postprocess",
    "vae_postprocess_reference",
]
