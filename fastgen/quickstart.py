"""``fastgen quickstart``: the whole loop on the built-in digits in a few minutes on a laptop CPU.

Default (latent diffusion, the Stable Diffusion recipe at toy scale):
1. train an ``AutoencoderKL`` (16 px digit -> 4x4x4 latent);
2. train a latent-diffusion ``UNet2DConditionModel`` whose cross-attention reads the digit's name ("zero" ...
   "nine") through a small CLIP text encoder trained with it, with condition dropout for guidance;
3. sample a 10x10 grid with DPM-Solver++ and classifier-free guidance — row r is the prompt of digit r, ten
   seeds per row — plus an interpolation strip (slerp between two initial noises, per prompt);
4. score the samples: FID against the 300 held-out real digits in the feature space of a small digits
   classifier, and the accuracy with which that classifier reads each row as its digit.

``--gan``: a class-conditional DCGAN instead; ``--pix2pix``: edges -> digits, written as input / output /
target triplets. Everything lands in ``--out`` (default: the current directory): ``samples.png``,
``interpolation.png``, ``curves.png``, ``report.json`` and the trained models under ``run/``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import torch

MODES = ("diffusion", "gan", "pix2pix")


class Phases:
    """Wall time per phase, printed as it goes."""

    def __init__(self, echo=print):
        self.times: dict[str, float] = {}
        self.echo = echo
        self._t0 = time.perf_counter()

    def run(self, name: str, fn, *args, **kwargs):
        self.echo(f"[fastgen quickstart] {name} ...")
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        self.times[name] = round(time.perf_counter() - t0, 2)
        self.echo(f"[fastgen quickstart] {name}: {self.times[name]:.1f} s")
        return out

    @property
    def total(self) -> float:
        return round(time.perf_counter() - self._t0, 2)


def _settings(quick: bool, mode: str) -> dict:
    """Step counts: the defaults fit 5 minutes on 2 CPU cores; ``quick`` is a smoke run (tests)."""
    if mode == "diffusion":
        return dict(vae_steps=20 if quick else 200, diffusion_steps=20 if quick else 700,
                    sample_steps=4 if quick else 20, n_eval=50 if quick else 300, classifier_steps=50 if quick else 400)
    if mode == "gan":
        return dict(gan_steps=20 if quick else 1500, n_eval=50 if quick else 300, classifier_steps=50 if quick else 400)
    return dict(pix2pix_steps=20 if quick else 600, n_eval=50 if quick else 300, classifier_steps=50 if quick else 400)


def _classifier(size: int, steps: int, quick: bool):
    from . import metrics
    from .data import load_digits

    if quick:  # a smoke run must not write a half-trained classifier into the user's cache
        train = load_digits(size, "train")
        return metrics.train_digits_classifier(train.images, train.labels, steps=steps, progress=False)
    return metrics.digits_classifier(size)


def run(out: Optional[str] = None, *, mode: str = "diffusion", quick: bool = False, seed: int = 0,
        device: Optional[str] = None, progress: bool = True, echo=print) -> dict:
    """Run the quickstart; returns the report (also written to ``<out>/report.json``)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    from .data import load_digits

    out_dir = Path(out or ".").resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    s = _settings(quick, mode)
    phases = Phases(echo)
    size = 32 if mode == "pix2pix" else 16  # pix2pix's U-Net needs 5 halvings
    train = phases.run("load digits", load_digits, size, "train")
    test = load_digits(size, "test")
    report = {"mode": mode, "quick": quick, "device": dev, "seed": seed, "threads": torch.get_num_threads(),
              "train_images": len(train), "held_out_images": len(test)}
    if mode == "diffusion":
        samples, labels, files, extra = _diffusion(train, out_dir, s, phases, dev, seed, progress)
    elif mode == "gan":
        samples, labels, files, extra = _gan(train, out_dir, s, phases, dev, seed, progress)
    else:
        samples, labels, files, extra = _pix2pix(train, test, out_dir, s, phases, dev, seed, progress)
    report.update(extra)
    if samples is not None:
        from . import metrics

        clf = phases.run("digits classifier", _classifier, 16, s["classifier_steps"], quick)
        scores = phases.run("FID and accuracy", metrics.evaluate_samples, samples.cpu(), labels,
                            real=test.images, classifier=clf)
        report["metrics"] = {"fid": scores["fid"], "accuracy": scores["accuracy"],
                             "per_class_accuracy": scores["per_class_accuracy"], "n_fake": scores["n_fake"],
                             "n_real": scores["n_real"],
                             "fid_feature": "fastgen digits classifier (not InceptionV3)"}
        # the reference point: the same FID between the train and held-out real digits
        report["metrics"]["fid_real_train_vs_held_out"] = metrics.fid(test.images, train.images, feature=clf)
    report["phase_seconds"] = phases.times
    report["total_seconds"] = phases.total
    report["files"] = {k: str(v) for k, v in files.items()}
    (out_dir / "report.json").write_text(json.dumps(report, indent=1))
    echo("")
    for name, seconds in phases.times.items():
        echo(f"  {name:<24s} {seconds:7.1f} s")
    echo(f"  {'total':<24s} {report['total_seconds']:7.1f} s")
    if "metrics" in report:
        m = report["metrics"]
        acc = "" if m["accuracy"] is None else f", classifier accuracy on the samples {m['accuracy']:.1%}"
        echo(f"  FID vs held-out digits {m['fid']:.2f} (real train vs held-out: "
             f"{m['fid_real_train_vs_held_out']:.2f}){acc}")
    for name, path in files.items():
        echo(f"  {name:<24s} {path}")
    echo(f"  {'report':<24s} {out_dir / 'report.json'}")
    return report


