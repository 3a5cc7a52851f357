"""Image grids for sample sheets: tensors -> uint8 arrays -> PNG files.

``make_grid`` mirrors ``torchvision.utils.make_grid`` followed by the usual to-uint8 conversion, without
needing torchvision. Grayscale stays 2-D (H, W) so ``PIL.Image.fromarray`` picks mode "L" on its own;
RGB is (H, W, 3).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

__all__ = ["make_grid", "save_image_grid", "save_image_rows"]


def _check_images(images, name: str = "images") -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (N, C, H, W), got {type(images).__name__}")
    if images.dim() == 3:  # a single image (C, H, W) is a common slip; accept it as a batch of one
        images = images.unsqueeze(0)
    if images.dim() != 4:
        raise ValueError(f"{name} must have rank 4 (N, C, H, W), got shape {tuple(images.shape)}")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"{name} must have 1 or 3 channels (N, C, H, W), got C={images.shape[1]} "
                         f"in shape {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError(f"{name} is empty (N=0)")
    if not images.is_floating_point():
        raise TypeError(f"{name} must be a float tensor, got dtype {images.dtype}")
    return images


def _to_unit(images: torch.Tensor, value_range) -> torch.Tensor:
    lo, hi = (float(v) for v in value_range)
    if not hi > lo:
        raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}")
    # fp32 on CPU: uint8 rounding of fp16/bf16 would otherwise differ from device to device.
    x = images.detach().to("cpu", torch.float32)
    return ((x - lo) / (hi - lo)).clamp_(0.0, 1.0)


def make_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2, value_range=(-1, 1),
              pad_value: float = 1.0) -> np.ndarray:
    """Tile (N, C, H, W) float images into one uint8 array, ``nrow`` images per row.

    ``value_range`` maps to 0..255 (values outside are clipped). ``pad_value`` is in output units
    0..1 (1.0 = white border), like torchvision. Returns (H', W') for C=1 and (H', W', 3) for C=3.
    """
    images = _check_images(images)
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    x = _to_unit(images, value_range)
    n, c, h, w = x.shape
    cols = min(nrow, n)
    rows = (n + cols - 1) // cols
    cell_h, cell_w = h + padding, w + padding
    grid = torch.full((c, rows * cell_h + padding, cols * cell_w + padding), float(pad_value))
    for i in range(n):
        r, col = divmod(i, cols)
        top, left = r * cell_h + padding, col * cell_w + padding
        grid[:, top:top + h, left:left + w] = x[i]
    out = (grid.clamp_(0, 1) * 255.0 + 0.5).to(torch.uint8).permute(1, 2, 0).numpy()
    return out[..., 0] if c == 1 else out


def _upscale(arr: np.ndarray, scale: int) -> np.ndarray:
    if not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be an int >= 1, got {scale!r}")
    if scale == 1:
        return arr
    # Nearest neighbour keeps pixels crisp; 16-px digits turn to mush under bilinear.
    return np.repeat(np.repeat(arr, scale, axis=0), scale, axis=1)


def _require_pil():
    try:
        import PIL.Image
        import PIL.ImageDraw
        import PIL.ImageFont
    except ImportError as e:  # pragma: no cover - Pillow is a soft dependency
        raise ImportError("Saving PNG images needs Pillow: pip install pillow") from e
    return PIL


def _write_png_atomic(arr: np.ndarray, path) -> Path:
    Image = _require_pil().Image
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Temp file in the same folder, so os.replace is a same-filesystem rename and a kill mid-write
    # leaves either the old file or none, never a truncated PNG.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(np.ascontiguousarray(arr)).save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def save_image_grid(images: torch.Tensor, path, nrow: int = 8, padding: int = 2, value_range=(-1, 1),
                    scale: int = 1) -> Path:
    """Write ``make_grid(images, ...)`` as a PNG at ``path`` (parents created, written atomically).

    ``scale`` enlarges the whole sheet by an integer factor with nearest-neighbour. Returns the path.
    """
    arr = make_grid(images, nrow=nrow, padding=padding, value_range=value_range)
    return _write_png_atomic(_upscale(arr, scale), path)


def _label_margin(arr: np.ndarray, labels: Sequence[str], row_pitch: int, padding: int) -> np.ndarray:
    pil = _require_pil()
    Image, ImageDraw, ImageFont = pil.Image, pil.ImageDraw, pil.ImageFont
    font = ImageFont.load_default()  # bundled with Pillow: nothing to find or download
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    boxes = [probe.textbbox((0, 0), str(t), font=font) for t in labels]
    margin = max(b[2] - b[0] for b in boxes) + 2 * max(padding, 2)
    bg = 255
    canvas = Image.new("L" if arr.ndim == 2 else "RGB", (arr.shape[1] + margin, arr.shape[0]),
                       bg if arr.ndim == 2 else (bg,) * 3)
    canvas.paste(Image.fromarray(arr), (margin, 0))
    draw = ImageDraw.Draw(canvas)
    for i, (text, box) in enumerate(zip(labels, boxes)):
        y = padding + i * row_pitch + (row_pitch - padding - (box[3] - box[1])) // 2 - box[1]
        draw.text((max(padding, 2), y), str(text), fill=0 if arr.ndim == 2 else (0, 0, 0), font=font)
    return np.asarray(canvas)


def save_image_rows(rows: Sequence[torch.Tensor], path, labels: Sequence[str] | None = None, padding: int = 2,
                    value_range=(-1, 1), scale: int = 1) -> Path:
    """Write several equally sized batches one per row, e.g. input / output / target triplets.

    Every row must have the same (N, C, H, W). ``labels`` (one string per row) are drawn in a left margin
    with Pillow's built-in font.
    """
    if isinstance(rows, torch.Tensor) or not isinstance(rows, Sequence) or len(rows) == 0:
        raise TypeError("rows must be a non-empty list of (N, C, H, W) tensors")
    if labels is not None and (isinstance(labels, str) or len(labels) != len(rows)):
        raise ValueError(f"labels must be a list with one string per row ({len(rows)} rows), got {labels!r}")
    names = [str(t) for t in labels] if labels is not None else [f"rows[{i}]" for i in range(len(rows))]
    checked = [_check_images(r, name) for r, name in zip(rows, names)]
    first = checked[0].shape
    for r, name in zip(checked[1:], names[1:]):
        if r.shape != first:
            raise ValueError(f"every row must have the shape of {names[0]} {tuple(first)}, "
                             f"but {name} has {tuple(r.shape)}")
    stacked = torch.cat([r.to("cpu", torch.float32) for r in checked])
    arr = _upscale(make_grid(stacked, nrow=first[0], padding=padding, value_range=value_range), scale)
    if labels is not None:
        arr = _label_margin(arr, names, (first[2] + padding) * scale, padding * scale)
    return _write_png_atomic(arr, path)
