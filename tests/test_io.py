"""fastgen.io: diffusers' folder layout both ways, every bad checkpoint refused with a clear error (and a
malicious pickle never run), original Stable Diffusion single files converted exactly as diffusers converts
them, and pipeline folders."""

from __future__ import annotations

import importlib
import json
import os
import pickle
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # diffusers must never reach for the network here

import pytest
import torch
from torch import nn

import fastgen.models
from fastgen import io
from fastgen._config import register_to_config
from fastgen.io import CheckpointError, CheckpointNotFoundError
from fastgen.models._modeling import ModelMixin

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders import single_file_utils as dsf  # noqa: E402

_MODULES = {"UNet2DConditionModel": "unet_2d_condition", "UNet2DModel": "unet_2d", "AutoencoderKL": "autoencoder_kl"}


def fastgen_class(name: str):
    """fastgen's model class ``name``, or a skip while it is not written yet."""
    cls = getattr(fastgen.models, name, None)
    if cls is None:
        try:
            cls = getattr(importlib.import_module(f"fastgen.models.{_MODULES[name]}"), name, None)
        except ImportError as e:
            pytest.skip(f"fastgen.models.{name} is not available yet ({e})")
    if cls is None:
        pytest.skip(f"fastgen.models.{name} is not available yet")
    return cls


def model_class(impl: str, name: str):
    """fastgen's class, or diffusers' class driven through fastgen.io (same configs and key names)."""
    return fastgen_class(name) if impl == "fastgen" else getattr(diffusers, name)


# ----------------------------------------------------------------------------------------- tiny models


class Tiny(ModelMixin):
    @register_to_config
    def __init__(self, channels: int = 3, hidden: int = 8, tie: bool = False, scratch: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(channels, hidden, 3, padding=1)
        self.norm = nn.GroupNorm(2, hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, hidden)
        if tie:
            self.out.weight = self.proj.weight
        if scratch:  # a non-persistent buffer: not in the state dict, computed here
            self.register_buffer("scale", torch.arange(hidden, dtype=torch.float32), persistent=False)


def tiny(**kw) -> Tiny:
    torch.manual_seed(0)
    m = Tiny(**kw)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p))  # not the init values a fresh build would also give
    return m


def assert_same_weights(a: nn.Module | dict, b: nn.Module | dict):
    sa = a if isinstance(a, dict) else a.state_dict()
    sb = b if isinstance(b, dict) else b.state_dict()
    assert list(sa) == list(sb) or sorted(sa) == sorted(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


UNET_SD1 = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 32, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
)
UNET_SD2 = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(64, 128),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=48, attention_head_dim=(1, 2), use_linear_projection=True, norm_num_groups=16,
    transformer_layers_per_block=2,
)
VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
    latent_channels=4, norm_num_groups=16, sample_size=32,
)
UNET2D = dict(
    sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
)


def randomized(model: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return model.eval()


def diffusers_model(name: str, config: dict):
    torch.manual_seed(0)
    return randomized(getattr(diffusers, name)(**config))


# ----------------------------------------------------------------------------------------- round trips


def test_roundtrip_safetensors(tmp_path):
    m = tiny()
    m.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["_class_name"] == "Tiny" and re.fullmatch(r"\d+\.\d+\.\d+", cfg["_diffusers_version"])
    assert {k: v for k, v in cfg.items() if not k.startswith("_")} == dict(m.config)
    m.train()
    loaded = Tiny.from_pretrained(tmp_path)
    assert not loaded.training  # eval(), like diffusers
    assert loaded.config == m.config
    assert_same_weights(loaded, m)
    assert all(not p.is_meta and p.data_ptr() % 64 == 0 for p in loaded.parameters())  # torch-allocated, aligned
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in loaded.parameters())


