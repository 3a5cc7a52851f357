"""GANs: ``bias_act`` on DCGAN / pix2pix activation shapes, and one pix2pix training step.

Baselines, in the same run:

* ``bias_act`` (``lrelu``, StyleGAN's gain sqrt(2), a bias): the eager chain ``x + b``, ``F.leaky_relu``,
  ``* gain`` (:func:`fastgen.ops.bias_act_reference`), and the same formula under ``torch.compile`` (inductor
  fuses it into one loop; compiled once per shape before timing, skipped with ``--quick``). Forward, and
  forward+backward with the bias gradient.
* the pix2pix step at 128x128, batch 4 (U-Net G with 7 levels, 70x70 PatchGAN D, train mode): D's loss on a
  real and a detached fake pair, backward; G's cGAN + 100 * L1 loss, backward. fastgen's models against the
  same architecture in plain PyTorch (:mod:`fastgen.bench.gan_eager`) holding the same weights; no optimizer
  step, so every round times the same computation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..ops.bias_act import bias_act, bias_act_reference
from ._runner import Case

# Activations of a 64 px DCGAN / 128-256 px pix2pix at batch 16: the widest layers are the deepest, the largest
# tensors the shallowest.
SHAPES = [(16, 512, 8, 8), (16, 256, 16, 16), (16, 128, 32, 32), (16, 128, 64, 64), (16, 64, 128, 128)]
GAIN = math.sqrt(2)


def _dtypes(device: torch.device) -> list[torch.dtype]:
    return [torch.float32, torch.bfloat16] + ([torch.float16] if device.type == "cuda" else [])


def _chain(x, b):
    return bias_act_reference(x, b, 1, "lrelu", 0.2, GAIN)


class _Compiled:
    """torch.compile of a callable, compiled by its first (warm-up) call."""

    def __init__(self, fn):
        # One specialisation per case (shape, dtype, forward or backward) of the same function: past dynamo's
        # default limit of 8 it would silently run eager.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self.fn = torch.compile(fn, dynamic=False)

    def __call__(self, *args):
        return self.fn(*args)


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    out = []
    shapes = [SHAPES[0], SHAPES[-1]] if quick else SHAPES
    for shape in shapes:
        for dtype in _dtypes(device):
            out += _bias_act_cases(shape, dtype, device, quick)
    out.append(_pix2pix_case(device, quick))
    return out


def _bias_act_cases(shape, dtype, device, quick) -> list[Case]:
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(shape[1], generator=g).to(device=device, dtype=dtype)
    dy = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    nbytes = x.numel() * x.element_size()
    params = {"shape": "x".join(map(str, shape)), "dtype": str(dtype).replace("torch.", ""), "act": "lrelu"}

    fwd_baselines = {"eager": lambda: _chain(x, b)}
    if not quick:
        compiled_fwd = _Compiled(_chain)
        fwd_baselines["compiled"] = lambda: compiled_fwd(x, b)
    rows = [Case("gan", "bias_act", dict(params), lambda: bias_act(x, b, 1, "lrelu", 0.2, GAIN), fwd_baselines,
                 2 * nbytes)]  # read x, write y

    xg = x.detach().clone().requires_grad_(True)
    bg = b.detach().clone().requires_grad_(True)

    def fused():
        bias_act(xg, bg, 1, "lrelu", 0.2, GAIN).backward(dy)

    def eager():
        _chain(xg, bg).backward(dy)

    fb_baselines = {"eager": eager}
    if not quick:
        compiled_fb = _Compiled(_chain)
        fb_baselines["compiled"] = lambda: compiled_fb(xg, bg).backward(dy)
    # forward: read x, write y; backward: read dy and x, write dx (the bias gradient reads dx once more)
    rows.append(Case("gan", "bias_act fwd+bwd", dict(params), fused, fb_baselines, 5 * nbytes))
    return rows


def _pix2pix_pair(device):
    from ..models import PatchGANDiscriminator, Pix2PixGenerator
    from .gan_eager import EagerPatchGANDiscriminator, EagerPix2PixGenerator

    torch.manual_seed(0)
    g, d = Pix2PixGenerator(image_size=128), PatchGANDiscriminator()
    eg, ed = EagerPix2PixGenerator(image_size=128), EagerPatchGANDiscriminator()
    eg.load_state_dict(g.state_dict())
    ed.load_state_dict(d.state_dict())
    return [m.to(device).train() for m in (g, d, eg, ed)]


def _step(g, d, condition, target):
    """One pix2pix training step's forward and backward (Isola et al. 2017: L_cGAN + 100 L1, D halved)."""
    for m in (g, d):
        m.zero_grad(set_to_none=True)
    fake = g(condition)
    real_logits = d(condition, target)
    fake_logits = d(condition, fake.detach())
    d_loss = 0.5 * (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
                    + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))
    d_loss.backward()
    logits = d(condition, fake)
    g_loss = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits)) + 100.0 * F.l1_loss(fake, target)
    g_loss.backward()


def _pix2pix_case(device, quick) -> Case:
    g, d, eg, ed = _pix2pix_pair(device)
    gen = torch.Generator(device="cpu").manual_seed(1)
    condition = torch.rand(4, 3, 128, 128, generator=gen).mul(2).sub(1).to(device)
    target = torch.rand(4, 3, 128, 128, generator=gen).mul(2).sub(1).to(device)

    def ours():
        _step(g, d, condition, target)

    params = {"shape": "4x3x128x128", "dtype": "float32", "act": "pix2pix G+D"}
    return Case("gan", "pix2pix train step", params, ours, {"eager": lambda: _step(eg, ed, condition, target)},
                extra={"rounds": 2 if quick else 5})
