"""``LatentDiffusionPipeline``: fastgen's own text-, class- or unconditional diffusion models behind diffusers'
pipeline call.

Components: a fastgen ``UNet2DConditionModel``, a fastgen scheduler, an optional ``AutoencoderKL`` (without
one the U-Net works in pixel space), and the condition encoder the U-Net's cross-attention reads: a
``transformers`` text encoder and tokenizer (prompts), or ``condition_tokens``, a learned token per class plus
the empty one (class labels; with no classes, an unconditional model). Guidance is diffusers' rule (a
``guidance_scale`` above 1 on a conditional model), run as one U-Net call on ``[uncond; cond]`` and the
scheduler's fused CFG step (:mod:`.denoise`).

Folders: :meth:`from_pretrained` reads a diffusers pipeline folder (``model_index.json`` plus one subfolder
per component: ``unet``, ``vae``, ``scheduler`` through fastgen's classes, ``text_encoder`` / ``tokenizer``
through ``transformers``, local files only) — a StableDiffusionPipeline folder, or what ``fastgen train
diffusion`` / ``fastgen quickstart`` export, whose ``model_index.json`` adds ``condition_tokens`` and a
``fastgen`` entry (class names, default steps and guidance)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

from ..io.pipeline import MODEL_INDEX, load_pipeline
from .denoise import denoise
from .geometry import LatentGeometry

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class ImagePipelineOutput:
    """diffusers' pipeline output: ``images`` (a list of PIL images, an (N, H, W, C) array, an (N, C, H, W)
    tensor in [0, 1], or the latents); ``output[0]`` is ``images`` too."""

    images: Any

    def __getitem__(self, index):
        return (self.images,)[index]


class LatentDiffusionPipeline(LatentGeometry):
    def __init__(self, unet, scheduler, vae=None, text_encoder=None, tokenizer=None, condition_tokens=None, *,
                 class_names: Sequence[str] = (), default_num_inference_steps: int = 50,
                 default_guidance_scale: float = 7.5):
        if (text_encoder is None) != (tokenizer is None):
            raise ValueError("LatentDiffusionPipeline: a text_encoder needs its tokenizer and a tokenizer its "
                             "text_encoder")
        if text_encoder is not None and condition_tokens is not None:
            raise ValueError("LatentDiffusionPipeline: give a text_encoder (prompts) or condition_tokens "
                             "(class labels), not both")
        if text_encoder is None and condition_tokens is None:
            raise ValueError("LatentDiffusionPipeline: the U-Net's cross-attention needs a text_encoder + tokenizer "
                             "or condition_tokens (fastgen's class/unconditional token table)")
        self.unet, self.scheduler, self.vae = unet, scheduler, vae
        self.text_encoder, self.tokenizer, self.condition_tokens = text_encoder, tokenizer, condition_tokens
        self.class_names = list(class_names)
        self.default_num_inference_steps = int(default_num_inference_steps)
        self.default_guidance_scale = float(default_guidance_scale)
        for m in self.torch_modules().values():
            m.eval()

    # ------------------------------------------------------------------ components

    @property
    def conditioning(self) -> str:
        if self.text_encoder is not None:
            return "prompt"
        return "class" if self.condition_tokens.num_conditions > 0 else "none"

    def torch_modules(self) -> dict:
        return {k: v for k, v in dict(unet=self.unet, vae=self.vae, text_encoder=self.text_encoder,
                                      condition_tokens=self.condition_tokens).items() if v is not None}

    @property
    def components(self) -> dict:
        return dict(unet=self.unet, scheduler=self.scheduler, vae=self.vae, text_encoder=self.text_encoder,
                    tokenizer=self.tokenizer, condition_tokens=self.condition_tokens)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "LatentDiffusionPipeline":
        for m in self.torch_modules().values():
            m.to(device=device, dtype=dtype)
        return self

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1

    # ------------------------------------------------------------------ conditions

    def resolve_condition(self, prompt: Optional[str] = None, class_label: Union[int, str, None] = None):
        """The condition one image is drawn under: the prompt text (prompt models; a class label picks
        ``class_names[label]``), the class id (class models), or None (unconditional). Raises ValueError for a
        condition this model cannot take."""
        kind = self.conditioning
        if kind == "none":
            if prompt is not None or class_label is not None:
                raise ValueError("this model is unconditional: send neither a prompt nor a class_label")
            return None
        if kind == "prompt":
            if class_label is not None:
                return self.class_names[self._class_index(class_label)]
            if prompt is None:
                raise ValueError("this model is conditioned on prompts: send a prompt (or a class_label among "
                                 f"{self._names_text()})")
            if not isinstance(prompt, str):
                raise TypeError(f"a prompt must be a string, got {type(prompt).__name__}")
            return prompt
        if prompt is not None:
            raise ValueError(f"this model is conditioned on class labels, not prompts: send a class_label "
                             f"({self._names_text()})")
        if class_label is None:
            raise ValueError(f"this model is conditioned on class labels: send a class_label ({self._names_text()})")
        return self._class_index(class_label)

    def _names_text(self) -> str:
        if not self.class_names:
            n = self.condition_tokens.num_conditions if self.condition_tokens is not None else 0
            return f"0..{n - 1}" if n else "none known"
        return ", ".join(repr(c) for c in self.class_names)

    def _class_index(self, label) -> int:
        n = len(self.class_names) or (self.condition_tokens.num_conditions if self.condition_tokens is not None else 0)
        if isinstance(label, str):
            if label not in self.class_names:
                raise ValueError(f"unknown class {label!r}; this model knows {self._names_text()}")
            return self.class_names.index(label)
        if isinstance(label, bool) or not isinstance(label, int):
            raise TypeError(f"a class label must be an int or a class name, got {type(label).__name__}")
        if not 0 <= label < n:
            raise ValueError(f"class {label} is out of range: this model has {n} classes ({self._names_text()})")
        return label

    @torch.no_grad()
    def encode_conditions(self, conditions: Sequence, negative_prompt: Union[str, Sequence[str], None] = None
                          ) -> tuple[Tensor, Optional[Tensor]]:
        """``(cond, uncond)`` cross-attention states for resolved conditions (see :meth:`resolve_condition`);
        ``uncond`` is None for an unconditional model."""
        n = len(conditions)
        if self.conditioning == "prompt":
            if negative_prompt is None:
                negative = [""] * n
            else:
                negative = [negative_prompt] * n if isinstance(negative_prompt, str) else list(negative_prompt)
                if len(negative) != n:
                    raise ValueError(f"{len(negative)} negative prompts for {n} images")
            states = self._encode_texts(list(conditions) + negative)
            return states[:n], states[n:]
        if negative_prompt is not None:
            raise ValueError("negative_prompt needs a prompt-conditioned model")
        null = self.condition_tokens.num_conditions
        ids = torch.tensor([null if c is None else c for c in conditions], dtype=torch.long, device=self.device)
        cond = self.condition_tokens(ids).to(self.dtype)
        if self.conditioning == "none":
            return cond, None
        return cond, self.condition_tokens(torch.full_like(ids, null)).to(self.dtype)

    def _encode_texts(self, texts: list) -> Tensor:
        # each distinct text once (a batch of one prompt with its empty negative encodes two rows, not 2N)
        unique = list(dict.fromkeys(texts))
        tok = self.tokenizer(unique, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        states = self.text_encoder(input_ids=tok.input_ids.to(self.text_encoder.device)).last_hidden_state
        index = torch.tensor([unique.index(t) for t in texts], device=states.device)
        return states[index].to(device=self.device, dtype=self.dtype)

    # ------------------------------------------------------------------ sampling

    def decode(self, latents: Tensor) -> Tensor:
        """Images in [-1, 1] (not clamped) from final latents."""
        if self.vae is None:
            return latents
        return self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample

    @torch.no_grad()
    def generate(self, conditions: Sequence, *, latents: Tensor, num_inference_steps: Optional[int] = None,
                 guidance_scale: Optional[float] = None, negative_prompt=None, generator=None,
                 output_type: str = "pt") -> Tensor:
        """The sampling core: resolved ``conditions`` (one per row of ``latents``) to images in [-1, 1], or to
        the final latents with ``output_type="latent"``. ``generator`` feeds stochastic schedulers' step noise."""
        steps = self.default_num_inference_steps if num_inference_steps is None else num_inference_steps
        g = self.default_guidance_scale if guidance_scale is None else float(guidance_scale)
        cond, uncond = self.encode_conditions(conditions, negative_prompt)
        self.scheduler.set_timesteps(steps)
        x = denoise(self.unet, self.scheduler, latents.to(self.device, self.dtype), cond, uncond, g,
                    generator=generator)
        return x if output_type == "latent" else self.decode(x)

    @torch.no_grad()
    def __call__(self, prompt: Union[str, Sequence[str], None] = None,
                 class_labels: Union[int, str, Sequence, None] = None, *, height: Optional[int] = None,
                 width: Optional[int] = None, num_inference_steps: Optional[int] = None,
                 guidance_scale: Optional[float] = None, negative_prompt=None, num_images_per_prompt: int = 1,
                 generator=None, seeds: Optional[Sequence[int]] = None, latents: Optional[Tensor] = None,
                 output_type: str = "pil", return_dict: bool = True):
        """diffusers' call: ``prompt`` (a string or a list), or ``class_labels`` (an int / name or a list), or
        neither for an unconditional model (then ``num_images_per_prompt`` images). ``seeds`` (one int per
        image) is fastgen's shorthand for ``generator=[torch.Generator().manual_seed(s), ...]``."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}; got {output_type!r}")
        if prompt is not None and class_labels is not None:
            raise ValueError("pass prompt or class_labels, not both")
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) \
                or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive int, got {num_images_per_prompt!r}")
        if prompt is not None:
            items = [prompt] if isinstance(prompt, str) else list(prompt)
            conditions = [self.resolve_condition(prompt=p) for p in items]
        elif class_labels is not None:
            items = [class_labels] if isinstance(class_labels, (int, str)) else list(class_labels)
            conditions = [self.resolve_condition(class_label=c) for c in items]
        else:
            conditions = [self.resolve_condition()]
        conditions = [c for c in conditions for _ in range(num_images_per_prompt)]
        n = len(conditions)
        if n == 0:
            raise ValueError("nothing to generate: the prompt / class_labels list is empty")
        dh, dw = self.default_size()
        height, width = height or dh, width or dw
        if seeds is not None:
            if generator is not None:
                raise ValueError("pass seeds or generator, not both")
            seeds = list(seeds)
            if len(seeds) != n:
                raise ValueError(f"{len(seeds)} seeds for {n} images: give one per image")
            generator = seeds
        if isinstance(generator, (list, tuple)) and len(generator) not in (1, n):
            raise ValueError(f"{len(generator)} generators for {n} images: give one, or one per image")
        if latents is None:
            latents = self.initial_latents(n, height, width, generator)
        elif tuple(latents.shape) != (n,) + self.latent_shape(height, width):
            raise ValueError(f"latents must be {(n,) + self.latent_shape(height, width)}, got {tuple(latents.shape)}")
        out = self.generate(conditions, latents=latents, num_inference_steps=num_inference_steps,
                            guidance_scale=guidance_scale, negative_prompt=negative_prompt, generator=generator,
                            output_type=output_type)
        images = out if output_type == "latent" else to_output(out, output_type)
        return ImagePipelineOutput(images) if return_dict else (images,)

    # ------------------------------------------------------------------ folders

    @classmethod
    def from_pretrained(cls, folder: Union[str, os.PathLike], *, torch_dtype: Optional[torch.dtype] = None,
                        device=None) -> "LatentDiffusionPipeline":
        """Load a diffusers pipeline folder or a fastgen diffusion export (local files only)."""
        if not os.path.isfile(os.path.join(folder, MODEL_INDEX)) and os.path.isfile(
                os.path.join(folder, "fastgen_model.json")):
            # an export written before fastgen exports were pipeline folders: its manifest has what is needed
            from ..train.diffusion import DiffusionModel

            return DiffusionModel.from_folder(folder, device or "cpu").pipeline()
        loaded = load_pipeline(folder, torch_dtype=torch_dtype)
        options = loaded.config.get("fastgen", {}) or {}
        text_encoder = tokenizer = tokens = None
        if loaded.get("text_encoder") is not None:
            text_encoder = _load_transformers(loaded, "text_encoder", torch_dtype)
            tokenizer = _load_transformers(loaded, "tokenizer", None)
        if loaded.get("condition_tokens") is not None:
            tokens = load_condition_tokens(loaded["condition_tokens"])
        unet, scheduler = loaded.get("unet"), loaded.get("scheduler")
        if unet is None or scheduler is None:
            raise ValueError(f"{os.path.join(loaded.folder, MODEL_INDEX)} needs a unet and a scheduler")
        kwargs = {k: options[k] for k in ("class_names", "default_num_inference_steps", "default_guidance_scale")
                  if k in options}
        pipe = cls(unet, scheduler, loaded.get("vae"), text_encoder, tokenizer, tokens, **kwargs)
        return pipe.to(device) if device is not None else pipe

    def save_pretrained(self, folder: Union[str, os.PathLike]) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(folder / "unet")
        self.scheduler.save_pretrained(folder / "scheduler")
        if self.vae is not None:
            self.vae.save_pretrained(folder / "vae")
        if self.text_encoder is not None:
            self.text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
            self.tokenizer.save_pretrained(folder / "tokenizer")
        if self.condition_tokens is not None:
            save_condition_tokens(self.condition_tokens, folder / "condition_tokens")
        write_model_index(folder, self)


def to_output(images: Tensor, output_type: str):
    """[-1, 1] images as diffusers' ``output_type``: "pt" (N, C, H, W) in [0, 1], "np" (N, H, W, C), "pil"."""
    unit = (images.float() / 2 + 0.5).clamp(0, 1).cpu()
    if output_type == "pt":
        return unit
    arr = unit.permute(0, 2, 3, 1).numpy()
    if output_type == "np":
        return arr
    from PIL import Image

    u8 = (arr * 255).round().astype("uint8")
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in u8]