@pytest.mark.parametrize("max_shard_size", [300, "1KB", "0.001MB"])
def test_roundtrip_sharded_and_back(tmp_path, max_shard_size):
    m = tiny(hidden=16)
    m.save_pretrained(tmp_path, max_shard_size=max_shard_size)
    index = json.loads((tmp_path / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all(re.fullmatch(r"diffusion_pytorch_model-\d{5}-of-\d{5}\.safetensors", s) for s in shards)
    assert sorted(index["weight_map"]) == sorted(m.state_dict())
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in m.state_dict().values())
    assert_same_weights(Tiny.from_pretrained(tmp_path), m)
    assert_same_weights(io.load_state_dict(tmp_path / "diffusion_pytorch_model.safetensors.index.json"), m.state_dict())
    # saving unsharded into the same folder removes the index and the stale shards
    m2 = tiny(hidden=16)
    with torch.no_grad():
        m2.proj.weight.mul_(2)
    m2.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert_same_weights(Tiny.from_pretrained(tmp_path), m2)


def test_roundtrip_bin_and_use_safetensors(tmp_path):
    m = tiny()
    m.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "diffusion_pytorch_model.bin").is_file()
    assert_same_weights(Tiny.from_pretrained(tmp_path), m)
    with pytest.raises(CheckpointNotFoundError, match=r"diffusion_pytorch_model\.safetensors.*use_safetensors=True"):
        Tiny.from_pretrained(tmp_path, use_safetensors=True)
    m2 = tiny()
    with torch.no_grad():
        m2.conv.bias.fill_(7)
    m2.save_pretrained(tmp_path)  # both files now: safetensors preferred, .bin on request
    assert torch.equal(Tiny.from_pretrained(tmp_path).conv.bias, m2.conv.bias)
    assert torch.equal(Tiny.from_pretrained(tmp_path, use_safetensors=False).conv.bias, m.conv.bias)
    m.save_pretrained(tmp_path / "sharded_bin", safe_serialization=False, max_shard_size=300)
    assert (tmp_path / "sharded_bin" / "diffusion_pytorch_model.bin.index.json").is_file()
    assert_same_weights(Tiny.from_pretrained(tmp_path / "sharded_bin"), m)


def test_variant_and_torch_dtype(tmp_path):
    m = tiny().to(torch.float16)
    m.save_pretrained(tmp_path, variant="fp16")
    assert (tmp_path / "diffusion_pytorch_model.fp16.safetensors").is_file()
    loaded = Tiny.from_pretrained(tmp_path, variant="fp16", torch_dtype=torch.float16)
    assert loaded.dtype == torch.float16
    assert_same_weights(loaded, m)
    # without torch_dtype the weights take the model's dtype (fp32), as in load_state_dict
    assert Tiny.from_pretrained(tmp_path, variant="fp16").dtype == torch.float32
    with pytest.raises(CheckpointNotFoundError, match=r"looked for .*diffusion_pytorch_model\.safetensors"):
        Tiny.from_pretrained(tmp_path)
    bf = Tiny.from_pretrained(tmp_path, variant="fp16", torch_dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf.parameters())
    m.save_pretrained(tmp_path / "sh", variant="fp16", max_shard_size=200)
    assert (tmp_path / "sh" / "diffusion_pytorch_model.safetensors.index.fp16.json").is_file()
    assert any(n.startswith("diffusion_pytorch_model.fp16-00001-of-") for n in os.listdir(tmp_path / "sh"))
    assert_same_weights(Tiny.from_pretrained(tmp_path / "sh", variant="fp16", torch_dtype=torch.float16), m)
    with pytest.raises(TypeError, match="torch_dtype"):
        Tiny.from_pretrained(tmp_path, variant="fp16", torch_dtype="half-ish")


def test_model_safetensors_name_and_subfolder(tmp_path):
    m = tiny()
    m.save_pretrained(tmp_path / "unet")
    os.rename(tmp_path / "unet" / "diffusion_pytorch_model.safetensors", tmp_path / "unet" / "model.safetensors")
    assert_same_weights(Tiny.from_pretrained(tmp_path, subfolder="unet"), m)


def test_tied_weights_and_buffers(tmp_path):
    m = tiny(tie=True, scratch=True)
    assert m.out.weight is m.proj.weight
    m.save_pretrained(tmp_path)  # safetensors refuses shared storage: io clones
    loaded = Tiny.from_pretrained(tmp_path)
    assert loaded.out.weight is loaded.proj.weight
    assert torch.equal(loaded.scale, torch.arange(8.0))
    assert_same_weights(loaded, m)


