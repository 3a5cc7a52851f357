"""Condition images for paired image-to-image datasets (pix2pix-style): grayscale, low-resolution and edge maps,
made on the fly from the target image.

Every function takes a float batch ``(N, C, H, W)`` or a single image ``(C, H, W)`` (as a DataLoader's
``Dataset.__getitem__`` sees it) on any device, in float32, float16, bfloat16 or float64, and returns the same
rank, dtype and device. The math runs in float32 (float64 stays float64) and is rounded once: several torch ops
have no half-precision CPU kernel, and edge thresholds should not depend on the storage dtype. Everything is
batched tensor ops (``F.conv2d``, ``F.interpolate``, ``F.max_pool2d``); nothing loops over pixels or samples.

Value range: :func:`to_grayscale` and :func:`downsample` are linear with weights that sum to one, so they work
on images in ``[-1, 1]`` or ``[0, 1]`` alike and keep the range (bicubic may overshoot it slightly, as it does in
PIL). The edge detectors need to know what black and white are: pass ``value_range=(lo, hi)`` — ``(-1, 1)`` by
default, fastgen's model range — and they return edge maps in that same range, ``hi`` (white) on edges and
``lo`` (black) elsewhere, or the reverse with ``invert=True`` (black lines on white, as in pix2pix's
edges2shoes / edges2handbags).

Colour images have 3 channels (RGB); a 1-channel image is its own luma. The outputs keep the input's channel
count when ``keep_channels=True`` (a 3-channel condition for a model built for RGB inputs), else have 1 channel.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["canny_edges", "downsample", "sobel_edges", "to_grayscale"]

# ITU-R BT.601 luma, the weights of PIL's convert("L") and torchvision's rgb_to_grayscale
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
INTERPOLATION_MODES = ("nearest", "nearest-exact", "bilinear", "bicubic", "area")
# The largest |Sobel gradient| over any 3x3 patch with values in [0, 1]: |(4, 2)|, from a patch such as
# [[0, 0, 1], [0, 0, 1], [0, 1, 1]] (the magnitude is convex, so a binary patch attains it). Normalising by it
# keeps sobel_edges' magnitude in [0, 1].
SOBEL_MAX = 2 * math.sqrt(5)

NMS_RELATIVE_TOLERANCE = 1e-4

_SOBEL_X = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))


# ---------------------------------------------------------------- checks and layout


def _as_batch(name: str, images) -> tuple[Tensor, bool]:
    """The (N, C, H, W) view of ``images`` and whether it was a single (C, H, W) image."""
    if not isinstance(images, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(images).__name__}")
    if not images.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (values in [-1, 1] or [0, 1]); got dtype "
                        f"{str(images.dtype).replace('torch.', '')} — convert uint8 images with "
                        "images.float() / 255 first")
    if images.dim() not in (3, 4):
        raise ValueError(f"{name} must be (N, C, H, W) or a single (C, H, W) image; got shape {tuple(images.shape)}")
    if any(s == 0 for s in images.shape[-3:]):
        raise ValueError(f"{name} has an empty channel or spatial dim: shape {tuple(images.shape)}")
    single = images.dim() == 3
    return (images.unsqueeze(0) if single else images), single


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _finish(y: Tensor, like: Tensor, single: bool) -> Tensor:
    y = y.to(like.dtype)
    return y.squeeze(0) if single else y


def _check_channels(name: str, x: Tensor) -> None:
    if x.shape[1] not in (1, 3):
        raise ValueError(f"{name} must have 3 (RGB) or 1 (grayscale) channels; got {x.shape[1]} "
                         f"(shape {tuple(x.shape)})")


def _check_range(value_range) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value_range)
    except (TypeError, ValueError):
        raise TypeError(f"value_range must be a pair (lo, hi) of numbers, such as (-1, 1) or (0, 1); "
                        f"got {value_range!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise ValueError(f"value_range must be finite with lo < hi; got {value_range!r}")
    return lo, hi


def _luma(x: Tensor) -> Tensor:
    """(N, 1, H, W) luma of an (N, 1 or 3, H, W) batch, in x's dtype."""
    if x.shape[1] == 1:
        return x
    w = torch.tensor(LUMA_WEIGHTS, dtype=x.dtype, device=x.device)
    return torch.einsum("nchw,c->nhw", x, w).unsqueeze(1)


