import os

# The Triton interpreter runs every tl.dot through numpy on tiles of ~64x64,
# where a multi-threaded BLAS only adds overhead (2-3x slower suite on 2 cores).
for _var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import torch  # noqa: E402

# Without a GPU, Triton kernels are exercised on CPU tensors through the
# interpreter. It must be set before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def one_thread():
    """Tiny convolutions on a loaded 2-core machine: two OpenMP threads spin far more than they compute."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def digits():
    """The 1,497 training digits at 16 px (skips without scikit-learn)."""
    pytest.importorskip("sklearn")
    from fastgen.data import load_digits

    return load_digits(16, "train")


@pytest.fixture
def diffusers_twin():
    """``twin(folder)``: diffusers' StableDiffusionPipeline over the components of a saved fastgen pipeline
    folder (the same weights, through diffusers' and transformers' own classes)."""
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")

    def twin(folder):
        sd = diffusers.StableDiffusionPipeline(
            unet=diffusers.UNet2DConditionModel.from_pretrained(folder / "unet"),
            vae=diffusers.AutoencoderKL.from_pretrained(folder / "vae"),
            text_encoder=transformers.CLIPTextModel.from_pretrained(folder / "text_encoder"),
            tokenizer=transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer"),
            scheduler=diffusers.DPMSolverMultistepScheduler.from_pretrained(folder / "scheduler"),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        sd.set_progress_bar_config(disable=True)
        return sd

    return twin