def test_save_is_atomic(tmp_path, monkeypatch):
    m = tiny()
    m.save_pretrained(tmp_path)
    before = (tmp_path / "diffusion_pytorch_model.safetensors").read_bytes()
    import safetensors.torch

    def killed(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt  # the process dies mid-write

    monkeypatch.setattr(safetensors.torch, "save_file", killed)
    m2 = tiny()
    with torch.no_grad():
        m2.conv.weight.zero_()
    with pytest.raises(KeyboardInterrupt):
        m2.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["config.json", "diffusion_pytorch_model.safetensors"]  # no temp left
    monkeypatch.undo()
    assert_same_weights(Tiny.from_pretrained(tmp_path), m)


def test_load_kwargs(tmp_path):
    tiny().save_pretrained(tmp_path)
    Tiny.from_pretrained(tmp_path, local_files_only=False, use_safetensors=None, variant=None)
    with pytest.raises(TypeError, match="revision"):
        Tiny.from_pretrained(tmp_path, revision="main")
    with pytest.raises(TypeError):
        io.save_model(tiny(), tmp_path, push_to_hub=True)
    with pytest.raises(ValueError, match="max_shard_size"):
        io.save_model(tiny(), tmp_path, max_shard_size="lots")


# ----------------------------------------------------------------------------------------- bad folders and files


@pytest.mark.parametrize("path", ["runwayml/stable-diffusion-v1-5", "stabilityai/sd-vae-ft-mse"])
def test_hub_id_is_refused(path):
    with pytest.raises(FileNotFoundError, match="local folders only and never downloads"):
        Tiny.from_pretrained(path)


def test_missing_files(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        Tiny.from_pretrained(tmp_path / "file")
    with pytest.raises(CheckpointNotFoundError, match="no config.json"):
        Tiny.from_pretrained(tmp_path)
    tiny().save_pretrained(tmp_path / "m")
    os.remove(tmp_path / "m" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointNotFoundError) as e:
        Tiny.from_pretrained(tmp_path / "m")
    for name in ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin",
                 "diffusion_pytorch_model.safetensors.index.json"):
        assert name in str(e.value)
    assert isinstance(e.value, ValueError) and isinstance(e.value, FileNotFoundError)
    with pytest.raises(CheckpointNotFoundError, match="no such file"):
        io.load_state_dict(tmp_path / "nope.safetensors")
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json.*not a valid JSON"):
        Tiny.from_pretrained(tmp_path / "m")


def _save_raw(folder, state_dict, config=None):
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config or dict(Tiny().config)))
    save_file(state_dict, str(folder / "diffusion_pytorch_model.safetensors"))
    return str(folder / "diffusion_pytorch_model.safetensors")


def test_missing_unexpected_and_wrong_shape(tmp_path):
    sd = {k: v.clone() for k, v in tiny().state_dict().items()}
    del sd["proj.bias"]
    sd["extra.weight"] = torch.zeros(2)
    file = _save_raw(tmp_path / "a", sd)
    with pytest.raises(CheckpointError) as e:
        Tiny.from_pretrained(tmp_path / "a")
    msg = str(e.value)
    assert file in msg and "1 missing keys" in msg and "'proj.bias'" in msg
    assert "1 unexpected keys" in msg and "'extra.weight'" in msg
    sd = {k: v.clone() for k, v in tiny().state_dict().items()}
    sd["out.weight"] = torch.zeros(8, 5)
    file = _save_raw(tmp_path / "b", sd)
    with pytest.raises(CheckpointError, match=re.escape(f"{file}: does not match") + r".*out\.weight: model expects \(8, 8\), file has \(8, 5\)"):
        Tiny.from_pretrained(tmp_path / "b")
    # many missing keys: the first 10 and the count
    big = {f"k{i}": torch.zeros(1) for i in range(30)}
    with pytest.raises(CheckpointError, match=r"30 missing keys \(first 10: \['k0'.*'k9'\]\)"):
        io.check_state_dict(big, {}, "somefile")
    # a config key the class does not take is refused by from_config
    file = _save_raw(tmp_path / "c", tiny().state_dict(), {**dict(Tiny().config), "bogus": 1})
    with pytest.raises(ValueError, match="bogus"):
        Tiny.from_pretrained(tmp_path / "c")


