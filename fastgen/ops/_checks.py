"""Input validation shared by the ops: clear errors that say what was expected."""

from __future__ import annotations

from typing import Iterable, Optional

import torch


def check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_dtype(name: str, t: torch.Tensor, allowed: Iterable[torch.dtype]) -> None:
    if t.dtype in allowed:
        return
    names = ", ".join(str(d).replace("torch.", "") for d in allowed)
    raise TypeError(f"{name} must have dtype {names}; got {str(t.dtype).replace('torch.', '')}")


def check_same_device(**tensors: Optional[torch.Tensor]) -> None:
    first_name, first = None, None
    for name, t in tensors.items():
        if t is None:
            continue
        if first is None:
            first_name, first = name, t.device
        elif t.device != first:
            raise ValueError(
                f"all tensors must be on one device: {first_name} is on {first}, {name} is on {t.device}"
            )
