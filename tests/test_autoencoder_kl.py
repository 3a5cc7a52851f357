"""fastgen.models.AutoencoderKL against diffusers' AutoencoderKL with the same (perturbed random) weights."""

from __future__ import annotations

import inspect

import pytest
import torch

from fastgen.models import AutoencoderKL
from fastgen.models.autoencoder_kl import Decoder, DiagonalGaussianDistribution, Encoder
from fastgen.models.blocks import GroupNorm

from helpers import assert_lowp_close

diffusers = pytest.importorskip("diffusers")

TWO = dict(
    block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1, norm_num_groups=8, latent_channels=2, sample_size=32,
)
THREE = dict(
    block_out_channels=(32, 32, 64), down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, norm_num_groups=8, latent_channels=4,
    sample_size=32, act_fn="swish",
)
# The unfused activation path, no quant convs, no mid-block attention.
PLAIN = dict(TWO, act_fn="gelu", use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False)
CONFIGS = {"two": TWO, "three": THREE, "plain": PLAIN}


def _pair(cfg: dict, seed: int = 0):
    torch.manual_seed(seed)
    ref = diffusers.AutoencoderKL(**cfg)
    with torch.no_grad():  # away from init: non-trivial norm weights and biases
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * (0.1 if p.dim() == 1 else 0.02))
    ours = AutoencoderKL(**cfg)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref.eval(), ours.eval()


_CACHE: dict = {}


def pair(name: str):
    if name not in _CACHE:
        _CACHE[name] = _pair(CONFIGS[name])
    return _CACHE[name]


def assert_fp32_close(out, ref, what=""):
    """docs/design.md-style fp32 parity: max |diff| <= 1e-4 x max(1, the reference's scale)."""
    scale = max(1.0, ref.abs().max().item())
    err = (out - ref).abs().max().item()
    assert err <= 1e-4 * scale, f"{what}: max error {err:.3g} (scale {scale:.3g})"


def _plain(v):
    return list(v) if isinstance(v, (tuple, list)) else v


