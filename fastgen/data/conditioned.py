"""Condition images made on the fly from a dataset's images (edges, grey, low resolution), for image-to-image
training on datasets that have no pairs.

The conditions come from :mod:`fastgen.conditions`, always in [-1, 1] (the images' range) with the image's height,
width and channel count, so that a same-size conditional U-Net can take them.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .. import conditions

__all__ = ["CONDITIONS", "ConditionedDataset", "condition_fn"]

# name -> (function, fixed keyword arguments); the fixed ones keep the output's range, channels and size
_FUNCTIONS = {
    "edges": (conditions.sobel_edges, {"keep_channels": True, "value_range": (-1.0, 1.0)}),
    "canny": (conditions.canny_edges, {"keep_channels": True, "value_range": (-1.0, 1.0)}),
    "grey": (conditions.to_grayscale, {"keep_channels": True}),
    "gray": (conditions.to_grayscale, {"keep_channels": True}),
    "lowres": (conditions.downsample, {"upsample_back": True}),
}
_DEFAULTS = {"lowres": {"factor": 4}}
CONDITIONS = tuple(_FUNCTIONS)


class _Condition:
    """A picklable (for DataLoader workers) batched condition function."""

    def __init__(self, name: str, options: dict):
        self.name = name
        self.options = options

    def __call__(self, images: Tensor) -> Tensor:
        fn, fixed = _FUNCTIONS[self.name]
        # bicubic downsampling overshoots a little; the condition must stay in the images' range
        return fn(images, **self.options, **fixed).clamp_(-1.0, 1.0)

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"condition_fn({self.name!r}{opts})"


def condition_fn(name: str, **options) -> _Condition:
    """The batched condition ``f(images) -> conditions`` for (N, C, H, W) or (C, H, W) images in [-1, 1].

    Names: ``"edges"`` (:func:`~fastgen.conditions.sobel_edges`), ``"canny"``
    (:func:`~fastgen.conditions.canny_edges`), ``"grey"`` / ``"gray"`` (:func:`~fastgen.conditions.to_grayscale`),
    ``"lowres"`` (:func:`~fastgen.conditions.downsample` by ``factor``, default 4, and back up). ``options`` go
    to that function (``threshold``, ``sigma``, ``invert``, ``factor``, ``mode``, ...).
    """
    if name not in _FUNCTIONS:
        raise ValueError(f"unknown condition {name!r}; the conditions are {', '.join(map(repr, CONDITIONS))}")
    fn, fixed = _FUNCTIONS[name]
    fixed_given = sorted(set(options) & set(fixed))
    if fixed_given:
        raise ValueError(f"condition {name!r} sets {', '.join(fixed_given)} itself, so that the condition has the "
                         "image's range, channels and size; leave it out")
    options = {**_DEFAULTS.get(name, {}), **options}
    params = inspect.signature(fn).parameters
    allowed = [p for p in list(params)[1:] if p not in fixed]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"condition {name!r} has no option {', '.join(unknown)}; its options are "
                        f"{', '.join(allowed)}")
    return _Condition(name, options)


class ConditionedDataset(Dataset):
    """Wraps a dataset of ``(image, label)`` and yields ``(condition, image, label)``, the condition made from the
    image by :func:`condition_fn` ``(condition, **options)``. Other attributes (``class_names``, ...) are the
    wrapped dataset's."""

    def __init__(self, dataset, condition: str = "edges", **options):
        if not hasattr(dataset, "__getitem__"):
            raise TypeError(f"dataset must be indexable (a torch Dataset); got {type(dataset).__name__}")
        self.dataset = dataset
        self.condition = condition
        self.condition_fn = condition_fn(condition, **options)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        item = self.dataset[index]
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], Tensor)):
            raise TypeError(f"ConditionedDataset needs a dataset of (image tensor, label) pairs; item {index} of "
                            f"{type(self.dataset).__name__} is {type(item).__name__}")
        image, label = item
        with torch.no_grad():
            cond = self.condition_fn(image)
        return cond, image, label

    def __getattr__(self, name):
        # only called for attributes not found normally; __dict__ lookup avoids recursion while unpickling
        dataset = self.__dict__.get("dataset")
        if dataset is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(dataset, name)

    def __repr__(self) -> str:
        return f"ConditionedDataset({self.dataset!r}, {self.condition_fn!r})"
