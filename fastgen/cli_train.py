"""``fastgen quickstart | train | sample | evaluate``: the training side of the command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TRAINERS = ("vae", "conv-vae", "gan", "pix2pix", "diffusion")


def _fail(command: str, exc: BaseException) -> int:
    print(f"fastgen {command}: {exc}", file=sys.stderr)
    return 2


# ------------------------------------------------------------------ quickstart


def _cmd_quickstart(args) -> int:
    from .quickstart import run

    mode = "gan" if args.gan else "pix2pix" if args.pix2pix else "diffusion"
    try:
        run(args.out, mode=mode, quick=args.quick, seed=args.seed, device=args.device, progress=not args.no_progress)
    except ImportError as exc:
        return _fail("quickstart", f"{exc} (pip install 'fastgen[train]')")
    return 0


# ------------------------------------------------------------------ train


def _loop_config(args, **defaults):
    from .train.config import TrainConfig

    values = dict(defaults)
    for key in ("steps", "batch_size", "lr", "warmup_steps", "grad_accum", "max_grad_norm", "ema_decay", "precision",
                "seed", "sample_every", "checkpoint_every", "device", "log_every", "lr_schedule"):
        value = getattr(args, key)
        if value is not None:
            values[key] = value
    if args.no_ema:
        values["ema_decay"] = None
    if args.no_clip:
        values["max_grad_norm"] = None
    values["out_dir"] = args.out
    values["progress"] = not args.no_progress
    return TrainConfig(**values)


def _dataset(args, size: int, paired: bool = False):
    from .data import PairedImageFolder, load_dataset

    if paired:
        return PairedImageFolder(args.data, size=size, channels=args.channels, flip=args.flip)
    if args.data == "digits":
        return load_dataset("digits", size=size, channels=args.channels)
    return load_dataset(args.data, size=size, channels=args.channels, flip=args.flip)


def _build_trainer(args):
    """(trainer) for ``fastgen train KIND``: options from the flags, the data's channels and class names."""
    kind = args.kind
    size = args.size
    if kind == "vae":
        from .train.vae import VAEOptions, VAETrainer

        data = _dataset(args, size or 16)
        o = VAEOptions(image_size=size or 16, channels=_channels(data), kl_weight=args.kl_weight,
                       gan_weight=args.gan_weight, latent_channels=args.latent_channels)
        return VAETrainer(data, o, _loop_config(args, lr=2e-3, batch_size=64, steps=300, lr_schedule="cosine",
                                                ema_decay=0.99))
    if kind == "conv-vae":
        from .train.conv_vae import ConvVAEOptions, ConvVAETrainer

        data = _dataset(args, size or 16)
        o = ConvVAEOptions(image_size=size or 16, channels=_channels(data), latent_dim=args.latent_dim, beta=args.beta)
        return ConvVAETrainer(data, o, _loop_config(args, lr=2e-3, batch_size=64, steps=1000))
    if kind == "gan":
        from .train.gan import DCGANTrainer, GANOptions, default_config

        data = _dataset(args, size or 16)
        classes = len(getattr(data, "class_names", ()) or ()) if args.class_conditional else None
        if args.class_conditional and not classes:
            raise ValueError("--class-conditional needs labelled data (class sub-folders or the digits)")
        o = GANOptions(image_size=size or 16, channels=_channels(data), num_classes=classes or None, loss=args.loss,
                       r1_gamma=args.r1_gamma)
        base = default_config()
        return DCGANTrainer(data, o, _loop_config(args, lr=base.lr, beta1=base.beta1, max_grad_norm=None,
                                                  batch_size=64, steps=1500))
    if kind == "pix2pix":
        from .train.pix2pix import Pix2PixOptions, Pix2PixTrainer

        paired = args.data != "digits" and args.condition is None
        data = _dataset(args, size or 32, paired=paired)
        first = data[0]
        o = Pix2PixOptions(image_size=size or 32, in_channels=first[0].shape[0] if paired else _channels(data),
                           out_channels=first[1].shape[0] if paired else _channels(data),
                           condition=None if paired else (args.condition or "edges"), l1_weight=args.l1_weight)
        return Pix2PixTrainer(data, o, _loop_config(args, lr=2e-4, beta1=0.5, max_grad_norm=None, batch_size=32,
                                                    steps=600))
    from .train.diffusion import DiffusionOptions, DiffusionTrainer

    data = _dataset(args, size or 16)
    names = list(getattr(data, "class_names", ()) or ())
    space = "latent" if args.vae else "pixel"
    o = DiffusionOptions(space=space, image_size=size or 16, channels=_channels(data), conditioning=args.conditioning,
                         prediction_type=args.prediction_type, min_snr_gamma=args.min_snr_gamma,
                         cond_dropout=args.cond_dropout, class_names=names if args.conditioning != "none" else [])
    return DiffusionTrainer(data, o, _loop_config(args, lr=1e-3, batch_size=64, steps=1200, lr_schedule="cosine",
                                                  ema_decay=0.995, warmup_steps=50), vae=args.vae)


