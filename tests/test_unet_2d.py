"""fastgen's UNet2DModel (pixel-space DDPM U-Net) against diffusers' on small random configs: strict loads,
fp32 outputs within 1e-4 of the output's scale, gradients, bf16 autocast, and refusals by name."""

from __future__ import annotations

import pytest
import torch

from fastgen.models import UNet2DModel

from helpers import assert_lowp_close
from model_helpers import assert_fp32_close, assert_grads_close, pair

diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

DDPM = dict(
    block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, attention_head_dim=8,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
)
CONFIGS = {
    "ddpm": DDPM,
    # class-conditional, one head per block (head dim = channels), scale-shift time conditioning
    "classes": dict(DDPM, num_class_embeds=4, attention_head_dim=None, resnet_time_scale_shift="scale_shift"),
    "learned_time_no_mid_attention": dict(DDPM, time_embedding_type="learned", num_train_timesteps=1000,
                                          add_attention=False, attn_norm_num_groups=4),
    "timestep_class_no_mid": dict(DDPM, mid_block_type=None, class_embed_type="timestep", center_input_sample=True),
}
LABELS = {"classes": torch.tensor([0, 3]), "timestep_class_no_mid": torch.tensor([5.0, 900.0])}


def _inputs(name, hw=(16, 16)):
    g = torch.Generator().manual_seed(1)
    return dict(sample=torch.randn(2, 3, *hw, generator=g), timestep=torch.tensor([10, 500]),
                class_labels=LABELS.get(name))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_diffusers(name):
    ref, ours = pair(diffusers.UNet2DModel, UNet2DModel, CONFIGS[name])
    args = _inputs(name)
    with torch.no_grad():
        assert_fp32_close(ours(**args).sample, ref(**args).sample, name)
        # a python-int timestep, broadcast like diffusers
        assert_fp32_close(ours(args["sample"], 7, args["class_labels"]).sample,
                          ref(args["sample"], 7, args["class_labels"]).sample, f"{name} int timestep")


def test_gradients_bf16_and_channels_last():
    ref, ours = pair(diffusers.UNet2DModel, UNet2DModel, CONFIGS["classes"])
    args = _inputs("classes")
    with torch.no_grad():
        fp32 = ref(**args).sample
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert_lowp_close(ours(**args).sample, fp32, ref(**args).sample, what="bf16 autocast UNet2DModel")
        cl = ours.to(memory_format=torch.channels_last)
        assert_fp32_close(cl(**{**args, "sample": args["sample"].to(memory_format=torch.channels_last)}).sample,
                          fp32, "channels_last")
        ours = ours.to(memory_format=torch.contiguous_format)
    ref.train(), ours.train()
    ours.enable_gradient_checkpointing()
    for model in (ref, ours):
        model(**args).sample.square().mean().backward()
    assert_grads_close(ours, ref, ["conv_in.weight", "conv_norm_out.bias", "class_embedding.weight",
                                   "down_blocks.1.attentions.0.to_q.weight", "mid_block.resnets.1.conv2.weight",
                                   "up_blocks.0.attentions.1.group_norm.weight"])


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(time_embedding_type="fourier"), "time_embedding_type='fourier'"),
        (dict(down_block_types=("SkipDownBlock2D", "AttnDownBlock2D")), "SkipDownBlock2D"),
        (dict(downsample_type="resnet"), "downsample_type='resnet'"),
        (dict(resnet_time_scale_shift="spatial"), "resnet_time_scale_shift='spatial'"),
    ],
)
def test_unimplemented_options_are_refused_by_name(change, match):
    with pytest.raises(NotImplementedError, match=match):
        UNet2DModel(**{**DDPM, **change})


def test_bad_inputs():
    model = UNet2DModel(**DDPM)
    with pytest.raises(ValueError, match="in_channels=3"):
        model(torch.randn(1, 4, 16, 16), 1)
    with pytest.raises(ValueError, match="no class embedding"):
        model(torch.randn(1, 3, 16, 16), 1, class_labels=torch.tensor([1]))
    with pytest.raises(ValueError, match="class_labels are needed"):
        UNet2DModel(**CONFIGS["classes"])(torch.randn(1, 3, 16, 16), 1)
