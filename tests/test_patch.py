"""``fastgen.patch``: diffusers models and pipelines on fastgen's kernels give diffusers' outputs, keep their
weights, LoRAs and state dicts, and ``unpatch`` restores them exactly."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

import fastgen
from drop_in_helpers import (CONTROLNET, UNET, VAE, assert_images_close, run, sd_pipeline, sdxl_pipeline, twin)
from model_helpers import assert_fp32_close, perturbed

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::FutureWarning",
                                        "ignore::DeprecationWarning", "ignore::UserWarning")


def _unet_inputs(batch=2, hw=(16, 16), ctx_dim=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(sample=torch.randn(batch, 4, *hw, generator=g), timestep=torch.tensor([3, 901][:batch]),
                encoder_hidden_states=torch.randn(batch, 7, ctx_dim, generator=g))


def _model(cls, config, seed=0):
    torch.manual_seed(seed)
    return perturbed(cls(**config), seed)


def _forward_all(model, args):
    with torch.no_grad():
        return model(**args)


# ------------------------------------------------------------------ models


def test_unet_2d_condition_matches_and_unpatches():
    unet = _model(diffusers.UNet2DConditionModel, UNET)
    args = _unet_inputs()
    keys = list(unet.state_dict())
    params = {n: p for n, p in unet.named_parameters()}
    ref = _forward_all(unet, args).sample
    report = fastgen.patch(unet)
    # 7 transformer blocks (down 2, mid 1, up 4) x self + cross attention; 8 ResNets; every conv
    assert report.counts == dict(attention=14, resnet=8, group_norm=24, conv=39, feed_forward=7, scheduler=0, vae=0)
    assert report.seconds < 1.0 and not report.left
    out = _forward_all(unet, args).sample
    assert_fp32_close(out, ref, "patched UNet2DConditionModel")
    assert not torch.equal(out, ref), "patched output is bit-identical: the kernels did not run"
    # the same parameter objects under the same names
    assert list(unet.state_dict()) == keys
    assert all(p is params[n] for n, p in unet.named_parameters())
    assert fastgen.is_patched(unet)
    fastgen.unpatch(unet)
    assert not fastgen.is_patched(unet)
    assert torch.equal(_forward_all(unet, args).sample, ref)
    assert not any("forward" in m.__dict__ for m in unet.modules())
    assert all(type(m.processor).__name__ == "AttnProcessor2_0" for m in unet.modules() if hasattr(m, "processor"))


def test_resolution_and_batch_change_need_nothing():
    unet = _model(diffusers.UNet2DConditionModel, UNET)
    patched = copy.deepcopy(unet)
    fastgen.patch(patched)
    for batch, hw in ((1, (8, 8)), (2, (24, 16)), (3, (16, 32))):
        args = _unet_inputs(batch=batch, hw=hw)
        args["timestep"] = torch.tensor([500] * batch)
        assert_fp32_close(_forward_all(patched, args).sample, _forward_all(unet, args).sample, f"{batch}x{hw}")


def test_attention_mask_and_lora_scale_honoured():
    unet = _model(diffusers.UNet2DConditionModel, UNET)
    patched = copy.deepcopy(unet)
    fastgen.patch(patched)
    args = _unet_inputs()
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, 4:] = False
    args["encoder_attention_mask"] = mask
    ref = _forward_all(unet, args).sample
    assert_fp32_close(_forward_all(patched, args).sample, ref, "with an encoder attention mask")
    unmasked = _forward_all(unet, _unet_inputs()).sample
    assert (ref - unmasked).abs().max() > 1e-4, "the mask changed nothing (test proves nothing)"


def test_patching_twice_is_harmless():
    unet = _model(diffusers.UNet2DConditionModel, UNET)
    args = _unet_inputs()
    ref = _forward_all(unet, args).sample
    first = fastgen.patch(unet)
    once = _forward_all(unet, args).sample
    second = fastgen.patch(unet)
    assert second.total == 0 and second.already == first.total
    assert torch.equal(_forward_all(unet, args).sample, once)
    fastgen.unpatch(unet)
    assert torch.equal(_forward_all(unet, args).sample, ref)


def test_bf16_follows_the_low_precision_rule():
    from helpers import assert_lowp_close

    unet = _model(diffusers.UNet2DConditionModel, UNET)
    args = _unet_inputs()
    ref32 = _forward_all(unet, args).sample
    lowp = copy.deepcopy(unet).to(torch.bfloat16)
    args16 = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in args.items()}
    torch_bf16 = _forward_all(lowp, args16).sample
    fastgen.patch(lowp)
    out = _forward_all(lowp, args16).sample
    assert out.dtype == torch.bfloat16
    assert_lowp_close(out, ref32, torch_bf16, what="patched bf16 UNet2DConditionModel")


def test_unet_2d_matches():
    config = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, attention_head_dim=8,
                  down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                  num_class_embeds=3, resnet_time_scale_shift="scale_shift")
    unet = _model(diffusers.UNet2DModel, config)
    g = torch.Generator().manual_seed(0)
    args = dict(sample=torch.randn(2, 3, 16, 16, generator=g), timestep=torch.tensor([10, 500]),
                class_labels=torch.tensor([0, 2]))
    ref = _forward_all(unet, args).sample
    report = fastgen.patch(unet)
    assert report.counts["resnet"] > 0 and report.counts["attention"] > 0
    assert_fp32_close(_forward_all(unet, args).sample, ref, "patched UNet2DModel")
    fastgen.unpatch(unet)
    assert torch.equal(_forward_all(unet, args).sample, ref)


def test_autoencoder_kl_matches_and_tiles_large_latents():
    vae = _model(diffusers.AutoencoderKL, VAE)
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        ref_latent = vae.encode(x).latent_dist.mean
        ref = vae.decode(ref_latent).sample
        big = torch.randn(1, 4, 40, 24, generator=torch.Generator().manual_seed(1))
        vae.enable_tiling()
        tiled_ref = vae.decode(big).sample
        vae.disable_tiling()
        untiled_ref = vae.decode(big).sample
        report = fastgen.patch(vae, vae_tiling_min_size=32)
        assert report.counts["vae"] == 1 and report.counts["attention"] == 2
        assert_fp32_close(vae.encode(x).latent_dist.mean, ref_latent, "patched encode")
        assert_fp32_close(vae.decode(ref_latent).sample, ref, "patched decode")
        # a 40x24 latent is above 32: diffusers' own tiled decode (its grid and blend), not the untiled one
        tiled = vae.decode(big).sample
        assert_fp32_close(tiled, tiled_ref, "auto-tiled decode")
        assert (tiled_ref - untiled_ref).abs().max() > 1e-3, "tiling changed nothing (test proves nothing)"
    fastgen.unpatch(vae)
    with torch.no_grad():
        assert torch.equal(vae.decode(big).sample, untiled_ref)


def test_controlnet_matches():
    controlnet = _model(diffusers.ControlNetModel, CONTROLNET)
    args = _unet_inputs()
    args["controlnet_cond"] = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    ref = _forward_all(controlnet, args)
    report = fastgen.patch(controlnet)
    assert report.counts["resnet"] > 0 and report.counts["attention"] > 0
    out = _forward_all(controlnet, args)
    for i, (a, b) in enumerate(zip(out.down_block_res_samples, ref.down_block_res_samples)):
        assert_fp32_close(a, b, f"controlnet down residual {i}")
    assert_fp32_close(out.mid_block_res_sample, ref.mid_block_res_sample, "controlnet mid residual")


def test_options_select_kinds():
    unet = _model(diffusers.UNet2DConditionModel, UNET)
    report = fastgen.patch(unet, attention=False, conv=False, feed_forward=False)
    assert report.counts["attention"] == report.counts["conv"] == report.counts["feed_forward"] == 0
    assert report.counts["resnet"] == 8
    args = _unet_inputs()
    patched = _forward_all(unet, args).sample
    fastgen.unpatch(unet)
    assert_fp32_close(patched, _forward_all(unet, args).sample, "norm-only patch")


def test_user_processors_and_wrapped_forwards_are_left_alone():
    from diffusers.models.attention_processor import AttnProcessor

    unet = _model(diffusers.UNet2DConditionModel, UNET)
    unet.set_attn_processor(AttnProcessor())  # the user's choice, not the default 2.0 processor ... 
    mine = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1

    class Custom:
        def __call__(self, attn, hidden_states, *args, **kwargs):
            return hidden_states

    mine.set_processor(Custom())
    conv = unet.conv_in
    conv.forward = torch.nn.Conv2d.forward.__get__(conv)  # someone else's rebinding (an offload hook)
    report = fastgen.patch(unet)
    assert isinstance(mine.processor, Custom)
    assert conv.__dict__["forward"].__func__ is torch.nn.Conv2d.forward
    reasons = [why for _, why in report.left]
    assert any("Custom" in why for why in reasons) and any("already replaced" in why for why in reasons)
    assert report.counts["attention"] == 13  # AttnProcessor is diffusers' default too: covered


def test_bad_targets_raise_type_error():
    with pytest.raises(TypeError, match="diffusers pipeline"):
        fastgen.patch(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="diffusers pipeline"):
        fastgen.patch("unet")
    with pytest.raises(TypeError, match="fastgen's own model"):
        fastgen.patch(fastgen.models.UNet2DConditionModel(**UNET))
    with pytest.raises(ValueError, match="vae_tiling_min_size"):
        fastgen.patch(_model(diffusers.AutoencoderKL, VAE), vae_tiling_min_size=0)


# ------------------------------------------------------------------ pipelines


def test_sd_pipeline_matches_and_unpatches():
    pipe = sd_pipeline()
    ref = run(pipe, guidance_scale=7.5)
    pil_ref = run(pipe, output_type="pil")
    scheduler = pipe.scheduler
    report = fastgen.patch(pipe)
    assert report.counts["scheduler"] == 1 and report.counts["vae"] == 2
    assert type(pipe.scheduler).__module__.startswith("fastgen.")
    assert pipe.config["scheduler"][0] == "diffusers"  # model_index.json still names diffusers' class
    assert_images_close(run(pipe, guidance_scale=7.5), ref, "patched StableDiffusionPipeline")
    pil = run(pipe, output_type="pil")
    diff = np.abs(np.asarray(pil[0], dtype=np.int16) - np.asarray(pil_ref[0], dtype=np.int16)).max()
    assert diff <= 1, f"PIL images differ by {diff} levels"
    fastgen.unpatch(pipe)
    assert pipe.scheduler is scheduler
    assert np.array_equal(run(pipe, guidance_scale=7.5), ref)


def test_ddim_pipeline_keeps_the_pipelines_config_fixes():
    # An outdated DDIM config: the pipeline rewrites steps_offset to 1 and clip_sample to False when built;
    # diffusers lists both in _use_default_values, so a plain from_config would reset them.
    pipe = sd_pipeline(scheduler="DDIMScheduler", steps_offset=0, clip_sample=True)
    assert pipe.scheduler.config.steps_offset == 1 and pipe.scheduler.config.clip_sample is False
    ref = run(pipe, steps=4)
    fastgen.patch(pipe)
    assert pipe.scheduler.config.steps_offset == 1 and pipe.scheduler.config.clip_sample is False
    assert_images_close(run(pipe, steps=4), ref, "patched DDIM pipeline")


def test_unknown_scheduler_is_left_and_reported():
    pipe = sd_pipeline()
    pipe.scheduler = diffusers.PNDMScheduler.from_config(pipe.scheduler.config)
    report = fastgen.patch(pipe)
    assert isinstance(pipe.scheduler, diffusers.PNDMScheduler)
    assert any(where == "scheduler" and "PNDMScheduler" in why for where, why in report.left)


def test_img2img_pipeline_matches():
    pipe = sd_pipeline("StableDiffusionImg2ImgPipeline")
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    ref = run(pipe, steps=4, image=image, strength=0.6)
    fastgen.patch(pipe)
    assert_images_close(run(pipe, steps=4, image=image, strength=0.6), ref, "patched img2img")


def test_inpaint_pipeline_matches():
    pipe = sd_pipeline("StableDiffusionInpaintPipeline")  # a 4-channel U-Net: the latents are blended by mask
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1.0
    kwargs = dict(steps=4, image=image, mask_image=mask, height=32, width=32)
    ref = run(pipe, **kwargs)
    report = fastgen.patch(pipe)
    assert report.counts["vae"] == 2  # its mask_processor is not the output's and stays diffusers'
    assert_images_close(run(pipe, **kwargs), ref, "patched inpaint")


def test_sdxl_pipeline_matches():
    pipe = sdxl_pipeline()
    ref = run(pipe, steps=3, height=32, width=32)
    report = fastgen.patch(pipe)
    assert report.counts["scheduler"] == 1 and report.counts["attention"] > 0
    assert_images_close(run(pipe, steps=3, height=32, width=32), ref, "patched StableDiffusionXLPipeline")


def test_controlnet_pipeline_matches():
    from drop_in_helpers import sd_components

    torch.manual_seed(0)
    controlnet = perturbed(diffusers.ControlNetModel(**CONTROLNET), 7)
    pipe = diffusers.StableDiffusionControlNetPipeline(controlnet=controlnet, **sd_components())
    pipe.set_progress_bar_config(disable=True)
    cond = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    ref = run(pipe, image=cond)
    report = fastgen.patch(pipe)
    assert report.counts["resnet"] > 14  # the U-Net's, the VAE's and the ControlNet's
    assert_images_close(run(pipe, image=cond), ref, "patched ControlNet pipeline")


@pytest.mark.parametrize("order", ["offload_then_patch", "patch_then_offload"])
def test_model_cpu_offload_keeps_working(order):
    pipe = sd_pipeline()
    ref = run(pipe)
    steps = [lambda: pipe.enable_model_cpu_offload(device="cpu"), lambda: fastgen.patch(pipe)]
    for step in steps if order == "offload_then_patch" else steps[::-1]:
        step()
    assert hasattr(pipe.unet, "_hf_hook")
    assert_images_close(run(pipe), ref, f"model CPU offload ({order})")
    fastgen.unpatch(pipe)
    assert hasattr(pipe.unet, "_hf_hook")  # unpatch leaves accelerate's hooks in place
    assert np.array_equal(run(pipe), ref)


def test_save_pretrained_after_patching_writes_a_diffusers_folder(tmp_path):
    pipe = sd_pipeline()
    fastgen.patch(pipe)
    pipe.save_pretrained(tmp_path)
    again = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path)
    assert type(again.scheduler) is diffusers.DPMSolverMultistepScheduler
    assert again.scheduler.config.beta_schedule == "scaled_linear"
    assert again.scheduler.config.beta_start == pipe.scheduler.config.beta_start
    # the folder holds the same weights
    assert torch.equal(again.unet.conv_in.weight, pipe.unet.conv_in.weight)