def test_truncated_and_corrupt_safetensors(tmp_path):
    file = _save_raw(tmp_path / "m", tiny().state_dict())
    data = open(file, "rb").read()
    for name, blob in [("truncated", data[: len(data) // 2]), ("header", data[:20]), ("empty", b""),
                       ("garbage", b"\x00" * 64), ("badjson", (8).to_bytes(8, "little") + b"{nope!!}")]:
        open(file, "wb").write(blob)
        with pytest.raises(CheckpointError, match=re.escape(file) + ".*not a valid safetensors file") as e:
            Tiny.from_pretrained(tmp_path / "m")
        assert type(e.value) is CheckpointError, name
        with pytest.raises(CheckpointError, match=re.escape(file)):
            io.load_state_dict(file)


def test_corrupt_index(tmp_path):
    m = tiny(hidden=16)
    m.save_pretrained(tmp_path, max_shard_size=300)
    index = tmp_path / "diffusion_pytorch_model.safetensors.index.json"
    good = json.loads(index.read_text())
    cases = {
        "{broken": "not a valid shard index",
        json.dumps({"metadata": {}}): "weight_map",
        json.dumps({"weight_map": {"conv.weight": "../../etc/passwd"}}): "not a file name",
        json.dumps({"weight_map": {**good["weight_map"], "conv.weight": "gone.safetensors"}}): "shard files missing: gone.safetensors",
        json.dumps({"weight_map": {k: v for k, v in good["weight_map"].items() if k != "conv.bias"}}): "keys not in the index: \\['conv.bias'\\]",
    }
    for text, pattern in cases.items():
        index.write_text(text)
        with pytest.raises(CheckpointError, match=pattern) as e:
            Tiny.from_pretrained(tmp_path)
        assert "diffusion_pytorch_model" in str(e.value)


class _Evil:
    """Unpickling this would run a shell command that creates the marker file."""

    marker = ""

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvilExec:
    marker = ""

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's notice about pickle.dump's protocol
@pytest.mark.parametrize("suffix", [".bin", ".ckpt", ".pt"])
@pytest.mark.parametrize("how", ["torch.save", "pickle", "exec"])
def test_malicious_pickle_is_never_executed(tmp_path, suffix, how):
    marker = tmp_path / "pwned"
    file = tmp_path / f"evil{suffix}"
    if how == "exec":
        _EvilExec.marker = str(marker)
        torch.save({"weight": torch.zeros(2), "payload": _EvilExec()}, file)
    else:
        _Evil.marker = str(marker)
        payload = {"state_dict": {"weight": torch.zeros(2), "payload": _Evil()}}
        if how == "torch.save":
            torch.save(payload, file)
        else:
            with open(file, "wb") as f:
                pickle.dump(payload, f)
    with pytest.raises(CheckpointError, match=re.escape(str(file)) + ".*objects other than tensors.*fastgen does not unpickle them"):
        io.load_state_dict(file)
    assert not marker.exists()
    # through every entry point
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(dict(Tiny().config)))
    os.replace(file, folder / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="fastgen does not unpickle"):
        Tiny.from_pretrained(folder)
    with pytest.raises(CheckpointError, match="fastgen does not unpickle"):
        io.from_single_file(diffusers.AutoencoderKL, folder / "diffusion_pytorch_model.bin")
    assert not marker.exists()


def test_non_tensor_values_and_state_dict_unwrap(tmp_path):
    sd = tiny().state_dict()
    torch.save({"state_dict": dict(sd), "global_step": 470000, "epoch": 3}, tmp_path / "sd.ckpt")
    assert_same_weights(io.load_state_dict(tmp_path / "sd.ckpt"), sd)
    torch.save({**sd, "step": 3, "lr": 0.1}, tmp_path / "mixed.bin")
    with pytest.raises(CheckpointError, match=r"mixed\.bin: 2 entries are not str -> tensor.*'step' \(int\)"):
        io.load_state_dict(tmp_path / "mixed.bin")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match=r"list\.pt: holds a list"):
        io.load_state_dict(tmp_path / "list.pt")
    (tmp_path / "trunc.bin").write_bytes((tmp_path / "sd.ckpt").read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"trunc\.bin: not a readable torch checkpoint"):
        io.load_state_dict(tmp_path / "trunc.bin")


# ----------------------------------------------------------------------------------------- diffusers <-> fastgen


COMPAT = [("UNet2DConditionModel", UNET_SD1), ("UNet2DModel", UNET2D), ("AutoencoderKL", VAE)]


