"""Latent-space tools: interpolation, class-mean arithmetic, and 2-D latent manifold maps.

Shape rule for ``t`` everywhere: a Python number (or 0-d tensor) gives one result shaped like ``a``;
a sequence or 1-D tensor of K values gives results stacked on a new leading dim, (K, *a.shape).

Slerp treats each leading-dim sample as its own vector when ``a.dim() >= 2`` (a batch (N, ...)), and
the whole tensor as one vector when ``a`` is 1-D; ``per_sample`` overrides that rule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["class_arithmetic", "class_means", "interpolate", "latent_grid", "latent_map", "lerp", "slerp"]


def _check_pair(a, b) -> None:
    for name, v in (("a", a), ("b", b)):
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(v).__name__}")
        if not v.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {v.dtype}")
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise TypeError(f"a and b must have the same dtype, got {a.dtype} and {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"a and b must be on the same device, got {a.device} and {b.device}")


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half precision loses the small sin() ratios near the endpoints; fp64 inputs keep fp64.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _as_t(t, ref: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """t as a (K, 1, ..., 1) tensor broadcastable against (K, *ref.shape), and whether it was scalar."""
    if isinstance(t, torch.Tensor):
        if t.dim() > 1:
            raise ValueError(f"t must be a number, a sequence or a 1-D tensor, got shape {tuple(t.shape)}")
        scalar = t.dim() == 0
        tt = t.detach().to(ref.device, _work_dtype(ref.dtype)).reshape(-1)
    elif isinstance(t, (int, float)) and not isinstance(t, bool):
        scalar, tt = True, torch.tensor([float(t)], dtype=_work_dtype(ref.dtype), device=ref.device)
    elif isinstance(t, Sequence) and not isinstance(t, str):
        if len(t) == 0:
            raise ValueError("t is an empty sequence; pass at least one interpolation value")
        scalar, tt = False, torch.tensor([float(v) for v in t], dtype=_work_dtype(ref.dtype), device=ref.device)
    else:
        raise TypeError(f"t must be a number, a sequence of numbers or a 1-D tensor, got {type(t).__name__}")
    if not torch.isfinite(tt).all():
        raise ValueError(f"t must be finite, got {tt.tolist()}")
    return tt.reshape(-1, *([1] * ref.dim())), scalar


def _finish(out: torch.Tensor, t: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scalar: bool) -> torch.Tensor:
    out = out.to(a.dtype)
    # Select the inputs themselves at t == 0 / 1 so endpoints are bit-exact, whatever rounding did.
    out = torch.where(t == 0, a.unsqueeze(0), torch.where(t == 1, b.unsqueeze(0), out))
    return out[0] if scalar else out


def lerp(a: torch.Tensor, b: torch.Tensor, t) -> torch.Tensor:
    """Linear interpolation ``a + t * (b - a)``, computed in fp32 (fp64 for fp64 inputs)."""
    _check_pair(a, b)
    tt, scalar = _as_t(t, a)
    wd = _work_dtype(a.dtype)
    a32, b32 = a.to(wd), b.to(wd)
    return _finish(a32 + tt * (b32 - a32), tt, a, b, scalar)


def slerp(a: torch.Tensor, b: torch.Tensor, t, *, dot_threshold: float = 0.9995,
          per_sample: bool | None = None) -> torch.Tensor:
    """Spherical interpolation along the great circle from ``a`` to ``b`` (the DDIM / StyleGAN form).

    The angle comes from the normalised vectors; the result mixes the raw ``a`` and ``b``, so unit
    vectors stay unit and Gaussian latents keep a typical norm instead of shrinking mid-way as with
    lerp. Where ``|cos angle| > dot_threshold`` (near-parallel or near-opposite, sin angle ~ 0) or a
    vector is zero, it falls back to lerp. ``per_sample`` defaults to ``a.dim() >= 2``.
    """
    _check_pair(a, b)
    if not 0.0 < dot_threshold <= 1.0:
        raise ValueError(f"dot_threshold must be in (0, 1], got {dot_threshold}")
    tt, scalar = _as_t(t, a)
    per_sample = a.dim() >= 2 if per_sample is None else bool(per_sample)
    if per_sample and a.dim() < 1:
        raise ValueError("per_sample=True needs a tensor with a leading batch dim, got a 0-d tensor")
    wd = _work_dtype(a.dtype)
    a32, b32 = a.to(wd), b.to(wd)
    dims = tuple(range(1, a.dim())) if per_sample else tuple(range(a.dim()))
    keep = dict(dim=dims, keepdim=True) if dims else None
    na = torch.linalg.vector_norm(a32, **keep) if keep else a32.abs()
    nb = torch.linalg.vector_norm(b32, **keep) if keep else b32.abs()
    degenerate = (na == 0) | (nb == 0)
    dot = ((a32 * b32).sum(**keep) if keep else a32 * b32) / torch.where(degenerate, 1, na * nb)
    dot = dot.clamp(-1.0, 1.0)
    use_lerp = degenerate | (dot.abs() > dot_threshold)
    theta = torch.acos(torch.where(use_lerp, 0.0, dot))  # theta = pi/2 where lerp is used: no 0/0
    sin_theta = torch.sin(torch.where(use_lerp, torch.pi / 2, theta))
    wa = torch.sin((1 - tt) * theta) / sin_theta
    wb = torch.sin(tt * theta) / sin_theta
    wa = torch.where(use_lerp, 1 - tt, wa)
    wb = torch.where(use_lerp, tt, wb)
    return _finish(wa * a32 + wb * b32, tt, a, b, scalar)


def interpolate(a: torch.Tensor, b: torch.Tensor, steps: int, method: str = "slerp") -> torch.Tensor:
    """``steps`` evenly spaced points from ``a`` to ``b``, both endpoints included: (steps, *a.shape)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"steps must be an int >= 2 (both endpoints are included), got {steps!r}")
    fns = {"slerp": slerp, "lerp": lerp}
    if method not in fns:
        raise ValueError(f"method must be one of {sorted(fns)}, got {method!r}")
    t = torch.linspace(0.0, 1.0, steps, dtype=torch.float64)
    return fns[method](a, b, t)


