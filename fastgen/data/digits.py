"""The 1,797 real 8x8 handwritten digits shipped with scikit-learn (UCI optdigits' test set), upscaled: a tiny
real dataset that trainers and metrics can use without a download.

The held-out split is fixed — 30 images per class, chosen by a ``numpy.random.RandomState(0)`` permutation of
each class in turn — so that it never depends on global seeds and a metric computed on ``split="test"`` always
sees the same 300 images.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = ["CLASS_NAMES", "DigitsDataset", "load_digits"]

CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SIZES = (8, 16, 32)
SPLITS = ("train", "test", "all")
TEST_PER_CLASS = 30
# sklearn's digits count ink in 4x4 blocks of a 32x32 bitmap: 0 .. 16
MAX_VALUE = 16.0


def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as exc:
        raise ImportError("fastgen.data.load_digits needs scikit-learn, which ships the digits data: "
                          "pip install scikit-learn") from exc
    bunch = sk_load_digits()
    return bunch.images, bunch.target


@functools.lru_cache(maxsize=None)
def _split_indices() -> dict[str, np.ndarray]:
    _, target = _sklearn_digits()
    rng = np.random.RandomState(0)
    test = np.sort(np.concatenate([rng.permutation(np.flatnonzero(target == c))[:TEST_PER_CLASS]
                                   for c in range(len(CLASS_NAMES))]))
    train = np.setdiff1d(np.arange(len(target)), test)
    return {"train": train, "test": test, "all": np.arange(len(target))}


@functools.lru_cache(maxsize=None)
def _upscaled(size: int, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 images (N, channels, size, size) in [-1, 1] and their labels; cached because trainers and metrics
    load the set repeatedly, and callers get copies so that the cache cannot be changed through them."""
    images, target = _sklearn_digits()
    x = torch.from_numpy(images).to(torch.float32).unsqueeze(1) / MAX_VALUE
    if size != x.shape[-1]:
        # bicubic overshoots near strokes, so clamp back to the [0, 1] ink range
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp_(0, 1)
    x = (x * 2 - 1).repeat(1, channels, 1, 1)
    return x, torch.from_numpy(target).to(torch.int64)


class DigitsDataset(Dataset):
    """``(image, label)`` with image a float32 (channels, size, size) tensor in [-1, 1] (white ink on black) and
    label an int64 0-dim tensor; build it with :func:`load_digits`.

    Attributes: ``images`` (N, C, S, S), ``labels`` (N,), ``prompts`` (each image's class name),
    ``class_names``, ``num_classes``, ``image_size``, ``channels``, ``split``.
    """

    class_names = CLASS_NAMES
    num_classes = len(CLASS_NAMES)

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, split: str):
        self.images = images
        self.labels = labels
        self.split = split
        self.image_size = images.shape[-1]
        self.channels = images.shape[1]
        self.prompts = tuple(CLASS_NAMES[int(c)] for c in labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index):
        return self.images[index], self.labels[index]

    def __repr__(self) -> str:
        return (f"DigitsDataset(split={self.split!r}, {len(self)} images, size={self.image_size}, "
                f"channels={self.channels})")


def load_digits(size: int = 16, split: str = "train", channels: int = 1) -> DigitsDataset:
    """scikit-learn's handwritten digits, upscaled from 8x8 to ``size`` (8, 16 or 32; bicubic).

    Args:
        size: 8 (the original pixels), 16 or 32.
        split: ``"train"`` (1,497 images), ``"test"`` (the 300 held out, 30 per class) or ``"all"`` (1,797).
        channels: 1, or 3 to repeat the grey channel for RGB models.
    """
    if isinstance(size, bool) or size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(map(str, SIZES))} for the 8x8 digits; got {size!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(map(repr, SPLITS))}; got {split!r}")
    if isinstance(channels, bool) or channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (grey repeated as RGB); got {channels!r}")
    images, labels = _upscaled(size, channels)
    idx = torch.from_numpy(_split_indices()[split])
    return DigitsDataset(images[idx], labels[idx], split)
