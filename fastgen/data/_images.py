"""Reading image files for the folder datasets: listing, header checks, decoding, resizing and the per-item random
state, with errors that name the file or folder.

Images come out as float32 (C, H, W) tensors in [-1, 1] (0 -> -1, 255 -> 1), fastgen's model range.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
CROPS = ("center", "random", None)
# The modes whose channel count is unambiguous. Others (alpha, palette, 16-bit, CMYK) need an explicit
# conversion: guessing would silently drop transparency or change colours.
MODE_CHANNELS = {"1": 1, "L": 1, "RGB": 3}
MODE_NAMES = {"RGBA": "RGB with alpha", "LA": "grey with alpha", "P": "palette", "PA": "palette with alpha",
              "I": "32-bit integer grey", "I;16": "16-bit grey", "F": "float grey", "CMYK": "CMYK"}
# What Pillow raises on a file it cannot parse or decode.
PIL_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


# ---------------------------------------------------------------- argument checks


def check_folder(folder, what: str) -> Path:
    path = Path(os.fspath(folder))
    if not path.exists():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    if not path.is_dir():
        raise NotADirectoryError(f"{what} {str(path)!r} is not a directory")
    return path


def check_extensions(extensions) -> tuple[str, ...]:
    if isinstance(extensions, str):
        extensions = (extensions,)
    try:
        ext = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    except (TypeError, AttributeError):
        raise TypeError(f"extensions must be a sequence of strings such as ('.png', '.jpg'); "
                        f"got {extensions!r}") from None
    if not ext:
        raise ValueError("extensions must name at least one file extension, such as '.png'")
    return ext


def check_size(size) -> Optional[int]:
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(f"size must be None (keep each image's size) or a positive integer; got {size!r}")
    return size


def check_channels(channels) -> Optional[int]:
    if channels is not None and (isinstance(channels, bool) or channels not in (1, 3)):
        raise ValueError(f"channels must be 1 (grey), 3 (RGB) or None (keep each file's own); got {channels!r}")
    return channels


def check_crop(crop) -> Optional[str]:
    if crop not in CROPS:
        raise ValueError(f"crop must be 'center', 'random' or None (resize to exactly size x size); got {crop!r}")
    return crop


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0; got {seed!r}")
    return seed


def check_index(index, length: int) -> int:
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
        raise TypeError(f"index must be an integer; got {type(index).__name__}")
    i = int(index) + length if index < 0 else int(index)
    if not 0 <= i < length:
        raise IndexError(f"index {index} is out of range for a dataset of {length} items")
    return i


# ---------------------------------------------------------------- listing


def list_images(folder: Path, extensions: tuple[str, ...]) -> list[Path]:
    """The image files directly in ``folder``, sorted by name; hidden files (``.DS_Store``, ``._x.png``) are skipped."""
    return sorted(p for p in folder.iterdir()
                  if not p.name.startswith(".") and p.suffix.lower() in extensions and p.is_file())


def list_folders(folder: Path) -> list[Path]:
    """The non-hidden sub-folders of ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.is_dir())


def no_images_error(folder: Path, extensions: tuple[str, ...], what: str = "folder") -> ValueError:
    return ValueError(f"{what} {str(folder)!r} has no images with extensions {', '.join(extensions)}")


def some(names: Sequence, limit: int = 5) -> str:
    names = [str(n) for n in names]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# ---------------------------------------------------------------- reading


def read_header(path: Path) -> tuple[str, tuple[int, int]]:
    """(PIL mode, (width, height)) of an image file, from its header; ``verify`` checks the file's structure
    (chunk checksums for PNG) without decoding the pixels."""
    try:
        with Image.open(path) as im:
            mode, size = im.mode, im.size
            im.verify()
    except PIL_ERRORS as exc:
        raise ValueError(f"cannot read image {str(path)!r}: {exc}") from exc
    return mode, size


def channels_of(path: Path, mode: str, channels: Optional[int]) -> int:
    """The channel count ``path`` will have: ``channels`` when converting, else its own (grey or RGB only)."""
    if channels is not None:
        return channels
    if mode not in MODE_CHANNELS:
        raise ValueError(f"image {str(path)!r} is {MODE_NAMES.get(mode, 'PIL mode ' + repr(mode))} "
                         f"(mode {mode!r}), not grey or RGB; pass channels=3 or channels=1 to convert it")
    return MODE_CHANNELS[mode]


