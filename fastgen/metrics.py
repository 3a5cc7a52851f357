"""Sample-quality metrics for small image models: a digits classifier, FID, and one-call evaluation.

InceptionV3 FID means little on 16-px digits (and needs downloaded weights), so the default FID
feature network is a small CNN trained on sklearn's 8x8 digits, upscaled. Its scores compare runs of
this library with each other; they are not comparable with published FIDs.

Images everywhere are (N, C, H, W) float tensors in [-1, 1].
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DigitsClassifier", "classifier_accuracy", "digits_classifier", "evaluate_samples", "fid",
    "load_classifier", "per_class_accuracy", "save_classifier", "train_digits_classifier",
]

# Bump when the architecture, the training recipe or the data change: cached weights are keyed on it.
CLASSIFIER_VERSION = "v1"
_META_KEY = "fastgen.digits_classifier"


# ------------------------------------------------------------------ checks


def _check_images(x, name: str = "images", channels: tuple[int, ...] = (1, 3)) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (N, C, H, W) in [-1, 1], got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have rank 4 (N, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a float tensor in [-1, 1], got dtype {x.dtype}")
    if x.shape[1] not in channels:
        raise ValueError(f"{name} must have {' or '.join(map(str, channels))} channels, got shape {tuple(x.shape)}")
    return x


def _check_labels(y, n: int, num_classes: int, name: str = "labels") -> torch.Tensor:
    y = torch.as_tensor(y)
    if y.dim() != 1 or y.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},), got {tuple(y.shape)}")
    if y.is_floating_point() or y.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {y.dtype}")
    if n and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"{name} must be in [0, {num_classes}), got range [{int(y.min())}, {int(y.max())}]")
    return y.long()


# ------------------------------------------------------------------ data


def _digits(size: int = 16, split: str = "train", channels: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Digits images (N, channels, size, size) in [-1, 1] and labels (N,), from fastgen.data if present."""
    try:
        from fastgen.data import load_digits
    except ImportError:
        load_digits = None
    if load_digits is not None:
        ds = load_digits(size=size, split=split, channels=channels)
        return ds.images, ds.labels
    # Same recipe as fastgen.data.load_digits, for checkouts that predate it.
    try:
        from sklearn.datasets import load_digits as sk_load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:
        raise ImportError("The digits data needs scikit-learn: pip install scikit-learn") from e
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    d = sk_load_digits()
    x = torch.from_numpy(d.images).float().unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    x = x.clamp(0, 1) * 2 - 1
    y = torch.from_numpy(d.target).long()
    train_idx, test_idx = train_test_split(torch.arange(len(y)).numpy(), test_size=300, stratify=d.target,
                                           random_state=0)
    idx = torch.from_numpy(train_idx if split == "train" else test_idx)
    return x[idx].repeat(1, channels, 1, 1).contiguous(), y[idx]


# ------------------------------------------------------------------ classifier


