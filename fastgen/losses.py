"""GAN objectives and regularisers: small functions over discriminator logits.

Every function takes raw (pre-sigmoid) discriminator outputs of any shape — ``(N,)``, ``(N, 1)`` or a PatchGAN
map ``(N, 1, H', W')`` — and returns a 0-dim tensor averaged over every element (a PatchGAN's loss is the mean
over patches, as in pix2pix). Real and fake logits may have different batch sizes: each term is averaged on its
own. Math runs in the logits' dtype through torch's own ops (``F.softplus``, ``F.relu``, ``F.mse_loss``,
``F.l1_loss``), whose reductions accumulate in fp32 for fp16/bf16 inputs.

Conventions: ``d_loss_*`` is minimised by the discriminator, ``g_loss_*`` by the generator; fake logits passed
to a ``d_loss_*`` should come from detached fake images (``D(G(z).detach())``) unless the caller means G to
receive D's gradient.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "d_loss_hinge",
    "d_loss_lsgan",
    "d_loss_nonsaturating",
    "d_loss_wgan",
    "g_loss_hinge",
    "g_loss_lsgan",
    "g_loss_nonsaturating",
    "g_loss_wgan",
    "gradient_penalty",
    "pix2pix_discriminator_loss",
    "pix2pix_generator_loss",
    "r1_penalty",
]

GAN_MODES = ("vanilla", "lsgan")


def _check_logits(name: str, x) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of discriminator logits, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {str(x.dtype).replace('torch.', '')}")
    if x.numel() == 0:
        # the mean of an empty tensor is NaN, which would poison an optimiser step silently
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}); a loss needs at least one logit")


def _check_gan_mode(gan_mode: str) -> None:
    if gan_mode not in GAN_MODES:
        raise ValueError(f"gan_mode must be one of {', '.join(map(repr, GAN_MODES))}; got {gan_mode!r}")


# ---------------------------------------------------------------- non-saturating (Goodfellow et al. 2014)


def d_loss_nonsaturating(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Discriminator loss of the original GAN (Goodfellow et al. 2014, "Generative Adversarial Nets").

        L_D = mean(softplus(-D(x))) + mean(softplus(D(G(z))))

    i.e. binary cross-entropy with label 1 for real and 0 for fake, on logits (softplus(-l) = -log sigmoid(l)).

    Args:
        real_logits: D's logits on real images, any shape (N, ...).
        fake_logits: D's logits on generated images, any shape (M, ...).

    Returns a 0-dim tensor.
    """
    _check_logits("real_logits", real_logits)
    _check_logits("fake_logits", fake_logits)
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def g_loss_nonsaturating(fake_logits: Tensor) -> Tensor:
    """Generator loss of the non-saturating GAN (Goodfellow et al. 2014, section 3).

        L_G = mean(softplus(-D(G(z)))) = -mean(log sigmoid(D(G(z))))

    Maximising log D(G(z)) instead of minimising log(1 - D(G(z))) keeps G's gradient large early in training.

    Args:
        fake_logits: D's logits on generated images, any shape (N, ...).

    Returns a 0-dim tensor.
    """
    _check_logits("fake_logits", fake_logits)
    return F.softplus(-fake_logits).mean()


# ---------------------------------------------------------------- hinge (Lim & Ye 2017; Miyato et al. 2018)


