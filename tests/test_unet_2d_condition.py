"""fastgen's UNet2DConditionModel against diffusers' on small random configs: strict state-dict loads, the
same outputs (fp32: max abs diff <= 1e-4 x the output's scale; bf16 autocast: docs/design.md's low-precision
rule against diffusers under the same autocast), the same gradients, channels-last, checkpointing, compile,
and clear refusals."""

from __future__ import annotations

import warnings

import pytest
import torch

from fastgen.models import UNet2DConditionModel

from helpers import assert_lowp_close
from model_helpers import assert_fp32_close, assert_grads_close, pair

diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::FutureWarning")

# SD 1.x: conv projections, heads from attention_head_dim; channels 80/160 with 2 heads -> head dims 40, 80.
SD1 = dict(
    block_out_channels=(80, 160), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=2,
)
# SD 2.x: linear projections, per-block head counts (head dim 40 in both blocks), a deeper transformer.
SD2 = dict(
    block_out_channels=(80, 160), layers_per_block=(1, 2), norm_num_groups=16, cross_attention_dim=48,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2), upcast_attention=True,
)
# SDXL: text_time added conditions, no attention in the first block, nested transformer depths.
SDXL = dict(
    block_out_channels=(32, 64, 64), layers_per_block=(1, 1, 2), norm_num_groups=8, cross_attention_dim=40,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(1, 2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2, (1, 2)),
    reverse_transformer_layers_per_block=((1, 2, 1), (2, 2), (1, 1)),
    addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=24 + 6 * 8,
)
CLASSES = dict(SD1, num_class_embeds=5, resnet_time_scale_shift="scale_shift", time_cond_proj_dim=6)
TIMESTEP_CLASS = dict(SD1, class_embed_type="timestep", class_embeddings_concat=True, time_embedding_act_fn="silu")
PROJ = dict(SD1, encoder_hid_dim=20, encoder_hid_dim_type="text_proj", class_embed_type="projection",
            projection_class_embeddings_input_dim=12, resnet_skip_time_act=True, resnet_out_scale_factor=2.0)

CONFIGS = {"sd1": SD1, "sd2": SD2, "sdxl": SDXL, "classes": CLASSES, "timestep_class": TIMESTEP_CLASS, "proj": PROJ}


def _inputs(name, config, batch=2, hw=(16, 16), tokens=77, seed=1):
    g = torch.Generator().manual_seed(seed)
    ctx_dim = config.get("encoder_hid_dim") or config["cross_attention_dim"]
    args = dict(
        sample=torch.randn(batch, config.get("in_channels", 4), *hw, generator=g),
        timestep=torch.tensor([3, 901][:batch]),
        encoder_hidden_states=torch.randn(batch, tokens, ctx_dim, generator=g),
    )
    if name == "sdxl":
        args["added_cond_kwargs"] = dict(
            text_embeds=torch.randn(batch, 24, generator=g), time_ids=torch.tensor([[64.0, 64, 0, 0, 64, 64]] * batch)
        )
    if name == "classes":
        args["class_labels"] = torch.tensor([1, 4][:batch])
        args["timestep_cond"] = torch.randn(batch, 6, generator=g)
    if name == "timestep_class":
        args["class_labels"] = torch.tensor([7.0, 650.0][:batch])
    if name == "proj":
        args["class_labels"] = torch.randn(batch, 12, generator=g)
    return args


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_diffusers(name):
    config = CONFIGS[name]
    ref, ours = pair(diffusers.UNet2DConditionModel, UNet2DConditionModel, config)
    # odd token counts (77, 13) and a size the U-Net's downsampling does not divide (upsample_size path)
    for hw, tokens in (((16, 16), 77), ((17, 11), 13)):
        args = _inputs(name, config, hw=hw, tokens=tokens)
        with torch.no_grad():
            expected = ref(**args).sample
            got = ours(**args).sample
        assert_fp32_close(got, expected, f"{name} {hw} {tokens} tokens")


def test_masks_and_controlnet_residuals():
    ref, ours = pair(diffusers.UNet2DConditionModel, UNet2DConditionModel, SD1)
    args = _inputs("sd1", SD1, tokens=9)
    args["encoder_attention_mask"] = torch.tensor([[1, 1, 1, 0, 0, 1, 1, 1, 1], [1] * 8 + [0]])
    with torch.no_grad():
        probe = ours.down_blocks[0](ours.conv_in(args["sample"]), torch.zeros(2, 320),
                                    encoder_hidden_states=args["encoder_hidden_states"])
        shapes = [ours.conv_in(args["sample"]).shape] + [t.shape for t in probe[1]]
        shapes += [t.shape for t in ours.down_blocks[1](probe[0], torch.zeros(2, 320))[1]]
        g = torch.Generator().manual_seed(3)
        args["down_block_additional_residuals"] = tuple(torch.randn(s, generator=g) for s in shapes)
        args["mid_block_additional_residual"] = torch.randn(shapes[-1], generator=g)
        expected, got = ref(**args).sample, ours(**args).sample
    assert_fp32_close(got, expected, "masked cross-attention + ControlNet residuals")


