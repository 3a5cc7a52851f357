"""``AutoencoderKL`` training (the VAE of latent diffusion, Rombach et al. 2022): reconstruction (L1 or L2)
+ ``kl_weight`` x KL to N(0, I), optionally + a PatchGAN term on the reconstructions (the paper's adversarial
loss, hinge, switched on after ``gan_start`` steps). Exports the VAE with ``scaling_factor`` = 1 / std of the
training latents, the number latent diffusion multiplies latents by (SD's 0.18215 was measured the same way)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import losses
from ..models import AutoencoderKL, PatchGANDiscriminator
from .export import write_manifest
from .loop import Phase, Trainer


@dataclass
class VAEOptions:
    image_size: int = 16
    channels: int = 1
    block_out_channels: tuple = (16, 32, 32)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 8
    mid_block_attention: bool = False
    recon: str = "l1"
    kl_weight: float = 1e-3
    gan_weight: float = 0.0
    gan_start: int = 0
    disc_channels: int = 32

    def __post_init__(self):
        if self.recon not in ("l1", "l2"):
            raise ValueError(f"VAEOptions.recon must be 'l1' or 'l2', got {self.recon!r}")
        self.block_out_channels = tuple(self.block_out_channels)
        if self.image_size % 2 ** (len(self.block_out_channels) - 1):
            raise ValueError(f"VAEOptions: image_size {self.image_size} must be divisible by "
                             f"2^{len(self.block_out_channels) - 1} (one halving per extra level)")


def build_vae(o: VAEOptions, scaling_factor: float = 1.0) -> AutoencoderKL:
    n = len(o.block_out_channels)
    return AutoencoderKL(in_channels=o.channels, out_channels=o.channels, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=o.block_out_channels,
                         layers_per_block=o.layers_per_block, latent_channels=o.latent_channels,
                         norm_num_groups=o.norm_num_groups, sample_size=o.image_size,
                         mid_block_add_attention=o.mid_block_attention, scaling_factor=scaling_factor)


def check_images(owner: str, images: Tensor, channels: int, size: int) -> None:
    if images.dim() != 4:
        raise ValueError(f"{owner}: the data must give (C, H, W) images, got a batch of shape {tuple(images.shape)}")
    if images.shape[1] != channels:
        raise ValueError(f"{owner}: the data gives {images.shape[1]}-channel images, the model expects {channels} "
                         f"(set channels={images.shape[1]}, or load the data with channels={channels})")
    if tuple(images.shape[2:]) != (size, size):
        raise ValueError(f"{owner}: the data gives {images.shape[2]}x{images.shape[3]} images, the model expects "
                         f"{size}x{size} (resize the data with size={size}, or set image_size)")


def images_of(batch) -> Tensor:
    return batch[0] if isinstance(batch, (list, tuple)) else batch


class _Reconstruct(torch.nn.Module):
    """Encode, reparameterise with the given noise, decode: the VAE's training forward as one call (DDP)."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, x: Tensor, noise: Tensor):
        h = self.vae.encode(x).latent_dist
        rec = self.vae.decode(h.mean + h.std * noise).sample
        return rec, h.mean, h.logvar


class VAETrainer(Trainer):
    kind = "vae"
    options_class = VAEOptions


    def build_models(self):
        models = {"vae": build_vae(self.options)}
        if self.options.gan_weight > 0:
            models["discriminator"] = PatchGANDiscriminator(in_channels=self.options.channels,
                                                            ndf=self.options.disc_channels, n_layers=2)
        return models

    def ema_models(self):
        return ["vae"]

    def check_batch(self, batch) -> None:
        check_images("VAETrainer", images_of(batch), self.options.channels, self.options.image_size)

    def ddp_target(self, name):
        return _Reconstruct(self.models["vae"]) if name == "vae" else self.models[name]

    def latent_shape(self) -> tuple:
        o = self.options
        side = o.image_size // 2 ** (len(o.block_out_channels) - 1)
        return (o.latent_channels, side, side)

    def vae_loss(self, batch, rng):
        o = self.options
        x = images_of(batch)
        net = self.net("vae")  # DDP(_Reconstruct) under torchrun, else the AutoencoderKL
        if isinstance(net, AutoencoderKL):
            net = _Reconstruct(net)
        rec, mean, logvar = net(x, rng.randn(*self.latent_shape(), dtype=x.dtype))
        recon = F.l1_loss(rec, x) if o.recon == "l1" else F.mse_loss(rec, x)
        # KL(q(z|x) || N(0, I)) per image, per input value: kl_weight means the same at any resolution
        kl = (0.5 * (mean.float().pow(2) + logvar.float().exp() - 1.0 - logvar.float())).flatten(1).sum(1).mean()
        kl = kl / x[0].numel()
        loss = recon + o.kl_weight * kl
        logs = {"loss": loss.detach(), "recon": recon.detach(), "kl": kl.detach()}
        if o.gan_weight > 0 and self.step >= o.gan_start:
            g = losses.g_loss_hinge(self.net("discriminator")(rec[:, :0], rec))
            loss = loss + o.gan_weight * g
            logs["g_adv"] = g.detach()
        return loss, logs

    def disc_loss(self, batch, rng):
        x = images_of(batch)
        with torch.no_grad():
            model = self.models["vae"]
            h = model.encode(x).latent_dist
            rec = model.decode(h.mean + h.std * rng.randn_like(h.mean)).sample
        d = self.net("discriminator")
        logits = d(torch.cat([x, rec])[:, :0], torch.cat([x, rec]))  # one pass: DDP sees one forward
        real, fake = logits[: len(x)], logits[len(x):]
        loss = losses.d_loss_hinge(real, fake)
        return loss, {"d_loss": loss.detach()}

    def phases(self):
        phases = [Phase("vae", self.vae_loss)]
        if self.options.gan_weight > 0 and self.step >= self.options.gan_start:
            phases.append(Phase("discriminator", self.disc_loss))
        return phases

    def sample_grid(self) -> Optional[Tensor]:
        """Reconstructions of the first 32 training images under their originals (rows of 8)."""
        n = min(32, len(self.dataset))
        x = torch.stack([images_of(self.dataset[i]) for i in range(n)]).to(self.device)
        rec = self.models["vae"](x, sample_posterior=False).sample.clamp(-1, 1)
        rows = []
        for r in range(0, n, 8):
            rows += [x[r:r + 8], rec[r:r + 8]]
        return torch.cat(rows)

    @torch.no_grad()
    def latent_std(self, max_images: int = 2048) -> float:
        """Std of the posterior-mean latents over (up to) ``max_images`` training images."""
        vae = self.models["vae"]
        n = min(max_images, len(self.dataset))
        values = []
        for start in range(0, n, 256):
            x = torch.stack([images_of(self.dataset[i]) for i in range(start, min(n, start + 256))]).to(self.device)
            values.append(vae.encode(x).latent_dist.mean.float().flatten())
        return float(torch.cat(values).std())

    def export(self, folder: Path) -> None:
        with self.eval_mode():
            scale = 1.0 / max(self.latent_std(), 1e-6)
        vae = build_vae(self.options, scaling_factor=scale)
        vae.load_state_dict(self.models["vae"].state_dict())
        vae.save_pretrained(folder / "vae")
        write_manifest(folder, self.kind, self.options, scaling_factor=scale)
