"""fastgen's GANs (DCGAN, pix2pix's U-Net and PatchGAN) against their plain PyTorch twins in
fastgen.bench.gan_eager: strict state-dict loads both ways, fp32 outputs and gradients within 1e-4 of the
output's scale in eval and train mode (dropout drawing the same masks), second derivatives through the
discriminators, shapes per resolution, conditioning, spectral norm, files, and errors."""

from __future__ import annotations

import pytest
import torch

from fastgen.bench.gan_eager import (EagerDCGANDiscriminator, EagerDCGANGenerator, EagerPatchGANDiscriminator,
                                     EagerPix2PixGenerator)
from fastgen.models import DCGANDiscriminator, DCGANGenerator, PatchGANDiscriminator, Pix2PixGenerator

from helpers import assert_lowp_close
from model_helpers import assert_fp32_close, perturbed

# fastgen's conv2d warns once per shape that 4x4 kernels run on its torch backend


def _randn(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


LABELS = torch.tensor([1, 2])

# name -> (fastgen class, eager class, config, inputs)
CASES = {
    "dcgan_g": (DCGANGenerator, EagerDCGANGenerator, dict(image_size=32, ngf=8, latent_dim=16),
                lambda: (_randn(2, 16),)),
    "dcgan_g_classes": (DCGANGenerator, EagerDCGANGenerator,
                        dict(image_size=16, ngf=8, latent_dim=16, num_classes=3, class_embed_dim=5),
                        lambda: (_randn(2, 16, 1, 1), LABELS)),
    "dcgan_d": (DCGANDiscriminator, EagerDCGANDiscriminator, dict(image_size=32, ndf=8),
                lambda: (_randn(2, 3, 32, 32),)),
    "dcgan_d_projection": (DCGANDiscriminator, EagerDCGANDiscriminator, dict(image_size=32, ndf=8, num_classes=3),
                           lambda: (_randn(2, 3, 32, 32), LABELS)),
    "dcgan_d_concat_sn": (DCGANDiscriminator, EagerDCGANDiscriminator,
                          dict(image_size=16, in_channels=1, ndf=8, num_classes=3, condition_type="concat",
                               spectral_norm=True),
                          lambda: (_randn(2, 1, 16, 16), LABELS)),
    # 64 px, 6 levels: one dropout block
    "pix2pix": (Pix2PixGenerator, EagerPix2PixGenerator, dict(image_size=64, ngf=8),
                lambda: (_randn(2, 3, 64, 64),)),
    "pix2pix_1to2_no_dropout": (Pix2PixGenerator, EagerPix2PixGenerator,
                                dict(in_channels=1, out_channels=2, image_size=32, ngf=4, use_dropout=False),
                                lambda: (_randn(2, 1, 32, 32),)),
    "patchgan": (PatchGANDiscriminator, EagerPatchGANDiscriminator, dict(ndf=8),
                 lambda: (_randn(2, 3, 64, 64), _randn(2, 3, 64, 64, seed=2))),
    "patchgan_sn_2layers": (PatchGANDiscriminator, EagerPatchGANDiscriminator,
                            dict(in_channels=4, ndf=8, n_layers=2, spectral_norm=True),
                            lambda: (_randn(2, 1, 32, 32), _randn(2, 3, 32, 32, seed=2))),
}


def _pair(name, seed=0):
    cls, eager_cls, config, inputs = CASES[name]
    torch.manual_seed(seed)
    ours = perturbed(cls(**config), seed)
    ref = eager_cls(**config).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ours, ref, inputs()


@pytest.mark.parametrize("name", list(CASES))
def test_matches_eager_twin(name):
    ours, ref, args = _pair(name)
    # the other direction loads too
    ours.load_state_dict(ref.state_dict(), strict=True)
    with torch.no_grad():
        assert_fp32_close(ours(*args), ref(*args), f"{name} eval")
    ours.train(), ref.train()
    outs = []
    for model in (ours, ref):
        torch.manual_seed(123)  # dropout's masks
        out = model(*args)
        out.square().mean().backward()
        outs.append(out.detach())
    assert_fp32_close(outs[0], outs[1], f"{name} train")
    theirs = dict(ref.named_parameters())
    for key, p in ours.named_parameters():
        q = theirs[key]
        assert p.grad is not None and q.grad is not None, f"{name}: {key} has no gradient"
        scale = q.grad.abs().max().item()
        assert (p.grad - q.grad).abs().max().item() <= 1e-4 * scale + 1e-7, f"{name}: {key} gradient differs"
    # running statistics moved the same way
    sd_ref = ref.state_dict()
    for key, buf in ours.state_dict().items():
        if "running" in key or "num_batches" in key:
            assert torch.allclose(buf.float(), sd_ref[key].float(), rtol=1e-5, atol=1e-6), f"{name}: {key}"


@pytest.mark.parametrize("name", ["pix2pix", "patchgan", "dcgan_d_projection"])
def test_bf16_autocast_and_channels_last(name):
    ours, ref, args = _pair(name)
    with torch.no_grad():
        fp32 = ref(*args)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert_lowp_close(ours(*args), fp32, ref(*args), what=f"{name} bf16 autocast")
        ours = ours.to(memory_format=torch.channels_last)
        cl = [a.to(memory_format=torch.channels_last) if a.dim() == 4 else a for a in args]
        assert_fp32_close(ours(*cl), fp32, f"{name} channels_last")


def test_dropout_is_the_noise_source():
    ours, _, (x,) = _pair("pix2pix")
    ours.train()
    a, b = ours(x), ours(x)
    assert not torch.equal(a, b)
    ours.eval()
    assert torch.equal(ours(x), ours(x))


@pytest.mark.parametrize("size", [16, 32, 64, 128])
def test_dcgan_shapes(size):
    g = DCGANGenerator(image_size=size, ngf=4, latent_dim=8, num_classes=4)
    d = DCGANDiscriminator(image_size=size, ndf=4, num_classes=4)
    img = g(_randn(2, 8), LABELS)
    assert img.shape == (2, 3, size, size) and img.abs().max() <= 1
    assert d(img, LABELS).shape == (2,)
    assert len(d.blocks) == len(g.blocks) == size.bit_length() - 3


@pytest.mark.parametrize("size", [32, 64, 128, 256])
def test_pix2pix_shapes(size):
    g = Pix2PixGenerator(image_size=size, ngf=2)
    assert g.num_downs == min(size.bit_length() - 1, 8)
    x = _randn(1, 3, size, size)
    assert g(x).shape == (1, 3, size, size)
    # a shallower U-Net on the same size; other sizes that are multiples of 2 ** num_downs also run
    g5 = Pix2PixGenerator(image_size=size, ngf=2, num_downs=5)
    assert g5(x).shape == (1, 3, size, size)
    assert g5(_randn(1, 3, 32, 96)).shape == (1, 3, 32, 96)


def test_release_defaults():
    with torch.device("meta"):
        g, d = Pix2PixGenerator(), PatchGANDiscriminator()
        dg, dd = DCGANGenerator(), DCGANDiscriminator()
    assert g.num_downs == 8 and g.config.image_size == 256 and g.config.ngf == 64 and g.config.use_dropout
    assert sum(lv.dropout for lv in g.levels) == 3
    # parameter counts of the pix2pix release's unet_256 and basic (n_layers=3) discriminator with 6 inputs
    assert g.num_parameters() == 54_413_955
    assert d.num_parameters() == 2_768_705
    assert d.receptive_field == 70 and d.config.in_channels == 6
    assert dg.config.image_size == 64 and dg.config.latent_dim == 100 and dd.config.ndf == 64
    assert [b.conv.out_channels for b in dg.blocks] == [512, 256, 128, 64]
    assert [b.conv.out_channels for b in dd.blocks] == [64, 128, 256, 512]


def test_patchgan_30x30_and_receptive_field():
    d = PatchGANDiscriminator(ndf=4)
    assert d(_randn(1, 3, 256, 256), _randn(1, 3, 256, 256, seed=2)).shape == (1, 1, 30, 30)
    for n_layers, field in ((1, 16), (2, 34), (3, 70)):
        d = perturbed(PatchGANDiscriminator(in_channels=2, ndf=2, n_layers=n_layers))
        size = 96
        x = _randn(1, 1, size, size).requires_grad_()
        out = d(x, _randn(1, 1, size, size, seed=2))
        c = out.shape[-1] // 2
        (g,) = torch.autograd.grad(out[0, 0, c, c], x)
        rows = g[0, 0].abs().sum(1).nonzero()
        assert d.receptive_field == field
        # zero padding can only cut the field at the border; a centre logit sees all of it
        assert rows.max() - rows.min() + 1 == field, n_layers


def test_discriminators_see_the_condition():
    d = perturbed(PatchGANDiscriminator(ndf=4, n_layers=2))
    cond, img = _randn(1, 3, 32, 32), _randn(1, 3, 32, 32, seed=2)
    with torch.no_grad():
        assert not torch.allclose(d(cond, img), d(cond + 1, img))
        assert not torch.allclose(d(cond, img), d(cond, img + 1))


@pytest.mark.parametrize("condition_type", ["projection", "concat"])
def test_class_conditioning_changes_outputs(condition_type):
    g = perturbed(DCGANGenerator(image_size=16, ngf=4, latent_dim=8, num_classes=3))
    d = perturbed(DCGANDiscriminator(image_size=16, ndf=4, num_classes=3, condition_type=condition_type))
    z, other = _randn(2, 8), torch.tensor([0, 0])
    with torch.no_grad():
        img = g(z, LABELS)
        assert not torch.allclose(img, g(z, other))
        assert not torch.allclose(d(img, LABELS), d(img, other))


@pytest.mark.parametrize("name", ["dcgan_g_classes", "dcgan_d_concat_sn", "pix2pix_1to2_no_dropout",
                                  "patchgan_sn_2layers"])
def test_save_and_load(name, tmp_path):
    ours, _, args = _pair(name)
    ours.save_pretrained(tmp_path)
    loaded = type(ours).from_pretrained(tmp_path)
    assert dict(loaded.config) == dict(ours.config)
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(*args), ours(*args))