def test_bf16_autocast_follows_the_low_precision_rule():
    ref, ours = pair(diffusers.UNet2DConditionModel, UNet2DConditionModel, SD1)
    args = _inputs("sd1", SD1, tokens=13)
    with torch.no_grad():
        fp32 = ref(**args).sample
        with torch.autocast("cpu", dtype=torch.bfloat16):
            theirs = ref(**args).sample
            got = ours(**args).sample
    assert got.dtype == torch.bfloat16
    assert_lowp_close(got, fp32, theirs, what="bf16 autocast U-Net")


def test_channels_last_model_and_input():
    ref, ours = pair(diffusers.UNet2DConditionModel, UNet2DConditionModel, SD2)
    args = _inputs("sd2", SD2, tokens=13)
    with torch.no_grad():
        expected = ref(**args).sample
        ours = ours.to(memory_format=torch.channels_last)
        args["sample"] = args["sample"].to(memory_format=torch.channels_last)
        got = ours(**args).sample
    assert_fp32_close(got, expected, "channels_last")


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradients_match_diffusers(checkpointing):
    ref, ours = pair(diffusers.UNet2DConditionModel, UNet2DConditionModel, SD1)
    ref.train(), ours.train()
    if checkpointing:
        ours.enable_gradient_checkpointing()
        assert ours.is_gradient_checkpointing
    args = _inputs("sd1", SD1, tokens=13)
    target = torch.randn_like(args["sample"])
    for model in (ref, ours):
        ((model(**args).sample - target) ** 2).mean().backward()
    assert_grads_close(ours, ref, [
        "conv_in.weight", "conv_out.weight", "conv_norm_out.weight",
        "down_blocks.0.resnets.0.norm1.weight", "down_blocks.0.attentions.0.norm.weight",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
        "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight",
        "mid_block.attentions.0.transformer_blocks.0.norm3.weight", "time_embedding.linear_1.weight",
    ])


def test_compiles_without_graph_breaks():
    """fullgraph=True fails on any graph break; the aot_eager backend traces the fused ops through their fake
    kernels and AOTAutograd like inductor does, without inductor's C++ code generation (minutes here)."""
    _, ours = pair(diffusers.UNet2DConditionModel, UNet2DConditionModel, SD1)
    args = _inputs("sd1", SD1, tokens=13)
    with torch.no_grad():
        expected = ours(**args).sample
        got = torch.compile(ours, fullgraph=True, backend="aot_eager")(**args).sample
    assert_fp32_close(got, expected, "torch.compile(fullgraph=True)")


def test_config_round_trip_and_attribute_access():
    model = UNet2DConditionModel(**SDXL)
    again = UNet2DConditionModel.from_config(model.config)
    assert dict(again.config) == dict(model.config)
    assert set(again.state_dict()) == set(diffusers.UNet2DConditionModel(**SDXL).state_dict())
    with pytest.warns(FutureWarning, match="in_channels"):
        assert model.in_channels == 4


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(attention_type="gated"), "attention_type='gated'"),
        (dict(time_embedding_type="fourier"), "time_embedding_type='fourier'"),
        (dict(addition_embed_type="text"), "addition_embed_type='text'"),
        (dict(dual_cross_attention=True), "dual_cross_attention=True"),
        (dict(only_cross_attention=True), "only_cross_attention=True"),
        (dict(mid_block_type="UNetMidBlock2DSimpleCrossAttn"), "mid_block_type"),
        (dict(down_block_types=("SimpleCrossAttnDownBlock2D", "DownBlock2D")), "SimpleCrossAttnDownBlock2D"),
        (dict(cross_attention_norm="group_norm"), "cross_attention_norm"),
    ],
)
def test_unimplemented_options_are_refused_by_name(change, match):
    with pytest.raises(NotImplementedError, match=match):
        UNet2DConditionModel(**{**SD1, **change})


def test_unknown_config_keys_are_refused():
    with pytest.raises(ValueError, match=r"\['not_a_key'\]"):
        UNet2DConditionModel.from_config({**SD1, "not_a_key": 1, "_class_name": "UNet2DConditionModel"})


def test_bad_inputs_give_clear_errors():
    model = UNet2DConditionModel(**SDXL)
    args = _inputs("sdxl", SDXL, tokens=5)
    with pytest.raises(ValueError, match=r"in_channels=4"):
        model(**{**args, "sample": torch.randn(2, 3, 16, 16)})
    with pytest.raises(ValueError, match="encoder_hidden_states must be"):
        model(**{**args, "encoder_hidden_states": torch.randn(2, 40)})
    with pytest.raises(ValueError, match="time_ids"):
        model(**{**args, "added_cond_kwargs": {"text_embeds": torch.randn(2, 24)}})
    with pytest.raises(ValueError, match="timestep must be"):
        model(**{**args, "timestep": torch.tensor([1, 2, 3])})
    with pytest.raises(ValueError, match="class_labels"):
        UNet2DConditionModel(**CLASSES)(**_inputs("sd1", CLASSES, tokens=5))
    with pytest.raises(NotImplementedError, match="cross_attention_kwargs"):
        UNet2DConditionModel(**SD1)(**_inputs("sd1", SD1, tokens=5), cross_attention_kwargs={"gligen": 1})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        UNet2DConditionModel(**SD1)(**_inputs("sd1", SD1, tokens=5), cross_attention_kwargs={"scale": 0.5})
