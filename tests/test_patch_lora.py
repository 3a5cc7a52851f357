"""LoRAs and ``fastgen.patch``: loaded before or after patching, switched with ``set_adapters``, scaled through
``cross_attention_kwargs`` and fused, a patched pipeline gives the unpatched pipeline's images."""

from __future__ import annotations

import pytest
import torch

import fastgen
from drop_in_helpers import UNET, assert_images_close, run, sd_pipeline, twin

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::FutureWarning",
                                        "ignore::DeprecationWarning", "ignore::UserWarning")

# Attention projections, the feed-forward and the ResNets' convolutions: every patched kind carries a LoRA.
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj", "conv1", "conv2"]


def _lora_file(folder, seed: int, name: str) -> str:
    """A random LoRA for the tiny U-Net in diffusers' file format (``unet.``-prefixed peft keys)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**UNET)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False))
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_" in n:
                p.mul_(0.3)  # moves the images visibly; much larger makes the tiny random net chaotic
    layers = get_peft_model_state_dict(unet)
    diffusers.StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, weight_name=name)
    return name


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    return folder, _lora_file(folder, 1, "a.safetensors"), _lora_file(folder, 2, "b.safetensors")


def _with_loras(pipe, loras):
    folder, a, b = loras
    pipe.load_lora_weights(folder, weight_name=a, adapter_name="a")
    pipe.load_lora_weights(folder, weight_name=b, adapter_name="b")
    return pipe


def test_lora_loaded_before_and_after_patching(loras):
    base = sd_pipeline()
    plain = run(base)
    ref = _with_loras(twin(base), loras)
    ref_images = run(ref)
    assert abs(ref_images - plain).max() > 1e-3, "the LoRAs change nothing (test proves nothing)"

    before = _with_loras(twin(base), loras)
    fastgen.patch(before)
    assert_images_close(run(before), ref_images, "LoRA loaded before patching")

    after = twin(base)
    fastgen.patch(after)
    _with_loras(after, loras)
    assert_images_close(run(after), ref_images, "LoRA loaded after patching")
    # Patching again after the load leaves what is patched (the LoRA wrappers' base layers among it) and
    # covers only the new modules: the LoRAs' own lora_A / lora_B convolutions.
    report = fastgen.patch(after)
    assert report.already > 0 and report.counts["resnet"] == report.counts["attention"] == 0
    assert report.counts["conv"] == 2 * 2 * 16  # 2 adapters x (lora_A, lora_B) x 16 conv1/conv2 layers
    assert_images_close(run(after), ref_images, "LoRA after patching twice")

    for weights in ([1.0, 0.0], [0.3, 1.2]):
        ref.set_adapters(["a", "b"], weights)
        after.set_adapters(["a", "b"], weights)
        assert_images_close(run(after), run(ref), f"set_adapters {weights}")

    scale = {"scale": 0.4}
    assert_images_close(run(after, cross_attention_kwargs=scale), run(ref, cross_attention_kwargs=scale),
                        "cross_attention_kwargs scale")
    assert abs(run(ref, cross_attention_kwargs=scale) - run(ref)).max() > 1e-4, "scale changed nothing"


def test_fuse_and_unfuse_lora_after_patching(loras):
    base = sd_pipeline()
    ref = _with_loras(twin(base), loras)
    patched = _with_loras(twin(base), loras)
    fastgen.patch(patched)
    run(patched)  # the conv weight transforms are cached now; fusing must invalidate them
    for pipe in (ref, patched):
        pipe.set_adapters(["a"], [1.0])
        pipe.fuse_lora(adapter_names=["a"], lora_scale=0.7)
        pipe.set_adapters(["a"], [0.0])  # only the fused weights act
    assert_images_close(run(patched), run(ref), "fused LoRA")
    for pipe in (ref, patched):
        pipe.unfuse_lora()
    assert_images_close(run(patched), run(ref), "unfused LoRA")


def test_unpatch_with_lora_restores_identity(loras):
    pipe = _with_loras(sd_pipeline(), loras)
    ref = run(pipe)
    keys = list(pipe.unet.state_dict())
    fastgen.patch(pipe)
    assert list(pipe.unet.state_dict()) == keys
    fastgen.unpatch(pipe)
    assert (run(pipe) == ref).all()
