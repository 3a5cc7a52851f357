"""One sample request and its result: what the batch sampler, the request queue, the HTTP server and the Ray
Serve deployment pass between them. A request names one image: its condition (a prompt, a class label, or
neither for an unconditional model), its seed, and how to sample it. Requests with the same
:meth:`SampleRequest.batch_key` can share a batch: the sampler runs them as one tensor batch."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Optional, Union

import torch
from torch import Tensor

MAX_SEED = 2**63 - 1
MAX_STEPS = 1000


@dataclass(frozen=True)
class SampleRequest:
    """One image. ``height`` / ``width`` of ``None`` take the model's default size, ``steps`` /
    ``guidance_scale`` of ``None`` the pipeline's defaults."""

    prompt: Optional[str] = None
    class_label: Union[int, str, None] = None
    seed: int = 0
    steps: Optional[int] = None
    guidance_scale: Optional[float] = None
    height: Optional[int] = None
    width: Optional[int] = None

    def __post_init__(self):
        if self.prompt is not None and not isinstance(self.prompt, str):
            raise TypeError(f"SampleRequest.prompt must be a string, got {type(self.prompt).__name__}")
        if self.class_label is not None and (isinstance(self.class_label, bool)
                                             or not isinstance(self.class_label, (int, str))):
            raise TypeError(f"SampleRequest.class_label must be an int or a class name, "
                            f"got {type(self.class_label).__name__}")
        if self.prompt is not None and self.class_label is not None:
            raise ValueError("SampleRequest: give a prompt or a class_label, not both")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"SampleRequest.seed must be an int in [0, 2**63), got {self.seed!r}")
        if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(self.steps, int)
                                       or not 1 <= self.steps <= MAX_STEPS):
            raise ValueError(f"SampleRequest.steps must be an int in [1, {MAX_STEPS}], got {self.steps!r}")
        if self.guidance_scale is not None and (isinstance(self.guidance_scale, bool)
                                                or not isinstance(self.guidance_scale, (int, float))
                                                or not math.isfinite(self.guidance_scale)
                                                or self.guidance_scale < 0):
            raise ValueError(f"SampleRequest.guidance_scale must be a finite number >= 0, got {self.guidance_scale!r}")
        for name in ("height", "width"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 8 <= v <= 4096):
                raise ValueError(f"SampleRequest.{name} must be an int in [8, 4096], got {v!r}")

    @classmethod
    def from_dict(cls, data: Any) -> "SampleRequest":
        """A request from JSON-like data, refusing unknown keys (a typo would otherwise be silently ignored)."""
        if not isinstance(data, dict):
            raise ValueError(f"a sample request must be a JSON object, got {type(data).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown request field(s) {', '.join(map(repr, unknown))}; "
                             f"expected some of {', '.join(sorted(known))}")
        return cls(**data)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def batch_key(self) -> tuple:
        """Requests with equal keys can run in one batch (same shape, steps and guidance)."""
        return (self.steps, self.guidance_scale, self.height, self.width)


@dataclass
class SampleResult:
    """``image``: (C, H, W) float32 in [0, 1] on the CPU, the request it answers, and the batch it ran in."""

    image: Tensor
    request: SampleRequest
    batch_size: int = 1

    def to_uint8(self):
        """(H, W, C) uint8 numpy array."""
        return (self.image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
