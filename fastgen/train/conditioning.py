"""What a diffusion U-Net's cross-attention reads: a prompt through a small CLIP text encoder (trained with the
U-Net, as Stable Diffusion's text enters through cross-attention), a learned token per class, or one learned
token for an unconditional model. Every encoder maps a batch of condition ids to ``(N, L, D)`` hidden states;
id ``num_conditions`` is the empty condition classifier-free guidance drops to."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

CONDITIONINGS = ("none", "class", "prompt")


def prompt_tokenizer(max_length: int):
    """A CLIP tokenizer over a character vocabulary written in code (no download): any lowercase prompt works."""
    try:
        from ..bench.offline import clip_tokenizer
    except ImportError as exc:  # transformers missing
        raise ImportError("prompt conditioning needs transformers: pip install 'fastgen[train]'") from exc
    return clip_tokenizer(max_length)


class TokenTable(torch.nn.Module):
    """Class (or null) conditioning: one learned ``(1, D)`` token sequence per class, plus the empty one."""

    def __init__(self, num_conditions: int, dim: int):
        super().__init__()
        self.num_conditions = num_conditions
        self.tokens = torch.nn.Embedding(num_conditions + 1, dim)
        torch.nn.init.normal_(self.tokens.weight, std=0.02)

    def forward(self, ids: Tensor) -> Tensor:
        return self.tokens(ids)[:, None, :]


class PromptEncoder(torch.nn.Module):
    """A CLIP text encoder (transformers' ``CLIPTextModel``, a tiny config) over prompts; the prompts of the
    training conditions (the class names) are tokenized once into ``token_ids``; free text goes through
    :meth:`encode_text`."""

    def __init__(self, prompts: Sequence[str], dim: int, *, layers: int = 2, heads: int = 4, max_length: int = 16):
        super().__init__()
        from transformers import CLIPTextConfig, CLIPTextModel

        self.tokenizer = prompt_tokenizer(max_length)
        config = CLIPTextConfig(vocab_size=len(self.tokenizer), hidden_size=dim, intermediate_size=4 * dim,
                                num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=max_length,
                                bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=dim)
        self.text_model = CLIPTextModel(config)
        self.prompts = list(prompts)
        self.register_buffer("token_ids", self.tokenize(self.prompts + [""]), persistent=False)
        self.num_conditions = len(self.prompts)

    def tokenize(self, prompts: Sequence[str]) -> Tensor:
        for p in prompts:
            if not isinstance(p, str):
                raise TypeError(f"prompts must be strings, got {type(p).__name__}")
        ids = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                             max_length=self.tokenizer.model_max_length, return_tensors="pt").input_ids
        return ids

    def encode_tokens(self, ids: Tensor) -> Tensor:
        return self.text_model(input_ids=ids).last_hidden_state

    def forward(self, condition_ids: Tensor) -> Tensor:
        # a batch holds at most num_conditions + 1 distinct prompts: encode each once and gather (the gradient
        # of every prompt is the sum over its rows, as if each row had been encoded on its own)
        unique, inverse = torch.unique(condition_ids, return_inverse=True)
        return self.encode_tokens(self.token_ids[unique])[inverse]

    def encode_text(self, prompts: Sequence[str]) -> Tensor:
        return self.encode_tokens(self.tokenize(prompts).to(self.token_ids.device))

    def save(self, folder: Path) -> None:
        self.text_model.save_pretrained(folder / "text_encoder", safe_serialization=True)
        self.tokenizer.save_pretrained(folder / "tokenizer")


class Denoiser(torch.nn.Module):
    """The U-Net and its condition encoder as one module: one optimizer and one DDP wrapper train both."""

    def __init__(self, unet: torch.nn.Module, encoder: torch.nn.Module):
        super().__init__()
        self.unet = unet
        self.encoder = encoder

    def forward(self, x: Tensor, t: Tensor, condition_ids: Tensor) -> Tensor:
        return self.unet(x, t, self.encoder(condition_ids)).sample


def check_conditioning(conditioning: str, num_conditions: Optional[int]) -> None:
    if conditioning not in CONDITIONINGS:
        raise ValueError(f"conditioning must be one of {', '.join(CONDITIONINGS)}; got {conditioning!r}")
