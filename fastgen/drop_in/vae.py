"""The VAE side of a patched pipeline: the decoder's output post-processed in one fused pass, and tiled
decoding on its own for latents too large to decode at once.

``VaeImageProcessor.postprocess`` turns the decoder's [-1, 1] output into [0, 1] floats (``pt``), NHWC
float arrays (``np``) or PIL images through ``(x / 2 + 0.5).clamp(0, 1)``, a permute and
``(images * 255).round()``: three passes for the float image and six for the PIL one. fastgen's
``vae_postprocess`` reads the tensor once and writes the image once, bit-identical for fp32 (its
docstring says why).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ..ops.vae_postprocess import vae_postprocess
from ._rebind import mark

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _denormalizes_all(processor, image: Tensor, do_denormalize) -> bool:
    if do_denormalize is None:
        return bool(processor.config.do_normalize)
    return len(do_denormalize) == image.shape[0] and all(bool(d) for d in do_denormalize)


@mark("vae")
def postprocess(self, image: Tensor, output_type: str = "pil", do_denormalize: Optional[list] = None):
    """``VaeImageProcessor.postprocess`` with the denormalise / permute / round as one fused kernel."""
    fusable = (
        isinstance(image, Tensor) and image.dim() == 4 and image.dtype in _FLOATS
        and output_type in ("pt", "np", "pil") and _denormalizes_all(self, image, do_denormalize)
    )
    if not fusable:
        return type(self).postprocess(self, image, output_type=output_type, do_denormalize=do_denormalize)
    if output_type == "pt":
        return vae_postprocess(image)
    if output_type == "np":
        return vae_postprocess(image).cpu().permute(0, 2, 3, 1).float().numpy()
    return _to_pil(vae_postprocess(image, output="uint8").cpu().numpy())


def _to_pil(images: np.ndarray) -> list:
    from PIL import Image  # diffusers' own dependency; only the PIL output needs it

    if images.shape[-1] == 1:
        return [Image.fromarray(img.squeeze(-1), mode="L") for img in images]
    return [Image.fromarray(img) for img in images]


def make_auto_tiling_decode(min_latent_size: int):
    """``AutoencoderKL._decode`` that tiles (diffusers' own ``tiled_decode``, grid and blend) when tiling is
    off and the latent's height or width exceeds ``min_latent_size`` (128: images above 1024x1024 for the SD
    VAE), where an untiled decode needs several GiB of activations per image."""

    @mark("vae")
    def _decode(self, z: Tensor, return_dict: bool = True):
        if not self.use_tiling and max(z.shape[-2:]) > min_latent_size:
            return self.tiled_decode(z, return_dict=return_dict)
        return type(self)._decode(self, z, return_dict=return_dict)

    return _decode