def test_spectral_norm():
    d = DCGANDiscriminator(image_size=16, ndf=4, spectral_norm=True)
    convs = [b.conv for b in d.blocks] + [d.conv_out]
    assert all(torch.nn.utils.parametrize.is_parametrized(c, "weight") for c in convs)
    d.eval()
    for c in convs:
        sigma = torch.linalg.matrix_norm(c.weight.detach().flatten(1), ord=2)
        assert abs(sigma.item() - 1) < 0.05
    assert not torch.nn.utils.parametrize.is_parametrized(DCGANDiscriminator(image_size=16, ndf=4).conv_out)


@pytest.mark.parametrize("name", ["dcgan_d_projection", "patchgan", "patchgan_sn_2layers"])
def test_double_backward_r1(name):
    """An R1 penalty (Mescheder et al. 2018): |grad_x D(x)|^2, differentiated again to D's parameters."""
    ours, ref, args = _pair(name)
    grads = []
    for model in (ours, ref):
        model.train()
        model.zero_grad()
        args_ = [a.clone().requires_grad_() if a.is_floating_point() else a for a in args]
        x = args_[-1] if name.startswith("patchgan") else args_[0]
        (gx,) = torch.autograd.grad(model(*args_).sum(), x, create_graph=True)
        gx.square().sum().backward()
        grads.append({k: p.grad for k, p in model.named_parameters()})
    for key, g in grads[0].items():
        assert g is not None and torch.isfinite(g).all(), f"{name}: {key}"
        # a parameter the penalty does not depend on (the last bias): None in eager, zeros through bias_act
        ref_g = torch.zeros_like(g) if grads[1][key] is None else grads[1][key]
        assert (g - ref_g).abs().max() <= 1e-4 * ref_g.abs().max() + 1e-6, f"{name}: {key} R1 gradient differs"
    assert any(g.abs().sum() > 0 for g in grads[0].values())


