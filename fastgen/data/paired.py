"""Paired images for image-to-image models (pix2pix): a condition (input) image and its target."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from torch.utils.data import Dataset

from . import _images as im

__all__ = ["PairedImageFolder"]


class PairedImageFolder(im.Augmented, Dataset):
    """``(condition, target)`` pairs of float32 (C, H, W) tensors in [-1, 1].

    Layouts:

    - ``root/A/<name>.<ext>`` is the condition of ``root/B/<name>.<ext>`` (folder names set by ``condition_dir``
      and ``target_dir``), matched by file stem; both folders must hold the same names, and the two images of a
      pair the same size;
    - ``side_by_side=True``: each image directly in ``root`` is condition | target side by side (the layout of
      pix2pix's released datasets, e.g. ``edges2shoes/train``), left half the condition; widths must be even.

    ``size``, ``crop``, ``channels``, ``flip``, ``seed``, ``verify`` and ``extensions`` are as in
    :class:`~fastgen.data.ImageFolder`, and a pair always gets the same resize, crop and flip. With
    ``channels=None`` the condition and target images may differ (grey edges, RGB photos), but all conditions
    must agree, and all targets.
    """

    def __init__(self, root, size: Optional[int] = None, *, channels: Optional[int] = None, flip: bool = False,
                 side_by_side: bool = False, condition_dir: str = "A", target_dir: str = "B",
                 crop: Optional[str] = "center", extensions=im.IMAGE_EXTENSIONS, seed: int = 0,
                 verify: bool = True):
        self.root = im.check_folder(root, "pix2pix folder")
        self.size = im.check_size(size)
        self.crop = im.check_crop(crop)
        self.flip = bool(flip)
        self.channels = im.check_channels(channels)
        self.extensions = im.check_extensions(extensions)
        self.seed = im.check_seed(seed)
        self.side_by_side = bool(side_by_side)
        if self.side_by_side:
            files = im.list_images(self.root, self.extensions)
            if not files:
                raise im.no_images_error(self.root, self.extensions, "side-by-side pix2pix folder")
            self.pairs = [(f, f) for f in files]
        else:
            self.pairs = self._match(condition_dir, target_dir)
        self._uniform = None
        if verify:
            self.verify()

    def _match(self, condition_dir: str, target_dir: str) -> list[tuple[Path, Path]]:
        hint = (f" (expected {condition_dir}/<name> conditions and {target_dir}/<name> targets in it, or "
                "side_by_side=True for condition|target images)")
        folders = []
        for name in (condition_dir, target_dir):
            try:
                folders.append(im.check_folder(self.root / name, "pix2pix folder"))
            except OSError as exc:
                raise type(exc)(f"{exc}{hint}") from None
        by_stem = []
        for folder in folders:
            files = im.list_images(folder, self.extensions)
            if not files:
                raise im.no_images_error(folder, self.extensions)
            stems: dict[str, Path] = {}
            for f in files:
                if f.stem in stems:
                    raise ValueError(f"{str(stems[f.stem])!r} and {str(f)!r} have the same name, so which one "
                                     "is the pair's image is ambiguous; rename or remove one")
                stems[f.stem] = f
            by_stem.append(stems)
        cond, target = by_stem
        only_cond, only_target = sorted(cond.keys() - target.keys()), sorted(target.keys() - cond.keys())
        if only_cond or only_target:
            parts = [f"{len(names)} only in {str(folder)!r} ({im.some(names)})"
                     for names, folder in ((only_cond, folders[0]), (only_target, folders[1])) if names]
            raise ValueError(f"the images of {str(folders[0])!r} and {str(folders[1])!r} must pair up by name; "
                             f"{'; '.join(parts)}")
        return [(cond[s], target[s]) for s in sorted(cond)]

    def __len__(self) -> int:
        return len(self.pairs)

    def _check_pair(self, uniform, pair, modes, sizes) -> None:
        """The pair-level checks, on headers (verify) or decoded images (loading) alike."""
        cond_path, target_path = pair
        if self.side_by_side:
            (w, h), mode = sizes[0], modes[0]
            if w % 2:
                raise ValueError(f"side-by-side image {str(cond_path)!r} is {w} pixels wide, which is odd, so "
                                 "it cannot be split into condition | target halves of equal width")
            uniform[0].check(cond_path, im.channels_of(cond_path, mode, self.channels), (w, h))
            return
        if sizes[0] != sizes[1]:
            raise ValueError(f"the pair {str(cond_path)!r} ({sizes[0][0]}x{sizes[0][1]}) and {str(target_path)!r} "
                             f"({sizes[1][0]}x{sizes[1][1]}) differ in size; the two images of a pair must match")
        for u, path, mode, size in zip(uniform, pair, modes, sizes):
            u.check(path, im.channels_of(path, mode, self.channels), size)

    def _new_uniform(self):
        return (im.Uniform("condition image", check_size=self.size is None),
                im.Uniform("target image", check_size=self.size is None))

    def verify(self) -> None:
        """Read every file's header; raise ValueError naming the first unreadable or inconsistent file or pair."""
        uniform = self._new_uniform()
        for pair in self.pairs:
            headers = [im.read_header(p) for p in pair[:1 if self.side_by_side else 2]]
            self._check_pair(uniform, pair, [m for m, _ in headers], [s for _, s in headers])
        self._uniform = uniform

    def _reference(self):
        # Without verify(), pairs are checked against the first pair, whichever a worker loads first.
        if self._uniform is None:
            uniform = self._new_uniform()
            pair = self.pairs[0]
            headers = [im.read_header(p) for p in pair[:1 if self.side_by_side else 2]]
            self._check_pair(uniform, pair, [m for m, _ in headers], [s for _, s in headers])
            self._uniform = uniform
        return self._uniform

    def _load(self, pair):
        if self.side_by_side:
            img = im.load_image(pair[0], self.channels)
            self._check_pair(self._reference(), pair, [img.mode], [img.size])
            w, h = img.size
            return img.crop((0, 0, w // 2, h)), img.crop((w // 2, 0, w, h))
        cond, target = (im.load_image(p, self.channels) for p in pair)
        self._check_pair(self._reference(), pair, [cond.mode, target.mode], [cond.size, target.size])
        return cond, target

    def __getitem__(self, index):
        i = im.check_index(index, len(self))
        cond, target = self._load(self.pairs[i])
        g = self._generator(i, self.flip or (self.size is not None and self.crop == "random"))
        plan = im.plan_resize(cond.size, self.size, self.crop, g)
        images = [im.to_tensor(im.apply_resize(img, plan)) for img in (cond, target)]
        cond_t, target_t = im.maybe_flip(images, self.flip, g)
        return cond_t, target_t

    def __repr__(self) -> str:
        layout = "side by side" if self.side_by_side else "A/B folders"
        return f"PairedImageFolder({str(self.root)!r}, {len(self)} pairs, {layout}, size={self.size})"