def _unit_luma(x: Tensor, value_range) -> Tensor:
    """Luma of a checked batch in float32/64, rescaled so that ``value_range`` maps to [0, 1]."""
    lo, hi = _check_range(value_range)
    y = _luma(x.to(_compute_dtype(x)))
    return (y - lo) / (hi - lo)


def _to_range(unit: Tensor, x: Tensor, value_range, keep_channels: bool, invert: bool) -> Tensor:
    """Map a [0, 1] (N, 1, H, W) map back to ``value_range``, optionally inverted and repeated over x's channels."""
    lo, hi = _check_range(value_range)
    if invert:
        unit = 1 - unit
    y = lo + unit * (hi - lo)
    return y.repeat(1, x.shape[1], 1, 1) if keep_channels and x.shape[1] != 1 else y


def _sobel(y: Tensor) -> tuple[Tensor, Tensor]:
    """(gx, gy) of an (N, 1, H, W) map, rightwards and downwards, with replicated borders (so that an image's
    edge is not taken for an edge in the image)."""
    kx = torch.tensor(_SOBEL_X, dtype=y.dtype, device=y.device)
    weight = torch.stack([kx, kx.t()]).unsqueeze(1)
    g = F.conv2d(F.pad(y, (1, 1, 1, 1), mode="replicate"), weight)
    return g[:, :1], g[:, 1:]


# ---------------------------------------------------------------- grayscale


def to_grayscale(images: Tensor, keep_channels: bool = True) -> Tensor:
    """Luma ``0.299 R + 0.587 G + 0.114 B`` (ITU-R BT.601, as PIL's ``convert("L")`` and torchvision's
    ``rgb_to_grayscale``): the condition of a colourisation pair.

    Args:
        images: (N, 3, H, W) or (3, H, W) RGB, float, in [-1, 1] or [0, 1] (the range is kept); a 1-channel
            image is returned as is (a copy).
        keep_channels: repeat the luma over 3 channels (a gray RGB image); else return 1 channel.

    Returns (N, 3 or 1, H, W) (or without N), in the input's dtype and device.
    """
    x, single = _as_batch("images", images)
    _check_channels("images", x)
    y = _luma(x.to(_compute_dtype(x)))
    if keep_channels:
        y = y.repeat(1, x.shape[1], 1, 1)
    return _finish(y, images, single)


# ---------------------------------------------------------------- super-resolution


