"""Original Stable Diffusion single-file checkpoints (CompVis / Stability ``.ckpt`` / ``.safetensors``) to
diffusers key names, for ``UNet2DConditionModel`` and ``AutoencoderKL``.

The original U-Net is ``input_blocks`` / ``middle_block`` / ``output_blocks``, flat lists of sequential
blocks: ``input_blocks.0`` is ``conv_in``; each level then has ``layers_per_block`` entries of
``[ResBlock, SpatialTransformer?]`` and, except the last level, one entry holding only a downsampling conv
(``.0.op``). ``output_blocks`` hold ``layers_per_block + 1`` entries a level, deepest level first, each
``[ResBlock, SpatialTransformer?, Upsample?]`` with the upsampler on the last entry of every level but the
shallowest. A ResBlock's layers are ``in_layers.{0: norm, 2: conv}``, ``emb_layers.1``,
``out_layers.{0: norm, 3: conv}`` and ``skip_connection``; a SpatialTransformer already uses diffusers'
names. The original VAE is ``encoder.down.{i}.block.{j}`` / ``decoder.up.{i}.block.{j}`` (decoder levels
numbered from the deepest up, the reverse of diffusers), ``mid.block_1`` / ``mid.attn_1`` / ``mid.block_2``,
with the mid attention's q/k/v/proj_out stored as 1x1 convolutions (diffusers: Linear layers).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Optional, Union

from torch import Tensor

from .files import CheckpointError, PathLike, build_and_load, load_state_dict, read_config

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIXES = ("first_stage_model.", "vae.")
VAE_TOP = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
# Entries of a bare VAE file that are not part of the autoencoder (training loss, EMA copies): skipped.
VAE_IGNORED = ("loss.", "model_ema.")

_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
           "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


# --------------------------------------------------------------------------------------- helpers


def _strip(state_dict: dict[str, Tensor], prefixes: tuple[str, ...], bare_marker: str, what: str,
           bare_top: Optional[tuple[str, ...]] = None, ignored: tuple[str, ...] = ()) -> dict[str, Tensor]:
    """The component's entries without their prefix: a full SD checkpoint holds every component under its own
    prefix; a file of the component alone holds its keys bare."""
    for p in prefixes:
        sub = {k[len(p):]: v for k, v in state_dict.items() if k.startswith(p)}
        if sub:
            return sub
    if bare_marker in state_dict:
        if bare_top is None:
            return dict(state_dict)
        out = {}
        for k, v in state_dict.items():
            if k.startswith(bare_top):
                out[k] = v
            elif not k.startswith(ignored):
                out[k] = v  # left for the converter to report as unconvertible
        return out
    raise CheckpointError(
        f"not an original Stable Diffusion {what} checkpoint: no keys start with "
        f"{' or '.join(repr(p) for p in prefixes)} and there is no {bare_marker!r}"
    )


def _per_level(value, n: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise CheckpointError(f"config {name} has {len(value)} entries for {n} levels")
        return list(value)
    return [value] * n


class _Renamer:
    """Prefix rules ``old_prefix -> (new_prefix, suffix_fn)``; every key must match exactly one rule."""

    def __init__(self):
        self.rules: dict[str, tuple[str, Any]] = {}

    def add(self, old: str, new: str, suffix_fn=None):
        self.rules[old + "."] = (new + ".", suffix_fn)

    def apply(self, sd: dict[str, Tensor], what: str) -> dict[str, Tensor]:
        out, unknown = {}, []
        for key, value in sd.items():
            parts = key.split(".")
            for depth in range(min(len(parts) - 1, 6), 0, -1):
                prefix = ".".join(parts[:depth]) + "."
                rule = self.rules.get(prefix)
                if rule is not None:
                    new_prefix, fn = rule
                    suffix = key[len(prefix):]
                    converted = fn(suffix, value) if fn else (suffix, value)
                    if converted is None:
                        unknown.append(key)
                    else:
                        new_key = new_prefix + converted[0]
                        if new_key in out:
                            raise CheckpointError(f"{what}: two checkpoint keys convert to {new_key!r}")
                        out[new_key] = converted[1]
                    break
            else:
                unknown.append(key)
        if unknown:
            raise CheckpointError(
                f"{what}: {len(unknown)} checkpoint keys do not fit the config's layout "
                f"(first {min(10, len(unknown))}: {unknown[:10]}); check the config (layers_per_block, "
                "block types, block_out_channels) or pass one explicitly"
            )
        return out


def _resnet_suffix(suffix: str, value):
    parts = suffix.split(".")
    for n in (2, 1):
        head = ".".join(parts[:n])
        if head in _RESNET and len(parts) > n:
            return _RESNET[head] + "." + ".".join(parts[n:]), value
    return None


def _vae_resnet_suffix(suffix: str, value):
    if suffix.startswith("nin_shortcut."):
        return "conv_shortcut." + suffix[len("nin_shortcut."):], value
    if suffix.split(".")[0] in ("norm1", "conv1", "norm2", "conv2", "conv_shortcut"):
        return suffix, value
    return None


def _vae_attn_suffix(suffix: str, value: Tensor):
    layer, _, param = suffix.partition(".")
    if layer not in _VAE_ATTN or param not in ("weight", "bias"):
        return None
    if layer != "norm" and param == "weight" and value.ndim > 2:
        if any(s != 1 for s in value.shape[2:]):
            return None
        value = value.reshape(value.shape[0], value.shape[1])  # 1x1 conv -> Linear
    return f"{_VAE_ATTN[layer]}.{param}", value


# --------------------------------------------------------------------------------------- U-Net


def convert_sd_unet(state_dict: dict[str, Tensor], config: dict) -> dict[str, Tensor]:
    """The U-Net of an original SD checkpoint (keys under ``model.diffusion_model.``, or bare) in
    diffusers' ``UNet2DConditionModel`` key names, for the diffusers ``config`` (only its layout keys are
    read: ``block_out_channels``, ``layers_per_block``, ``down_block_types``, ``up_block_types`` and the
    class/addition embedding keys). Every U-Net key must convert; other components' keys, and the EMA copy
    (``model_ema.*``), are ignored: the non-EMA weights load, as with diffusers' default."""
    sd = _strip(state_dict, (UNET_PREFIX,), "input_blocks.0.0.weight", "U-Net")
    n = len(config.get("block_out_channels", (320, 640, 1280, 1280)))
    layers = _per_level(config.get("layers_per_block", 2), n, "layers_per_block")
    down_types = list(config.get("down_block_types") or ["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"])
    up_types = list(config.get("up_block_types") or ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1))
    if len(down_types) != n or len(up_types) != n:
        raise CheckpointError(
            f"config has {n} block_out_channels but {len(down_types)} down / {len(up_types)} up block types"
        )

    r = _Renamer()
    r.add("time_embed.0", "time_embedding.linear_1")
    r.add("time_embed.2", "time_embedding.linear_2")
    r.add("input_blocks.0.0", "conv_in")
    r.add("out.0", "conv_norm_out")
    r.add("out.2", "conv_out")
    if config.get("class_embed_type") in ("timestep", "projection"):
        r.add("label_emb.0.0", "class_embedding.linear_1")
        r.add("label_emb.0.2", "class_embedding.linear_2")
    if config.get("addition_embed_type") == "text_time":
        r.add("label_emb.0.0", "add_embedding.linear_1")
        r.add("label_emb.0.2", "add_embedding.linear_2")
    if config.get("num_class_embeds") is not None:
        r.add("label_emb", "class_embedding")

    idx = 1
    for level in range(n):
        for j in range(layers[level]):
            r.add(f"input_blocks.{idx}.0", f"down_blocks.{level}.resnets.{j}", _resnet_suffix)
            if "CrossAttn" in down_types[level]:
                r.add(f"input_blocks.{idx}.1", f"down_blocks.{level}.attentions.{j}")
            idx += 1
        if level != n - 1:
            r.add(f"input_blocks.{idx}.0.op", f"down_blocks.{level}.downsamplers.0.conv")
            idx += 1

    r.add("middle_block.0", "mid_block.resnets.0", _resnet_suffix)
    r.add("middle_block.1", "mid_block.attentions.0")
    r.add("middle_block.2", "mid_block.resnets.1", _resnet_suffix)

    idx = 0
    up_layers = list(reversed(layers))
    for b in range(n):
        attn = "CrossAttn" in up_types[b]
        for j in range(up_layers[b] + 1):
            r.add(f"output_blocks.{idx}.0", f"up_blocks.{b}.resnets.{j}", _resnet_suffix)
            sub = 1
            if attn:
                r.add(f"output_blocks.{idx}.1", f"up_blocks.{b}.attentions.{j}")
                sub = 2
            if b != n - 1 and j == up_layers[b]:
                r.add(f"output_blocks.{idx}.{sub}.conv", f"up_blocks.{b}.upsamplers.0.conv")
            idx += 1
    return r.apply(sd, "U-Net")


