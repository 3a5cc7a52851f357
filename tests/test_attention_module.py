"""fastgen.models.blocks.Attention against diffusers' Attention (AttnProcessor2_0).

Tolerances: in fp32 the comparisons use ``torch.testing.assert_close``'s
defaults (rtol 1.3e-6, atol 1e-5). On the ``torch`` backend the module runs the
same Linear layers and the same SDPA call as diffusers, so the self- and
cross-attention outputs come out bit-identical in practice; the GroupNorm of
the VAE block is fastgen's (its own reduction order), and the native kernels
(Triton under the interpreter, the C++ CPU kernel when built) sum the softmax
in another order, both of which stay within those defaults at these sizes.
fp16/bf16 follow docs/design.md's rule (at most 2x PyTorch's own error against
fp32).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from fastgen import _backend
from fastgen._backend import BackendUnavailable
from fastgen.models.blocks import Attention, GroupNorm

from helpers import assert_lowp_close, kernel_backends

diffusers_ap = pytest.importorskip("diffusers.models.attention_processor")
DiffusersAttention = diffusers_ap.Attention

# The three attention layers of Stable Diffusion 1.x, at small token counts.
SELF = dict(query_dim=320, heads=8, dim_head=40)
CROSS = dict(query_dim=320, cross_attention_dim=768, heads=8, dim_head=40)
VAE_MID = dict(
    query_dim=512, heads=1, dim_head=512, norm_num_groups=32, residual_connection=True,
    bias=True, upcast_softmax=True, rescale_output_factor=1, eps=1e-6,
)
# (config, hidden_states shape, encoder_hidden_states shape)
CASES = {
    "self": (SELF, (2, 64, 320), None),
    "cross": (CROSS, (2, 64, 320), (2, 77, 768)),
    "vae_mid": (VAE_MID, (1, 512, 8, 8), None),
}


def _diffusers(config, seed=0):
    """A diffusers Attention with non-trivial weights (biases and norms perturbed)."""
    torch.manual_seed(seed)
    ref = DiffusersAttention(**config).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return ref


def _pair(config, backend=None, seed=0):
    ref = _diffusers(config, seed)
    ours = Attention(**config, backend=backend).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _inputs(x_shape, ctx_shape, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(x_shape, generator=g).to(dtype)
    ctx = torch.randn(ctx_shape, generator=g).to(dtype) if ctx_shape else None
    return x, ctx


# ------------------------------------------------------------ state dict


@pytest.mark.parametrize(
    "config",
    [
        SELF, CROSS, VAE_MID,
        dict(query_dim=64, heads=2, dim_head=32, out_dim=64, out_bias=False),
        dict(query_dim=64, cross_attention_dim=48, heads=2, dim_head=32, cross_attention_norm="layer_norm"),
        dict(query_dim=64, cross_attention_dim=48, heads=2, dim_head=32, cross_attention_norm="group_norm",
             cross_attention_norm_num_groups=8),
    ],
)
def test_state_dict_names_match_diffusers(config):
    ref = DiffusersAttention(**config)
    ours = Attention(**config)
    assert list(ours.state_dict()) == list(ref.state_dict())
    for name, t in ref.state_dict().items():
        assert ours.state_dict()[name].shape == t.shape, name
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(ours.state_dict(), strict=True)  # and back
    if config.get("norm_num_groups"):
        assert isinstance(ours.group_norm, GroupNorm)
    assert isinstance(ours.to_out, torch.nn.ModuleList) and isinstance(ours.to_out[1], torch.nn.Dropout)
    for attr in ("heads", "scale", "inner_dim", "cross_attention_dim", "is_cross_attention", "out_dim",
                 "rescale_output_factor", "residual_connection", "upcast_softmax", "upcast_attention"):
        assert getattr(ours, attr) == getattr(ref, attr), attr


# ------------------------------------------------------------ outputs (fp32)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", ["torch", None])
def test_matches_diffusers_fp32(case, backend):
    config, x_shape, ctx_shape = CASES[case]
    ref, ours = _pair(config, backend)
    x, ctx = _inputs(x_shape, ctx_shape)
    with torch.no_grad():
        expected = ref(x, ctx)
        out = ours(x, encoder_hidden_states=ctx)
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("backend", kernel_backends("cpu"))
@pytest.mark.parametrize("case", ["self", "cross"])
def test_kernel_backends_match_diffusers(backend, case):
    # 16 query tokens: the Triton interpreter is slow. (Triton stops at head
    # dim 160, so the VAE's single 512-wide head is not a Triton case.)
    config, x_shape, ctx_shape = CASES[case]
    ref, ours = _pair(config, backend)
    x, ctx = _inputs((1, 16, 320), ctx_shape and (1, 9, 768))
    with torch.no_grad():
        torch.testing.assert_close(ours(x, ctx), ref(x, ctx))


def test_vae_mid_block_odd_spatial_channels_last_batch2():
    ref, ours = _pair(VAE_MID)
    x, _ = _inputs((2, 512, 5, 7), None)
    with torch.no_grad():
        expected = ref(x)
        torch.testing.assert_close(ours(x), expected)
        torch.testing.assert_close(ours(x.contiguous(memory_format=torch.channels_last)), expected)


def test_rescale_output_factor_and_residual_on_tokens():
    config = dict(query_dim=64, heads=2, dim_head=32, residual_connection=True, rescale_output_factor=2.0, bias=True)
    ref, ours = _pair(config)
    x, _ = _inputs((3, 17, 64), None)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x))


def test_scale_qk_false_matches_diffusers():
    # diffusers runs scale_qk=False through AttnProcessor with scale 1.0.
    config = dict(query_dim=64, heads=2, dim_head=32, scale_qk=False)
    ref, ours = _pair(config)
    assert ours.scale == 1.0
    x, _ = _inputs((2, 11, 64), None)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x))


@pytest.mark.parametrize("norm", ["layer_norm", "group_norm"])
def test_cross_attention_norm_matches_diffusers(norm):
    config = dict(query_dim=64, cross_attention_dim=48, heads=2, dim_head=32, cross_attention_norm=norm,
                  cross_attention_norm_num_groups=8)
    ref, ours = _pair(config)
    x, ctx = _inputs((2, 13, 64), (2, 7, 48))
    with torch.no_grad():
        torch.testing.assert_close(ours(x, ctx), ref(x, ctx))


def test_out_dim_matches_diffusers():
    config = dict(query_dim=64, heads=2, dim_head=32, out_dim=96)
    ref, ours = _pair(config)
    assert ours.heads == ref.heads == 3
    x, _ = _inputs((2, 9, 64), None)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x))


def test_head_dim_without_kernel_falls_back_to_sdpa_once():
    config = dict(query_dim=16, heads=2, dim_head=8)  # diffusers' tiny test models use such head dims
    ref, ours = _pair(config)
    x, _ = _inputs((2, 5, 16), None)
    _backend._warned.discard(("Attention", "head_dim", 8))  # an earlier test may already have warned
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.testing.assert_close(ours(x), ref(x))
        ours(x)
    fallback = [w for w in caught if "head dim 8" in str(w.message)]
    assert len(fallback) == 1  # once per process, through fastgen._backend.warn_once
    assert fallback[0].category is RuntimeWarning
    # Asked for by name, a native backend raises instead of silently using SDPA.
    ours.backend = "cpu"
    with pytest.raises((ValueError, BackendUnavailable)):
        ours(x)
    ours.backend = "torch"
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x))


# ------------------------------------------------------------ fp16 / bf16


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["self", "cross"])
def test_lowp_matches_fp32_reference(dtype, case):
    config, x_shape, ctx_shape = CASES[case]
    ref, ours = _pair(config)
    x, ctx = _inputs((2, 32, 320), ctx_shape and (2, 77, 768))
    with torch.no_grad():
        expected32 = ref(x, ctx)
        ours = ours.to(dtype)
        ref_lowp = ref.to(dtype)(x.to(dtype), ctx.to(dtype) if ctx is not None else None)
        out = ours(x.to(dtype), ctx.to(dtype) if ctx is not None else None)
    assert out.dtype == dtype
    assert_lowp_close(out, expected32, ref_lowp, what=f"Attention {case} {dtype}")


# ------------------------------------------------------------ gradients


@pytest.mark.parametrize("backend", ["torch"] + kernel_backends("cpu"))
def test_gradients_match_diffusers(backend):
    ref, ours = _pair(CROSS, backend)
    x, ctx = _inputs((1, 16, 320), (1, 9, 768))
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    cs = [ctx.clone().requires_grad_(True) for _ in range(2)]
    g = torch.randn(1, 16, 320, generator=torch.Generator().manual_seed(3))
    ref(xs[0], cs[0]).backward(g)
    ours(xs[1], cs[1]).backward(g)
    # The kernels' backward sums in another order than SDPA's: fp32 gradients
    # agree to ~1e-6 relative per element, summed over tokens into the weights.
    tol = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(xs[1].grad, xs[0].grad, **tol)
    torch.testing.assert_close(cs[1].grad, cs[0].grad, **tol)
    for (name, p_ref), (_, p) in zip(ref.named_parameters(), ours.named_parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, msg=name, **tol)


def test_gradients_through_mask_path():
    ref, ours = _pair(CROSS)
    x, ctx = _inputs((1, 16, 320), (1, 9, 768))
    mask = _sd_text_mask(1, 9, [4])
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    ref(xs[0], ctx, attention_mask=mask).sum().backward()
    ours(xs[1], ctx, attention_mask=mask).sum().backward()
    torch.testing.assert_close(xs[1].grad, xs[0].grad)


# ------------------------------------------------------------ masks


def _sd_text_mask(batch, tokens, lengths):
    """UNet2DConditionModel's encoder mask: (B, 1, Nk) additive, -10000 where padded."""
    keep = torch.arange(tokens)[None, :] < torch.tensor(lengths)[:, None]
    return ((1 - keep.float()) * -10000.0).unsqueeze(1)


