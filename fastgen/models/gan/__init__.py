"""Classic GANs on fastgen's ops: DCGAN (Radford et al. 2015) with optional class conditioning, and pix2pix's
U-Net generator and PatchGAN discriminator (Isola et al. 2017)."""

from .dcgan import DCGANDiscriminator, DCGANGenerator
from .pix2pix import PatchGANDiscriminator, Pix2PixGenerator

__all__ = ["DCGANDiscriminator", "DCGANGenerator", "PatchGANDiscriminator", "Pix2PixGenerator"]