def downsample(images: Tensor, factor: int, mode: str = "bicubic", upsample_back: bool = True,
               antialias: bool = True) -> Tensor:
    """The low-resolution image of a super-resolution pair: ``images`` shrunk by ``factor``, and (by default)
    resized back to the full size so that a same-size pix2pix U-Net can take it as its condition.

    Args:
        images: (N, C, H, W) or (C, H, W), float, any range (the resize is linear and keeps constants).
        factor: a positive integer that divides H and W.
        mode: ``"bicubic"``, ``"bilinear"``, ``"area"`` (box filter, a mean over factor x factor blocks),
            ``"nearest"`` or ``"nearest-exact"``; used both ways (``"area"`` upsamples as nearest).
        upsample_back: resize the low-resolution image back to (H, W).
        antialias: low-pass filter before a bilinear / bicubic shrink (as PIL and torchvision resize do), so
            that fine detail does not alias; ignored by the other modes.

    Returns (N, C, H, W), or (N, C, H // factor, W // factor) without ``upsample_back``, in the input's dtype.
    """
    x, single = _as_batch("images", images)
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor must be a positive integer; got {factor!r}")
    if mode not in INTERPOLATION_MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, INTERPOLATION_MODES))}; got {mode!r}")
    h, w = x.shape[-2:]
    if h % factor or w % factor:
        raise ValueError(f"factor {factor} must divide the image size; got H, W = {h}, {w}")
    if factor == 1:
        return images.clone()
    smooth = mode in ("bilinear", "bicubic")
    kwargs = {"align_corners": False} if smooth else {}
    xc = x.to(_compute_dtype(x))
    small = F.interpolate(xc, size=(h // factor, w // factor), mode=mode, antialias=antialias and smooth, **kwargs)
    y = F.interpolate(small, size=(h, w), mode=mode, **kwargs) if upsample_back else small
    return _finish(y, images, single)


# ---------------------------------------------------------------- edges


def sobel_edges(images: Tensor, threshold: Optional[float] = None, *, value_range=(-1.0, 1.0),
                keep_channels: bool = True, invert: bool = False) -> Tensor:
    """Gradient magnitude of the luma with 3x3 Sobel filters: a soft edge map, or a binary one with ``threshold``.

        m = sqrt(gx^2 + gy^2) / (2 sqrt 5),   gx = [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]] * Y,  gy = gx's transpose

    on the luma Y rescaled to [0, 1]; 2 sqrt 5 is the largest magnitude a 3x3 patch can have, so m is in [0, 1]
    (a sharp full-contrast vertical step gives 4 / (2 sqrt 5) = 0.894 on both columns beside it). Borders are
    replicated.

    Args:
        images: (N, 1 or 3, H, W) or (1 or 3, H, W), float, with values in ``value_range``.
        threshold: None for the soft magnitude; else a number in [0, 1): edges are where m > threshold.
        value_range: (lo, hi), the black and white of the input, and of the output.
        keep_channels: repeat the edge map over the input's channels; else return 1 channel.
        invert: dark edges on white instead of white edges on black.

    Returns the edge map mapped to ``value_range`` (lo + m (hi - lo), or lo / hi for a binary map), in the
    input's dtype.
    """
    x, single = _as_batch("images", images)
    _check_channels("images", x)
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or not 0 <= threshold < 1):
        raise ValueError(f"threshold must be None or a number in [0, 1); got {threshold!r}")
    gx, gy = _sobel(_unit_luma(x, value_range))
    m = torch.hypot(gx, gy) / SOBEL_MAX
    if threshold is not None:
        m = (m > threshold).to(m.dtype)
    return _finish(_to_range(m, x, value_range, keep_channels, invert), images, single)


def _gaussian_blur(y: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of an (N, 1, H, W) map, truncated at 4 sigma, with replicated borders."""
    radius = max(1, math.ceil(4 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=y.dtype, device=y.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(y, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1))


def _non_max_suppression(m: Tensor, gx: Tensor, gy: Tensor) -> Tensor:
    """Where m is a local maximum along its gradient direction, quantised to 0, 45, 90 or 135 degrees.

    A pixel must beat its "before" neighbour strictly and tie-or-beat the "after" one, so that a ridge two
    pixels wide with equal magnitudes (a step edge between two pixel columns) keeps exactly one of them.
    """
    h, w = m.shape[-2:]
    p = F.pad(m, (1, 1, 1, 1))

    def at(dy: int, dx: int) -> Tensor:
        return p[..., 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]

    ax, ay = gx.abs(), gy.abs()
    tan22 = math.tan(math.pi / 8)
    horizontal = ay <= tan22 * ax  # the gradient points along x: compare left and right
    vertical = ax < tan22 * ay
    # y points down, so gx * gy > 0 is a gradient towards the bottom right
    main_diag = ~horizontal & ~vertical & (gx * gy > 0)
    before = torch.where(horizontal, at(0, -1), torch.where(vertical, at(-1, 0),
                                                           torch.where(main_diag, at(-1, -1), at(-1, 1))))
    after = torch.where(horizontal, at(0, 1), torch.where(vertical, at(1, 0),
                                                         torch.where(main_diag, at(1, 1), at(1, -1))))
    # The two magnitudes of such a ridge differ by rounding only (the blur and Sobel sums run over different
    # values), which would pick the kept pixel at random along the edge and make it jagged: a relative
    # tolerance far above float32 rounding and far below any real contrast makes them tie.
    tol = NMS_RELATIVE_TOLERANCE * m
    return (m > before + tol) & (m >= after - tol)


def _hysteresis(strong: Tensor, weak: Tensor, max_iterations: int) -> Tensor:
    """Grow ``strong`` through 8-connected ``weak`` pixels (strong is a subset of weak) until it stops changing."""
    edges = strong.to(torch.float32)
    weak_f = weak.to(edges.dtype)
    # Several dilations per convergence test: once converged a dilation changes nothing, and each test is a
    # device-to-host sync on CUDA.
    per_check = 8
    done = 0
    while done < max_iterations:
        prev = edges
        for _ in range(min(per_check, max_iterations - done)):
            edges = F.max_pool2d(edges, 3, stride=1, padding=1) * weak_f
        done += per_check
        if torch.equal(edges, prev):
            break
    return edges > 0


def canny_edges(images: Tensor, sigma: float = 1.0, low_threshold: float = 0.1, high_threshold: float = 0.2, *,
                value_range=(-1.0, 1.0), keep_channels: bool = True, invert: bool = False,
                max_iterations: Optional[int] = None) -> Tensor:
    """Canny's edge detector (Canny 1986) on the luma: a binary map of thin, linked edges.

    1. Y = the luma rescaled to [0, 1], blurred with a Gaussian of std ``sigma`` (truncated at 4 sigma; 0 skips).
    2. gx, gy = the 3x3 Sobel gradients of Y (borders replicated), m = sqrt(gx^2 + gy^2) / 4, so a sharp
       step of contrast c has m = c (a blurred one somewhat less: 0.64 c at sigma = 1).
    3. Non-maximum suppression: keep pixels whose m is a maximum along the gradient direction quantised to
       0, 45, 90 or 135 degrees (ties go to the pixel on the lower-coordinate side, so edges are one pixel wide).
    4. Double threshold and hysteresis: maxima with m >= ``high_threshold`` are edges, and maxima with
       m >= ``low_threshold`` join them when 8-connected to an edge (a 3x3 max-pool dilation masked by the
       weak maxima, repeated until nothing changes or ``max_iterations``).

    skimage.feature.canny's thresholds on a [0, 1] image are 4x these (it does not divide the Sobel response
    by 4); its blur and interpolated suppression differ in detail.

    Args:
        images: (N, 1 or 3, H, W) or (1 or 3, H, W), float, with values in ``value_range``.
        sigma: the blur's standard deviation in pixels (>= 0).
        low_threshold, high_threshold: 0 <= low <= high, in the units of step 2.
        value_range: (lo, hi), the black and white of the input, and of the output.
        keep_channels: repeat the edge map over the input's channels; else return 1 channel.
        invert: black edges on white (pix2pix's edges2shoes look) instead of white edges on black.
        max_iterations: the cap on hysteresis dilations; None is H * W (enough for any edge chain).

    Returns the binary edge map with values ``lo`` and ``hi``, in the input's dtype.
    """
    x, single = _as_batch("images", images)
    _check_channels("images", x)
    for name, v in (("sigma", sigma), ("low_threshold", low_threshold), ("high_threshold", high_threshold)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{name} must be a finite number >= 0; got {v!r}")
    if low_threshold > high_threshold:
        raise ValueError(f"low_threshold ({low_threshold}) must not exceed high_threshold ({high_threshold})")
    h, w = x.shape[-2:]
    if max_iterations is None:
        max_iterations = h * w
    elif isinstance(max_iterations, bool) or not isinstance(max_iterations, int) or max_iterations < 0:
        raise ValueError(f"max_iterations must be None or an integer >= 0; got {max_iterations!r}")
    y = _unit_luma(x, value_range)
    if sigma > 0:
        y = _gaussian_blur(y, sigma)
    gx, gy = _sobel(y)
    m = torch.hypot(gx, gy) / 4
    maxima = _non_max_suppression(m, gx, gy)
    strong = maxima & (m >= high_threshold)
    weak = maxima & (m >= low_threshold)
    edges = _hysteresis(strong, weak, max_iterations).to(y.dtype)
    return _finish(_to_range(edges, x, value_range, keep_channels, invert), images, single)
