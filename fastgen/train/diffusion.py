"""Diffusion training (Ho et al. 2020) in pixel space or in a trained VAE's latent space (Rombach et al. 2022):
x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps through the fused ``q_sample`` with per-sample timesteps, an
``UNet2DConditionModel`` predicting eps, v or x_0, optional min-SNR-gamma weighting (Hang et al. 2023), and
the condition — a class token or a prompt through a small CLIP text encoder — entering through
cross-attention, dropped to the empty condition with probability ``cond_dropout`` so one network learns the
conditional and the unconditional model classifier-free guidance needs (Ho & Salimans 2022).

:class:`DiffusionModel` is the trained bundle (U-Net, condition encoder, VAE, scheduler config) that samples
with DPM-Solver++ and guidance; the trainer's sample grids and ``fastgen sample`` both go through it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models import AutoencoderKL, UNet2DConditionModel
from ..ops import q_sample, v_target
from ..schedulers import DDPMScheduler, DPMSolverMultistepScheduler
from .conditioning import Denoiser, PromptEncoder, TokenTable, check_conditioning
from .export import read_manifest, write_manifest
from .loop import Phase, Trainer
from .vae import check_images, images_of

PREDICTIONS = ("epsilon", "v_prediction", "sample")
SPACES = ("pixel", "latent")


@dataclass
class DiffusionOptions:
    space: str = "latent"
    image_size: int = 16
    channels: int = 1
    conditioning: str = "prompt"
    prediction_type: str = "epsilon"
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    min_snr_gamma: Optional[float] = None
    cond_dropout: float = 0.1
    block_out_channels: tuple = (64,)
    layers_per_block: int = 1
    attention_head_dim: int = 2
    cross_attention_dim: int = 64
    norm_num_groups: int = 16
    text_layers: int = 2
    text_heads: int = 4
    max_length: int = 8
    sample_steps: int = 20
    guidance_scale: float = 3.0
    class_names: list = field(default_factory=list)

    def __post_init__(self):
        if self.space not in SPACES:
            raise ValueError(f"DiffusionOptions.space must be one of {', '.join(SPACES)}; got {self.space!r}")
        if self.prediction_type not in PREDICTIONS:
            raise ValueError(f"DiffusionOptions.prediction_type must be one of {', '.join(PREDICTIONS)}; "
                             f"got {self.prediction_type!r}")
        if not 0.0 <= self.cond_dropout < 1.0:
            raise ValueError(f"DiffusionOptions.cond_dropout must be in [0, 1), got {self.cond_dropout!r}")
        if self.min_snr_gamma is not None and not self.min_snr_gamma > 0:
            raise ValueError(f"DiffusionOptions.min_snr_gamma must be > 0 or None, got {self.min_snr_gamma!r}")
        self.block_out_channels = tuple(self.block_out_channels)
        check_conditioning(self.conditioning, None)

    def scheduler_config(self) -> dict:
        return dict(num_train_timesteps=self.num_train_timesteps, beta_schedule=self.beta_schedule,
                    beta_start=self.beta_start, beta_end=self.beta_end, prediction_type=self.prediction_type)


def build_unet(o: DiffusionOptions, in_channels: int, sample_size: int) -> UNet2DConditionModel:
    n = len(o.block_out_channels)
    # SD's layout: cross-attention at every level but the lowest (one level: cross-attention there too)
    down = ("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D" if n > 1 else "CrossAttnDownBlock2D",)
    up = ("UpBlock2D" if n > 1 else "CrossAttnUpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1)
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=in_channels, out_channels=in_channels,
        down_block_types=down, up_block_types=up,
        block_out_channels=o.block_out_channels, layers_per_block=o.layers_per_block,
        cross_attention_dim=o.cross_attention_dim, attention_head_dim=o.attention_head_dim,
        norm_num_groups=o.norm_num_groups)


def build_encoder(o: DiffusionOptions) -> torch.nn.Module:
    if o.conditioning == "prompt":
        return PromptEncoder(o.class_names, o.cross_attention_dim, layers=o.text_layers, heads=o.text_heads,
                             max_length=o.max_length)
    return TokenTable(len(o.class_names) if o.conditioning == "class" else 0, o.cross_attention_dim)


class DiffusionModel:
    """A trained (or training) diffusion model: ``generate`` samples images with DPM-Solver++ and guidance."""

    def __init__(self, options: DiffusionOptions, denoiser: Denoiser, vae: Optional[AutoencoderKL]):
        self.options = options
        self.denoiser = denoiser
        self.vae = vae

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def sample_shape(self) -> tuple:
        o = self.options
        if self.vae is None:
            return (o.channels, o.image_size, o.image_size)
        down = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return (self.vae.config.latent_channels, o.image_size // down, o.image_size // down)

    def condition_ids(self, conditions) -> Tensor:
        """Condition ids from class indices or (for prompt models) the training prompts' names."""
        o = self.options
        ids = []
        for c in conditions:
            if isinstance(c, str):
                if c not in o.class_names:
                    raise ValueError(f"unknown condition {c!r}; this model knows {', '.join(o.class_names)}"
                                     + (" (free text goes through prompts=)" if o.conditioning == "prompt" else ""))
                ids.append(o.class_names.index(c))
            else:
                c = int(c)
                if not 0 <= c < max(1, len(o.class_names)):
                    raise ValueError(f"class {c} is out of range: the model has {len(o.class_names)} classes")
                ids.append(c)
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    def pipeline(self):
        """The model as a :class:`~fastgen.pipelines.LatentDiffusionPipeline` sharing these modules."""
        from ..pipelines import LatentDiffusionPipeline

        o, enc = self.options, self.denoiser.encoder
        text = dict(text_encoder=enc.text_model, tokenizer=enc.tokenizer) if isinstance(enc, PromptEncoder) \
            else dict(condition_tokens=enc)
        scheduler = DPMSolverMultistepScheduler(**o.scheduler_config(), algorithm_type="dpmsolver++", solver_order=2)
        return LatentDiffusionPipeline(self.denoiser.unet, scheduler, self.vae, **text, class_names=o.class_names,
                                       default_num_inference_steps=o.sample_steps,
                                       default_guidance_scale=o.guidance_scale)

    @torch.no_grad()
    def generate(self, conditions: Optional[Sequence] = None, *, prompts: Optional[Sequence[str]] = None,
                 seeds: Optional[Sequence[int]] = None, noise: Optional[Tensor] = None, steps: Optional[int] = None,
                 guidance_scale: Optional[float] = None, batch_size: int = 128) -> Tensor:
        """Images (N, C, H, W) in [-1, 1], one per seed (or per row of ``noise``, the initial (N, *sample_shape)
        latents, e.g. interpolated ones): ``conditions`` (class ids or names) or ``prompts``, one per image
        (or one for all). Sampling is the pipeline's (DPM-Solver++, guidance above a scale of 1)."""
        from ..schedulers.noise import randn_tensor

        o = self.options
        if (seeds is None) == (noise is None):
            raise ValueError("generate: pass exactly one of seeds= and noise=")
        if noise is None:
            noise = torch.cat([randn_tensor(self.sample_shape(), torch.Generator().manual_seed(int(s)))[None]
                               for s in seeds])
        elif tuple(noise.shape[1:]) != self.sample_shape():
            raise ValueError(f"generate: noise must be (N, {', '.join(map(str, self.sample_shape()))}), "
                             f"got {tuple(noise.shape)}")
        n = noise.shape[0]
        items = prompts if prompts is not None else (conditions if conditions is not None else [0] * n)
        items = list(items)
        if len(items) == 1:
            items = items * n
        if len(items) != n:
            raise ValueError(f"{len(items)} conditions for {n} seeds: give one per seed, or one for all")
        if prompts is not None:
            if o.conditioning != "prompt":
                raise ValueError(f"this model is conditioned on {o.conditioning!r}, not on prompts")
            resolved = [str(p) for p in items]
        elif o.conditioning == "none":
            resolved = [None] * n
        else:
            ids = self.condition_ids(items).tolist()
            resolved = [o.class_names[i] for i in ids] if o.conditioning == "prompt" else ids
        pipe = self.pipeline()
        out = [pipe.generate(resolved[i:i + batch_size], latents=noise[i:i + batch_size], num_inference_steps=steps,
                             guidance_scale=guidance_scale) for i in range(0, n, batch_size)]
        return torch.cat(out).clamp(-1, 1)

    def decode(self, x: Tensor) -> Tensor:
        return self.pipeline().decode(x)

    def save(self, folder: Path) -> None:
        """A pipeline folder (``model_index.json``: ``LatentDiffusionPipeline.from_pretrained`` and ``fastgen
        serve`` read it) plus fastgen's manifest (the training options)."""
        self.pipeline().save_pretrained(folder)
        write_manifest(folder, "diffusion", self.options)

    @classmethod
    def from_folder(cls, folder, device: Union[str, torch.device] = "cpu") -> "DiffusionModel":
        folder = Path(folder)
        manifest = read_manifest(folder)
        if manifest["kind"] != "diffusion":
            raise ValueError(f"{folder} holds a {manifest['kind']!r} model, not a diffusion model")
        options = DiffusionOptions(**manifest["options"])
        unet = UNet2DConditionModel.from_pretrained(folder / "unet")
        encoder = build_encoder(options)
        if isinstance(encoder, PromptEncoder):
            from transformers import CLIPTextModel

            encoder.text_model = CLIPTextModel.from_pretrained(folder / "text_encoder", use_safetensors=True)
        else:
            from ..pipelines.latent_diffusion import load_condition_tokens

            encoder.tokens.weight.data.copy_(load_condition_tokens(folder / "condition_tokens").tokens.weight)
        vae = AutoencoderKL.from_pretrained(folder / "vae") if options.space == "latent" else None
        model = cls(options, Denoiser(unet, encoder).eval().to(device), vae.eval().to(device) if vae else None)
        return model


