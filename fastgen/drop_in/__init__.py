"""``fastgen.patch(pipe_or_model)``: diffusers' pipelines and models on fastgen's fused kernels, in place.

What changes, by kind (each a keyword of :func:`patch`):

- ``attention``: every diffusers ``Attention`` whose processor is diffusers' default gets
  :class:`~fastgen.drop_in.attention.FastgenAttnProcessor` through diffusers' own ``set_processor``.
- ``norm``: every ``ResnetBlock2D`` runs GroupNorm+SiLU as one pass and adds its skip connection (and
  ``1 / output_scale_factor``) in ``conv2``'s epilogue; every other ``nn.GroupNorm`` runs fastgen's kernel.
- ``conv``: every plain ``nn.Conv2d`` runs :func:`fastgen.ops.conv2d` (Winograd / BLAS on CPU, the packed
  weights cached on the weight tensor and revalidated on every call).
- ``feed_forward``: every ``GEGLU`` runs fastgen's fused gate.
- ``scheduler``: the pipeline's scheduler becomes fastgen's class of the same name, built from its live
  config (:mod:`.scheduler`).
- ``vae``: the pipeline's ``image_processor.postprocess`` is one fused pass, and ``AutoencoderKL`` decodes
  tile by tile on its own above ``vae_tiling_min_size`` latent pixels (:mod:`.vae`).

Modules are patched by type wherever they are (U-Net, VAE, ControlNet, SDXL's second U-Net blocks), by
rebinding ``forward`` on the live instance; no parameter is renamed, copied or re-registered, so
``state_dict()``, ``load_lora_weights``, ``set_adapters``, ``fuse_lora`` and offload hooks keep working.
:func:`unpatch` puts back exactly what was there.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import _backend
from . import attention as _attention
from . import feed_forward as _feed_forward
from . import resnet as _resnet
from . import scheduler as _scheduler
from . import vae as _vae
from ._rebind import Record, patched_kind

__all__ = ["patch", "unpatch", "is_patched", "PatchReport"]

KINDS = ("attention", "resnet", "group_norm", "conv", "feed_forward", "scheduler", "vae")

_records: "weakref.WeakKeyDictionary[Any, Record]" = weakref.WeakKeyDictionary()


@dataclass
class PatchReport:
    """What one :func:`patch` call did: ``counts[kind]`` newly patched, ``already`` found patched before,
    ``left`` the (where, why) of everything it left alone, and the seconds it took."""

    counts: dict = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    already: int = 0
    left: list = field(default_factory=list)
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __str__(self) -> str:
        parts = ", ".join(f"{k} {v}" for k, v in self.counts.items() if v)
        text = f"fastgen.patch: {parts or 'nothing'} patched in {self.seconds * 1e3:.0f} ms"
        if self.already:
            text += f"; {self.already} already patched"
        if self.left:
            text += f"; {len(self.left)} left as they were"
        return text


def _diffusers():
    try:
        import diffusers
    except ImportError:
        return None
    return diffusers


def _check_target(obj: Any):
    diffusers = _diffusers()
    from ..models._modeling import ModelMixin as FastgenModelMixin

    if isinstance(obj, FastgenModelMixin):
        raise TypeError(
            f"fastgen.patch: {type(obj).__name__} is fastgen's own model, already built on fastgen's kernels; "
            "patch takes a diffusers pipeline or model"
        )
    if diffusers is None:
        raise TypeError(
            f"fastgen.patch takes a diffusers pipeline or model, got {type(obj).__name__} "
            "(and diffusers is not installed: pip install diffusers)"
        )
    if isinstance(obj, diffusers.DiffusionPipeline):
        return "pipeline"
    if isinstance(obj, diffusers.ModelMixin):
        return "model"
    raise TypeError(
        f"fastgen.patch takes a diffusers pipeline (DiffusionPipeline) or model (ModelMixin: "
        f"UNet2DConditionModel, UNet2DModel, AutoencoderKL, ControlNetModel, ...), got {type(obj).__module__}."
        f"{type(obj).__qualname__}"
    )


def patch(
    obj: Any,
    *,
    attention: bool = True,
    norm: bool = True,
    conv: bool = True,
    feed_forward: bool = True,
    scheduler: bool = True,
    vae: bool = True,
    vae_tiling_min_size: int | None = 128,
) -> PatchReport:
    """Run a diffusers pipeline or model on fastgen's kernels, in place; returns a :class:`PatchReport`.

    Args:
        obj: a ``DiffusionPipeline`` (every diffusers model among its components is patched, plus its
            scheduler and image post-processing) or a diffusers ``ModelMixin``.
        attention, norm, conv, feed_forward, scheduler, vae: which kinds to patch (module docstring).
        vae_tiling_min_size: with ``vae``, a latent taller or wider than this decodes in tiles when tiling
            is off (None: never on its own).

    Outputs stay those of the unpatched object within the numerics rules of docs/design.md. Patching twice
    is harmless (what is patched stays, new modules, e.g. a LoRA loaded since, are patched); resolution and
    batch size changes need nothing. Raises ``TypeError`` for anything that is not a diffusers pipeline or
    model.
    """
    if vae_tiling_min_size is not None and (not isinstance(vae_tiling_min_size, int) or vae_tiling_min_size < 1):
        raise ValueError(f"fastgen.patch: vae_tiling_min_size must be a positive int or None, got {vae_tiling_min_size!r}")
    what = _check_target(obj)
    start = time.perf_counter()
    record = _records.get(obj)
    if record is None:
        record = _records[obj] = Record()
    report = PatchReport()
    options = dict(attention=attention, norm=norm, conv=conv, feed_forward=feed_forward, vae=vae,
                   vae_tiling_min_size=vae_tiling_min_size)
    if what == "model":
        _patch_model(obj, type(obj).__name__, record, report, options)
    else:
        diffusers = _diffusers()
        for name, component in obj.components.items():
            if isinstance(component, diffusers.ModelMixin):
                _patch_model(component, name, record, report, options)
        if scheduler and getattr(obj, "scheduler", None) is not None:
            _patch_scheduler(obj, record, report)
        if vae and getattr(obj, "image_processor", None) is not None:
            _patch_postprocess(obj.image_processor, record, report)
    report.seconds = time.perf_counter() - start
    for where, why in report.left:
        _backend.warn_once(("drop_in.left", why), f"fastgen.patch: {where} left as it was: {why}", stacklevel=2)
    return report


def unpatch(obj: Any) -> None:
    """Undo every :func:`patch` of ``obj``: the forwards, processors, scheduler and post-processing that were
    there before come back (the same objects). Harmless on an object that was never patched."""
    _check_target(obj)
    record = _records.pop(obj, None)
    if record is not None:
        record.undo()


def is_patched(obj: Any) -> bool:
    """Whether :func:`patch` changed ``obj`` (and :func:`unpatch` has not undone it)."""
    record = _records.get(obj)
    return record is not None and bool(record.changes or record.restores)


# ------------------------------------------------------------------ models


def _patch_model(model: torch.nn.Module, prefix: str, record: Record, report: PatchReport, options: dict) -> None:
    from diffusers.models.activations import GEGLU
    from diffusers.models.attention_processor import Attention
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.resnet import ResnetBlock2D

    for name, module in model.named_modules():
        where = f"{prefix}.{name}" if name else prefix
        kind = type(module)
        if options["attention"] and isinstance(module, Attention):
            _patch_attention(module, where, record, report)
        elif options["norm"] and kind is ResnetBlock2D:
            _bind(module, "forward", _resnet.resnet_forward, "resnet", where,
                  _resnet.resnet_unsupported_reason(module), record, report)
        elif options["norm"] and kind is torch.nn.GroupNorm:
            _bind(module, "forward", _resnet.group_norm_forward, "group_norm", where, None, record, report)
        elif options["conv"] and kind is torch.nn.Conv2d:
            _bind(module, "forward", _resnet.conv2d_forward, "conv", where,
                  _resnet.conv_unsupported_reason(module), record, report)
        elif options["feed_forward"] and kind is GEGLU:
            _bind(module, "forward", _feed_forward.geglu_forward, "feed_forward", where, None, record, report)
    if options["vae"] and options["vae_tiling_min_size"] is not None and type(model) is AutoencoderKL:
        _bind(model, "_decode", _vae.make_auto_tiling_decode(options["vae_tiling_min_size"]), "vae", prefix,
              None, record, report)


def _bind(module, attr: str, fn, kind: str, where: str, unsupported, record: Record, report: PatchReport) -> None:
    if patched_kind(module, attr) is not None:
        report.already += 1
        return
    if unsupported is not None:
        report.left.append((where, unsupported))
        return
    if attr in module.__dict__:
        # Someone else bound this instance's method (accelerate's offload hooks do): replacing it would
        # drop their hook, and wrapping it would run their code out of order.
        report.left.append((where, f"its {attr} is already replaced by {module.__dict__[attr]!r}"))
        return
    record.bind(module, attr, fn)
    report.counts[kind] += 1


def _patch_attention(attn, where: str, record: Record, report: PatchReport) -> None:
    if isinstance(attn.processor, _attention.FastgenAttnProcessor):
        report.already += 1
        return
    reason = _attention.unsupported_reason(attn)
    if reason is not None:
        report.left.append((where, reason))
        return
    original = attn.processor
    attn.set_processor(_attention.FastgenAttnProcessor())
    record.on_undo(lambda: attn.set_processor(original))
    report.counts["attention"] += 1


# ------------------------------------------------------------------ pipeline parts


def _patch_scheduler(pipe, record: Record, report: PatchReport) -> None:
    original = pipe.scheduler
    if type(original) in _scheduler.FASTGEN_SCHEDULERS.values():
        report.already += 1
        return
    new = _scheduler.fastgen_scheduler_for(original)
    if isinstance(new, str):
        report.left.append(("scheduler", new))
        return
    # object.__setattr__ keeps the pipeline's config (model_index.json) naming diffusers' class, so a saved
    # pipeline stays loadable by diffusers; save_pretrained saves the original scheduler (same config).
    object.__setattr__(pipe, "scheduler", new)

    def restore():
        if pipe.scheduler is new:  # (a scheduler the user set since is theirs)
            object.__setattr__(pipe, "scheduler", original)

    record.on_undo(restore)
    record.bind(pipe, "save_pretrained", _make_save_pretrained(original))
    report.counts["scheduler"] += 1


def _make_save_pretrained(original_scheduler):
    def save_pretrained(self, *args, **kwargs):
        # diffusers saves a component only when its class is one it knows: save with diffusers' scheduler
        # (built from the same config), then put fastgen's back.
        current = self.scheduler
        object.__setattr__(self, "scheduler", original_scheduler)
        try:
            return type(self).save_pretrained(self, *args, **kwargs)
        finally:
            object.__setattr__(self, "scheduler", current)

    return save_pretrained


def _patch_postprocess(processor, record: Record, report: PatchReport) -> None:
    from diffusers.image_processor import VaeImageProcessor

    own = not isinstance(processor, VaeImageProcessor) or type(processor).postprocess is not VaeImageProcessor.postprocess
    _bind(processor, "postprocess", _vae.postprocess, "vae", "image_processor",
          f"{type(processor).__name__} has its own postprocess" if own else None, record, report)