def class_means(latents: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None) -> torch.Tensor:
    """Mean latent of each class: (num_classes, *latents.shape[1:]). A class with no sample is an error."""
    if not isinstance(latents, torch.Tensor) or latents.dim() < 2 or not latents.is_floating_point():
        raise ValueError("latents must be a float tensor of shape (N, ...) with a batch dim, got "
                         f"{getattr(latents, 'shape', type(latents).__name__)}")
    labels = torch.as_tensor(labels, device=latents.device)
    if labels.dim() != 1 or labels.shape[0] != latents.shape[0]:
        raise ValueError(f"labels must have shape ({latents.shape[0]},), got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    labels = labels.long()
    if labels.numel() and labels.min() < 0:
        raise ValueError(f"labels must be >= 0, got {int(labels.min())}")
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if labels.numel() else 0
    if num_classes < 1:
        raise ValueError("need at least one class (got no labels and no num_classes)")
    if labels.numel() and labels.max() >= num_classes:
        raise ValueError(f"label {int(labels.max())} is out of range for num_classes={num_classes}")
    wd = _work_dtype(latents.dtype)
    flat = latents.reshape(latents.shape[0], -1).to(wd)
    sums = torch.zeros(num_classes, flat.shape[1], dtype=wd, device=latents.device).index_add_(0, labels, flat)
    counts = torch.bincount(labels, minlength=num_classes)
    missing = (counts == 0).nonzero().flatten().tolist()
    if missing:
        raise ValueError(f"class(es) {missing} have no sample, so they have no mean latent")
    means = sums / counts.to(wd).unsqueeze(1)
    return means.reshape(num_classes, *latents.shape[1:]).to(latents.dtype)


def class_arithmetic(z: torch.Tensor, source_class: int, target_class: int, means: torch.Tensor,
                     strength: float = 1.0) -> torch.Tensor:
    """Move ``z`` from one class to another: ``z - strength * means[source] + strength * means[target]``.

    ``z`` is one latent shaped like ``means[0]`` or a batch (N, *means.shape[1:]).
    """
    if not isinstance(means, torch.Tensor) or means.dim() < 2:
        raise ValueError("means must be a tensor (num_classes, ...) as returned by class_means")
    if not isinstance(z, torch.Tensor) or z.shape[-(means.dim() - 1):] != means.shape[1:] or \
            z.dim() not in (means.dim() - 1, means.dim()):
        raise ValueError(f"z must have shape {tuple(means.shape[1:])} or (N, {', '.join(map(str, means.shape[1:]))})"
                         f", got {tuple(getattr(z, 'shape', ()))}")
    c = means.shape[0]
    for name, k in (("source_class", source_class), ("target_class", target_class)):
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k < c:
            raise ValueError(f"{name} must be an int in [0, {c}), got {k!r}")
    wd = _work_dtype(z.dtype)
    delta = (means[target_class].to(wd) - means[source_class].to(wd)) * float(strength)
    return (z.to(wd) + delta.to(z.device)).to(z.dtype)


def latent_grid(n: int = 20, *, lo: float | None = None, hi: float | None = None,
                quantiles: bool = True) -> torch.Tensor:
    """An n x n grid of 2-D latents, (n*n, 2), ordered row-major for ``make_grid(nrow=n)``.

    With ``quantiles`` (default), values are the standard-normal inverse CDF of ``n`` evenly spaced
    probabilities from ``lo`` to ``hi`` (default 0.05..0.95), as in Kingma & Welling's MNIST manifold:
    equal prior mass between neighbours. Otherwise they are evenly spaced in z from ``lo`` to ``hi``
    (default -2..2). Column index -> first coordinate increasing; row index (top to bottom) -> second
    coordinate decreasing, so the picture has "up" = larger z2.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"n must be an int >= 2, got {n!r}")
    lo = (0.05 if quantiles else -2.0) if lo is None else float(lo)
    hi = (0.95 if quantiles else 2.0) if hi is None else float(hi)
    if not lo < hi:
        raise ValueError(f"lo must be < hi, got lo={lo}, hi={hi}")
    if quantiles:
        if not 0.0 < lo < hi < 1.0:
            raise ValueError(f"with quantiles=True, lo and hi are probabilities in (0, 1), got {lo}, {hi}")
        p = torch.linspace(lo, hi, n, dtype=torch.float64)
        normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64),
                                            torch.tensor(1.0, dtype=torch.float64))
        v = normal.icdf(p)
        if abs(lo + hi - 1.0) < 1e-12:
            v = 0.5 * (v - v.flip(0))  # symmetric range -> make the grid exactly symmetric about 0
    else:
        v = torch.linspace(lo, hi, n, dtype=torch.float64)
    z1 = v.repeat(n)                       # column j -> v[j]
    z2 = v.flip(0).repeat_interleave(n)    # row i -> v[n-1-i]
    return torch.stack([z1, z2], dim=1).to(torch.float32)


def latent_map(decode: Callable[[torch.Tensor], torch.Tensor], n: int = 20, *, batch_size: int = 256,
               device=None, dtype: torch.dtype = torch.float32, **grid_kw) -> torch.Tensor:
    """Decode ``latent_grid(n, **grid_kw)`` into images (n*n, C, H, W), in batches under no_grad.

    ``decode`` maps (B, 2) latents to (B, C, H, W) images. For a model whose latent is not 2-D, pass a
    callable that embeds the 2-D z itself (e.g. into a plane spanned by two directions).
    """
    if not callable(decode):
        raise TypeError(f"decode must be a callable from (B, 2) latents to (B, C, H, W) images, got "
                        f"{type(decode).__name__}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    z = latent_grid(n, **grid_kw).to(device=device, dtype=dtype)
    outs = []
    with torch.no_grad():
        for start in range(0, z.shape[0], batch_size):
            zb = z[start:start + batch_size]
            img = decode(zb)
            if not isinstance(img, torch.Tensor) or img.dim() != 4 or img.shape[0] != zb.shape[0]:
                raise ValueError(f"decode must return a tensor (B, C, H, W) with B={zb.shape[0]} for a "
                                 f"(B, 2) latent batch, got {tuple(getattr(img, 'shape', ())) or type(img).__name__}")
            outs.append(img)
    return torch.cat(outs)
