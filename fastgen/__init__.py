"""fastgen: fast generative image models for PyTorch, over Triton and C++/CUDA kernels."""

from . import models, ops
from ._backend import BACKENDS, BackendUnavailable, available_backends, use_backend
from ._version import __version__
from .info import info

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "__version__",
    "available_backends",
    "info",
    "models",
    "ops",
    "use_backend",
]
