"""fastgen's trainers over one shared loop (:mod:`fastgen.train.loop`): data order, micro-batches, autocast and
grad scaling, clipping, LR warm-up, EMA, DDP under torchrun, progress, sample grids, curves, atomic checkpoints
and bitwise resume.

- :class:`VAETrainer` (``AutoencoderKL``: L1/L2 + beta KL, optional PatchGAN term) and :class:`ConvVAETrainer`
  (the classic vector-latent VAE, any latent size);
- :class:`DCGANTrainer` (optionally class-conditional; non-saturating, hinge, LSGAN or WGAN-GP; R1) and
  :class:`Pix2PixTrainer` (paired image-to-image, L_cGAN + lambda L1);
- :class:`DiffusionTrainer` (pixel or latent; eps, v or x0; min-SNR; class or prompt conditioning through
  cross-attention; condition dropout for classifier-free guidance) and :class:`DiffusionModel`, its sampler.
"""

from .config import TrainConfig
from .conv_vae import ConvVAEOptions, ConvVAETrainer
from .diffusion import DiffusionModel, DiffusionOptions, DiffusionTrainer
from .gan import DCGANTrainer, GANOptions
from .loop import Phase, Trainer
from .pix2pix import Pix2PixOptions, Pix2PixTrainer
from .vae import VAEOptions, VAETrainer

__all__ = [
    "ConvVAEOptions",
    "ConvVAETrainer",
    "DCGANTrainer",
    "DiffusionModel",
    "DiffusionOptions",
    "DiffusionTrainer",
    "GANOptions",
    "Phase",
    "Pix2PixOptions",
    "Pix2PixTrainer",
    "TrainConfig",
    "Trainer",
    "VAEOptions",
    "VAETrainer",
]