def write_model_index(folder: Path, pipe: LatentDiffusionPipeline) -> None:
    def entry(obj, library):
        return [library, type(obj).__name__] if obj is not None else [None, None]

    index = {
        "_class_name": "LatentDiffusionPipeline",
        "unet": entry(pipe.unet, "diffusers"),
        "scheduler": entry(pipe.scheduler, "diffusers"),
        "vae": entry(pipe.vae, "diffusers"),
        "text_encoder": entry(pipe.text_encoder, "transformers"),
        "tokenizer": entry(pipe.tokenizer, "transformers"),
        "condition_tokens": entry(pipe.condition_tokens, "fastgen"),
        "fastgen": {"class_names": pipe.class_names,
                    "default_num_inference_steps": pipe.default_num_inference_steps,
                    "default_guidance_scale": pipe.default_guidance_scale},
    }
    (folder / MODEL_INDEX).write_text(json.dumps(index, indent=1))


def save_condition_tokens(tokens, folder: Path) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({"tokens": tokens.tokens.weight.detach().cpu().contiguous()}, str(folder / "model.safetensors"))


def load_condition_tokens(folder: Union[str, Path]):
    """fastgen's class-token table from ``folder/model.safetensors`` (rows: one per class, then the empty one)."""
    from ..io import CheckpointError, load_state_dict
    from ..train.conditioning import TokenTable

    state = load_state_dict(os.path.join(folder, "model.safetensors"))
    weight = state.get("tokens")
    if weight is None or weight.dim() != 2 or weight.shape[0] < 1:
        raise CheckpointError(f"{folder}/model.safetensors: expected a 'tokens' tensor (classes + 1, dim), "
                              f"got keys {sorted(state)}")
    table = TokenTable(weight.shape[0] - 1, weight.shape[1])
    table.tokens.weight.data.copy_(weight)
    return table.eval()


def _load_transformers(loaded, name: str, torch_dtype):
    try:
        import transformers
    except ImportError as exc:
        raise ImportError(f"{loaded.folder}: the {name} needs transformers: pip install 'fastgen[train]'") from exc
    from ..io import CheckpointError

    folder = loaded[name]
    class_name = loaded.classes[name][1]
    cls = getattr(transformers, class_name, None)
    if cls is None:
        raise CheckpointError(f"{loaded.folder}/{MODEL_INDEX}: {name} is a {class_name}, which transformers lacks")
    if not os.path.isdir(folder):
        raise CheckpointError(f"{loaded.folder}/{MODEL_INDEX}: component {name!r} has no folder {folder!r}")
    kwargs = {"local_files_only": True}
    if torch_dtype is not None and name == "text_encoder":
        kwargs["dtype"] = torch_dtype
    model = cls.from_pretrained(folder, **kwargs)
    return model.eval() if name == "text_encoder" else model