def _diffusion(train, out_dir: Path, s: dict, phases: Phases, dev: str, seed: int, progress: bool):
    from .images import save_image_rows
    from .latent import slerp
    from .train.config import TrainConfig
    from .train.curves import plot_curves
    from .train.diffusion import DiffusionOptions, DiffusionTrainer
    from .train.vae import VAEOptions, VAETrainer

    run_dir = out_dir / "run"
    vae_t = VAETrainer(train, VAEOptions(), TrainConfig(
        steps=s["vae_steps"], batch_size=64, lr=2e-3, warmup_steps=min(20, s["vae_steps"] // 4), lr_schedule="cosine",
        ema_decay=0.99, seed=seed, out_dir=str(run_dir / "vae"), progress=progress, device=dev, log_every=10))
    phases.run("train AutoencoderKL", vae_t.fit)
    vae_dir = run_dir / "vae" / "model" / "vae"
    options = DiffusionOptions(class_names=list(train.class_names), sample_steps=s["sample_steps"])
    diff_t = DiffusionTrainer(train, options, TrainConfig(
        steps=s["diffusion_steps"], batch_size=64, lr=1e-3, warmup_steps=min(50, s["diffusion_steps"] // 4),
        lr_schedule="cosine", ema_decay=0.995, seed=seed, out_dir=str(run_dir / "diffusion"), progress=progress,
        device=dev, log_every=10), vae=str(vae_dir))
    phases.run("train latent diffusion U-Net", diff_t.fit)
    model = diff_t.model()
    with diff_t.averaged_weights(), diff_t.eval_mode():
        names = list(train.class_names)
        grid = phases.run("sample 10x10 grid", model.generate, prompts=[n for n in names for _ in range(10)],
                          seeds=[seed * 1000 + 10 * r + c for r in range(10) for c in range(10)])
        n_eval = s["n_eval"]
        eval_labels = torch.arange(n_eval) % 10
        samples = phases.run(f"sample {n_eval} for metrics", model.generate,
                             prompts=[names[int(i)] for i in eval_labels],
                             seeds=[seed * 1000 + 100 + i for i in range(n_eval)])
        a = torch.randn((4, *model.sample_shape()), generator=torch.Generator().manual_seed(seed + 7))
        b = torch.randn((4, *model.sample_shape()), generator=torch.Generator().manual_seed(seed + 8))
        path = slerp(a, b, torch.linspace(0, 1, 10))  # (10, 4, ...): 10 points for each of 4 prompts
        strip_prompts = names[2:6]
        noise = path.transpose(0, 1).reshape(40, *model.sample_shape())
        strip = phases.run("sample interpolation", model.generate,
                           prompts=[p for p in strip_prompts for _ in range(10)], noise=noise)
    files = {
        "samples.png": save_image_rows([grid[10 * r:10 * r + 10].cpu() for r in range(10)], out_dir / "samples.png",
                                       labels=names, scale=4),
        "interpolation.png": save_image_rows([strip[10 * r:10 * r + 10].cpu() for r in range(4)],
                                             out_dir / "interpolation.png", labels=strip_prompts, scale=4),
    }
    curves = plot_curves({"vae": vae_t.history, "diffusion": diff_t.history}, out_dir / "curves.png",
                         title="fastgen quickstart: AutoencoderKL, then latent diffusion")
    if curves is not None:
        files["curves.png"] = curves
    files["model"] = run_dir / "diffusion" / "model"
    extra = {"vae": {"steps": vae_t.step, "final": vae_t.history[-1] if vae_t.history else None,
                     "scaling_factor": model.vae.config.scaling_factor},
             "diffusion": {"steps": diff_t.step, "final": diff_t.history[-1] if diff_t.history else None,
                           "parameters": sum(p.numel() for p in diff_t.models["denoiser"].parameters()),
                           "sampler": f"DPM-Solver++(2M), {options.sample_steps} steps, guidance "
                                      f"{options.guidance_scale}"}}
    return samples, eval_labels, files, extra


def _gan(train, out_dir, s, phases, dev, seed, progress):
    from .images import save_image_rows
    from .latent import slerp
    from .train.curves import plot_curves
    from .train.gan import DCGANTrainer, GANOptions, default_config

    run_dir = out_dir / "run"
    options = GANOptions(num_classes=10)
    trainer = DCGANTrainer(train, options, default_config(
        steps=s["gan_steps"], batch_size=64, seed=seed, out_dir=str(run_dir / "gan"), progress=progress, device=dev,
        log_every=10))
    phases.run("train class-conditional DCGAN", trainer.fit)
    names = list(train.class_names)
    g = trainer.models["generator"]
    with torch.no_grad(), trainer.eval_mode(), trainer.averaged_weights():
        gen = torch.Generator().manual_seed(seed + 1)
        z = torch.randn(100, options.latent_dim, generator=gen).to(trainer.device)
        grid = g(z, (torch.arange(100) // 10).to(trainer.device))
        n_eval = s["n_eval"]
        eval_labels = torch.arange(n_eval) % 10
        z_eval = torch.randn(n_eval, options.latent_dim, generator=gen).to(trainer.device)
        samples = g(z_eval, eval_labels.to(trainer.device))
        a, b = (torch.randn(4, options.latent_dim, generator=gen) for _ in range(2))
        path = slerp(a, b, torch.linspace(0, 1, 10)).transpose(0, 1).reshape(40, -1).to(trainer.device)
        strip = g(path, torch.arange(2, 6).repeat_interleave(10).to(trainer.device))
    files = {
        "samples.png": save_image_rows([grid[10 * r:10 * r + 10].cpu() for r in range(10)], out_dir / "samples.png",
                                       labels=names, scale=4),
        "interpolation.png": save_image_rows([strip[10 * r:10 * r + 10].cpu() for r in range(4)],
                                             out_dir / "interpolation.png", labels=names[2:6], scale=4),
    }
    curves = plot_curves({"gan": trainer.history}, out_dir / "curves.png", title="fastgen quickstart --gan")
    if curves is not None:
        files["curves.png"] = curves
    files["model"] = run_dir / "gan" / "model"
    return samples, eval_labels, files, {"gan": {"steps": trainer.step, "final": trainer.history[-1]}}


def _pix2pix(train, test, out_dir, s, phases, dev, seed, progress):
    from .train.curves import plot_curves
    from .train.pix2pix import Pix2PixOptions, Pix2PixTrainer, default_config
    from .data import condition_fn
    from .images import save_image_rows

    run_dir = out_dir / "run"
    options = Pix2PixOptions(image_size=32, ngf=16, ndf=16, condition="edges")
    trainer = Pix2PixTrainer(train, options, default_config(
        steps=s["pix2pix_steps"], batch_size=32, seed=seed, out_dir=str(run_dir / "pix2pix"), progress=progress,
        device=dev, log_every=10))
    phases.run("train pix2pix (edges -> digits)", trainer.fit)
    edges = condition_fn("edges")(test.images)
    out = phases.run("translate held-out edges", trainer.translate, edges)
    files = {"samples.png": save_image_rows(_triplet_rows(edges, out.cpu(), test.images, 10),
                                            out_dir / "samples.png",
                                            labels=[w for _ in range(3) for w in ("input", "output", "target")],
                                            scale=4)}
    curves = plot_curves({"pix2pix": trainer.history}, out_dir / "curves.png", title="fastgen quickstart --pix2pix")
    if curves is not None:
        files["curves.png"] = curves
    files["model"] = run_dir / "pix2pix" / "model"
    n_eval = min(s["n_eval"], len(test))
    return out[:n_eval].cpu(), test.labels[:n_eval], files, {"pix2pix": {"steps": trainer.step,
                                                                          "final": trainer.history[-1]}}


def _triplet_rows(cond, out, target, per_row: int) -> list:
    """Three groups of input / output / target rows of ``per_row`` held-out digits each."""
    rows = []
    for k in range(3):
        sl = slice(per_row * k, per_row * (k + 1))
        rows += [cond[sl].cpu(), out[sl].cpu(), target[sl].cpu()]
    return rows
