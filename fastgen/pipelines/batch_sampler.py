"""``BatchSampler``: many single-image requests answered as few batches as the device allows.

* **Per-sample seeds.** Image i's initial latents come from its own seed (``torch.Generator().manual_seed``,
  on the CPU), and a stochastic scheduler's step noise from a stream derived from it, so a request gets the
  same image whatever batch it is drawn in and whatever its batch-mates are (up to the last bits of batched
  float arithmetic).
* **Compatible requests only.** Requests are grouped by (steps, guidance, height, width) — what a batch must
  share — keeping their order, then cut into batches of at most ``max_batch_size``.
* **Buffers per shape and CUDA graphs** (GPU): the whole denoising loop, U-Net and fused scheduler step, is
  captured once per (batch bucket, latent shape, text length, steps, guidance, scheduler) and replayed;
  batches are padded to power-of-two buckets so a handful of graphs covers every batch size. A graph is
  re-captured when the weights move or adapter/processor state changes (:mod:`.graphs` says exactly what
  invalidates one); in-place weight edits (LoRA fuse/unfuse) need no re-capture.
* ``channels_last`` on CUDA (its convolutions are faster in NHWC); on the CPU fastgen's kernels pick their
  own layouts.

Calls are serialised by a lock: the sampler owns its device, so two callers' batches run one after the other.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Optional, Sequence

import torch
from torch import Tensor

from .denoise import denoise, guided, is_deterministic
from .graphs import CapturedLoop, capture_loop, replay, scheduler_key, weights_fingerprint
from .latent_diffusion import LatentDiffusionPipeline
from .request import SampleRequest, SampleResult


class BatchSampler:
    def __init__(self, pipeline, max_batch_size: int = 8, *, cuda_graphs: Optional[bool] = None,
                 channels_last: Optional[bool] = None, max_graphs: int = 16):
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be a positive int, got {max_batch_size!r}")
        if isinstance(pipeline, LatentDiffusionPipeline):
            self.pipe = pipeline
        else:
            from .diffusers_adapter import DiffusersAdapter

            self.pipe = DiffusersAdapter(pipeline)
        self.max_batch_size = max_batch_size
        device = self.pipe.device
        on_cuda = device.type == "cuda"
        self.cuda_graphs = on_cuda if cuda_graphs is None else bool(cuda_graphs)
        if self.cuda_graphs and not on_cuda:
            raise ValueError(f"cuda_graphs=True needs the pipeline on a CUDA device; it is on {device}")
        self.channels_last = on_cuda if channels_last is None else bool(channels_last)
        if self.channels_last:
            for name in ("unet", "vae"):
                module = getattr(self.pipe, name, None)
                if module is not None:
                    module.to(memory_format=torch.channels_last)
        self.max_graphs = max_graphs
        self._graphs: "OrderedDict[tuple, CapturedLoop]" = OrderedDict()
        self._fingerprint: Optional[tuple] = None
        self._schedulers: dict = {}
        self._lock = threading.Lock()
        self.stats = dict(batches=0, images=0, captures=0, replays=0, invalidations=0)

    # ------------------------------------------------------------------ requests

    def check(self, request: SampleRequest) -> None:
        """Raise ValueError / TypeError for a request this model cannot serve (before it joins a batch)."""
        if not isinstance(request, SampleRequest):
            raise TypeError(f"BatchSampler takes SampleRequest objects, got {type(request).__name__}")
        self.pipe.resolve_condition(request.prompt, request.class_label)
        h, w = self._size(request)
        self.pipe.latent_shape(h, w)

    def _size(self, r: SampleRequest) -> tuple[int, int]:
        dh, dw = self.pipe.default_size()
        return r.height or dh, r.width or dw

    def batch_key(self, r: SampleRequest) -> tuple:
        """(steps, guidance, height, width) with this model's defaults filled in: requests with equal keys run
        in one batch (a queue in front of the sampler groups by it, so ``steps=None`` and the default steps
        written out share batches)."""
        steps = self.pipe.default_num_inference_steps if r.steps is None else r.steps
        g = self.pipe.default_guidance_scale if r.guidance_scale is None else float(r.guidance_scale)
        return (steps, g) + self._size(r)

    def __call__(self, requests: Sequence[SampleRequest]) -> list[SampleResult]:
        """One result per request, in order. Every request is checked first, so a bad one raises before any
        work (the request queue then re-runs each request of the batch alone, so only the bad one fails)."""
        requests = list(requests)
        for r in requests:
            self.check(r)
        groups: "OrderedDict[tuple, list[int]]" = OrderedDict()
        for i, r in enumerate(requests):
            groups.setdefault(self.batch_key(r), []).append(i)
        results: list[Optional[SampleResult]] = [None] * len(requests)
        with self._lock:
            for settings, index in groups.items():
                for start in range(0, len(index), self.max_batch_size):
                    part = index[start:start + self.max_batch_size]
                    images = self._run([requests[i] for i in part], *settings)
                    for i, image in zip(part, images):
                        results[i] = SampleResult(image, requests[i], len(part))
        return results

    sample = __call__

    # ------------------------------------------------------------------ batches

    def _scheduler(self, steps: int):
        # the sampler's own scheduler copy: the pipeline's may be stepped by someone else meanwhile
        live = self.pipe.scheduler
        key = (type(live), id(live))
        sched = self._schedulers.get(key)
        if sched is None or dict(sched.config) != dict(live.config):
            sched = type(live).from_config(dict(live.config))
            self._schedulers = {key: sched}
        return sched

    @torch.no_grad()
    def _run(self, requests: list, steps: int, guidance: float, height: int, width: int) -> Tensor:
        """(n, C, H, W) float32 images in [0, 1] on the CPU."""
        pipe = self.pipe
        seeds = [r.seed for r in requests]
        conditions = [pipe.resolve_condition(r.prompt, r.class_label) for r in requests]
        latents = pipe.initial_latents(len(requests), height, width, seeds)
        cond, uncond = pipe.encode_conditions(conditions)
        latents = latents.to(pipe.dtype)
        if not guided(guidance, uncond is not None):
            uncond = None
        sched = self._scheduler(steps)
        if self.cuda_graphs and is_deterministic(sched):
            x = self._graph_run(sched, latents, cond, uncond, guidance, steps)
        else:
            sched.set_timesteps(steps)
            x = denoise(pipe.unet, sched, latents, cond, uncond, guidance, generator=seeds)
        images = pipe.decode(x)
        self.stats["batches"] += 1
        self.stats["images"] += len(requests)
        return (images.float() / 2 + 0.5).clamp(0, 1).cpu()

    def bucket(self, n: int) -> int:
        """The batch size a batch of ``n`` runs at under CUDA graphs: the next power of two, at most the max."""
        b = 1
        while b < n:
            b *= 2
        return min(b, self.max_batch_size)

    def _graph_run(self, sched, latents, cond, uncond, guidance, steps) -> Tensor:
        fingerprint = weights_fingerprint(self.pipe.torch_modules().values())
        if fingerprint != self._fingerprint:
            if self._graphs:
                self.stats["invalidations"] += 1
            self._graphs.clear()
            self._fingerprint = fingerprint
        bucket = self.bucket(latents.shape[0])
        key = (bucket, tuple(latents.shape[1:]), tuple(cond.shape[1:]), latents.dtype, steps,
               guidance if uncond is not None else None, scheduler_key(sched))
        loop = self._graphs.get(key)
        if loop is None:
            loop = capture_loop(self.pipe.unet, type(sched).from_config(dict(sched.config)), latents, cond, uncond,
                                guidance, steps, bucket)
            self._graphs[key] = loop
            self.stats["captures"] += 1
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(key)
        self.stats["replays"] += 1
        return replay(loop, latents, cond, uncond)

    def clear_graphs(self) -> None:
        with self._lock:
            self._graphs.clear()
            self._fingerprint = None

    @property
    def graph_count(self) -> int:
        return len(self._graphs)


def load_sampler(model_dir, *, max_batch_size: int = 8, device=None, torch_dtype=None, **kwargs) -> BatchSampler:
    """A :class:`BatchSampler` over ``LatentDiffusionPipeline.from_pretrained(model_dir)`` on ``device``
    (default: CUDA when available)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = LatentDiffusionPipeline.from_pretrained(model_dir, torch_dtype=torch_dtype, device=device)
    return BatchSampler(pipe, max_batch_size, **kwargs)