def test_masks_match_diffusers():
    ref, ours = _pair(CROSS)
    x, ctx = _inputs((2, 24, 320), (2, 77, 768))
    g = torch.Generator().manual_seed(5)
    masks = {
        "additive (B,1,Nk)": _sd_text_mask(2, 77, [5, 77]),
        "bool (B,Nk)": torch.arange(77)[None, :] < torch.tensor([[9], [40]]),
        "additive (B,Nq,Nk)": torch.randn(2, 24, 77, generator=g),
        "per head (B*heads,1,Nk)": torch.randn(2 * 8, 1, 77, generator=g),
        "per head (B*heads,Nq,Nk)": torch.randn(2 * 8, 24, 77, generator=g),
    }
    with torch.no_grad():
        unmasked = ours(x, ctx)
        for what, mask in masks.items():
            out = ours(x, ctx, attention_mask=mask)
            torch.testing.assert_close(out, ref(x, ctx, attention_mask=mask), msg=what)
            assert not torch.allclose(out, unmasked), f"{what}: the mask was ignored"


def test_mask_4d_and_self_attention_mask():
    ref, ours = _pair(SELF)
    x, _ = _inputs((2, 20, 320), None)
    mask = torch.randn(2, 20, 20, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(ours(x, attention_mask=mask), ref(x, attention_mask=mask))
        # A 4-D mask goes to SDPA as is: same result as the equivalent 3-D one.
        torch.testing.assert_close(ours(x, attention_mask=mask[:, None]), ours(x, attention_mask=mask))


def test_mask_on_vae_4d_input():
    ref, ours = _pair(VAE_MID)
    x, _ = _inputs((1, 512, 4, 4), None)
    mask = torch.randn(1, 16, 16, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(ours(x, attention_mask=mask), ref(x, attention_mask=mask))


def test_bad_masks():
    ours = Attention(**CROSS)
    x, ctx = _inputs((2, 8, 320), (2, 77, 768))
    with pytest.raises(ValueError, match="key tokens"):
        ours(x, ctx, attention_mask=torch.zeros(2, 1, 76))
    with pytest.raises(ValueError, match="first dim"):
        ours(x, ctx, attention_mask=torch.zeros(3, 1, 77))
    with pytest.raises(ValueError, match="query tokens"):
        ours(x, ctx, attention_mask=torch.zeros(2, 5, 77))
    with pytest.raises(ValueError, match="2-D, 3-D or 4-D"):
        ours(x, ctx, attention_mask=torch.zeros(77))
    with pytest.raises(ValueError, match="broadcast"):
        ours(x, ctx, attention_mask=torch.zeros(2, 3, 8, 77))
    with pytest.raises(TypeError, match="bool"):
        ours(x, ctx, attention_mask=torch.zeros(2, 1, 77, dtype=torch.int64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        ours(x, ctx, attention_mask=[[0.0] * 77] * 2)


# ------------------------------------------------------------ from_diffusers


def test_from_diffusers_shares_parameters():
    ref = _diffusers(VAE_MID)
    ours = Attention.from_diffusers(ref)
    assert ours.to_q.weight is ref.to_q.weight and ours.to_out[0].bias is ref.to_out[0].bias
    assert isinstance(ours.group_norm, GroupNorm) and ours.group_norm.weight is ref.group_norm.weight
    assert ours.group_norm.eps == ref.group_norm.eps == 1e-6
    assert list(ours.state_dict()) == list(ref.state_dict())
    x, _ = _inputs((1, 512, 4, 4), None)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x))
        ref.to_v.weight.mul_(-1.5)  # an in-place update to diffusers' weights is seen by ours
        torch.testing.assert_close(ours(x), ref(x))
    # Parameters count once when both live in one model.
    both = torch.nn.ModuleList([ref, ours])
    assert sum(p.numel() for p in both.parameters()) == sum(p.numel() for p in ref.parameters())


@pytest.mark.parametrize("case", ["self", "cross"])
def test_from_diffusers_matches(case):
    config, x_shape, ctx_shape = CASES[case]
    ref = _diffusers(config)
    ours = Attention.from_diffusers(ref, backend="torch")
    x, ctx = _inputs(x_shape, ctx_shape)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, ctx), ref(x, ctx))


