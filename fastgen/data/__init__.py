"""Datasets for fastgen's trainers: images are float32 (C, H, W) tensors in [-1, 1].

- :func:`load_digits`: scikit-learn's 8x8 handwritten digits, upscaled, with a fixed held-out split;
- :class:`ImageFolder`: a folder of images, flat or one sub-folder per class;
- :class:`PairedImageFolder`: pix2pix pairs, ``A/`` and ``B/`` folders or side-by-side images;
- :class:`ConditionedDataset` / :func:`condition_fn`: edge, grey or low-resolution conditions made on the fly.

(This folder also holds package data, ``attention_cpu_choice.json``, read by path by fastgen.ops.)
"""

from __future__ import annotations

import os
from typing import Optional

from .conditioned import CONDITIONS, ConditionedDataset, condition_fn
from .digits import DigitsDataset, load_digits
from .folder import ImageFolder
from .paired import PairedImageFolder

__all__ = [
    "CONDITIONS",
    "ConditionedDataset",
    "DigitsDataset",
    "ImageFolder",
    "PairedImageFolder",
    "condition_fn",
    "load_dataset",
    "load_digits",
]

DIGITS = "digits"


def load_dataset(spec, size: Optional[int] = None, split: str = "train", channels: Optional[int] = None, **kw):
    """The dataset a trainer's ``--data`` names: ``"digits"`` (:func:`load_digits`, ``size`` default 16,
    ``channels`` default 1), or the path of an image folder (:class:`ImageFolder`, ``**kw`` passed on).

    A folder has no held-out part: ``split`` must be ``"train"`` or ``"all"`` for it (point at a separate folder
    for held-out images). To load a folder that is literally named ``digits``, pass ``./digits``.
    """
    if spec == DIGITS:
        if kw:
            raise TypeError(f"options {', '.join(sorted(kw))} apply to image folders, not to 'digits'")
        return load_digits(size or 16, split, channels or 1)
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"spec must be 'digits' or the path of an image folder; got {type(spec).__name__}")
    if not os.path.exists(spec):
        raise FileNotFoundError(f"dataset {os.fspath(spec)!r} is neither {DIGITS!r} nor an existing folder")
    if split not in ("train", "all"):
        raise ValueError(f"split {split!r}: the image folder {os.fspath(spec)!r} has no held-out part; "
                         "use split='train' and load held-out images from their own folder")
    return ImageFolder(spec, size, channels=channels, **kw)
