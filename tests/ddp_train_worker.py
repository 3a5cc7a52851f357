"""Run under torchrun by tests/test_train_distributed.py (or alone): a few steps of a tiny trainer on digits,
then rank 0 writes the final weights to argv[2]. argv[1] picks the trainer; argv[3:] are key=value loop options (resume=1: fit(resume=True))."""

import sys

import torch

from fastgen.data import load_digits
from fastgen.train.config import TrainConfig
from fastgen.train.diffusion import DiffusionOptions, DiffusionTrainer
from fastgen.train.vae import VAEOptions, VAETrainer


def build(kind: str, loop: dict):
    torch.set_num_threads(1)
    data = load_digits(16, "train")
    config = TrainConfig(progress=False, log_every=1, **loop)
    if kind == "vae":
        return VAETrainer(data, VAEOptions(block_out_channels=(8, 16), norm_num_groups=4), config)
    if kind == "gan":
        from fastgen.train.gan import DCGANTrainer, GANOptions

        return DCGANTrainer(data, GANOptions(num_classes=10, ngf=8, ndf=8, latent_dim=16, r1_gamma=1.0), config)
    options = DiffusionOptions(space="pixel", conditioning="class", class_names=list(data.class_names),
                               block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=32,
                               attention_head_dim=1)
    return DiffusionTrainer(data, options, config)


def parse(items) -> dict:
    loop = {}
    for item in items:
        k, v = item.split("=", 1)
        loop[k] = v if k == "out_dir" else (float(v) if "." in v or "e-" in v else int(v))
    return loop


def main():
    train_and_save(sys.argv[1], sys.argv[2], parse(sys.argv[3:]))


def train_and_save(kind: str, out: str, loop: dict) -> None:
    loop = dict(loop)
    resume = bool(loop.pop("resume", 0))
    trainer = build(kind, loop)
    trainer.fit(resume=resume)
    if trainer.is_main:
        from safetensors.torch import save_file

        tensors = {f"{name}.{k}": v.detach().contiguous() for name, m in trainer.models.items()
                   for k, v in m.state_dict().items()}
        save_file(tensors, out)
    trainer.dist.close()


if __name__ == "__main__":
    main()
