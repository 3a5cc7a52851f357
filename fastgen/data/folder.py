"""A folder of images as a dataset: flat (unlabelled) or one sub-folder per class."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import Dataset

from . import _images as im

__all__ = ["ImageFolder"]


class ImageFolder(im.Augmented, Dataset):
    """Images from ``root``, as ``(image, label)`` with image a float32 (C, H, W) tensor in [-1, 1].

    Layouts (files whose extension is not in ``extensions``, and hidden files, are ignored):

    - images directly in ``root``: unlabelled, label -1, ``class_names == ()``;
    - one level of class folders, ``root/<class>/<image>``: labels index the sorted folder names
      (``class_names``). Every class folder must hold images; a root holding both images and class folders
      with images is refused as ambiguous.

    Args:
        size: None keeps each image's size (they must all be the same, to batch); an int resizes the shorter
            side to ``size`` (bicubic, antialiased) and crops a ``size`` x ``size`` square: ``crop="center"``
            or ``"random"``, or ``crop=None`` to resize to exactly ``size`` x ``size`` (aspect not kept).
        flip: a random left-right flip.
        channels: 1 converts to grey, 3 to RGB; None keeps each file's own, which must be grey or RGB and
            the same for every file.
        seed: the random crop and flip of item ``i`` depend only on (``seed``, epoch, ``i``), so they are the
            same in any DataLoader worker; ``set_epoch(e)`` draws anew for epoch ``e``.
        verify: check every file's header now (readable, channels and, with ``size=None``, size) so that a
            bad file fails here, not hours into training; else the same checks run as items load.
    """

    def __init__(self, root, size: Optional[int] = None, *, crop: Optional[str] = "center", flip: bool = False,
                 channels: Optional[int] = None, extensions=im.IMAGE_EXTENSIONS, seed: int = 0,
                 verify: bool = True):
        self.root = im.check_folder(root, "image folder")
        self.size = im.check_size(size)
        self.crop = im.check_crop(crop)
        self.flip = bool(flip)
        self.channels = im.check_channels(channels)
        self.extensions = im.check_extensions(extensions)
        self.seed = im.check_seed(seed)
        self.files, self.labels, self.class_names = self._scan()
        self.num_classes = len(self.class_names)
        self._uniform = None
        if verify:
            self.verify()

    def _scan(self) -> tuple[list[Path], list[int], tuple[str, ...]]:
        files = im.list_images(self.root, self.extensions)
        classes = [(d, im.list_images(d, self.extensions)) for d in im.list_folders(self.root)]
        if files:
            with_images = [d.name for d, found in classes if found]
            if with_images:
                raise ValueError(
                    f"image folder {str(self.root)!r} holds both images ({im.some(f.name for f in files)}) and "
                    f"class folders with images ({im.some(with_images)}); put every image in a class folder "
                    "(labelled) or none in any (unlabelled)")
            return files, [-1] * len(files), ()
        if not classes:
            raise im.no_images_error(self.root, self.extensions, "image folder")
        for folder, found in classes:
            if not found:
                raise im.no_images_error(folder, self.extensions, "class folder")
        files = [f for _, found in classes for f in found]
        labels = [label for label, (_, found) in enumerate(classes) for _ in found]
        return files, labels, tuple(d.name for d, _ in classes)

    def __len__(self) -> int:
        return len(self.files)

    def verify(self) -> None:
        """Read every file's header; raise ValueError naming the first unreadable or inconsistent one."""
        uniform = im.Uniform("image", check_size=self.size is None)
        for path in self.files:
            mode, size = im.read_header(path)
            uniform.check(path, im.channels_of(path, mode, self.channels), size)
        self._uniform = uniform

    def _reference(self) -> im.Uniform:
        # Without verify(), items are checked against the first file, whichever item a worker loads first.
        if self._uniform is None:
            uniform = im.Uniform("image", check_size=self.size is None)
            mode, size = im.read_header(self.files[0])
            uniform.check(self.files[0], im.channels_of(self.files[0], mode, self.channels), size)
            self._uniform = uniform
        return self._uniform

    def __getitem__(self, index):
        i = im.check_index(index, len(self))
        path = self.files[i]
        img = im.load_image(path, self.channels)
        self._reference().check(path, len(img.getbands()), img.size)
        g = self._generator(i, self.flip or (self.size is not None and self.crop == "random"))
        img = im.apply_resize(img, im.plan_resize(img.size, self.size, self.crop, g))
        (image,) = im.maybe_flip([im.to_tensor(img)], self.flip, g)
        return image, torch.tensor(self.labels[i], dtype=torch.int64)

    def __repr__(self) -> str:
        kind = f"{self.num_classes} classes" if self.num_classes else "unlabelled"
        return f"ImageFolder({str(self.root)!r}, {len(self)} images, {kind}, size={self.size})"