def _channels(data) -> int:
    return int(data[0][0].shape[0])


def _cmd_train(args) -> int:
    try:
        trainer = _build_trainer(args)
    except (ValueError, TypeError, FileNotFoundError, NotADirectoryError, ImportError) as exc:
        return _fail("train", exc)
    try:
        trainer.fit(resume=args.resume)
    except KeyboardInterrupt as exc:
        print(f"fastgen train: {exc or 'interrupted'}", file=sys.stderr)
        return 130
    except (ValueError, FloatingPointError) as exc:
        return _fail("train", exc)
    if trainer.is_main:
        print(f"trained {args.kind} for {trainer.step} steps in {trainer.timings.get('train_s', 0):.1f} s")
        print(f"model:   {Path(args.out, 'model')}")
        print(f"samples: {Path(args.out, 'samples')}")
        print(f"curves:  {Path(args.out, 'curves.png')}")
    return 0


# ------------------------------------------------------------------ sample / evaluate


def load_trained(folder, device: str = "cpu"):
    """(kind, generate(conditions, seeds) -> images, class names) of an exported model folder."""
    import torch

    from .train.export import read_manifest

    manifest = read_manifest(folder)
    kind = manifest["kind"]
    folder = Path(folder)
    if kind == "diffusion":
        from .train.diffusion import DiffusionModel

        model = DiffusionModel.from_folder(folder, device)
        names = model.options.class_names

        def generate(conditions, seeds, prompts=None, steps=None, guidance=None):
            return model.generate(conditions, prompts=prompts, seeds=seeds, steps=steps, guidance_scale=guidance)

        return kind, generate, names
    if kind == "dcgan":
        from .models import DCGANGenerator

        g = DCGANGenerator.from_pretrained(folder / "generator").eval().to(device)
        names = [str(i) for i in range(g.config.num_classes or 0)]

        @torch.no_grad()
        def generate(conditions, seeds, prompts=None, steps=None, guidance=None):
            if prompts is not None:
                raise ValueError("a DCGAN takes --class, not --prompt")
            z = torch.cat([torch.randn(1, g.config.latent_dim, generator=torch.Generator().manual_seed(int(s)))
                           for s in seeds]).to(device)
            labels = None
            if g.config.num_classes:
                labels = torch.tensor([int(c) for c in conditions], device=device)
            return g(z, labels)

        return kind, generate, names
    if kind == "conv_vae":
        from .models.conv_vae import ConvVAE

        vae = ConvVAE.from_pretrained(folder / "vae").eval().to(device)

        @torch.no_grad()
        def generate(conditions, seeds, prompts=None, steps=None, guidance=None):
            z = torch.cat([torch.randn(1, vae.config.latent_dim, generator=torch.Generator().manual_seed(int(s)))
                           for s in seeds]).to(device)
            return vae.decode(z)

        return kind, generate, []
    raise ValueError(f"fastgen sample cannot sample a {kind!r} model (pix2pix translates images: use its "
                     "trainer's translate())")


def _conditions(args, names):
    if args.cls is not None:
        out = []
        for c in args.cls:
            if c.isdigit():
                out.append(int(c))
            elif c in names:
                out.append(names.index(c))
            else:
                raise ValueError(f"--class {c!r}: expected an index or one of {', '.join(names)}")
        return out
    return None


