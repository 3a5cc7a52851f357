"""Train a :class:`~fastgen.models.conv_vae.ConvVAE` (Kingma & Welling 2014) on the shared loop: one phase
minimising the negative ELBO per image, ``recon + beta * KL`` (beta-VAE, Higgins et al. 2017, for beta != 1)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.conv_vae import ConvVAE, kl_divergence
from .export import write_manifest
from .loop import Phase, Trainer

RECON_LOSSES = ("bce", "l2", "l1")

__all__ = ["ConvVAEOptions", "ConvVAETrainer", "RECON_LOSSES", "batch_images", "check_images"]


@dataclass
class ConvVAEOptions:
    """The model and the objective.

    ``recon``: ``"bce"`` (Bernoulli likelihood of the images mapped from [-1, 1] to [0, 1], as for MNIST in the
    paper), ``"l2"`` (Gaussian with unit variance up to constants: 1/2 the squared error) or ``"l1"``
    (Laplace); each summed over the pixels of an image and averaged over the batch, the ELBO's per-image form.
    """

    latent_dim: int = 16
    base_channels: int = 32
    image_size: int = 16
    channels: int = 1
    beta: float = 1.0
    recon: str = "bce"

    def __post_init__(self) -> None:
        if self.recon not in RECON_LOSSES:
            raise ValueError(f"ConvVAEOptions.recon must be one of {', '.join(RECON_LOSSES)}; got {self.recon!r}")
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not self.beta >= 0:
            raise ValueError(f"ConvVAEOptions.beta must be a number >= 0, got {self.beta!r}")


def batch_images(batch) -> Tensor:
    """The images of a collated batch: a tensor, or the first element of (image, label, ...)."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    if isinstance(batch, dict) and isinstance(batch.get("image"), Tensor):
        return batch["image"]
    raise TypeError(f"the dataset must yield images or (image, label) pairs; a batch is {type(batch).__name__}")


def check_images(owner: str, images: Tensor, channels: int, image_size: int, options_name: str,
                 what: str = "images") -> None:
    """A ValueError saying what the data gives and what the model expects, when they differ."""
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise ValueError(f"{owner}: the dataset must yield (C, H, W) {what}; a batch of them has shape "
                         f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}")
    c, h, w = images.shape[1:]
    if c != channels or (h, w) != (image_size, image_size):
        raise ValueError(f"{owner}: the data gives {c}-channel {h}x{w} {what}, the model expects {channels}-channel "
                         f"{image_size}x{image_size} ({options_name}(channels={channels}, image_size={image_size})); "
                         f"build the trainer with {options_name}(channels={c}, image_size={h}) or load the data "
                         f"with channels={channels}, size={image_size}")
    if not images.is_floating_point():
        raise ValueError(f"{owner}: the {what} must be float tensors in [-1, 1], got dtype {images.dtype}")


class ConvVAETrainer(Trainer):
    """The negative ELBO on (image, label) or image datasets (labels are not used)."""

    kind = "conv_vae"
    options_class = ConvVAEOptions

    def build_models(self) -> dict[str, torch.nn.Module]:
        o = self.options
        return {"vae": ConvVAE(in_channels=o.channels, image_size=o.image_size, latent_dim=o.latent_dim,
                               base_channels=o.base_channels)}

    def phases(self) -> list[Phase]:
        return [Phase("vae", self.vae_loss)]

    def check_batch(self, batch) -> None:
        o = self.options
        check_images(type(self).__name__, batch_images(batch), o.channels, o.image_size, "ConvVAEOptions")

    def vae_loss(self, batch, rng) -> tuple[Tensor, dict]:
        o = self.options
        x = batch_images(batch)
        noise = rng.randn(o.latent_dim)
        # one forward of the (DDP-wrapped) module: encode, reparameterise, decode to pre-tanh logits
        logits, mu, logvar = self.net("vae")(x, noise, return_logits=True)
        recon = reconstruction_loss(logits, x, o.recon)
        kl = kl_divergence(mu, logvar).mean()
        loss = recon + o.beta * kl
        return loss, {"loss": loss.detach(), "recon": recon.detach(), "kl": kl.detach()}

    # ------------------------------------------------------------- samples and export

    def fixed_latents(self, n: int = 64) -> Tensor:
        g = torch.Generator().manual_seed(self.config.seed)
        return torch.randn(n, self.options.latent_dim, generator=g).to(self.device)

    def sample_grid(self) -> Optional[Tensor]:
        return self.models["vae"].decode(self.fixed_latents(64))

    def latent_map_png(self, path, n: int = 20) -> Optional[Path]:
        """For latent_dim == 2: the decoded grid of z over the prior's central quantiles (``latent_map``), from
        the EMA weights; None for other latent sizes."""
        if self.options.latent_dim != 2:
            return None
        from .. import latent as latent_mod
        from ..images import save_image_grid

        if not hasattr(latent_mod, "latent_map"):
            return None
        model = self.models["vae"]
        with torch.no_grad(), self.eval_mode(), self.averaged_weights():
            images = latent_mod.latent_map(model.decode, n=n, device=self.device)
        return save_image_grid(images.float().cpu(), path, nrow=n, padding=0,
                               scale=max(1, 32 // self.options.image_size))

    def generate(self, n: int, seed: int = 0) -> Tensor:
        """``n`` images decoded from prior draws z ~ N(0, I) of ``torch.Generator(seed)``, EMA weights."""
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(n, self.options.latent_dim, generator=g).to(self.device)
        with torch.no_grad(), self.eval_mode(), self.averaged_weights():
            return self.models["vae"].decode(z)

    def reconstruct(self, images: Tensor) -> Tensor:
        """Decode the posterior means of ``images`` with the EMA weights (no sampling)."""
        with torch.no_grad(), self.eval_mode(), self.averaged_weights():
            return self.models["vae"](images.to(self.device))[0]

    def save_samples(self) -> Optional[Path]:
        path = super().save_samples()
        if path is not None and self.options.latent_dim == 2:
            self.latent_map_png(self.out_path("samples", f"latent-map-step-{self.step:08d}.png"))
        return path

    def export(self, folder: Path) -> None:
        folder = Path(folder)
        self.models["vae"].save_pretrained(folder / "vae")
        write_manifest(folder, self.kind, self.options)


def reconstruction_loss(logits: Tensor, x: Tensor, kind: str) -> Tensor:
    """-log p(x|z) up to constants, summed per image and averaged over the batch (fp32). ``logits`` are the
    decoder's pre-tanh outputs h (images = tanh(h))."""
    logits, x = logits.float(), x.float()
    n = x.shape[0]
    if kind == "bce":
        # tanh(h) = 2 sigmoid(2h) - 1: 2h are the Bernoulli logits of the [0, 1] image
        per = F.binary_cross_entropy_with_logits(2.0 * logits, (x + 1.0) * 0.5, reduction="none")
    elif kind == "l2":
        per = 0.5 * (torch.tanh(logits) - x).square()
    elif kind == "l1":
        per = (torch.tanh(logits) - x).abs()
    else:
        raise ValueError(f"recon must be one of {', '.join(RECON_LOSSES)}; got {kind!r}")
    return per.reshape(n, -1).sum(dim=1).mean()
