"""Train a DCGAN (Radford et al. 2015), optionally class-conditional, on the shared loop: per step the
discriminator phase, then the generator phase.

Losses (:mod:`fastgen.losses`): ``"nonsaturating"`` (Goodfellow et al. 2014, DCGAN's), ``"hinge"`` (Lim & Ye
2017), ``"lsgan"`` (Mao et al. 2017) and ``"wgan-gp"`` (Gulrajani et al. 2017; its penalty is computed here, its
eps drawn from the step's random stream). ``r1_gamma > 0`` adds R1 on the real images (Mescheder et al. 2018).

Every random number (latents, WGAN-GP's eps) comes from the loop's per-sample stream (``rng``), so DDP equals one
process and a resumed run is bitwise the uninterrupted one.

fastgen's :class:`~fastgen.models.gan.DCGANDiscriminator` has BatchNorm (as in the paper), so D sees the real and
the fake batch in two separate forward passes (one concatenated batch would mix their statistics).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from .. import losses as L
from ..models.gan import DCGANDiscriminator, DCGANGenerator
from .config import TrainConfig
from .conv_vae import check_images
from .export import write_manifest
from .loop import Phase, Trainer

GAN_LOSSES = ("nonsaturating", "hinge", "lsgan", "wgan-gp")
_D_LOSS = {"nonsaturating": L.d_loss_nonsaturating, "hinge": L.d_loss_hinge, "lsgan": L.d_loss_lsgan,
           "wgan-gp": L.d_loss_wgan}
_G_LOSS = {"nonsaturating": L.g_loss_nonsaturating, "hinge": L.g_loss_hinge, "lsgan": L.g_loss_lsgan,
           "wgan-gp": L.g_loss_wgan}

__all__ = ["DCGANTrainer", "GANOptions", "GAN_LOSSES", "default_config", "generate"]


def default_config(**overrides) -> TrainConfig:
    """DCGAN's optimiser (Radford et al. 2015, section 4): Adam, lr 2e-4, beta1 0.5 (beta2 0.999), no weight
    decay and no gradient clipping; EMA of the generator 0.999. ``overrides`` are any TrainConfig fields."""
    values = dict(lr=2e-4, beta1=0.5, beta2=0.999, weight_decay=0.0, max_grad_norm=None, ema_decay=0.999)
    values.update(overrides)
    return TrainConfig(**values)


@dataclass
class GANOptions:
    """The networks and the objective (small defaults, for the 16 px digits).

    ``num_classes``: class-conditional (the data's labels feed G's embedding and D's projection or concat map,
    ``condition_type``). ``d_steps``: discriminator updates per generator update, all on the step's batch of real
    images with fresh latents (WGAN-GP's n_critic is 5). ``gp_weight``: WGAN-GP's lambda (only for "wgan-gp";
    note that the paper's critic has no BatchNorm, fastgen's DCGAN discriminator has).
    """

    image_size: int = 16
    channels: int = 1
    latent_dim: int = 64
    ngf: int = 32
    ndf: int = 32
    num_classes: Optional[int] = None
    condition_type: str = "projection"
    loss: str = "nonsaturating"
    r1_gamma: float = 0.0
    gp_weight: float = 10.0
    d_steps: int = 1
    spectral_norm: bool = False

    def __post_init__(self) -> None:
        if self.loss not in GAN_LOSSES:
            raise ValueError(f"GANOptions.loss must be one of {', '.join(GAN_LOSSES)}; got {self.loss!r}")
        for name in ("r1_gamma", "gp_weight"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ValueError(f"GANOptions.{name} must be a number >= 0, got {v!r}")
        if isinstance(self.d_steps, bool) or not isinstance(self.d_steps, int) or self.d_steps < 1:
            raise ValueError(f"GANOptions.d_steps must be a positive int, got {self.d_steps!r}")
        if self.num_classes is not None and (isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int)
                                             or self.num_classes < 1):
            raise ValueError(f"GANOptions.num_classes must be a positive int or None, got {self.num_classes!r}")


def _split_batch(batch) -> tuple[Tensor, Optional[Tensor]]:
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        labels = batch[1] if len(batch) > 1 and isinstance(batch[1], Tensor) else None
        return batch[0], labels
    raise TypeError(f"the dataset must yield images or (image, label) pairs; a batch is {type(batch).__name__}")


def _labels_tensor(labels, n: int, num_classes: Optional[int], device) -> Optional[Tensor]:
    if num_classes is None:
        if labels is not None:
            raise ValueError("class_labels were given but the generator is unconditional (num_classes=None)")
        return None
    if labels is None:
        return (torch.arange(n) % num_classes).to(device)
    t = torch.as_tensor(labels, dtype=torch.long)
    if t.dim() == 0:
        t = t.expand(n)
    if t.shape != (n,):
        raise ValueError(f"class_labels must be one int or {n} ints, got shape {tuple(t.shape)}")
    if int(t.min()) < 0 or int(t.max()) >= num_classes:
        raise ValueError(f"class_labels must lie in [0, {num_classes}), got [{int(t.min())}, {int(t.max())}]")
    return t.to(device)


@torch.no_grad()
def generate(generator: DCGANGenerator, n: int, class_labels=None, seed: int = 0) -> Tensor:
    """``n`` images (N, C, H, W) in [-1, 1] from a (loaded) generator in its current mode: z ~ N(0, I) drawn on
    the CPU from ``torch.Generator(seed)`` (the same images on every device); ``class_labels`` one int, n ints,
    or None (a conditional generator then cycles 0, 1, ..., num_classes - 1)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    device = next(generator.parameters()).device
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, generator.latent_dim, generator=g).to(device)
    labels = _labels_tensor(class_labels, n, generator.num_classes, device)
    return generator(z, labels)


