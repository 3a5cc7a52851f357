"""The loop every trainer shares: data order, micro-batches, autocast, gradient scaling, clipping, LR schedule,
EMA, DDP, progress, sample grids, curves and checkpoints. A trainer supplies its models and, per optimizer,
a loss over a micro-batch (:class:`Phase`); a GAN has two phases (D, then G), the others one."""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import torch
from torch import Tensor

from ..io.files import CheckpointError
from . import checkpoint as ckpt
from .config import TrainConfig
from .distributed import DistContext, GlobalOrder, StepRandom, all_reduce_mean, init_distributed
from .ema import EMA


class Phase(NamedTuple):
    """One optimizer's update: ``loss(batch, rng) -> (loss, logs)`` is summed over the micro-batches of a step,
    then that optimizer steps. ``logs`` maps names to 0-dim tensors shown in the progress bar and curves."""

    optimizer: str
    loss: Callable[[Any, StepRandom], tuple[Tensor, dict]]


class Trainer:
    """Base class; see :mod:`fastgen.train` for the subclasses. ``fit()`` runs ``config.steps`` steps."""

    kind = "base"
    options_class: Any = None

    def __init__(self, dataset, options=None, config: Optional[TrainConfig] = None):
        if len(dataset) == 0:
            raise ValueError(f"{type(self).__name__}: the dataset is empty")
        self.config = config if config is not None else TrainConfig()
        self.options = options if options is not None else self.options_class()
        self.dataset = dataset
        self.dist: DistContext = init_distributed(self.config.device)
        self.device = self.dist.device
        if self.config.batch_size % (self.dist.world_size * self.config.grad_accum):
            raise ValueError(f"batch_size {self.config.batch_size} must be divisible by world size "
                             f"{self.dist.world_size} x grad_accum {self.config.grad_accum}: it is the global batch")
        # the same seed in every process: identical initial weights, so DDP needs no broadcast to agree
        torch.manual_seed(self.config.seed)
        self.models: dict[str, torch.nn.Module] = {k: m.to(self.device) for k, m in self.build_models().items()}
        self.optimizers: dict[str, torch.optim.Optimizer] = self.build_optimizers()
        self.emas: dict[str, EMA] = {}
        if self.config.ema_decay is not None:
            self.emas = {name: EMA(self.models[name], self.config.ema_decay) for name in self.ema_models()}
        self.scalers = {name: torch.amp.GradScaler(self.device.type) for name in self.optimizers} \
            if self.config.precision == "fp16" else {}
        self.wrapped = dict(self.models)
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            for name in self.optimizers:
                self.wrapped[name] = DDP(self.ddp_target(name), device_ids=ids, broadcast_buffers=False)
        self.order = GlobalOrder(len(dataset), self.config.seed)
        self.step = 0
        self.history: list[dict] = []
        self.timings: dict[str, float] = {}
        self._checked = False
        self._stop_signal: Optional[int] = None

    # ------------------------------------------------------------- hooks for subclasses

    def build_models(self) -> dict[str, torch.nn.Module]:
        raise NotImplementedError

    def phases(self) -> list[Phase]:
        raise NotImplementedError

    def ema_models(self) -> list[str]:
        """Models whose weights are averaged (default: every model an optimizer trains)."""
        return list(self.optimizers)

    def parameters_of(self, name: str):
        return [p for p in self.models[name].parameters() if p.requires_grad]

    def build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        c = self.config
        return {name: torch.optim.AdamW(self.parameters_of(name), lr=c.lr, betas=(c.beta1, c.beta2),
                                        weight_decay=c.weight_decay)
                for name in self.trainable_models()}

    def trainable_models(self) -> list[str]:
        return list(self.models)

    def ddp_target(self, name: str) -> torch.nn.Module:
        """The module DDP wraps for optimizer ``name``: its whole training forward must be one call of it (DDP
        averages the gradients of the parameters a wrapped call used). Default: the model itself."""
        return self.models[name]

    def check_batch(self, batch) -> None:
        """Called once on the first batch: raise a clear error when the data does not fit the model."""

    def sample_grid(self) -> Optional[Tensor]:
        """Images (N, C, H, W) in [-1, 1] for the periodic PNG grid, drawn from the EMA weights; None: no grid."""
        return None

    def grid_rows(self) -> int:
        return 8

    def export(self, folder: Path) -> None:
        """Write the trained (EMA) models for ``fastgen sample`` (diffusers-layout folders)."""

    # ------------------------------------------------------------- helpers for subclasses

    def net(self, name: str):
        """The module to call in a loss: the DDP wrapper under torchrun (it averages the gradients)."""
        return self.wrapped[name]

    @contextlib.contextmanager
    def averaged_weights(self):
        """Swap the EMA weights in (for sampling or export), the training weights back afterwards."""
        saved = {}
        try:
            for name, ema in self.emas.items():
                model = self.models[name]
                saved[name] = {k: v.detach().clone() for k, v in model.state_dict().items() if k in ema.shadow}
                ema.copy_to(model)
            yield
        finally:
            for name, tensors in saved.items():
                state = self.models[name].state_dict()
                with torch.no_grad():
                    for k, v in tensors.items():
                        state[k].copy_(v)

    @contextlib.contextmanager
    def eval_mode(self):
        modes = {name: m.training for name, m in self.models.items()}
        try:
            for m in self.models.values():
                m.eval()
            yield
        finally:
            for name, m in self.models.items():
                m.train(modes[name])

    def autocast(self):
        if self.config.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.config.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def collate(self, indices: list[int]):
        from torch.utils.data import default_collate

        batch = default_collate([self.dataset[i] for i in indices])
        return _to_device(batch, self.device)

    # ------------------------------------------------------------- the loop

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def out_path(self, *parts: str) -> Path:
        if not self.config.out_dir:
            raise ValueError(f"{type(self).__name__}: no out_dir configured")
        return Path(self.config.out_dir, *parts)

    def _micro_rows(self) -> list[Tensor]:
        """For each micro-batch of this process: its rows within the global batch."""
        c, d = self.config, self.dist
        per_rank = c.batch_size // d.world_size
        micro = per_rank // c.grad_accum
        start = d.rank * per_rank
        return [torch.arange(start + m * micro, start + (m + 1) * micro) for m in range(c.grad_accum)]

    def train_step(self) -> dict[str, float]:
        c = self.config
        step = self.step
        indices = self.order.indices(step * c.batch_size, c.batch_size)
        rows = self._micro_rows()
        batches = [self.collate([indices[int(r)] for r in rws]) for rws in rows]
        if not self._checked:
            self.check_batch(batches[0])
            self._checked = True
        logs: dict[str, Tensor] = {}
        for p_index, phase in enumerate(self.phases()):
            opt = self.optimizers[phase.optimizer]
            lr = c.lr_at(step)
            for group in opt.param_groups:
                group["lr"] = lr
            opt.zero_grad(set_to_none=True)
            scaler = self.scalers.get(phase.optimizer)
            wrapped = self.wrapped[phase.optimizer]
            for m, (batch, rws) in enumerate(zip(batches, rows)):
                # a separate random stream per phase and micro-batch, keyed by the sample rows: see StepRandom
                rng = StepRandom(c.seed * 7919 + p_index, step, rws, c.batch_size, self.device)
                last = m == len(batches) - 1
                sync = contextlib.nullcontext() if last or not hasattr(wrapped, "no_sync") else wrapped.no_sync()
                with sync:
                    with self.autocast():
                        loss, phase_logs = phase.loss(batch, rng)
                    if not torch.isfinite(loss.detach()).all():
                        raise FloatingPointError(
                            f"{type(self).__name__}: {phase.optimizer} loss is {loss.item()} at step {step}; "
                            "lower lr, enable max_grad_norm, or use fp32/bf16 instead of fp16")
                    scaled = loss / len(batches)
                    (scaler.scale(scaled) if scaler is not None else scaled).backward()
                for k, v in phase_logs.items():
                    logs[k] = logs.get(k, 0.0) + v.detach().float() / len(batches)
            if scaler is not None:
                scaler.unscale_(opt)
            if c.max_grad_norm is not None:
                grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters_of(phase.optimizer), c.max_grad_norm)
                logs[f"grad_norm_{phase.optimizer}"] = grad_norm.detach().float()
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
        for name, ema in self.emas.items():
            ema.update(self.models[name])
        self.step += 1
        return logs

    def fit(self, resume: bool = False) -> list[dict]:
        """Train to ``config.steps``; with ``resume``, continue from the latest checkpoint in ``out_dir``."""
        c = self.config
        if resume:
            self.resume()
        if c.out_dir and self.is_main:
            self.out_path().mkdir(parents=True, exist_ok=True)
            if self.step == 0:  # a fresh run into a used folder: its curves must not mix with the old run's
                self.out_path("metrics.jsonl").unlink(missing_ok=True)
            (self.out_path("train_config.json")).write_text(json.dumps(
                {"trainer": self.kind, "options": asdict(self.options), "loop": c.to_dict(),
                 "world_size": self.dist.world_size}, indent=1))
        for m in self.models.values():
            m.train()
        bar = _progress(c, self.step, self.is_main, self.kind)
        start = time.perf_counter()
        restore = self._catch_signals()
        try:
            while self.step < c.steps:
                logs = self.train_step()
                bar.update(1)
                if self.step % c.log_every == 0 or self.step == c.steps:
                    values = {k: float(all_reduce_mean(v, self.dist)) for k, v in logs.items()}
                    record = {"step": self.step, "lr": c.lr_at(self.step - 1),
                              "time_s": round(time.perf_counter() - start, 3), **values}
                    self.history.append(record)
                    if self.is_main:
                        bar.set_postfix({k: f"{v:.4g}" for k, v in values.items() if not k.startswith("grad")})
                        self._append_metrics(record)
                if c.sample_every and (self.step % c.sample_every == 0) and self.step < c.steps:
                    self.save_samples()
                if c.checkpoint_every and self.step % c.checkpoint_every == 0:
                    self.save_checkpoint()
                if self._stop_signal is not None:
                    if c.out_dir and (not c.checkpoint_every or self.step % c.checkpoint_every):
                        self.save_checkpoint()
                    raise KeyboardInterrupt(f"stopped by signal {self._stop_signal} after step {self.step}; "
                                            "the checkpoint of this step is saved: resume with resume=True")
        finally:
            bar.close()
            restore()
        self.timings["train_s"] = time.perf_counter() - start
        if c.out_dir:
            if c.checkpoint_every and self.step % c.checkpoint_every:
                self.save_checkpoint()
            self.save_samples()
            if self.is_main:
                self.save_curves()
                with self.averaged_weights():
                    self.export(self.out_path("model"))
        self.dist.barrier()
        return self.history

    def _catch_signals(self):
        """SIGTERM (a scheduler's kill, torchrun's shutdown) ends the run after the current step with a
        checkpoint, instead of losing the steps since the last one."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        def handler(signum, frame):
            self._stop_signal = signum

        previous = signal.signal(signal.SIGTERM, handler)
        return lambda: signal.signal(signal.SIGTERM, previous)

    def _append_metrics(self, record: dict) -> None:
        if not self.config.out_dir:
            return
        with open(self.out_path("metrics.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def save_samples(self) -> Optional[Path]:
        if not (self.config.out_dir and self.is_main):
            return None
        with torch.no_grad(), self.eval_mode(), self.averaged_weights():
            images = self.sample_grid()
        if images is None:
            return None
        from ..images import save_image_grid

        return save_image_grid(images.float().cpu(), self.out_path("samples", f"step-{self.step:08d}.png"),
                               nrow=self.grid_rows(), scale=max(1, 64 // images.shape[-1]))

    def save_curves(self) -> Optional[Path]:
        from .curves import plot_curves

        return plot_curves(self.history, self.out_path("curves.png"), title=f"fastgen train {self.kind}")

    # ------------------------------------------------------------- checkpoints

    def checkpoint_state(self) -> dict:
        return {
            "trainer": self.kind,
            "options": asdict(self.options),
            "loop": self.config.to_dict(),
            "models": sorted(self.models),
            "emas": {name: ema.updates for name, ema in self.emas.items()},
            "scalers": {name: s.state_dict() for name, s in self.scalers.items()},
            "data_position": self.step * self.config.batch_size,
            "world_size": self.dist.world_size,
            "rng": ckpt.rng_state(self.device),
            "history": self.history,
        }

    def save_checkpoint(self) -> Optional[Path]:
        path = None
        if self.is_main:
            path = ckpt.save_checkpoint(
                self.config.out_dir, self.step,
                models={k: m.state_dict() for k, m in self.models.items()},
                emas={k: e.state_dict() for k, e in self.emas.items()},
                optimizers={k: ckpt.optimizer_to_files(o) for k, o in self.optimizers.items()},
                state=self.checkpoint_state(), keep=self.config.keep_checkpoints)
        self.dist.barrier()
        return path

    def resume(self, path=None) -> Optional[Path]:
        """Load ``path`` or the latest checkpoint in ``out_dir`` (none there: start from step 0)."""
        if path is None:
            if not self.config.out_dir:
                raise ValueError("resume needs out_dir, the folder holding checkpoints/")
            path = ckpt.latest_checkpoint(self.config.out_dir)
            if path is None:
                return None
        loaded = ckpt.load_checkpoint(path)
        state = loaded["state"]
        if state.get("trainer") != self.kind:
            raise CheckpointError(f"{path} is a {state.get('trainer')!r} checkpoint, not {self.kind!r}")
        if state.get("loop", {}).get("batch_size") != self.config.batch_size:
            raise CheckpointError(f"{path} was trained with global batch_size {state['loop'].get('batch_size')}; "
                                  f"resume with the same global batch (any number of processes)")
        for name, model in self.models.items():
            if name not in loaded["models"]:
                raise CheckpointError(f"{path} has no weights for {name!r}")
            try:
                model.load_state_dict(loaded["models"][name])
            except RuntimeError as exc:
                raise CheckpointError(f"{path}: the weights of {name!r} do not fit this model "
                                      f"(different options?): {exc}") from exc
        for name, ema in self.emas.items():
            if name not in loaded["emas"]:
                raise CheckpointError(f"{path} has no EMA weights for {name!r} (trained without ema_decay?)")
            ema.load_state_dict(loaded["emas"][name], state["emas"][name])
        for name, opt in self.optimizers.items():
            if name not in loaded["optimizers"]:
                raise CheckpointError(f"{path} has no optimizer state for {name!r}")
            opt.load_state_dict(loaded["optimizers"][name])
        for name, scaler in self.scalers.items():
            if name in state.get("scalers", {}):
                scaler.load_state_dict(state["scalers"][name])
        self.step = int(state["step"])
        self.history = [r for r in state.get("history", []) if r["step"] <= self.step]
        ckpt.set_rng_state(state.get("rng", {}), self.device)
        if self.config.out_dir and self.is_main:
            # the metrics file may hold steps after the checkpoint (the killed run's): rewrite it from history
            lines = "".join(json.dumps(r) + "\n" for r in self.history)
            self.out_path().mkdir(parents=True, exist_ok=True)
            self.out_path("metrics.jsonl").write_text(lines, encoding="utf-8")
        return Path(path)


def _to_device(batch, device):
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


class _NoBar:
    def update(self, n):
        pass

    def set_postfix(self, *a, **k):
        pass

    def close(self):
        pass


def _progress(config: TrainConfig, initial: int, main: bool, kind: str):
    if not (config.progress and main):
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=config.steps, initial=initial, desc=f"train {kind}", unit="step", dynamic_ncols=True)
