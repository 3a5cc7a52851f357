"""Train pix2pix (Isola et al. 2017) on the shared loop: the PatchGAN discriminator's phase on
``D(x, y)`` and ``D(x, G(x).detach())``, then the U-Net generator's, ``L_cGAN + lambda * L1``.

Data: ``(condition, target)`` pairs (:class:`~fastgen.data.PairedImageFolder`) or ``(condition, image, label)``
(:class:`~fastgen.data.ConditionedDataset`) are used as they are; ``(image, label)`` or bare images get their
condition made on the fly from the batch by :func:`fastgen.data.condition_fn` ``(options.condition)``.

Randomness: pix2pix's only noise is the generator's dropout (none below 64 px: the U-Net puts it at levels 5 to
num_downs - 1), drawn from torch's global generator, whose state the checkpoints save: a resumed run on one
process is bitwise the uninterrupted one; under DDP each process draws its own masks (not those of one process).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from ..losses import GAN_MODES, pix2pix_discriminator_loss, pix2pix_generator_loss
from ..models.gan import PatchGANDiscriminator, Pix2PixGenerator
from .config import TrainConfig
from .conv_vae import check_images
from .export import write_manifest
from .loop import Phase, Trainer

__all__ = ["Pix2PixOptions", "Pix2PixTrainer", "default_config"]


def default_config(**overrides) -> TrainConfig:
    """pix2pix's optimiser (Isola et al. 2017, section 3.3): Adam, lr 2e-4, beta1 0.5, no clipping; EMA 0.999
    of the generator (the paper has none: ``ema_decay=None`` for the paper's weights)."""
    values = dict(lr=2e-4, beta1=0.5, beta2=0.999, weight_decay=0.0, max_grad_norm=None, ema_decay=0.999)
    values.update(overrides)
    return TrainConfig(**values)


@dataclass
class Pix2PixOptions:
    """Networks and objective. ``num_downs`` None: as many U-Net levels as ``image_size`` allows (at least 5, so
    ``image_size`` >= 32). ``n_layers``: the PatchGAN's stride-2 steps (3: 70x70 patches; images >= 8 * 3 px).
    ``condition``: how to make conditions from (image, label) data (``"edges"``, ``"canny"``, ``"grey"``,
    ``"lowres"``; None: the data must bring its own pairs)."""

    image_size: int = 32
    in_channels: int = 1
    out_channels: int = 1
    ngf: int = 32
    ndf: int = 32
    num_downs: Optional[int] = None
    n_layers: int = 3
    l1_weight: float = 100.0
    gan_mode: str = "vanilla"
    condition: Optional[str] = "edges"
    dropout: bool = True

    def __post_init__(self) -> None:
        if self.gan_mode not in GAN_MODES:
            raise ValueError(f"Pix2PixOptions.gan_mode must be one of {', '.join(GAN_MODES)}; got {self.gan_mode!r}")
        if isinstance(self.l1_weight, bool) or not isinstance(self.l1_weight, (int, float)) or not self.l1_weight >= 0:
            raise ValueError(f"Pix2PixOptions.l1_weight must be a number >= 0, got {self.l1_weight!r}")
        if self.condition is not None:
            from ..data import condition_fn

            condition_fn(self.condition)  # an unknown name fails here, not at the first batch


class Pix2PixTrainer(Trainer):
    """Models ``generator`` (U-Net) and ``discriminator`` (PatchGAN on (condition, image) pairs); phases D then
    G; EMA of the generator only. Without a ``config``, :func:`default_config`."""

    kind = "pix2pix"
    options_class = Pix2PixOptions

    def __init__(self, dataset, options: Optional[Pix2PixOptions] = None, config: Optional[TrainConfig] = None):
        super().__init__(dataset, options, config if config is not None else default_config())
        self._condition_fn = None
        if self.options.condition is not None:
            from ..data import condition_fn

            self._condition_fn = condition_fn(self.options.condition)

    def build_models(self) -> dict[str, torch.nn.Module]:
        o = self.options
        return {
            "generator": Pix2PixGenerator(in_channels=o.in_channels, out_channels=o.out_channels,
                                          image_size=o.image_size, ngf=o.ngf, num_downs=o.num_downs,
                                          use_dropout=o.dropout),
            "discriminator": PatchGANDiscriminator(in_channels=o.in_channels + o.out_channels, ndf=o.ndf,
                                                   n_layers=o.n_layers),
        }

    def ema_models(self) -> list[str]:
        return ["generator"]

    def phases(self) -> list[Phase]:
        return [Phase("discriminator", self.d_loss), Phase("generator", self.g_loss)]

    # ------------------------------------------------------------- data

    def pair(self, batch) -> tuple[Tensor, Tensor]:
        """(condition, target) of a collated batch (see the module's docstring)."""
        if isinstance(batch, Tensor):
            return self._make_condition(batch), batch
        if not (isinstance(batch, (tuple, list)) and batch and all(isinstance(b, Tensor) for b in batch)):
            raise TypeError(f"{type(self).__name__}: the dataset must yield (condition, target) pairs, "
                            f"(condition, image, label) or (image, label); a batch is {type(batch).__name__}")
        if len(batch) >= 3:
            return batch[0], batch[1]
        if len(batch) == 2 and batch[1].dim() == 4 and batch[1].is_floating_point():
            return batch[0], batch[1]
        return self._make_condition(batch[0]), batch[0]

    def _make_condition(self, images: Tensor) -> Tensor:
        if self._condition_fn is None:
            raise ValueError(f"{type(self).__name__}: the data yields images without conditions and "
                             "Pix2PixOptions.condition is None; set condition ('edges', 'canny', 'grey', 'lowres') "
                             "or use a dataset of (condition, target) pairs (PairedImageFolder)")
        with torch.no_grad():
            return self._condition_fn(images)

    def check_batch(self, batch) -> None:
        o, owner = self.options, type(self).__name__
        cond, target = self.pair(batch)
        check_images(owner, target, o.out_channels, o.image_size, "Pix2PixOptions", what="target images")
        if cond.dim() != 4 or cond.shape[1] != o.in_channels or tuple(cond.shape[2:]) != tuple(target.shape[2:]):
            raise ValueError(f"{owner}: the data gives {cond.shape[1]}-channel {cond.shape[2]}x{cond.shape[3]} "
                             f"conditions for {target.shape[2]}x{target.shape[3]} targets, the model expects "
                             f"{o.in_channels}-channel {o.image_size}x{o.image_size} conditions "
                             f"(Pix2PixOptions(in_channels={o.in_channels}))")

    # ------------------------------------------------------------- losses

    def d_loss(self, batch, rng) -> tuple[Tensor, dict]:
        o = self.options
        cond, target = self.pair(batch)
        with torch.no_grad():
            fake = self.models["generator"](cond)
        D = self.net("discriminator")
        # two passes: the PatchGAN's BatchNorm must not mix real and fake statistics
        real_logits = D(cond, target)
        fake_logits = D(cond, fake.detach())
        loss = pix2pix_discriminator_loss(real_logits.float(), fake_logits.float(), o.gan_mode)
        thr = 0.5 if o.gan_mode == "lsgan" else 0.0
        acc = 0.5 * ((real_logits.detach() > thr).float().mean() + (fake_logits.detach() <= thr).float().mean())
        return loss, {"d_loss": loss.detach(), "d_acc": acc}

    def g_loss(self, batch, rng) -> tuple[Tensor, dict]:
        o = self.options
        cond, target = self.pair(batch)
        fake = self.net("generator")(cond)
        # D unwrapped: only G's gradients are averaged in this phase (D's are zeroed before its own phase)
        fake_logits = self.models["discriminator"](cond, fake)
        loss, parts = pix2pix_generator_loss(fake_logits.float(), fake.float(), target.float(), o.l1_weight,
                                             o.gan_mode)
        return loss, {"g_loss": loss.detach(), "g_gan": parts["gan"].detach(), "l1": parts["l1"].detach()}

    # ------------------------------------------------------------- samples, translation, export

    def fixed_pairs(self, n: int = 8) -> tuple[Tensor, Tensor]:
        """(condition, target) of the dataset's first ``n`` items, on the device."""
        batch = self.collate(list(range(min(n, len(self.dataset)))))
        return self.pair(batch)

    def grid_rows(self) -> int:
        return 3

    def sample_grid(self) -> Optional[Tensor]:
        """Condition / output / target triplets of the first 8 items, one triplet per grid row (nrow=3). A
        condition with another channel count than the target is shown repeated or averaged to it."""
        cond, target = self.fixed_pairs(8)
        out = self.models["generator"](cond)
        shown = _match_channels(cond, target.shape[1])
        return torch.stack([shown, out.to(target.dtype), target], dim=1).flatten(0, 1)

    def save_triplets(self, path, n: int = 8) -> Path:
        """Three labelled rows (condition, output, target) of the first ``n`` items, EMA weights, eval mode."""
        from ..images import save_image_rows

        cond, target = self.fixed_pairs(n)
        with torch.no_grad(), self.eval_mode(), self.averaged_weights():
            out = self.models["generator"](cond)
        rows = [_match_channels(cond, target.shape[1]), out.float(), target.float()]
        return save_image_rows([r.float().cpu() for r in rows], path, labels=["input", "output", "target"],
                               scale=max(1, 64 // target.shape[-1]))

    def translate(self, condition_images: Tensor) -> Tensor:
        """G(condition) with the EMA weights in eval mode (running BatchNorm statistics, no dropout)."""
        if isinstance(condition_images, Tensor) and condition_images.dim() == 3:
            return self.translate(condition_images[None])[0]
        with torch.no_grad(), self.eval_mode(), self.averaged_weights():
            return self.models["generator"](condition_images.to(self.device))

    def export(self, folder: Path) -> None:
        folder = Path(folder)
        self.models["generator"].save_pretrained(folder / "generator")
        self.models["discriminator"].save_pretrained(folder / "discriminator")
        write_manifest(folder, self.kind, self.options)


def _match_channels(x: Tensor, channels: int) -> Tensor:
    if x.shape[1] == channels:
        return x
    if x.shape[1] == 1:
        return x.expand(-1, channels, -1, -1)
    return x.mean(dim=1, keepdim=True).expand(-1, channels, -1, -1)