@pytest.mark.parametrize("name,config", COMPAT, ids=[c[0] for c in COMPAT])
def test_diffusers_layout_read_and_written(tmp_path, name, config):
    """fastgen.io reads what diffusers writes (single and sharded) and diffusers reads what fastgen.io writes,
    with diffusers' classes on both sides: the folder format itself."""
    ref = diffusers_model(name, config)
    cls = getattr(diffusers, name)
    ref.save_pretrained(tmp_path / "d", max_shard_size="100KB")
    assert (tmp_path / "d" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert_same_weights(io.load_model(cls, tmp_path / "d"), ref)
    io.save_model(ref, tmp_path / "f", max_shard_size="100KB")
    assert_same_weights(cls.from_pretrained(tmp_path / "f"), ref)
    io.save_model(ref, tmp_path / "g")
    back = cls.from_pretrained(tmp_path / "g")
    assert_same_weights(back, ref)
    public = lambda c: json.loads(json.dumps({k: v for k, v in c.items() if not k.startswith("_")}))  # noqa: E731
    assert public(back.config) == public(ref.config)


@pytest.mark.parametrize("name,config", COMPAT, ids=[c[0] for c in COMPAT])
def test_fastgen_and_diffusers_load_each_other(tmp_path, name, config):
    cls = fastgen_class(name)
    ref = diffusers_model(name, config)
    ref.save_pretrained(tmp_path / "d")
    ours = cls.from_pretrained(tmp_path / "d")
    assert isinstance(ours, cls) and not ours.training
    assert_same_weights(ours, ref)
    assert all(p.data_ptr() % 64 == 0 and p.requires_grad for p in ours.parameters())
    direct = cls.from_config(dict(ref.config))  # built normally, weights copied in
    direct.load_state_dict(ref.state_dict())
    torch.testing.assert_close(_forward(name, ours), _forward(name, direct.eval()), rtol=0, atol=0)
    ours.save_pretrained(tmp_path / "f")
    saved = json.loads((tmp_path / "f" / "config.json").read_text())
    assert saved["_class_name"] == name
    back = getattr(diffusers, name).from_pretrained(tmp_path / "f")
    assert_same_weights(back, ref)
    ours16 = cls.from_pretrained(tmp_path / "d", torch_dtype=torch.float16)
    assert ours16.dtype == torch.float16


def _forward(name: str, model) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if name == "UNet2DConditionModel":
            return model(torch.randn(1, 4, 8, 8, generator=g), 10, torch.randn(1, 3, 32, generator=g)).sample
        if name == "UNet2DModel":
            return model(torch.randn(1, 3, 8, 8, generator=g), 10).sample
        return model(torch.randn(1, 3, 16, 16, generator=g)).sample


# ----------------------------------------------------------------------------------------- single-file SD


def to_original_unet(sd: dict, config: dict) -> dict:
    """diffusers UNet2DConditionModel keys -> the original SD layout (the inverse of the conversion)."""
    L = config["layers_per_block"]
    res = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    out = {}
    for k, v in sd.items():
        head, _, param = k.rpartition(".")
        if head in fixed:
            new = f"{fixed[head]}.{param}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.*)", k):
            new = f"input_blocks.{1 + int(m[1]) * (L + 1) + int(m[2])}.0.{res[m[3]]}.{m[4]}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", k):
            new = f"input_blocks.{1 + int(m[1]) * (L + 1) + int(m[2])}.1.{m[3]}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", k):
            new = f"input_blocks.{(int(m[1]) + 1) * (L + 1)}.0.op.{m[2]}"
        elif m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(\w+)\.(.*)", k):
            new = f"middle_block.{2 * int(m[1])}.{res[m[2]]}.{m[3]}"
        elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.*)", k):
            new = f"middle_block.1.{m[1]}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.*)", k):
            new = f"output_blocks.{int(m[1]) * (L + 1) + int(m[2])}.0.{res[m[3]]}.{m[4]}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", k):
            new = f"output_blocks.{int(m[1]) * (L + 1) + int(m[2])}.1.{m[3]}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", k):
            b = int(m[1])
            sub = 2 if "CrossAttn" in config["up_block_types"][b] else 1
            new = f"output_blocks.{b * (L + 1) + L}.{sub}.conv.{m[2]}"
        else:
            raise AssertionError(f"test helper does not map {k}")
        out["model.diffusion_model." + new] = v
    return out


def to_original_vae(sd: dict, config: dict) -> dict:
    n = len(config["block_out_channels"])
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for k, v in sd.items():
        new = k.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", new):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.*)", new):
            new = f"encoder.down.{m[1]}.downsample.{m[2]}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", new):
            new = f"decoder.up.{n - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)", new):
            new = f"decoder.up.{n - 1 - int(m[1])}.upsample.{m[2]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.*)", new):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)\.(weight|bias)", new):
            new = f"{m[1]}.mid.attn_1.{attn[m[2]]}.{m[3]}"
            if m[2] != "group_norm" and m[3] == "weight":
                v = v[:, :, None, None]  # the original stores these as 1x1 convolutions
        out["first_stage_model." + new] = v
    return out


