"""LatentDiffusionPipeline against diffusers' StableDiffusionPipeline on the same weights, its folders, its
conditions and its errors."""

import json

import numpy as np
import pytest
import torch

from fastgen.bench.offline import tiny_latent_pipeline
from fastgen.pipelines import ImagePipelineOutput, LatentDiffusionPipeline

pytestmark = pytest.mark.usefixtures("one_thread")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def prompt_pipe():
    return tiny_latent_pipeline("prompt", seed=0)


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_matches_diffusers_stable_diffusion(prompt_pipe, tmp_path, guidance, diffusers_twin):
    prompt_pipe.save_pretrained(tmp_path)
    sd = diffusers_twin(tmp_path)
    ours = prompt_pipe("a red cat", seeds=[7], num_inference_steps=6, guidance_scale=guidance, output_type="pt")
    theirs = sd("a red cat", generator=torch.Generator().manual_seed(7), num_inference_steps=6,
                guidance_scale=guidance, output_type="pt").images
    assert ours.images.shape == theirs.shape == (1, 3, 32, 32)
    torch.testing.assert_close(ours.images, theirs, atol=2e-4, rtol=0)


def test_negative_prompt_and_batch_generator_match_diffusers(prompt_pipe, tmp_path, diffusers_twin):
    prompt_pipe.save_pretrained(tmp_path)
    sd = diffusers_twin(tmp_path)
    kw = dict(num_inference_steps=4, guidance_scale=3.0, output_type="pt", negative_prompt=["blur", "blur"])
    ours = prompt_pipe(["a cat", "a dog"], generator=torch.Generator().manual_seed(3), **kw).images
    theirs = sd(["a cat", "a dog"], generator=torch.Generator().manual_seed(3), **kw).images
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=0)