def d_loss_hinge(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Hinge discriminator loss (Lim & Ye 2017, "Geometric GAN"; Miyato et al. 2018, SN-GAN).

        L_D = mean(relu(1 - D(x))) + mean(relu(1 + D(G(z))))

    Args:
        real_logits: D's outputs on real images, any shape (N, ...).
        fake_logits: D's outputs on generated images, any shape (M, ...).

    Returns a 0-dim tensor.
    """
    _check_logits("real_logits", real_logits)
    _check_logits("fake_logits", fake_logits)
    return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()


def g_loss_hinge(fake_logits: Tensor) -> Tensor:
    """Hinge generator loss (Lim & Ye 2017; Miyato et al. 2018): ``L_G = -mean(D(G(z)))``.

    Args:
        fake_logits: D's outputs on generated images, any shape (N, ...).

    Returns a 0-dim tensor.
    """
    _check_logits("fake_logits", fake_logits)
    return -fake_logits.mean()


# ---------------------------------------------------------------- least squares (Mao et al. 2017)


def d_loss_lsgan(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Least-squares discriminator loss (Mao et al. 2017, "Least Squares Generative Adversarial Networks"),
    with the paper's 0-1 coding a = 0 (fake), b = 1 (real):

        L_D = 0.5 * mean((D(x) - 1)^2) + 0.5 * mean(D(G(z))^2)

    Args:
        real_logits: D's outputs on real images, any shape (N, ...).
        fake_logits: D's outputs on generated images, any shape (M, ...).

    Returns a 0-dim tensor.
    """
    _check_logits("real_logits", real_logits)
    _check_logits("fake_logits", fake_logits)
    return 0.5 * (F.mse_loss(real_logits, torch.ones_like(real_logits))
                  + F.mse_loss(fake_logits, torch.zeros_like(fake_logits)))


def g_loss_lsgan(fake_logits: Tensor) -> Tensor:
    """Least-squares generator loss (Mao et al. 2017) with c = 1: ``L_G = 0.5 * mean((D(G(z)) - 1)^2)``.

    Args:
        fake_logits: D's outputs on generated images, any shape (N, ...).

    Returns a 0-dim tensor.
    """
    _check_logits("fake_logits", fake_logits)
    return 0.5 * F.mse_loss(fake_logits, torch.ones_like(fake_logits))


# ---------------------------------------------------------------- Wasserstein (Arjovsky 2017; Gulrajani 2017)


def d_loss_wgan(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Critic loss of the Wasserstein GAN (Arjovsky et al. 2017; with the penalty of Gulrajani et al. 2017):

        L_D = mean(D(G(z))) - mean(D(x))

    Add :func:`gradient_penalty` for WGAN-GP.

    Args:
        real_logits: the critic's outputs on real images, any shape (N, ...).
        fake_logits: the critic's outputs on generated images, any shape (M, ...).

    Returns a 0-dim tensor.
    """
    _check_logits("real_logits", real_logits)
    _check_logits("fake_logits", fake_logits)
    return fake_logits.mean() - real_logits.mean()


def g_loss_wgan(fake_logits: Tensor) -> Tensor:
    """Generator loss of the Wasserstein GAN: ``L_G = -mean(D(G(z)))``.

    Args:
        fake_logits: the critic's outputs on generated images, any shape (N, ...).

    Returns a 0-dim tensor.
    """
    _check_logits("fake_logits", fake_logits)
    return -fake_logits.mean()


def gradient_penalty(discriminator: Callable[[Tensor], Tensor], real: Tensor, fake: Tensor, weight: float = 10.0,
                     *, generator: Optional[torch.Generator] = None) -> Tensor:
    """WGAN-GP's two-sided gradient penalty (Gulrajani et al. 2017, "Improved Training of Wasserstein GANs"):

        x_hat = eps * x + (1 - eps) * G(z),   eps ~ U[0, 1] per sample
        GP    = weight * mean_i((||grad_x D(x_hat)_i||_2 - 1)^2)

    where the norm is over every element of sample i's gradient. The gradient is taken with
    ``create_graph=True``, so ``GP.backward()`` reaches D's parameters (the penalty trains D). ``real`` and
    ``fake`` are detached first: the penalty is a term of D's loss only, and never sends gradient to G.

    Args:
        discriminator: a callable mapping a batch (N, ...) shaped like ``real`` to outputs of any shape with
            leading dim N (each output depends on its own sample only, as with any D without batch statistics).
        real: real images (N, C, H, W) (any shape with a leading batch dim).
        fake: generated images of the same shape and dtype.
        weight: lambda, the paper's 10.
        generator: an optional ``torch.Generator`` on ``real``'s device for the draws of eps (reproducibility).

    Returns a 0-dim tensor.
    """
    for name, t in (("real", real), ("fake", fake)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if real.shape != fake.shape:
        raise ValueError(f"real and fake must have one shape; got {tuple(real.shape)} and {tuple(fake.shape)}")
    if real.dim() < 1 or real.shape[0] == 0:
        raise ValueError(f"real needs a non-empty leading batch dim; got shape {tuple(real.shape)}")
    if not callable(discriminator):
        raise TypeError(f"discriminator must be callable, got {type(discriminator).__name__}")
    n = real.shape[0]
    eps = torch.rand((n,) + (1,) * (real.dim() - 1), generator=generator, device=real.device, dtype=real.dtype)
    x_hat = torch.lerp(fake.detach(), real.detach(), eps).requires_grad_(True)
    out = discriminator(x_hat)
    if not isinstance(out, Tensor):
        raise TypeError(f"discriminator must return a tensor, got {type(out).__name__}")
    (grad,) = _input_grads(out, (x_hat,), "discriminator(x_hat)", "x_hat")
    norm = torch.linalg.vector_norm(grad.reshape(n, -1), dim=1)
    return weight * ((norm - 1) ** 2).mean()


# ---------------------------------------------------------------- R1 (Mescheder et al. 2018)


def _input_grads(out: Tensor, inputs: Sequence[Tensor], out_name: str, in_name: str) -> list[Tensor]:
    if not out.requires_grad:
        raise ValueError(f"{out_name} does not require grad: compute it from {in_name} with autograd enabled "
                         "(not under torch.no_grad()) so that its input gradient exists")
    grads = torch.autograd.grad(out.sum(), list(inputs), create_graph=True, allow_unused=True)
    if all(g is None for g in grads):
        raise ValueError(f"{out_name} does not depend on {in_name}: pass the very tensor fed to the discriminator "
                         "(after any augmentation), not a copy")
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]


def r1_penalty(real_logits: Tensor, real_images: Union[Tensor, Sequence[Tensor]], gamma: float = 10.0) -> Tensor:
    """R1 regulariser (Mescheder et al. 2018, "Which Training Methods for GANs do actually Converge?"):

        R1 = gamma / 2 * mean_i ||d(sum_j D(x)_j) / d x_i||_2^2

    the squared L2 norm, per sample i, of the gradient of D's (summed) logits with respect to the real images
    they were computed from. The gradient is taken with ``create_graph=True``, so ``R1.backward()``
    differentiates through it to D's parameters (double backward; every op in D must support it).

    StyleGAN2's lazy regularisation is the caller's: compute R1 every k steps and scale it by k.

    Args:
        real_logits: D's outputs on ``real_images``, any shape with leading dim N; must be computed from
            ``real_images`` with autograd on.
        real_images: the tensor (N, C, H, W) that D saw, with ``requires_grad=True`` set before D ran; or a
            tuple of tensors for a conditional D (e.g. ``(condition, image)``): the squared norms of all the
            gradients add up (a tensor D does not use counts as zero gradient).
        gamma: the regularisation weight (the paper's and StyleGAN2-FFHQ's 10).

    Returns a 0-dim tensor.
    """
    _check_logits("real_logits", real_logits)
    if real_logits.dim() == 0:
        raise ValueError("real_logits must have a leading batch dim (N, ...); got a 0-dim tensor")
    images = (real_images,) if isinstance(real_images, Tensor) else tuple(real_images)
    if not images:
        raise ValueError("real_images is an empty sequence")
    for i, x in enumerate(images):
        name = "real_images" if isinstance(real_images, Tensor) else f"real_images[{i}]"
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.requires_grad:
            raise ValueError(f"{name} does not require grad: call real_images.requires_grad_(True) before "
                             "running the discriminator on it")
        if x.dim() < 1 or x.shape[0] != real_logits.shape[0]:
            raise ValueError(f"{name} (shape {tuple(x.shape)}) and real_logits (shape {tuple(real_logits.shape)}) "
                             "must share the batch size in dim 0")
    grads = _input_grads(real_logits, images, "real_logits", "real_images")
    n = real_logits.shape[0]
    sq = sum(g.reshape(n, -1).square().sum(dim=1) for g in grads)
    return gamma / 2 * sq.mean()


# ---------------------------------------------------------------- pix2pix (Isola et al. 2017)


def pix2pix_generator_loss(fake_logits: Tensor, fake: Tensor, target: Tensor, l1_weight: float = 100.0,
                           gan_mode: str = "vanilla") -> tuple[Tensor, dict[str, Tensor]]:
    """pix2pix's generator objective (Isola et al. 2017, "Image-to-Image Translation with Conditional
    Adversarial Networks"), eq. 4:

        L_G = L_cGAN(G, D) + lambda * L1(G(x, z), y),   L1 = mean(|y - G(x, z)|)

    where L_cGAN is the GAN loss with the "real" label on D's logits for (x, G(x)), as pix2pix's reference code
    computes it: ``"vanilla"`` is the non-saturating BCE ``mean(softplus(-l))``; ``"lsgan"`` is
    ``mean((l - 1)^2)`` (pix2pix's MSE criterion, without LSGAN's 0.5).

    Args:
        fake_logits: D's logits on (condition, fake), any shape — a PatchGAN map (N, 1, H', W') in pix2pix.
        fake: G's output (N, C, H, W).
        target: the ground-truth image y, same shape as ``fake``.
        l1_weight: lambda, the paper's 100.
        gan_mode: ``"vanilla"`` or ``"lsgan"``.

    Returns ``(total, {"gan": L_cGAN, "l1": L1})``: the parts unweighted, still attached to the graph (call
    ``.item()`` or ``.detach()`` to log them).
    """
    _check_logits("fake_logits", fake_logits)
    _check_gan_mode(gan_mode)
    for name, t in (("fake", fake), ("target", target)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if fake.shape != target.shape:
        # F.l1_loss would broadcast (and only warn), averaging the wrong pairs
        raise ValueError(f"fake and target must have one shape; got {tuple(fake.shape)} and {tuple(target.shape)}")
    if gan_mode == "vanilla":
        gan = F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))
    else:
        gan = F.mse_loss(fake_logits, torch.ones_like(fake_logits))
    l1 = F.l1_loss(fake, target)
    return gan + l1_weight * l1, {"gan": gan, "l1": l1}


def pix2pix_discriminator_loss(real_logits: Tensor, fake_logits: Tensor, gan_mode: str = "vanilla") -> Tensor:
    """pix2pix's discriminator objective (Isola et al. 2017), halved "to slow down the rate at which D learns
    relative to G" (section 3.3):

        vanilla: L_D = 0.5 * (mean(softplus(-D(x, y))) + mean(softplus(D(x, G(x)))))
        lsgan:   L_D = 0.5 * (mean((D(x, y) - 1)^2) + mean(D(x, G(x))^2))

    Args:
        real_logits: D's logits on (condition, target), any shape (a PatchGAN map in pix2pix).
        fake_logits: D's logits on (condition, detached fake), any shape.
        gan_mode: ``"vanilla"`` or ``"lsgan"``.

    Returns a 0-dim tensor.
    """
    _check_logits("real_logits", real_logits)
    _check_logits("fake_logits", fake_logits)
    _check_gan_mode(gan_mode)
    if gan_mode == "vanilla":
        real = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
        fake = F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    else:
        real = F.mse_loss(real_logits, torch.ones_like(real_logits))
        fake = F.mse_loss(fake_logits, torch.zeros_like(fake_logits))
    return 0.5 * (real + fake)