def load_image(path: Path, channels: Optional[int]) -> Image.Image:
    """The decoded image, converted to grey (``channels=1``) or RGB (3), or kept as grey / RGB (None)."""
    try:
        with Image.open(path) as im:
            im.load()
    except PIL_ERRORS as exc:
        raise ValueError(f"cannot read image {str(path)!r}: {exc}") from exc
    channels_of(path, im.mode, channels)
    want = {1: "L", 3: "RGB"}.get(channels, "L" if im.mode == "1" else im.mode)
    return im if im.mode == want else im.convert(want)


class Uniform:
    """The channel count and size every file must share (what stacking a batch needs), taken from the first
    file checked; ``what`` names the files in the errors ("image", "condition image", ...)."""

    def __init__(self, what: str, check_size: bool):
        self.what = what
        self.check_size = check_size
        self.first = None

    def check(self, path: Path, channels: int, size: tuple[int, int]) -> None:
        if self.first is None:
            self.first = (path, channels, size)
            return
        ref, ref_channels, ref_size = self.first
        if channels != ref_channels:
            raise ValueError(f"{self.what} {str(path)!r} has {channels} channel(s) but {str(ref)!r} has "
                             f"{ref_channels}; pass channels=1 or channels=3 to convert every image")
        if self.check_size and size != ref_size:
            raise ValueError(f"{self.what} {str(path)!r} is {size[0]}x{size[1]} but {str(ref)!r} is "
                             f"{ref_size[0]}x{ref_size[1]}; pass size= to resize every image")


# ---------------------------------------------------------------- resizing and augmentation


def item_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator whose draws depend only on (seed, epoch, index), so that an item's crop and flip are the same
    in any DataLoader worker and change from one epoch to the next. SeedSequence mixes the three, so that
    neighbouring items or epochs do not share a stream."""
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) >> 1)


def plan_resize(size_wh: tuple[int, int], size: Optional[int], crop: Optional[str],
                generator: Optional[torch.Generator]):
    """(resized (w, h), crop box or None) taking an image of ``size_wh`` to ``size`` x ``size``: the shorter side
    resized to ``size`` and a centre or random square cropped, or a plain resize with ``crop=None``. Planned apart
    from the image so that the two images of a pair get the same crop."""
    if size is None:
        return None
    w, h = size_wh
    if crop is None:
        return (size, size), None
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if crop == "random":
        left = int(torch.randint(nw - size + 1, (), generator=generator))
        top = int(torch.randint(nh - size + 1, (), generator=generator))
    else:
        left, top = (nw - size) // 2, (nh - size) // 2
    return (nw, nh), (left, top, left + size, top + size)


def apply_resize(img: Image.Image, plan) -> Image.Image:
    if plan is None:
        return img
    new_size, box = plan
    if img.size != new_size:
        # PIL's bicubic widens its kernel when shrinking, so downscaling is antialiased
        img = img.resize(new_size, Image.Resampling.BICUBIC)
    return img if box is None else img.crop(box)


def to_tensor(img: Image.Image) -> Tensor:
    arr = np.array(img, dtype=np.uint8)  # a writable copy: torch warns on PIL's read-only buffer
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(arr)).to(torch.float32).div_(127.5).sub_(1.0)


class Augmented:
    """The seed / epoch bookkeeping of datasets with random crops and flips: call ``set_epoch(e)`` at the start
    of each epoch (as with ``DistributedSampler``) for new draws; without it every epoch repeats epoch 0's."""

    seed: int = 0
    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an integer >= 0; got {epoch!r}")
        self.epoch = epoch

    def _generator(self, index: int, random: bool) -> Optional[torch.Generator]:
        return item_generator(self.seed, self.epoch, index) if random else None


def maybe_flip(images: Sequence[Tensor], flip: bool, generator: Optional[torch.Generator]) -> list[Tensor]:
    """The images, all flipped left-right together on a coin toss when ``flip``."""
    if flip and bool(torch.rand((), generator=generator) < 0.5):
        return [t.flip(-1) for t in images]
    return list(images)