def full_checkpoint(unet_sd=None, vae_sd=None) -> dict:
    """An original SD checkpoint: other components and schedule buffers beside the one converted."""
    ckpt = {"cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(4)[None],
            "alphas_cumprod": torch.linspace(1, 0, 10), "model_ema.decay": torch.tensor(0.999)}
    ckpt.update(unet_sd or {})
    ckpt.update(vae_sd or {})
    return ckpt


def assert_matches_diffusers_conversion(ours: dict, theirs: dict, ref: dict):
    assert sorted(ours) == sorted(theirs) == sorted(ref)
    for k in ours:
        assert ours[k].shape == theirs[k].shape == ref[k].shape, k
        assert torch.equal(ours[k], theirs[k]) and torch.equal(ours[k], ref[k]), k


@pytest.mark.parametrize("config", [UNET_SD1, UNET_SD2], ids=["sd1", "sd2"])
def test_convert_sd_unet_matches_diffusers(config):
    ref = diffusers_model("UNet2DConditionModel", config)
    sd = ref.state_dict()
    orig = full_checkpoint(to_original_unet(sd, ref.config), to_original_vae({"encoder.conv_in.weight": torch.zeros(1)}, VAE))
    ours = io.convert_sd_unet(orig, dict(ref.config))
    theirs = dsf.convert_ldm_unet_checkpoint(dict(orig), dict(ref.config))
    assert_matches_diffusers_conversion(ours, theirs, sd)
    # the same from a file of the U-Net's keys alone (no prefix)
    bare = {k.removeprefix("model.diffusion_model."): v for k, v in orig.items() if k.startswith("model.diffusion_model.")}
    assert_matches_diffusers_conversion(io.convert_sd_unet(bare, dict(ref.config)), theirs, sd)
    inferred = io.infer_sd_unet_config(orig)
    for key in ("in_channels", "out_channels", "layers_per_block", "cross_attention_dim", "use_linear_projection"):
        assert inferred[key] == config[key] if key in config else True, key
    assert tuple(inferred["block_out_channels"]) == config["block_out_channels"]
    assert tuple(inferred["down_block_types"]) == config["down_block_types"]
    assert tuple(inferred["up_block_types"]) == config["up_block_types"]
    assert inferred["transformer_layers_per_block"] == config.get("transformer_layers_per_block", 1)
    assert inferred["use_linear_projection"] == config.get("use_linear_projection", False)
    assert inferred["attention_head_dim"] == (8 if not config.get("use_linear_projection") else [1, 2])
    assert_matches_diffusers_conversion(io.convert_sd_unet(orig, inferred), theirs, sd)