def _images(n=2, size=32, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ config


def test_constructor_is_diffusers():
    ours = [p for p in inspect.signature(AutoencoderKL.__init__).parameters if p != "self"]
    theirs = [p for p in inspect.signature(diffusers.AutoencoderKL.__init__).parameters if p != "self"]
    assert ours == theirs
    ref, m = pair("three")
    for key in theirs:
        assert _plain(m.config[key]) == _plain(ref.config[key]), key
    assert (m.tile_sample_min_size, m.tile_latent_min_size, m.tile_overlap_factor) == (
        ref.tile_sample_min_size, ref.tile_latent_min_size, ref.tile_overlap_factor)
    # The final norm + SiLU is one fused call, under diffusers' parameter names.
    for part in (m.encoder, m.decoder):
        assert isinstance(part.conv_norm_out, GroupNorm) and part.conv_norm_out.activation == "silu"
    assert m._supports_gradient_checkpointing and hasattr(m.encoder, "gradient_checkpointing")


@pytest.mark.parametrize(
    "kw, name",
    [
        (dict(down_block_types=("DownBlock2D",)), "DownBlock2D"),
        (dict(up_block_types=("AttnUpDecoderBlock2D",)), "AttnUpDecoderBlock2D"),
    ],
)
def test_refuses_block_types(kw, name):
    with pytest.raises(NotImplementedError, match=name):
        AutoencoderKL(block_out_channels=(32,), norm_num_groups=8, **kw)


def test_refuses_unimplemented_values():
    with pytest.raises(NotImplementedError, match="norm_type"):
        Decoder(norm_type="spatial", block_out_channels=(32,), norm_num_groups=8)
    with pytest.raises(ValueError, match="tanh"):
        AutoencoderKL(block_out_channels=(32,), norm_num_groups=8, act_fn="tanh")
    with pytest.raises(ValueError, match="block_out_channels"):
        Encoder(down_block_types=("DownEncoderBlock2D",) * 2, block_out_channels=(32,), norm_num_groups=8)
    with pytest.raises(ValueError, match="not_a_key"):
        AutoencoderKL.from_config(dict(block_out_channels=(32,), norm_num_groups=8, not_a_key=1))


def test_bad_inputs_are_value_errors():
    _, m = pair("two")
    with pytest.raises(ValueError, match=r"AutoencoderKL.encode: x must be a \(batch, 3, height, width\)"):
        m.encode(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="AutoencoderKL.encode"):
        m.encode(torch.randn(1, 4, 32, 32))
    with pytest.raises(ValueError, match=r"AutoencoderKL.decode: z must be a \(batch, 2, height, width\)"):
        m.decode(torch.randn(1, 4, 16, 16))
    with pytest.raises(ValueError, match="floating-point"):
        m.decode(torch.ones(1, 2, 16, 16, dtype=torch.int64))
    with pytest.raises(ValueError, match="AutoencoderKL.encode"):  # forward checks through encode
        m(torch.randn(1, 1, 32, 32))


# ---------------------------------------------------------------- parity


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_diffusers(name):
    ref, m = pair(name)
    x = _images()
    with torch.no_grad():
        pr, pm = ref.encode(x).latent_dist, m.encode(x).latent_dist
        for attr in ("mean", "std", "var", "logvar"):
            assert_fp32_close(getattr(pm, attr), getattr(pr, attr), attr)
        assert_fp32_close(pm.kl(), pr.kl(), "kl")
        other_r, other_m = ref.encode(x.flip(0)).latent_dist, m.encode(x.flip(0)).latent_dist
        assert_fp32_close(pm.kl(other_m), pr.kl(other_r), "kl(other)")
        assert_fp32_close(pm.nll(pm.mean + 0.1), pr.nll(pr.mean + 0.1), "nll")
        # The same seed draws the same noise, so the samples differ only by the mean/std rounding.
        s_r = pr.sample(torch.Generator().manual_seed(7))
        s_m = pm.sample(torch.Generator().manual_seed(7))
        assert_fp32_close(s_m, s_r, "sample")
        noise = torch.randn(pm.mean.shape, generator=torch.Generator().manual_seed(7))
        torch.testing.assert_close(s_m, pm.mean + pm.std * noise)

        z = torch.randn(2, m.config.latent_channels, 8 if name != "three" else 8, 8)
        assert_fp32_close(m.decode(z).sample, ref.decode(z).sample, "decode")
        assert_fp32_close(m(x).sample, ref(x).sample, "forward")
        g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
        assert_fp32_close(m(x, sample_posterior=True, generator=g()).sample,
                          ref(x, sample_posterior=True, generator=g()).sample, "forward(sample_posterior)")
        # return_dict=False: tuples, as diffusers.
        (post,) = m.encode(x, return_dict=False)
        assert isinstance(post, DiagonalGaussianDistribution)
        (dec,) = m.decode(z, return_dict=False)
        (out,) = m(x, return_dict=False)
        assert dec.shape == ref.decode(z).sample.shape and out.shape == x.shape[:1] + (3,) + x.shape[2:]
        assert m.decode(z)[0] is not None and m.decode(z)["sample"].shape == dec.shape


def test_deterministic_posterior():
    params = torch.randn(2, 4, 3, 3)
    d = DiagonalGaussianDistribution(params, deterministic=True)
    assert torch.equal(d.sample(torch.Generator().manual_seed(0)), d.mean)
    assert torch.equal(d.kl(), torch.zeros(2)) and torch.equal(d.nll(d.mean), torch.zeros(2))
    clamped = DiagonalGaussianDistribution(torch.cat([params[:, :2], torch.full_like(params[:, 2:], 50.0)], 1))
    assert clamped.logvar.max().item() == 20.0


def test_slicing_matches_batch():
    _, m = pair("two")
    x = _images(3)
    with torch.no_grad():
        z = m.encode(x).latent_dist.mean
        full = m.decode(z).sample
        m.enable_slicing()
        try:
            sliced, post = m.decode(z).sample, m.encode(x).latent_dist
        finally:
            m.disable_slicing()
    torch.testing.assert_close(sliced, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(post.mean, z, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ tiling


def _small_tiles(*models, sample=32, latent=16):
    for mod in models:
        mod.tile_sample_min_size, mod.tile_latent_min_size = sample, latent
        mod.enable_tiling()


def test_tiled_matches_diffusers_tiled():
    ref, m = pair("two")
    _small_tiles(ref, m)
    try:
        with torch.no_grad():
            for h, w in ((64, 64), (72, 56)):  # the second ends in partial tiles
                x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(h))
                pr, pm = ref.encode(x).latent_dist, m.encode(x).latent_dist
                assert_fp32_close(pm.mean, pr.mean, f"tiled encode mean {h}x{w}")
                assert_fp32_close(pm.std, pr.std, f"tiled encode std {h}x{w}")
                z = torch.randn(1, 2, h // 2, w // 2, generator=torch.Generator().manual_seed(w))
                assert_fp32_close(m.decode(z).sample, ref.decode(z).sample, f"tiled decode {h}x{w}")
            z = torch.randn(1, 2, 32, 32)
            assert_fp32_close(m.tiled_decode(z).sample, ref.tiled_decode(z).sample, "tiled_decode")
            x = torch.randn(1, 3, 64, 64)
            assert_fp32_close(m.tiled_encode(x).latent_dist.mean, ref.tiled_encode(x).latent_dist.mean, "tiled_encode")
    finally:
        ref.disable_tiling()
        m.disable_tiling()


def test_tiled_close_to_untiled_and_auto_rule():
    _, m = pair("two")
    z = torch.randn(1, 2, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        m.disable_tiling()
        untiled = m.decode(z).sample
        _small_tiles(m)
        tiled = m.decode(z).sample
        # Tiling changes the result by design: each tile's GroupNorms see only that tile's statistics and
        # its convolutions see zero padding at the tile border; the linear blend hides the seams but does not
        # undo that. What must hold: the same picture, not a different one. The bound is loose (the model
        # has random weights, so nothing makes its tiles agree better than this).
        rng = (untiled.max() - untiled.min()).item()
        assert (tiled - untiled).abs().max().item() > 1e-3 * rng  # it did tile
        assert (tiled - untiled).abs().mean().item() < 0.1 * rng
        assert (tiled - untiled).abs().max().item() < 0.6 * rng
        assert torch.corrcoef(torch.stack([tiled.flatten(), untiled.flatten()]))[0, 1] > 0.8

        # Automatic rule: tiling never set -> tiled above auto_tiling_min_size latent pixels.
        auto = AutoencoderKL(**TWO).eval()
        auto.load_state_dict(m.state_dict())
        auto.tile_sample_min_size, auto.tile_latent_min_size = 32, 16
        assert auto.auto_tiling_min_size == 128 and not auto.use_tiling
        torch.testing.assert_close(auto.decode(z).sample, untiled, rtol=1e-5, atol=1e-5)  # 32 <= 128
        auto.auto_tiling_min_size = 24
        torch.testing.assert_close(auto.decode(z).sample, tiled, rtol=1e-5, atol=1e-5)  # 32 > 24
        auto.disable_tiling()  # explicit: never tiled
        torch.testing.assert_close(auto.decode(z).sample, untiled, rtol=1e-5, atol=1e-5)
    m.disable_tiling()


# ------------------------------------------------------------------ grads


def test_gradients_match_diffusers():
    ref, m = pair("three")
    x = _images(1)
    names = ["encoder.conv_in.weight", "decoder.conv_out.weight", "decoder.up_blocks.1.resnets.0.norm1.weight",
             "encoder.mid_block.attentions.0.to_q.weight", "decoder.mid_block.attentions.0.to_q.weight"]
    grads = {}
    for mod in (ref, m):
        mod.zero_grad()
        mod(x).sample.square().mean().backward()
        grads[mod] = {n: p.grad.clone() for n, p in mod.named_parameters() if n in names}
        mod.zero_grad()
    for n in names:
        torch.testing.assert_close(grads[m][n], grads[ref][n], rtol=1e-4, atol=1e-6, msg=n)
    m.enable_gradient_checkpointing()
    try:
        assert m.is_gradient_checkpointing and m.decoder.gradient_checkpointing
        m(x).sample.square().mean().backward()
        for n, p in m.named_parameters():
            if n in names:
                torch.testing.assert_close(p.grad, grads[m][n], rtol=1e-5, atol=1e-7, msg=n)
    finally:
        m.disable_gradient_checkpointing()
        m.zero_grad()


# ------------------------------------------------------- dtypes / layouts


def test_bf16_autocast():
    ref, m = pair("two")
    x = _images(1)
    with torch.no_grad():
        ref32 = ref(x).sample
        with torch.autocast("cpu", dtype=torch.bfloat16):
            theirs = ref(x).sample
            ours = m(x).sample
    assert ours.dtype == theirs.dtype == torch.bfloat16
    assert_lowp_close(ours, ref32, theirs, what="AutoencoderKL bf16 autocast")


def test_channels_last():
    _, m = pair("two")
    x = _images(1)
    with torch.no_grad():
        want = m(x).sample
        m.to(memory_format=torch.channels_last)
        try:
            got = m(x.contiguous(memory_format=torch.channels_last)).sample
        finally:
            m.to(memory_format=torch.contiguous_format)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_fp16_upcast():
    _, m = pair("two")
    half = AutoencoderKL(**TWO).eval()
    half.load_state_dict(m.state_dict())
    half.half()
    full = AutoencoderKL(**TWO).eval()
    full.load_state_dict(half.state_dict())  # the fp16-rounded weights, in fp32
    z = torch.randn(1, 2, 8, 8).half()
    with torch.no_grad():
        want = full.decode(z.float()).sample
        got = half.decode(z).sample  # force_upcast=True and fp16 weights -> computed in fp32
        assert got.dtype == torch.float16 and half.dtype == torch.float16
        torch.testing.assert_close(got, want.half(), rtol=0, atol=1e-3 * max(1, want.abs().max().item()))
        torch.testing.assert_close(half.decode(z, upcast=True).sample, got)
        lowp = half.decode(z, upcast=False).sample  # fp16 activations: farther away
        assert (lowp.float() - want).abs().max() >= (got.float() - want).abs().max()
        post = half.encode(torch.randn(1, 3, 16, 16).half()).latent_dist
        assert post.mean.dtype == torch.float16


def test_compile_decode_fullgraph():
    """fullgraph=True fails on any graph break; aot_eager traces the fused ops through their fakes and
    AOTAutograd as inductor does, without inductor's ~30 s of C++ compiling here."""
    cfg = dict(block_out_channels=(32,), layers_per_block=1, norm_num_groups=8, latent_channels=4)
    torch.manual_seed(0)
    m = AutoencoderKL(**cfg).eval()
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        eager = m.decode(z).sample
        compiled = torch.compile(m.decode, fullgraph=True, backend="aot_eager")(z).sample
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------- files


def test_save_load_round_trip(tmp_path):
    try:
        import fastgen.io  # noqa: F401
    except Exception as exc:  # another engineer's module: absent or broken is a skip, not our failure
        pytest.skip(f"fastgen.io not importable ({type(exc).__name__}: {exc})")
    _, m = pair("two")
    m.save_pretrained(tmp_path)
    back = AutoencoderKL.from_pretrained(tmp_path)
    assert {k: _plain(v) for k, v in back.config.items()} == {k: _plain(v) for k, v in m.config.items()}
    x = _images(1)
    with torch.no_grad():
        torch.testing.assert_close(back(x).sample, m(x).sample)
        theirs = diffusers.AutoencoderKL.from_pretrained(tmp_path)  # diffusers reads what fastgen wrote
        assert_fp32_close(theirs(x).sample, m(x).sample, "diffusers from fastgen's files")
