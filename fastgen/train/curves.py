"""Training curves as a PNG (matplotlib, an optional extra: without it no picture, and a warning)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Optional


def plot_curves(history, path, *, title: str = "training", skip=("step", "lr", "time_s")) -> Optional[Path]:
    """One panel per logged value (losses, grad norms) against the step, written atomically. ``history`` is one
    trainer's list of records, or a dict of them (``{"vae": [...], "diffusion": [...]}``: panels prefixed)."""
    runs = history if isinstance(history, dict) else {"": history}
    series: dict[str, list] = {}
    for prefix, records in runs.items():
        for r in records:
            for k, v in r.items():
                if k not in skip:
                    series.setdefault(f"{prefix} {k}" if prefix else k, []).append((r["step"], v))
    return _plot(series, path, title)


def _plot(series: dict, path, title: str) -> Optional[Path]:
    if not series:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed (pip install matplotlib): no training-curve PNG", stacklevel=2)
        return None
    keys = [k for k in series if "grad_norm" not in k] or list(series)
    cols = min(3, len(keys))
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        steps, values = zip(*series[key])
        ax.plot(steps, values, lw=1.2)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
        if "loss" in key and all(v > 0 for v in values):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path
