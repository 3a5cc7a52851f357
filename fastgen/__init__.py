"""fastgen: fast generative image models for PyTorch, over Triton and C++/CUDA kernels."""

from . import models, ops
from ._backend import BACKENDS, BackendUnavailable, available_backends, use_backend
from ._version import __version__
from .drop_in import PatchReport, is_patched, patch, unpatch
from .info import info

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "PatchReport",
    "__version__",
    "available_backends",
    "info",
    "is_patched",
    "models",
    "ops",
    "patch",
    "unpatch",
    "use_backend",
]