def test_from_diffusers_rejects_unsupported():
    with pytest.raises(NotImplementedError, match="qk_norm"):
        Attention.from_diffusers(DiffusersAttention(64, heads=2, dim_head=32, qk_norm="layer_norm"))
    with pytest.raises(NotImplementedError, match="kv_heads"):
        Attention.from_diffusers(DiffusersAttention(64, heads=2, kv_heads=1, dim_head=32))


# ------------------------------------------------------------ bad input


def test_bad_inputs():
    ours = Attention(**CROSS)
    ctx = torch.randn(2, 77, 768)
    with pytest.raises(TypeError, match="torch.Tensor"):
        ours([[0.0]])
    with pytest.raises(ValueError, match="3-D .* or 4-D"):
        ours(torch.randn(2, 320))
    with pytest.raises(ValueError, match="query_dim=320"):
        ours(torch.randn(2, 8, 321), ctx)
    with pytest.raises(ValueError, match="query_dim=320"):
        ours(torch.randn(2, 8, 4, 4), ctx)  # a 4-D input is (B, C, H, W)
    with pytest.raises(ValueError, match="cross_attention_dim=768"):
        ours(torch.randn(2, 8, 320), torch.randn(2, 77, 320))
    with pytest.raises(ValueError, match="batch"):
        ours(torch.randn(2, 8, 320), torch.randn(1, 77, 768))
    with pytest.raises(TypeError, match="dtype"):
        ours(torch.randn(2, 8, 320).to(torch.float64), ctx)
    with pytest.raises(TypeError, match="dtype"):
        ours(torch.randn(2, 8, 320), ctx.half())
    with pytest.raises(ValueError, match="no tokens"):
        ours(torch.randn(2, 0, 320), ctx)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(qk_norm="rms_norm"), "qk_norm"),
        (dict(added_kv_proj_dim=32), "added_kv_proj_dim"),
        (dict(spatial_norm_dim=4), "spatial_norm_dim"),
        (dict(kv_heads=1), "kv_heads"),
        (dict(is_causal=True), "is_causal"),
        (dict(pre_only=True), "pre_only"),
        (dict(processor=object()), "processor"),
    ],
)
def test_unsupported_constructor_args_raise(kwargs, match):
    with pytest.raises(NotImplementedError, match=match):
        Attention(64, heads=2, dim_head=32, **kwargs)


def test_bad_constructor_args():
    with pytest.raises(ValueError, match="heads"):
        Attention(64, heads=0)
    with pytest.raises(ValueError, match="out_dim"):
        Attention(64, heads=2, dim_head=32, out_dim=50)
    with pytest.raises(ValueError, match="cross_attention_norm"):
        Attention(64, cross_attention_norm="batch_norm")
    # diffusers' constructor arguments are accepted positionally in diffusers' order.
    a = Attention(64, 48, 2, None, 32, 0.0, True)
    assert a.cross_attention_dim == 48 and a.heads == 2 and a.to_q.bias is not None