def _count(keys, pattern: str) -> int:
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in keys if (m := rx.match(k))}
    return max(found) + 1 if found else 0


def infer_sd_unet_config(state_dict: dict[str, Tensor]) -> dict:
    """A diffusers ``UNet2DConditionModel`` config read off an original checkpoint's tensor shapes.

    SD 1.x (context 768, conv projections) gets ``attention_head_dim=8``; SD 2.x / XL (linear projections)
    get 64-channel heads, ``attention_head_dim=[c // 64 ...]`` (``[5, 10, 20, 20]`` for SD 2). What shapes
    cannot tell (``sample_size``, ``upcast_attention``, ``norm_num_groups``) keeps diffusers' defaults;
    pass ``config=`` for those."""
    sd = _strip(state_dict, (UNET_PREFIX,), "input_blocks.0.0.weight", "U-Net")

    def get(key: str) -> Tensor:
        if key not in sd:
            raise CheckpointError(f"cannot infer the U-Net config: the checkpoint has no {key!r}; pass config=")
        return sd[key]

    conv_in = get("input_blocks.0.0.weight")
    n_in = _count(sd, r"input_blocks\.(\d+)\.")
    ops = sorted(int(m.group(1)) for k in sd if (m := re.fullmatch(r"input_blocks\.(\d+)\.0\.op\.weight", k)))
    if ops:
        per = ops[0]  # each level: layers_per_block blocks + one downsampler
        n = len(ops) + 1
        layers = per - 1
    else:
        n, layers = 1, n_in - 1
    if layers < 1 or n_in != n * (layers + 1) or ops != [l * (layers + 1) for l in range(1, n)]:
        raise CheckpointError("cannot infer the U-Net config: input_blocks do not follow the SD layout; pass config=")

    block_out, down_types, up_types, depths = [], [], [], []
    for level in range(n):
        first = 1 + level * (layers + 1)
        block_out.append(get(f"input_blocks.{first}.0.out_layers.3.weight").shape[0])
        attn = f"input_blocks.{first}.1.proj_in.weight" in sd
        down_types.append("CrossAttnDownBlock2D" if attn else "DownBlock2D")
        depths.append(_count(sd, rf"input_blocks\.{first}\.1\.transformer_blocks\.(\d+)\.") if attn else None)
    for b in range(n):
        attn = f"output_blocks.{b * (layers + 1)}.1.proj_in.weight" in sd
        up_types.append("CrossAttnUpBlock2D" if attn else "UpBlock2D")

    proj = next((v for k, v in sd.items() if k.endswith(".proj_in.weight")), None)
    linear = proj is not None and proj.ndim == 2
    ctx = next((v.shape[1] for k, v in sd.items() if k.endswith("attn2.to_k.weight")), None)
    if linear or (ctx is not None and ctx != 768):
        heads = [c // 64 for c in block_out] if all(c % 64 == 0 for c in block_out) else 8
    else:
        heads = 8

    depths_used = [d for d in depths if d is not None] or [1]  # levels without attention: any depth
    config: dict[str, Any] = {
        "sample_size": 64,
        "in_channels": conv_in.shape[1],
        "out_channels": get("out.2.weight").shape[0],
        "down_block_types": down_types,
        "up_block_types": up_types,
        "block_out_channels": block_out,
        "layers_per_block": layers,
        "attention_head_dim": heads,
        "use_linear_projection": linear,
        "transformer_layers_per_block": depths_used[0] if len(set(depths_used)) == 1 else [d or 1 for d in depths],
    }
    if ctx is not None:
        config["cross_attention_dim"] = ctx
    temb = get("time_embed.0.weight").shape[0]
    if temb != 4 * block_out[0]:
        config["time_embedding_dim"] = temb
    if "label_emb.weight" in sd:
        config["num_class_embeds"] = sd["label_emb.weight"].shape[0]
    elif "label_emb.0.0.weight" in sd:
        if ctx in (1280, 2048):  # SDXL base / refiner: text embeddings + time ids
            config["addition_embed_type"] = "text_time"
            config["addition_time_embed_dim"] = 256
            config["addition_embed_type_num_heads"] = 64
        else:
            config["class_embed_type"] = "projection"
        config["projection_class_embeddings_input_dim"] = sd["label_emb.0.0.weight"].shape[1]
    return config


# --------------------------------------------------------------------------------------- VAE


def _vae_keys(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    return _strip(state_dict, VAE_PREFIXES, "encoder.conv_in.weight", "VAE", VAE_TOP, VAE_IGNORED)


def convert_sd_vae(state_dict: dict[str, Tensor], config: dict) -> dict[str, Tensor]:
    """The VAE of an original SD checkpoint (keys under ``first_stage_model.`` / ``vae.``, or a VAE file's
    bare ``encoder.`` / ``decoder.`` keys) in diffusers' ``AutoencoderKL`` key names; the mid attention's
    1x1-conv q/k/v/proj_out weights become Linear ``(C, C)``. ``config``: diffusers' (only the number of
    levels and ``layers_per_block`` are read)."""
    sd = _vae_keys(state_dict)
    n = len(config.get("block_out_channels", (64,)))
    layers = config.get("layers_per_block", 1)
    r = _Renamer()
    for name in ("conv_in", "conv_out"):
        r.add(f"encoder.{name}", f"encoder.{name}")
        r.add(f"decoder.{name}", f"decoder.{name}")
    r.add("encoder.norm_out", "encoder.conv_norm_out")
    r.add("decoder.norm_out", "decoder.conv_norm_out")
    r.add("quant_conv", "quant_conv")
    r.add("post_quant_conv", "post_quant_conv")
    for part in ("encoder", "decoder"):
        r.add(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", _vae_resnet_suffix)
        r.add(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", _vae_resnet_suffix)
        r.add(f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", _vae_attn_suffix)
    for i in range(n):
        for j in range(layers):
            r.add(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", _vae_resnet_suffix)
        if i != n - 1:
            r.add(f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv")
        up = n - 1 - i  # decoder levels are numbered from the deepest
        for j in range(layers + 1):
            r.add(f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{up}.resnets.{j}", _vae_resnet_suffix)
        if i != 0:
            r.add(f"decoder.up.{i}.upsample.conv", f"decoder.up_blocks.{up}.upsamplers.0.conv")
    return r.apply(sd, "VAE")


def infer_sd_vae_config(state_dict: dict[str, Tensor]) -> dict:
    """A diffusers ``AutoencoderKL`` config read off an original VAE's tensor shapes (``sample_size`` 512,
    ``scaling_factor`` 0.18215 and ``norm_num_groups`` 32, SD's values, are not in the shapes)."""
    sd = _vae_keys(state_dict)

    def get(key: str) -> Tensor:
        if key not in sd:
            raise CheckpointError(f"cannot infer the VAE config: the checkpoint has no {key!r}; pass config=")
        return sd[key]

    n = _count(sd, r"encoder\.down\.(\d+)\.")
    layers = _count(sd, r"encoder\.down\.0\.block\.(\d+)\.")
    if n < 1 or layers < 1:
        raise CheckpointError("cannot infer the VAE config: no encoder.down.*.block.* keys; pass config=")
    block_out = [get(f"encoder.down.{i}.block.0.conv2.weight").shape[0] for i in range(n)]
    return {
        "in_channels": get("encoder.conv_in.weight").shape[1],
        "out_channels": get("decoder.conv_out.weight").shape[0],
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": block_out,
        "layers_per_block": layers,
        "latent_channels": get("decoder.conv_in.weight").shape[1],
        "sample_size": 512,
        "scaling_factor": 0.18215,
    }


# --------------------------------------------------------------------------------------- entry point

_COMPONENTS = {
    "UNet2DConditionModel": (convert_sd_unet, infer_sd_unet_config, ("down_blocks.0.resnets.0.conv1.weight",)),
    "AutoencoderKL": (convert_sd_vae, infer_sd_vae_config, ("encoder.down_blocks.0.resnets.0.conv1.weight",)),
}


def _explicit_config(config: Union[dict, PathLike]) -> dict:
    if isinstance(config, dict):
        return dict(config)
    if hasattr(config, "config") and isinstance(config.config, dict):
        return dict(config.config)
    path = os.fspath(config)
    if os.path.isdir(path):
        return read_config(path)
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                out = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: not a valid JSON config ({type(e).__name__}: {e})") from None
        if not isinstance(out, dict):
            raise CheckpointError(f"{path}: holds a {type(out).__name__}, not a JSON object")
        return out
    raise FileNotFoundError(f"config {path!r}: no such folder or file (fastgen reads local files only)")


def from_single_file(cls, path: PathLike, *, config: Union[dict, PathLike, None] = None, torch_dtype=None):
    """``cls`` (``UNet2DConditionModel`` or ``AutoencoderKL``, by class name) from an original Stable
    Diffusion single-file checkpoint (``.safetensors`` or ``.ckpt``), its keys converted to diffusers'.

    ``config``: a diffusers config dict, a folder holding ``config.json`` or a JSON file; by default
    inferred from the tensor shapes (:func:`infer_sd_unet_config` / :func:`infer_sd_vae_config`). A file
    already in diffusers' key names is loaded as is."""
    name = cls.__name__
    if name not in _COMPONENTS:
        raise TypeError(
            f"{name}.from_single_file: fastgen converts original Stable Diffusion checkpoints for "
            f"{' and '.join(_COMPONENTS)} only"
        )
    convert, infer, diffusers_marker = _COMPONENTS[name]
    file = os.fspath(path)
    if os.path.isdir(file):
        raise CheckpointError(
            f"{file}: is a folder; from_single_file reads one checkpoint file (use from_pretrained for a folder)"
        )
    state_dict = load_state_dict(file)
    try:
        if any(k in state_dict for k in diffusers_marker):
            converted = state_dict  # already diffusers' names
            cfg = _explicit_config(config) if config is not None else None
            if cfg is None:
                raise CheckpointError("the file is in diffusers' key names: pass config= (a folder or dict)")
        else:
            cfg = _explicit_config(config) if config is not None else infer(state_dict)
            converted = convert(state_dict, cfg)
    except CheckpointError as e:
        raise CheckpointError(f"{file}: {e}") from None
    return build_and_load(cls, cfg, converted, file, torch_dtype)