class DigitsClassifier(nn.Module):
    """Small CNN: conv 32 -> pool -> conv 64 -> pool -> feature layer (``feature_dim``) -> logits.

    Inputs of another spatial size are resized to ``image_size`` first, so one classifier reads 16-
    and 32-px samples alike.
    """

    def __init__(self, in_channels: int = 1, image_size: int = 16, feature_dim: int = 64, num_classes: int = 10):
        super().__init__()
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {image_size}")
        self.config = dict(in_channels=int(in_channels), image_size=int(image_size),
                           feature_dim=int(feature_dim), num_classes=int(num_classes))
        self.in_channels, self.image_size = int(in_channels), int(image_size)
        self.feature_dim, self.num_classes = int(feature_dim), int(num_classes)
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4),  # 16 px -> already 4x4; larger image_size pools down to the same head
            nn.Flatten(),
        )
        self.feature = nn.Sequential(nn.Linear(64 * 16, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        _check_images(x, "x", channels=(self.in_channels,) if self.in_channels != 1 else (1, 3))
        if x.shape[1] == 3 and self.in_channels == 1:
            x = x.mean(dim=1, keepdim=True)  # RGB samples of a grayscale dataset: read the luminance
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              antialias=True, align_corners=False)
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate (N, feature_dim) activations: the FID feature space."""
        param = next(self.parameters())
        return self.feature(self.body(self._prepare(x).to(param.device, param.dtype)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class _FIDFeatures(nn.Module):
    """Adapter for torchmetrics' FID: with ``normalize=True`` a custom module receives the float images
    as passed, which ``fid`` makes [0, 1]; map back to the classifier's [-1, 1] and return features."""

    def __init__(self, classifier: DigitsClassifier):
        super().__init__()
        self.classifier = classifier.eval()
        self.num_features = classifier.feature_dim

    def train(self, mode: bool = True) -> _FIDFeatures:
        return super().train(False)  # a feature network must never switch to training behaviour

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(x.float() * 2 - 1).float()


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    # Up to ~1.5 px shifts and +-8% zoom at 16 px: generated digits are rarely perfectly centred.
    n = x.shape[0]
    shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * (3.0 / x.shape[-1])
    zoom = 1 + (torch.rand(n, generator=gen) * 2 - 1) * 0.08
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = zoom
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    # Shift into [0, 2] so zero padding is background (-1), then back.
    return F.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1


@contextlib.contextmanager
def _cpu_threads(n: int | None):
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def train_digits_classifier(images: torch.Tensor, labels: torch.Tensor, *, steps: int = 400,
                            batch_size: int = 32, seed: int = 0, lr: float = 3e-3, weight_decay: float = 1e-4,
                            augment: bool = True, feature_dim: int = 64, num_threads: int | None = 1,
                            progress: bool = True) -> DigitsClassifier:
    """Train a ``DigitsClassifier`` with AdamW + one-cycle LR; deterministic for a given ``seed`` (on CPU).

    ``images`` (N, C, S, S) in [-1, 1] fixes ``in_channels`` and ``image_size`` of the network.
    ``num_threads`` caps CPU intra-op threads while training (None = leave as is): the net is too
    small to gain from more, and on a busy 2-core machine spinning threads made training ~7x slower.
    """
    with _cpu_threads(num_threads if images.device.type == "cpu" else None):
        return _train(images, labels, steps=steps, batch_size=batch_size, seed=seed, lr=lr,
                      weight_decay=weight_decay, augment=augment, feature_dim=feature_dim, progress=progress)


def _train(images, labels, *, steps, batch_size, seed, lr, weight_decay, augment, feature_dim, progress):
    images = _check_images(images)
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"images must be square, got shape {tuple(images.shape)}")
    labels = _check_labels(labels, images.shape[0], 10)
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got steps={steps}, batch_size={batch_size}")
    device = images.device
    with torch.random.fork_rng(devices=[]):  # seed the init without disturbing the caller's RNG
        torch.manual_seed(seed)
        clf = DigitsClassifier(images.shape[1], images.shape[-1], feature_dim=feature_dim).to(device)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    x_all, y_all = images.float(), labels.to(device)
    n = x_all.shape[0]
    order, pos = torch.randperm(n, generator=gen), 0
    clf.train()
    for step in range(steps):
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos:pos + batch_size].to(device)
        pos += batch_size
        x = x_all[idx]
        if augment:
            x = _augment(x, gen)
        loss = F.cross_entropy(clf(x), y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress and (step + 1) % max(1, steps // 5) == 0:
            print(f"digits classifier: step {step + 1}/{steps} loss {loss.item():.4f}", flush=True)
    return clf.eval()


# ------------------------------------------------------------------ persistence


def save_classifier(clf: DigitsClassifier, path) -> Path:
    """Write weights as safetensors with the constructor config in its metadata (atomic replace)."""
    if not isinstance(clf, DigitsClassifier):
        raise TypeError(f"clf must be a DigitsClassifier, got {type(clf).__name__}")
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in clf.state_dict().items()}
    meta = {_META_KEY: json.dumps({**clf.config, "version": CLASSIFIER_VERSION}), "format": "pt"}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(state, tmp, metadata=meta)
        os.replace(tmp, path)  # a concurrent reader sees the old file or the new one, never half
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_classifier(path, device=None) -> DigitsClassifier:
    """Read a file written by ``save_classifier``; no pickle is involved."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"classifier weights not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if _META_KEY not in meta:
            raise ValueError(f"{path} has no '{_META_KEY}' metadata; was it written by save_classifier?")
        state = {k: f.get_tensor(k) for k in f.keys()}
    cfg = json.loads(meta[_META_KEY])
    cfg.pop("version", None)
    clf = DigitsClassifier(**cfg)
    clf.load_state_dict(state)
    return clf.to(device or "cpu").eval()


def _cache_root(cache_dir) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    root = os.environ.get("FASTGEN_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = os.path.join(xdg, "fastgen") if xdg else os.path.join(os.path.expanduser("~"), ".cache", "fastgen")
    return Path(root)


_MEMO: dict[str, DigitsClassifier] = {}


def digits_classifier(size: int = 16, cache_dir=None, *, progress: bool = False) -> DigitsClassifier:
    """The reference digits classifier at ``size`` px: loaded from the cache, else trained (~10-20 s on
    2 CPU cores at 16 px) on the digits train split and cached under ``cache_dir`` /
    ``$FASTGEN_CACHE_DIR`` / ``~/.cache/fastgen``."""
    path = _cache_root(cache_dir) / f"digits_classifier_{int(size)}px_{CLASSIFIER_VERSION}.safetensors"
    key = str(path.resolve())
    if key in _MEMO:
        return _MEMO[key]
    clf = None
    if path.is_file():
        try:
            clf = load_classifier(path)
        except Exception as e:  # a stale or corrupt cache entry is rebuilt, not fatal
            warnings.warn(f"ignoring unreadable cached classifier {path}: {e}", stacklevel=2)
    if clf is None:
        x, y = _digits(size=size, split="train", channels=1)
        clf = train_digits_classifier(x, y, progress=progress)
        try:
            save_classifier(clf, path)
        except OSError as e:  # a read-only cache still gives a working classifier
            warnings.warn(f"could not cache the digits classifier at {path}: {e}", stacklevel=2)
    _MEMO[key] = clf
    return clf


# ------------------------------------------------------------------ accuracy


@torch.no_grad()
def _predict(classifier: nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    was_training = classifier.training
    classifier.eval()
    try:
        device = next(classifier.parameters()).device
        preds = [classifier(images[i:i + batch_size].to(device)).argmax(dim=1).cpu()
                 for i in range(0, images.shape[0], batch_size)]
    finally:
        classifier.train(was_training)
    return torch.cat(preds)


def classifier_accuracy(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of ``images`` the classifier labels as ``labels``."""
    images = _check_images(images)
    if images.shape[0] == 0:
        raise ValueError("images is empty (N=0)")
    labels = _check_labels(labels, images.shape[0], getattr(classifier, "num_classes", 10))
    return (_predict(classifier, images) == labels).float().mean().item()


def per_class_accuracy(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                       num_classes: int | None = None) -> list[float]:
    """Accuracy per true class, ``num_classes`` entries; NaN for a class with no image."""
    images = _check_images(images)
    num_classes = num_classes or getattr(classifier, "num_classes", 10)
    labels = _check_labels(labels, images.shape[0], num_classes)
    hit = (_predict(classifier, images) == labels).float()
    total = torch.bincount(labels, minlength=num_classes).float()
    correct = torch.bincount(labels, weights=hit, minlength=num_classes)
    return (correct / total).tolist()  # 0/0 -> nan, on purpose


# ------------------------------------------------------------------ FID


def _fid_metric(feature):
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError as e:
        raise ImportError("FID needs torchmetrics: pip install torchmetrics") from e
    if isinstance(feature, bool) or isinstance(feature, int):
        raise ValueError(f"feature={feature} would download InceptionV3 weights, which fastgen never does; "
                         "pass feature='/path/to/pt_inception-2015-12-05.pth' (a local file) or 'digits'")
    if isinstance(feature, (str, os.PathLike)) and str(feature) != "digits":
        path = Path(feature)
        if not path.is_file():
            raise FileNotFoundError(f"InceptionV3 weights file not found: {path}")
        try:
            import torch_fidelity  # noqa: F401
        except ImportError as e:
            raise ImportError("FID with InceptionV3 weights needs torch-fidelity: pip install torch-fidelity") from e
        return FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(path), normalize=True), 3
    if isinstance(feature, DigitsClassifier):
        feature = _FIDFeatures(feature)
    if not isinstance(feature, nn.Module):
        raise TypeError(f"feature must be 'digits', an nn.Module or a path to InceptionV3 weights, got {feature!r}")
    return FrechetInceptionDistance(feature=feature, normalize=True), None