def _cmd_sample(args) -> int:
    from .images import save_image_grid

    try:
        kind, generate, names = load_trained(args.model, args.device or "cpu")
        seeds = list(range(args.seed, args.seed + args.num))
        conditions = _conditions(args, names)
        if conditions is None and args.prompt is None and names:
            conditions = [0]
        if conditions is not None and len(conditions) == 1:
            conditions = conditions * len(seeds)
        prompts = args.prompt * len(seeds) if args.prompt is not None and len(args.prompt) == 1 else args.prompt
        images = generate(conditions, seeds, prompts=prompts, steps=args.steps, guidance=args.guidance)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as exc:
        return _fail("sample", exc)
    path = save_image_grid(images.float().cpu(), args.output, nrow=min(10, len(seeds)),
                           scale=max(1, 64 // images.shape[-1]))
    print(f"wrote {len(seeds)} {kind} samples (seeds {seeds[0]}..{seeds[-1]}) to {path}")
    return 0


def _cmd_evaluate(args) -> int:
    import torch

    from . import metrics
    from .data import load_digits

    try:
        kind, generate, names = load_trained(args.model, args.device or "cpu")
        n = args.num
        labels = torch.arange(n) % max(1, len(names)) if names else None
        conditions = [int(c) for c in labels] if labels is not None else [0] * n
        fake = generate(conditions, list(range(args.seed, args.seed + n)), steps=args.steps).float().cpu()
        real = load_digits(fake.shape[-1], "test", fake.shape[1]).images
        scores = metrics.evaluate_samples(fake, labels if len(names) == 10 else None, real=real)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as exc:
        return _fail("evaluate", exc)
    print(json.dumps(scores, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(scores, indent=1))
    return 0


# ------------------------------------------------------------------ parsers


def add_commands(sub) -> None:
    p = sub.add_parser("quickstart", help="train a latent-diffusion model on the built-in digits and sample it (~5 min "
                                          "on 2 CPU cores)",
                       description="On the built-in digits: train an AutoencoderKL, then a latent-diffusion U-Net "
                                   "conditioned on the digit's name through cross-attention; sample a 10x10 grid "
                                   "(row r: the prompt of digit r, ten seeds) with DPM-Solver++ and classifier-free "
                                   "guidance; write samples.png, interpolation.png, curves.png and report.json (FID "
                                   "and the accuracy with which a digits classifier reads each row).")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--gan", action="store_true", help="a class-conditional DCGAN instead")
    mode.add_argument("--pix2pix", action="store_true", help="pix2pix: edge maps -> digits, input/output/target rows")
    p.add_argument("--out", default=".", help="folder for the pictures, the report and run/ (default: here)")
    p.add_argument("--quick", action="store_true", help="a smoke run of a few steps (the pictures are noise)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_quickstart)

    t = sub.add_parser("train", help="train a VAE, GAN, pix2pix or diffusion model",
                       description="Train one model; torchrun --nproc_per_node=N fastgen train ... runs it data-parallel "
                                   "(--batch-size is the global batch). Writes <out>/model (the trained, EMA "
                                   "weights), samples/, curves.png, metrics.jsonl and checkpoints/.")
    t.add_argument("kind", choices=TRAINERS)
    t.add_argument("--data", default="digits", help="'digits' (scikit-learn's 8x8 digits, upscaled) or an image "
                                                  "folder (class sub-folders optional; pix2pix: A/ and B/ pairs)")
    t.add_argument("--size", type=int, default=None, help="image size (digits: 8, 16 or 32)")
    t.add_argument("--channels", type=int, default=None, choices=[1, 3], help="convert images to 1 or 3 channels")
    t.add_argument("--flip", action="store_true", help="random horizontal flips (image folders)")
    t.add_argument("--out", required=True, help="output folder (checkpoints, samples, curves, model)")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    loop = t.add_argument_group("loop")
    loop.add_argument("--steps", type=int, default=None)
    loop.add_argument("--batch-size", type=int, default=None, help="global batch (all processes together)")
    loop.add_argument("--lr", type=float, default=None)
    loop.add_argument("--lr-schedule", choices=["constant", "cosine"], default=None)
    loop.add_argument("--warmup-steps", type=int, default=None)
    loop.add_argument("--grad-accum", type=int, default=None, help="micro-batches per step")
    loop.add_argument("--max-grad-norm", type=float, default=None)
    loop.add_argument("--no-clip", action="store_true", help="no gradient clipping")
    loop.add_argument("--ema-decay", type=float, default=None)
    loop.add_argument("--no-ema", action="store_true")
    loop.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None, help="autocast dtype")
    loop.add_argument("--seed", type=int, default=None)
    loop.add_argument("--log-every", type=int, default=None)
    loop.add_argument("--sample-every", type=int, default=None, help="steps between PNG sample grids")
    loop.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints")
    loop.add_argument("--device", default=None)
    loop.add_argument("--no-progress", action="store_true")
    m = t.add_argument_group("model")
    m.add_argument("--kl-weight", type=float, default=1e-3, help="vae: beta of the KL term")
    m.add_argument("--gan-weight", type=float, default=0.0, help="vae: weight of the PatchGAN term (0: off)")
    m.add_argument("--latent-channels", type=int, default=4, help="vae: latent channels")
    m.add_argument("--latent-dim", type=int, default=16, help="conv-vae: latent size (2: a 2-D latent map)")
    m.add_argument("--beta", type=float, default=1.0, help="conv-vae: beta of the KL term")
    m.add_argument("--loss", default="nonsaturating", choices=["nonsaturating", "hinge", "lsgan", "wgan-gp"],
                   help="gan: objective")
    m.add_argument("--r1-gamma", type=float, default=0.0, help="gan: R1 penalty weight (0: off)")
    m.add_argument("--class-conditional", action="store_true", help="gan: condition on the data's classes")
    m.add_argument("--condition", default=None, choices=["edges", "canny", "grey", "lowres"],
                   help="pix2pix: make inputs from the images on the fly (default for digits: edges; an image "
                        "folder without it must hold A/ and B/ pairs)")
    m.add_argument("--l1-weight", type=float, default=100.0, help="pix2pix: lambda of the L1 term")
    m.add_argument("--vae", default=None, help="diffusion: a trained VAE folder (<vae out>/model/vae): latent "
                                               "diffusion; without it, pixel space")
    m.add_argument("--conditioning", default="prompt", choices=["none", "class", "prompt"],
                   help="diffusion: class names as prompts through a CLIP text encoder, class tokens, or none")
    m.add_argument("--prediction-type", default="epsilon", choices=["epsilon", "v_prediction", "sample"])
    m.add_argument("--min-snr-gamma", type=float, default=None, help="diffusion: min-SNR loss weighting (e.g. 5)")
    m.add_argument("--cond-dropout", type=float, default=0.1, help="diffusion: condition dropout for guidance")
    t.set_defaults(func=_cmd_train)

    s = sub.add_parser("sample", help="sample a trained model into a PNG grid",
                       description="Sample a model folder written by fastgen train / quickstart (<out>/model).")
    s.add_argument("--model", required=True, help="the model folder (with fastgen_model.json)")
    s.add_argument("--prompt", nargs="+", default=None, help="diffusion models conditioned on prompts")
    s.add_argument("--class", dest="cls", nargs="+", default=None, help="class index or name, one or one per image")
    s.add_argument("--seed", type=int, default=0, help="first seed; image i uses seed + i")
    s.add_argument("--num", type=int, default=10, help="number of images")
    s.add_argument("--steps", type=int, default=None, help="diffusion: sampler steps")
    s.add_argument("--guidance", type=float, default=None, help="diffusion: classifier-free guidance scale")
    s.add_argument("--output", default="samples.png")
    s.add_argument("--device", default=None)
    s.set_defaults(func=_cmd_sample)

    e = sub.add_parser("evaluate", help="FID and class accuracy of a trained digits model",
                       description="Generate --num images (classes in turn) and report FID against the 300 held-out "
                                   "digits in the feature space of fastgen's digits classifier, and the accuracy with "
                                   "which that classifier reads each sample as its class.")
    e.add_argument("--model", required=True)
    e.add_argument("--num", type=int, default=300)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--steps", type=int, default=None)
    e.add_argument("--json", default=None, help="also write the scores here")
    e.add_argument("--device", default=None)
    e.set_defaults(func=_cmd_evaluate)