def test_bad_inputs():
    with pytest.raises(ValueError, match="power of two from 16 to 128"):
        DCGANGenerator(image_size=48)
    with pytest.raises(ValueError, match="power of two from 16 to 128"):
        DCGANDiscriminator(image_size=256)
    with pytest.raises(ValueError, match="unknown condition_type 'hinge'"):
        DCGANDiscriminator(image_size=16, num_classes=3, condition_type="hinge")
    with pytest.raises(ValueError, match="cannot be halved num_downs=6"):
        Pix2PixGenerator(image_size=96, num_downs=6)
    with pytest.raises(ValueError, match="cannot be halved 5 times"):
        Pix2PixGenerator(image_size=100)
    with pytest.raises(ValueError, match="num_downs must be an int >= 5"):
        Pix2PixGenerator(image_size=32, num_downs=4)
    with pytest.raises(ValueError, match="not arguments"):
        Pix2PixGenerator.from_config({"image_size": 32, "norm": "instance"})

    g = Pix2PixGenerator(image_size=32, ngf=2)
    with pytest.raises(ValueError, match="input height 33 cannot be halved num_downs=5"):
        g(torch.randn(1, 3, 33, 32))
    with pytest.raises(ValueError, match="input width 16 cannot be halved"):
        g(torch.randn(1, 3, 32, 16))
    with pytest.raises(ValueError, match="has 4 channels, the model expects 3"):
        g(torch.randn(1, 4, 32, 32))

    d = PatchGANDiscriminator(ndf=2)
    with pytest.raises(ValueError, match="3 \\+ 1 channels, the model expects in_channels=6"):
        d(torch.randn(1, 3, 64, 64), torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="share batch size, height and width"):
        d(torch.randn(1, 3, 64, 64), torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="at least 24 px"):
        d(torch.randn(1, 3, 16, 16), torch.randn(1, 3, 16, 16))

    gen = DCGANGenerator(image_size=16, ngf=2, latent_dim=8, num_classes=3)
    with pytest.raises(ValueError, match="z must be"):
        gen(torch.randn(2, 9))
    with pytest.raises(ValueError, match="class_labels are needed"):
        gen(torch.randn(2, 8))
    with pytest.raises(ValueError, match="must lie in \\[0, 3\\)"):
        gen(torch.randn(2, 8), torch.tensor([0, 3]))
    dis = DCGANDiscriminator(image_size=16, ndf=2)
    with pytest.raises(ValueError, match="x must be 16x16"):
        dis(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="has 1 channels, the model expects 3"):
        dis(torch.randn(2, 1, 16, 16))
    with pytest.raises(ValueError, match="the model is unconditional"):
        dis(torch.randn(2, 3, 16, 16), torch.tensor([0, 1]))