class DiffusionTrainer(Trainer):
    """Pass the trained VAE as ``vae=`` (an ``AutoencoderKL`` or its folder) for ``space="latent"``."""

    kind = "diffusion"
    options_class = DiffusionOptions

    def __init__(self, dataset, options: Optional[DiffusionOptions] = None, config=None, *, vae=None):
        options = options if options is not None else DiffusionOptions(
            class_names=list(getattr(dataset, "class_names", []) or []))
        if options.space == "latent":
            if vae is None:
                raise ValueError("DiffusionTrainer: space='latent' needs vae= (a trained AutoencoderKL or its folder; "
                                 "`fastgen train vae` makes one)")
            if not isinstance(vae, AutoencoderKL):
                vae = AutoencoderKL.from_pretrained(vae)
            if vae.config.in_channels != options.channels:
                raise ValueError(f"DiffusionTrainer: the VAE takes {vae.config.in_channels}-channel images, "
                                 f"options.channels is {options.channels}")
            vae.requires_grad_(False).eval()
        self.vae = vae if options.space == "latent" else None
        if options.conditioning != "none" and not options.class_names:
            raise ValueError(f"DiffusionTrainer: conditioning {options.conditioning!r} needs labelled data with class "
                             "names (class sub-folders or the digits); this dataset has none")
        super().__init__(dataset, options, config)
        if self.vae is not None:
            self.vae.to(self.device)
        abar = torch.as_tensor(DDPMScheduler(**self.options.scheduler_config()).alphas_cumprod, dtype=torch.float64)
        self.sqrt_abar = abar.sqrt().float().to(self.device)
        self.sqrt_1m_abar = (1 - abar).sqrt().float().to(self.device)
        self.snr = (abar / (1 - abar)).float().to(self.device)

    def build_models(self):
        o = self.options
        if self.vae is not None:
            down = 2 ** (len(self.vae.config.block_out_channels) - 1)
            channels, size = self.vae.config.latent_channels, o.image_size // down
        else:
            channels, size = o.channels, o.image_size
        return {"denoiser": Denoiser(build_unet(o, channels, size), build_encoder(o))}

    def model(self) -> DiffusionModel:
        return DiffusionModel(self.options, self.models["denoiser"], self.vae)

    def check_batch(self, batch) -> None:
        check_images("DiffusionTrainer", images_of(batch), self.options.channels, self.options.image_size)
        if self.options.conditioning != "none":
            labels = batch[1] if isinstance(batch, (list, tuple)) and len(batch) > 1 else None
            if labels is None or labels.dtype != torch.long or bool((labels < 0).any()):
                raise ValueError(f"DiffusionTrainer: conditioning {self.options.conditioning!r} needs labelled data "
                                 "(class sub-folders or the digits)")

    @torch.no_grad()
    def encode(self, x: Tensor, rng) -> Tensor:
        if self.vae is None:
            return x
        h = self.vae.encode(x).latent_dist
        return (h.mean + h.std * rng.randn_like(h.mean)) * self.vae.config.scaling_factor

    def diffusion_loss(self, batch, rng):
        o = self.options
        images = images_of(batch)
        with torch.autocast(self.device.type, enabled=False):
            x0 = self.encode(images.float(), rng)
        noise = rng.randn_like(x0)
        t = rng.randint(0, o.num_train_timesteps)
        sa, s1a = self.sqrt_abar[t], self.sqrt_1m_abar[t]
        x_t = q_sample(x0, noise, sa, s1a)
        null = self.models["denoiser"].encoder.num_conditions
        if o.conditioning == "none":
            ids = torch.full_like(t, null)
        else:
            labels = batch[1].to(torch.long)
            drop = rng.rand() < o.cond_dropout
            ids = torch.where(drop, torch.full_like(labels, null), labels)
        out = self.net("denoiser")(x_t, t, ids).float()
        target = noise if o.prediction_type == "epsilon" else (
            v_target(x0, noise, sa, s1a) if o.prediction_type == "v_prediction" else x0)
        per_sample = F.mse_loss(out, target, reduction="none").flatten(1).mean(1)
        if o.min_snr_gamma is not None:
            snr = self.snr[t]
            clipped = snr.clamp(max=o.min_snr_gamma)
            weight = {"epsilon": clipped / snr, "v_prediction": clipped / (snr + 1), "sample": clipped}[o.prediction_type]
            per_sample = per_sample * weight
        loss = per_sample.mean()
        return loss, {"loss": loss.detach()}

    def phases(self):
        return [Phase("denoiser", self.diffusion_loss)]

    def grid_rows(self) -> int:
        return 10 if self.options.conditioning != "none" else 8

    def sample_grid(self) -> Optional[Tensor]:
        o = self.options
        if o.conditioning == "none":
            return self.model().generate(seeds=list(range(64)))
        k = len(o.class_names)
        conditions = [r for r in range(k) for _ in range(10)]
        return self.model().generate(conditions, seeds=[c for _ in range(k) for c in range(10)])

    def export(self, folder: Path) -> None:
        self.model().save(folder)