class DCGANTrainer(Trainer):
    """Models ``generator`` and ``discriminator``; phases D (``d_steps`` times) then G; EMA of G only.

    Without a ``config``, :func:`default_config` (DCGAN's Adam settings) is used.
    """

    kind = "dcgan"
    options_class = GANOptions

    def __init__(self, dataset, options: Optional[GANOptions] = None, config: Optional[TrainConfig] = None):
        super().__init__(dataset, options, config if config is not None else default_config())

    def build_models(self) -> dict[str, torch.nn.Module]:
        o = self.options
        return {
            "generator": DCGANGenerator(image_size=o.image_size, out_channels=o.channels, latent_dim=o.latent_dim,
                                        ngf=o.ngf, num_classes=o.num_classes),
            "discriminator": DCGANDiscriminator(image_size=o.image_size, in_channels=o.channels, ndf=o.ndf,
                                                num_classes=o.num_classes, condition_type=o.condition_type,
                                                spectral_norm=o.spectral_norm),
        }

    def ema_models(self) -> list[str]:
        return ["generator"]

    def phases(self) -> list[Phase]:
        d = [Phase("discriminator", self._d_loss_logged(k == self.options.d_steps - 1))
             for k in range(self.options.d_steps)]
        return d + [Phase("generator", self.g_loss)]

    # ------------------------------------------------------------- data

    def _labels(self, labels: Optional[Tensor]) -> Optional[Tensor]:
        return labels.long() if self.options.num_classes is not None else None

    def check_batch(self, batch) -> None:
        o = self.options
        images, labels = _split_batch(batch)
        check_images(type(self).__name__, images, o.channels, o.image_size, "GANOptions")
        if o.num_classes is not None:
            if labels is None or labels.dim() != 1 or labels.is_floating_point():
                raise ValueError(f"{type(self).__name__}: num_classes={o.num_classes} needs a dataset of (image, "
                                 f"int label) pairs; the batch's labels are "
                                 f"{None if labels is None else (labels.dtype, tuple(labels.shape))}")
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= o.num_classes:
                raise ValueError(f"{type(self).__name__}: the data's labels reach [{lo}, {hi}], the model has "
                                 f"num_classes={o.num_classes} (labels 0 to {o.num_classes - 1})")

    # ------------------------------------------------------------- losses

    def _d_loss_logged(self, log: bool):
        def loss(batch, rng):
            total, logs = self.d_loss(batch, rng)
            return total, (logs if log else {})
        return loss

    def d_loss(self, batch, rng) -> tuple[Tensor, dict]:
        o = self.options
        real, labels = _split_batch(batch)
        labels = self._labels(labels)
        z = rng.randn(o.latent_dim)
        with torch.no_grad():
            fake = self.models["generator"](z, labels)
        D = self.net("discriminator")
        if o.r1_gamma > 0:
            real = real.detach().requires_grad_(True)
        # two passes: the discriminator's BatchNorm must not mix real and fake statistics
        real_logits = D(real, labels)
        fake_logits = D(fake.detach(), labels)
        d_loss = _D_LOSS[o.loss](real_logits.float(), fake_logits.float())
        total = d_loss
        logs = {"d_loss": d_loss.detach(), "d_real": real_logits.detach().float().mean(),
                "d_fake": fake_logits.detach().float().mean(),
                "d_acc": 0.5 * ((real_logits.detach() > self._threshold()).float().mean()
                                + (fake_logits.detach() <= self._threshold()).float().mean())}
        if o.r1_gamma > 0:
            r1 = L.r1_penalty(real_logits.float(), real, gamma=o.r1_gamma)
            total = total + r1
            logs["r1"] = r1.detach()
        if o.loss == "wgan-gp" and o.gp_weight > 0:
            eps = rng.rand(1, 1, 1).to(real.dtype)
            x_hat = torch.lerp(fake.detach().to(real.dtype), real.detach(), eps).requires_grad_(True)
            out = D(x_hat, labels)
            (grad,) = torch.autograd.grad(out.float().sum(), [x_hat], create_graph=True)
            norm = torch.linalg.vector_norm(grad.float().reshape(grad.shape[0], -1), dim=1)
            gp = o.gp_weight * (norm - 1).square().mean()
            total = total + gp
            logs["gp"] = gp.detach()
        return total, logs

    def _threshold(self) -> float:
        return 0.5 if self.options.loss == "lsgan" else 0.0

    def g_loss(self, batch, rng) -> tuple[Tensor, dict]:
        o = self.options
        real, labels = _split_batch(batch)
        labels = self._labels(labels)
        z = rng.randn(o.latent_dim)
        fake = self.net("generator")(z, labels)
        # D unwrapped: only G's gradients are averaged in this phase (D's are zeroed before its own phase)
        fake_logits = self.models["discriminator"](fake, labels)
        g_loss = _G_LOSS[o.loss](fake_logits.float())
        return g_loss, {"g_loss": g_loss.detach()}

    # ------------------------------------------------------------- samples, generation, export

    def grid_rows(self) -> int:
        return 10 if self.options.num_classes is not None else 8

    def sample_inputs(self) -> tuple[Tensor, Optional[Tensor]]:
        """The grid's fixed latents (``torch.Generator(config.seed)``) and labels: conditional, one row per class
        (at most 10) and one latent per column shared down the rows; else 64 latents."""
        o = self.options
        g = torch.Generator().manual_seed(self.config.seed)
        if o.num_classes is None:
            return torch.randn(64, o.latent_dim, generator=g).to(self.device), None
        rows = min(o.num_classes, 10)
        z = torch.randn(10, o.latent_dim, generator=g).repeat(rows, 1)
        labels = torch.arange(rows).repeat_interleave(10)
        return z.to(self.device), labels.to(self.device)

    def sample_grid(self) -> Optional[Tensor]:
        z, labels = self.sample_inputs()
        return self.models["generator"](z, labels)

    def generate(self, n: int, class_labels=None, seed: int = 0) -> Tensor:
        """``n`` images from the EMA generator in eval mode (see :func:`generate`)."""
        with torch.no_grad(), self.eval_mode(), self.averaged_weights():
            return generate(self.models["generator"], n, class_labels, seed)

    def export(self, folder: Path) -> None:
        folder = Path(folder)
        self.models["generator"].save_pretrained(folder / "generator")
        self.models["discriminator"].save_pretrained(folder / "discriminator")
        write_manifest(folder, self.kind, self.options)