# ---------------------------------------------------------------- the pix2pix release's layout
#
# Written from the release's documented structure (nested blocks, each an nn.Sequential with its layers at
# fixed indices, the forward "cat([x, block(x)])" around in-place activations), to check the key maps and
# that the flat U-Net computes what the nested one does.


class _ReleaseBlock(torch.nn.Module):
    def __init__(self, outer, inner, cin=None, sub=None, outermost=False, innermost=False, dropout=False):
        super().__init__()
        nn = torch.nn
        cin = outer if cin is None else cin
        down = nn.Conv2d(cin, inner, 4, 2, 1, bias=False)
        if outermost:
            layers = [down, sub, nn.ReLU(True), nn.ConvTranspose2d(2 * inner, outer, 4, 2, 1), nn.Tanh()]
        elif innermost:
            layers = [nn.LeakyReLU(0.2, True), down, nn.ReLU(True),
                      nn.ConvTranspose2d(inner, outer, 4, 2, 1, bias=False), nn.BatchNorm2d(outer)]
        else:
            layers = [nn.LeakyReLU(0.2, True), down, nn.BatchNorm2d(inner), sub, nn.ReLU(True),
                      nn.ConvTranspose2d(2 * inner, outer, 4, 2, 1, bias=False), nn.BatchNorm2d(outer)]
            layers += [nn.Dropout(0.5)] if dropout else []
        self.outermost = outermost
        self.model = nn.Sequential(*layers)

    def forward(self, x):
        return self.model(x) if self.outermost else torch.cat([x, self.model(x)], 1)


class _ReleaseUnet(torch.nn.Module):
    def __init__(self, cin, cout, num_downs, ngf):
        super().__init__()
        block = _ReleaseBlock(ngf * 8, ngf * 8, innermost=True)
        for _ in range(num_downs - 5):
            block = _ReleaseBlock(ngf * 8, ngf * 8, sub=block, dropout=True)
        for mult in (4, 2, 1):
            block = _ReleaseBlock(ngf * mult, ngf * mult * 2, sub=block)
        self.model = _ReleaseBlock(cout, ngf, cin=cin, sub=block, outermost=True)

    def forward(self, x):
        return self.model(x)