def test_infer_sd_unet_config_sd_shapes():
    """SD 1.x and 2.x head dims from the real models' channel counts (shapes only; nothing built)."""
    def fake(ctx, linear):
        sd = {"input_blocks.0.0.weight": torch.empty(320, 4, 3, 3), "out.2.weight": torch.empty(4, 320, 3, 3),
              "time_embed.0.weight": torch.empty(1280, 320)}
        chans = [320, 640, 1280, 1280]
        for level, c in enumerate(chans):
            for j in range(2):
                i = 1 + level * 3 + j
                sd[f"input_blocks.{i}.0.out_layers.3.weight"] = torch.empty(c, c, 3, 3)
                if level < 3:
                    sd[f"input_blocks.{i}.1.proj_in.weight"] = torch.empty(c, c) if linear else torch.empty(c, c, 1, 1)
                    sd[f"input_blocks.{i}.1.transformer_blocks.0.attn2.to_k.weight"] = torch.empty(c, ctx)
            if level < 3:
                sd[f"input_blocks.{3 * level + 3}.0.op.weight"] = torch.empty(c, c, 3, 3)
        for b in range(4):
            for j in range(3):
                sd[f"output_blocks.{3 * b + j}.0.out_layers.3.weight"] = torch.empty(1, 1, 1, 1)
                if b > 0:
                    sd[f"output_blocks.{3 * b + j}.1.proj_in.weight"] = torch.empty(1, 1)
        return {"model.diffusion_model." + k: v for k, v in sd.items()}

    sd1 = io.infer_sd_unet_config(fake(768, False))
    assert sd1["cross_attention_dim"] == 768 and sd1["attention_head_dim"] == 8 and not sd1["use_linear_projection"]
    assert sd1["block_out_channels"] == [320, 640, 1280, 1280] and sd1["layers_per_block"] == 2
    assert sd1["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert sd1["up_block_types"] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    sd2 = io.infer_sd_unet_config(fake(1024, True))
    assert sd2["cross_attention_dim"] == 1024 and sd2["attention_head_dim"] == [5, 10, 20, 20]
    assert sd2["use_linear_projection"]
    assert "time_embedding_dim" not in sd1


def test_convert_sd_vae_matches_diffusers():
    ref = diffusers_model("AutoencoderKL", VAE)
    sd = ref.state_dict()
    orig = full_checkpoint({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, to_original_vae(sd, ref.config))
    assert orig["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    ours = io.convert_sd_vae(orig, dict(ref.config))
    theirs = dsf.convert_ldm_vae_checkpoint(dict(orig), dict(ref.config))
    assert ours["encoder.mid_block.attentions.0.to_q.weight"].shape == (64, 64)
    assert_matches_diffusers_conversion(ours, theirs, sd)
    bare = {k.removeprefix("first_stage_model."): v for k, v in orig.items() if k.startswith("first_stage_model.")}
    bare["loss.logvar"] = torch.zeros(())  # a standalone VAE file's training leftovers are skipped
    assert_matches_diffusers_conversion(io.convert_sd_vae(bare, dict(ref.config)), theirs, sd)
    inferred = io.infer_sd_vae_config(orig)
    for key in ("in_channels", "out_channels", "layers_per_block", "latent_channels"):
        assert inferred[key] == VAE[key], key
    assert tuple(inferred["block_out_channels"]) == VAE["block_out_channels"]
    assert inferred["scaling_factor"] == 0.18215


def test_convert_errors():
    ref = diffusers_model("AutoencoderKL", VAE)
    orig = to_original_vae(ref.state_dict(), ref.config)
    with pytest.raises(CheckpointError, match="do not fit the config's layout"):
        io.convert_sd_vae(orig, {**VAE, "layers_per_block": 0})
    with pytest.raises(CheckpointError, match="not an original Stable Diffusion U-Net"):
        io.convert_sd_unet(orig, UNET_SD1)
    with pytest.raises(CheckpointError, match="not an original Stable Diffusion VAE"):
        io.convert_sd_vae({"model.diffusion_model.x": torch.zeros(1)}, VAE)
    bad = dict(orig)
    bad["first_stage_model.encoder.mid.attn_1.q.weight"] = torch.zeros(64, 64, 3, 3)
    with pytest.raises(CheckpointError, match=r"encoder\.mid\.attn_1\.q\.weight"):
        io.convert_sd_vae(bad, VAE)


@pytest.mark.parametrize("impl", ["fastgen", "diffusers"])
@pytest.mark.parametrize("fmt", [".safetensors", ".ckpt"])
def test_from_single_file(tmp_path, impl, fmt):
    from safetensors.torch import save_file

    unet_ref = diffusers_model("UNet2DConditionModel", UNET_SD1)
    vae_ref = diffusers_model("AutoencoderKL", VAE)
    unet_cls = model_class(impl, "UNet2DConditionModel")
    vae_cls = model_class(impl, "AutoencoderKL")
    ckpt = full_checkpoint(to_original_unet(unet_ref.state_dict(), unet_ref.config), to_original_vae(vae_ref.state_dict(), vae_ref.config))
    file = tmp_path / f"sd{fmt}"
    if fmt == ".safetensors":
        save_file({k: v.contiguous() for k, v in ckpt.items()}, str(file))
    else:
        torch.save({"state_dict": ckpt, "global_step": 1}, file)
    load = unet_cls.from_single_file if impl == "fastgen" else (lambda p, **kw: io.from_single_file(unet_cls, p, **kw))
    unet = load(file, config=dict(unet_ref.config))
    assert_same_weights(unet, unet_ref)
    assert not unet.training
    unet_ref.save_pretrained(tmp_path / "unet_cfg")
    unet16 = load(file, config=tmp_path / "unet_cfg", torch_dtype=torch.float16)
    assert unet16.dtype == torch.float16
    inferred = load(file)  # config read off the shapes (norm_num_groups etc. at SD's defaults)
    assert_same_weights(inferred, unet_ref)
    vload = vae_cls.from_single_file if impl == "fastgen" else (lambda p, **kw: io.from_single_file(vae_cls, p, **kw))
    vae = vload(file, config=dict(vae_ref.config))
    assert_same_weights(vae, vae_ref)
    assert_same_weights(vload(file), vae_ref)
    with pytest.raises(CheckpointError, match=re.escape(str(file)) + ".*do not fit the config's layout"):
        load(file, config={**unet_ref.config, "layers_per_block": 2})
    if impl == "fastgen":
        with torch.no_grad():
            x = torch.randn(1, 4, 8, 8)
            ctx = torch.randn(1, 3, 32)
            torch.testing.assert_close(unet(x, 10, ctx).sample, unet_ref(x, 10, ctx).sample, rtol=1e-4, atol=1e-4)


def test_from_single_file_refuses_other_classes(tmp_path):
    torch.save({"a": torch.zeros(1)}, tmp_path / "x.ckpt")
    with pytest.raises(TypeError, match="UNet2DConditionModel and AutoencoderKL only"):
        io.from_single_file(Tiny, tmp_path / "x.ckpt")
    with pytest.raises(FileNotFoundError):
        io.from_single_file(diffusers.AutoencoderKL, tmp_path / "missing.safetensors")


# ----------------------------------------------------------------------------------------- pipelines


def _write_sd_pipeline(folder):
    unet = diffusers_model("UNet2DConditionModel", UNET_SD1)
    vae = diffusers_model("AutoencoderKL", VAE)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    diffusers.DDIMScheduler(num_train_timesteps=100, beta_schedule="scaled_linear").save_pretrained(folder / "scheduler")
    for sub in ("text_encoder", "tokenizer", "feature_extractor"):
        (folder / sub).mkdir()
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
        "feature_extractor": ["transformers", "CLIPImageProcessor"], "image_encoder": [None, None],
        "requires_safety_checker": False, "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }))
    return unet, vae


@pytest.mark.parametrize("impl", ["fastgen", "diffusers"])
def test_load_pipeline(tmp_path, monkeypatch, impl):
    names = ("UNet2DConditionModel", "AutoencoderKL")
    classes = {n: model_class(impl, n) for n in names}
    if impl == "diffusers":  # diffusers' classes standing in for fastgen's under the same names
        for n, c in classes.items():
            monkeypatch.setattr(fastgen.models, n, c, raising=False)
    unet, vae = _write_sd_pipeline(tmp_path)
    pipe = io.load_pipeline(tmp_path, torch_dtype=torch.float16)
    assert pipe.class_name == "StableDiffusionPipeline" and pipe.config == {"requires_safety_checker": False}
    assert isinstance(pipe["unet"], classes["UNet2DConditionModel"]) and isinstance(pipe.vae, classes["AutoencoderKL"])
    assert pipe.unet.dtype == torch.float16
    assert_same_weights(pipe.unet, unet.half())
    assert_same_weights(pipe.vae, vae.half())
    from fastgen.schedulers import DDIMScheduler

    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.scheduler.config.num_train_timesteps == 100
    assert pipe.skipped == {n: str(tmp_path / n) for n in ("feature_extractor", "text_encoder", "tokenizer")}
    assert pipe["text_encoder"] == str(tmp_path / "text_encoder")
    assert pipe["safety_checker"] is None and pipe["image_encoder"] is None


def test_load_pipeline_ddpm_written_by_diffusers(tmp_path):
    cls = fastgen_class("UNet2DModel")
    unet = diffusers_model("UNet2DModel", UNET2D)
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(num_train_timesteps=50)).save_pretrained(tmp_path)
    pipe = io.load_pipeline(tmp_path)
    assert isinstance(pipe.unet, cls)
    assert_same_weights(pipe.unet, unet)
    assert type(pipe.scheduler).__name__ == "DDPMScheduler" and pipe.scheduler.config.num_train_timesteps == 50


def test_load_pipeline_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="local folders only"):
        io.load_pipeline("runwayml/stable-diffusion-v1-5")
    with pytest.raises(CheckpointNotFoundError, match="no model_index.json"):
        io.load_pipeline(tmp_path)
    diffusers.PNDMScheduler().save_pretrained(tmp_path / "scheduler")
    (tmp_path / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"]}))
    with pytest.raises(CheckpointError, match="'scheduler' is a PNDMScheduler, which fastgen does not implement"):
        io.load_pipeline(tmp_path)
    pipe = io.load_pipeline(tmp_path, skip=("scheduler",))
    assert pipe.skipped == {"scheduler": str(tmp_path / "scheduler"), "text_encoder": str(tmp_path / "text_encoder")}
    with pytest.raises(ValueError, match="no such components"):
        io.load_pipeline(tmp_path, skip=("unet",))
    (tmp_path / "model_index.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="model_index.json: not valid JSON"):
        io.load_pipeline(tmp_path)