def fid(real: torch.Tensor, fake: torch.Tensor, *, feature="digits", batch_size: int = 256) -> float:
    """Fréchet distance between feature statistics of ``real`` and ``fake`` (N, C, H, W) in [-1, 1].

    ``feature``: "digits" (the cached ``digits_classifier`` at the fake's size if 16 or 32, else 16), a
    ``DigitsClassifier``, any nn.Module taking [0, 1] float images to (B, F) features, or the path of a
    local InceptionV3 weights file (images become 3-channel and torchmetrics resizes them to 299).
    """
    real, fake = _check_images(real, "real"), _check_images(fake, "fake")
    if real.shape[0] < 2 or fake.shape[0] < 2:
        raise ValueError(f"FID needs at least 2 images in each set, got {real.shape[0]} real, {fake.shape[0]} fake")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real and fake must have the same channel count, got {real.shape[1]} and {fake.shape[1]}")
    if isinstance(feature, str) and feature == "digits":
        s = fake.shape[-1]
        feature = digits_classifier(size=s if s == fake.shape[-2] and s in (16, 32) else 16)
    metric, want_channels = _fid_metric(feature)
    try:
        device = next(metric.inception.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    metric = metric.to(device)
    with torch.no_grad():
        for x, is_real in ((real, True), (fake, False)):
            for i in range(0, x.shape[0], batch_size):
                xb = ((x[i:i + batch_size].to(device, torch.float32) + 1) / 2).clamp_(0, 1)
                if want_channels == 3 and xb.shape[1] == 1:
                    xb = xb.expand(-1, 3, -1, -1)
                metric.update(xb, real=is_real)
    return float(metric.compute())


# ------------------------------------------------------------------ one call


def evaluate_samples(fake: torch.Tensor, fake_labels: torch.Tensor | None = None, *, real: torch.Tensor | None = None,
                     classifier: DigitsClassifier | None = None, size: int = 16) -> dict:
    """FID (in the classifier's feature space) and, with ``fake_labels``, class-conditional accuracy.

    ``real`` defaults to the 300 held-out digits at the samples' size and channels; ``classifier`` to
    ``digits_classifier(size)``. Returns {"fid", "accuracy", "per_class_accuracy", "n_fake", "n_real"};
    the accuracies are None without ``fake_labels``.
    """
    fake = _check_images(fake, "fake")
    if fake.shape[-1] != fake.shape[-2]:
        raise ValueError(f"fake must be square images, got shape {tuple(fake.shape)}")
    if classifier is None:
        classifier = digits_classifier(size)
    if real is None:
        real, _ = _digits(size=fake.shape[-1], split="test", channels=fake.shape[1])
    out = {"fid": fid(real, fake, feature=classifier), "accuracy": None, "per_class_accuracy": None,
           "n_fake": int(fake.shape[0]), "n_real": int(real.shape[0])}
    if fake_labels is not None:
        out["accuracy"] = classifier_accuracy(classifier, fake, fake_labels)
        out["per_class_accuracy"] = per_class_accuracy(classifier, fake, fake_labels)
    return out