def _release_patchgan(cin, ndf, n_layers):
    nn = torch.nn
    layers = [nn.Conv2d(cin, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
    mult = 1
    for n in range(1, n_layers + 1):
        prev, mult = mult, min(2 ** n, 8)
        layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, 2 if n < n_layers else 1, 1, bias=False),
                   nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
    layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
    module = nn.Module()
    module.model = nn.Sequential(*layers)
    module.forward = lambda c, x: module.model(torch.cat([c, x], 1))
    return module


def test_loads_release_checkpoints():
    torch.manual_seed(0)
    release = perturbed(_ReleaseUnet(3, 2, 6, 4))
    ours = Pix2PixGenerator(out_channels=2, image_size=64, ngf=4)
    sd = {"module." + k: v for k, v in release.state_dict().items() if not k.endswith("num_batches_tracked")}
    ours.load_release_state_dict(sd)
    ours.eval()
    x = _randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_fp32_close(ours(x), release(x), "release U-Net eval")
    ours.train(), release.train()
    torch.manual_seed(7)
    a = ours(x)
    torch.manual_seed(7)
    assert_fp32_close(a, release(x), "release U-Net train (dropout)")

    release_d = perturbed(_release_patchgan(5, 4, 2))
    ours_d = PatchGANDiscriminator(in_channels=5, ndf=4, n_layers=2)
    ours_d.load_release_state_dict(release_d.state_dict())
    ours_d.eval()
    c, y = _randn(1, 2, 40, 40), _randn(1, 3, 40, 40, seed=3)
    with torch.no_grad():
        assert_fp32_close(ours_d(c, y), release_d(c, y), "release PatchGAN")
    with pytest.raises(ValueError, match="not a checkpoint of this release configuration"):
        PatchGANDiscriminator(in_channels=5, ndf=4, n_layers=3).load_release_state_dict(release_d.state_dict())


def test_models_run_without_fallback_warnings():
    # The 4x4 convolutions go to conv2d's torch backend by name: no "falls back" warning for every user.
    import warnings

    g, d = Pix2PixGenerator(image_size=32, ngf=4), PatchGANDiscriminator(ndf=4)
    x = torch.randn(1, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d(x, g(x)).sum().backward()


@pytest.mark.parametrize("xs,ws,stride,padding", [
    ((2, 8, 2, 2), (5, 8, 4, 4), 2, 1), ((1, 6, 4, 3), (7, 6, 4, 4), 2, 1), ((3, 4, 5, 5), (2, 4, 4, 4), 1, 1),
    ((2, 3, 4, 4), (4, 3, 4, 4), 1, 0),
])
def test_gemm_convolutions_match_torch(xs, ws, stride, padding):
    # The im2col + GEMM formulation the GAN layers use for tiny spatial sizes (fastgen/models/gan/_gemm_conv.py):
    # outputs and gradients of both the convolution and the transposed convolution equal PyTorch's.
    from fastgen.models.gan._gemm_conv import gemm_conv2d, gemm_conv_transpose2d

    g = torch.Generator().manual_seed(0)
    x = torch.randn(xs, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(ws, generator=g, dtype=torch.float64, requires_grad=True)
    st, pd = (stride, stride), (padding, padding)
    y, ref = gemm_conv2d(x, w, st, pd), torch.nn.functional.conv2d(x, w, None, st, pd)
    torch.testing.assert_close(y, ref)
    dy = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(y, (x, w), dy), torch.autograd.grad(ref, (x, w), dy))
    wt = torch.randn(xs[1], ws[0], ws[2], ws[3], generator=g, dtype=torch.float64, requires_grad=True)
    y = gemm_conv_transpose2d(x, wt, st, pd, (0, 0))
    ref = torch.nn.functional.conv_transpose2d(x, wt, None, st, pd)
    torch.testing.assert_close(y, ref)
    dy = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(y, (x, wt), dy), torch.autograd.grad(ref, (x, wt), dy))


def test_gemm_convolutions_only_for_fp32_cpu_tiny_images():
    from fastgen.models.gan._gemm_conv import use_gemm_conv2d, use_gemm_conv_transpose2d

    assert use_gemm_conv2d(torch.ones(1, 8, 8, 8), (4, 4), (2, 2), (1, 1))  # 4x4 output
    assert not use_gemm_conv2d(torch.ones(1, 8, 16, 16), (4, 4), (2, 2), (1, 1))  # 8x8 output: oneDNN
    assert not use_gemm_conv2d(torch.ones(1, 8, 8, 8, dtype=torch.bfloat16), (4, 4), (2, 2), (1, 1))
    assert use_gemm_conv_transpose2d(torch.ones(1, 8, 4, 4))
    assert not use_gemm_conv_transpose2d(torch.ones(1, 8, 8, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not use_gemm_conv_transpose2d(torch.ones(1, 8, 4, 4))