def test_from_pretrained_reads_a_diffusers_saved_pipeline(prompt_pipe, tmp_path, diffusers_twin):
    prompt_pipe.save_pretrained(tmp_path / "fg")
    sd = diffusers_twin(tmp_path / "fg")
    sd.save_pretrained(tmp_path / "sd")
    index = json.loads((tmp_path / "sd" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    loaded = LatentDiffusionPipeline.from_pretrained(tmp_path / "sd")
    assert loaded.conditioning == "prompt" and loaded.default_size() == (32, 32)
    ours = loaded("a cat", seeds=[1], num_inference_steps=4, guidance_scale=5.0, output_type="pt").images
    theirs = sd("a cat", generator=torch.Generator().manual_seed(1), num_inference_steps=4, guidance_scale=5.0,
                output_type="pt").images
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=0)


@pytest.mark.parametrize("conditioning", ["prompt", "class", "none"])
def test_save_and_load_round_trip(tmp_path, conditioning):
    pipe = tiny_latent_pipeline(conditioning, seed=1)
    pipe.save_pretrained(tmp_path)
    loaded = LatentDiffusionPipeline.from_pretrained(tmp_path)
    assert loaded.conditioning == conditioning
    assert loaded.class_names == pipe.class_names and loaded.default_num_inference_steps == 8
    kw = {"prompt": "a cat"} if conditioning == "prompt" else ({"class_labels": 3} if conditioning == "class" else {})
    a = pipe(**kw, seeds=[5], num_inference_steps=3, output_type="pt").images
    b = loaded(**kw, seeds=[5], num_inference_steps=3, output_type="pt").images
    assert torch.equal(a, b)


def test_class_conditioning_and_guidance_change_the_image():
    pipe = tiny_latent_pipeline("class", seed=2)
    kw = dict(seeds=[4], num_inference_steps=3, output_type="pt")
    three = pipe(class_labels=3, guidance_scale=4.0, **kw).images
    assert torch.equal(three, pipe(class_labels="3", guidance_scale=4.0, **kw).images)  # a name is its index
    assert (three - pipe(class_labels=5, guidance_scale=4.0, **kw).images).abs().max() > 1e-4
    assert (three - pipe(class_labels=3, guidance_scale=1.0, **kw).images).abs().max() > 1e-4


def test_output_types_and_output_object():
    pipe = tiny_latent_pipeline("none", seed=3)
    kw = dict(num_images_per_prompt=2, seeds=[0, 1], num_inference_steps=2)
    pt = pipe(**kw, output_type="pt")
    assert isinstance(pt, ImagePipelineOutput) and pt[0] is pt.images and pt.images.shape == (2, 3, 32, 32)
    assert 0 <= float(pt.images.min()) and float(pt.images.max()) <= 1
    arr = pipe(**kw, output_type="np").images
    assert isinstance(arr, np.ndarray) and arr.shape == (2, 32, 32, 3)
    np.testing.assert_allclose(arr, pt.images.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    pil = pipe(**kw, output_type="pil").images
    assert len(pil) == 2 and pil[0].size == (32, 32)
    latents = pipe(**kw, output_type="latent", return_dict=False)[0]
    assert latents.shape == (2, 3, 16, 16)
    # a seed is the same image alone or in a batch, and different seeds differ
    alone = pipe(num_images_per_prompt=1, seeds=[1], num_inference_steps=2, output_type="pt").images
    torch.testing.assert_close(alone[0], pt.images[1], atol=1e-5, rtol=0)
    assert (pt.images[0] - pt.images[1]).abs().max() > 1e-3


def test_errors(prompt_pipe, tmp_path):
    classes = tiny_latent_pipeline("class", seed=0)
    with pytest.raises(ValueError, match="unknown class 'eleven'"):
        classes(class_labels="eleven", seeds=[0])
    with pytest.raises(ValueError, match="out of range: this model has 10 classes"):
        classes(class_labels=10, seeds=[0])
    with pytest.raises(ValueError, match="conditioned on class labels, not prompts"):
        classes("a cat", seeds=[0])
    with pytest.raises(ValueError, match="conditioned on prompts: send a prompt"):
        prompt_pipe(seeds=[0])
    with pytest.raises(ValueError, match="output_type must be one of"):
        prompt_pipe("a cat", output_type="jpeg")
    with pytest.raises(ValueError, match="2 seeds for 1 images"):
        prompt_pipe("a cat", seeds=[1, 2])
    with pytest.raises(ValueError, match="multiples of 2"):
        prompt_pipe("a cat", height=33, seeds=[0])
    with pytest.raises(ValueError, match="latents must be"):
        prompt_pipe("a cat", latents=torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="not both"):
        prompt_pipe("a cat", class_labels=1)
    with pytest.raises(ValueError, match="needs a text_encoder"):
        LatentDiffusionPipeline(prompt_pipe.unet, prompt_pipe.scheduler)
    from fastgen.io import CheckpointNotFoundError

    with pytest.raises(CheckpointNotFoundError):
        LatentDiffusionPipeline.from_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        LatentDiffusionPipeline.from_pretrained(tmp_path / "empty")


def test_trained_export_is_a_pipeline_folder(digits, tmp_path):
    from fastgen.train import TrainConfig
    from fastgen.train.diffusion import DiffusionOptions, DiffusionTrainer

    options = DiffusionOptions(space="pixel", image_size=16, conditioning="prompt", class_names=digits.class_names,
                               block_out_channels=(16,), norm_num_groups=8, cross_attention_dim=16, sample_steps=3)
    trainer = DiffusionTrainer(digits, options, TrainConfig(steps=1, batch_size=4, out_dir=str(tmp_path / "run"),
                                                            progress=False, sample_every=0))
    model = trainer.model()
    model.denoiser.eval()
    model.save(tmp_path / "model")
    pipe = LatentDiffusionPipeline.from_pretrained(tmp_path / "model")
    assert pipe.conditioning == "prompt" and pipe.vae is None and pipe.class_names == list(digits.class_names)
    expected = model.generate(prompts=["four"], seeds=[2])
    got = pipe("four", seeds=[2], output_type="pt").images  # the export's default steps and guidance
    torch.testing.assert_close(got, (expected / 2 + 0.5).clamp(0, 1), atol=1e-6, rtol=0)
    via_class = pipe(class_labels="four", seeds=[2], output_type="pt").images
    assert torch.equal(via_class, got)
