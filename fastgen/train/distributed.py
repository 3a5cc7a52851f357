"""One process or ``torchrun --nproc_per_node=N``: the process group, and which samples and random numbers
each process takes so that N processes compute what one process would on the same global batch."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.initialized_here and dist.is_initialized():
            dist.destroy_process_group()
            self.initialized_here = False


def init_distributed(device: Optional[str] = None) -> DistContext:
    """Join the process group ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1), else a single
    process. nccl on CUDA (one GPU per local rank), gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' asked for, but torch sees no CUDA device")
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    ctx = DistContext(rank=rank, world_size=world, local_rank=local_rank, device=dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        ctx.initialized_here = True
    return ctx


class GlobalOrder:
    """The training stream: epoch ``e`` visits the dataset in ``randperm(n)`` drawn from ``(seed, e)``, and the
    stream continues across epochs, so step ``s`` takes stream positions ``[s * B, (s + 1) * B)`` of the global
    batch ``B``. The position of the data is therefore the step: a run resumed at step ``s`` with any number of
    processes sees exactly the samples an uninterrupted run would."""

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise ValueError("the dataset is empty")
        self.n = n
        self.seed = seed
        self._epoch = -1
        self._perm: Optional[Tensor] = None

    def _permutation(self, epoch: int) -> Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(hash_seed(self.seed, 0x5EED, epoch))
            self._perm = torch.randperm(self.n, generator=g)
            self._epoch = epoch
        return self._perm

    def indices(self, start: int, count: int) -> list[int]:
        out = []
        for p in range(start, start + count):
            out.append(int(self._permutation(p // self.n)[p % self.n]))
        return out

    def epoch_of(self, position: int) -> int:
        return position // self.n


def hash_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64 over the parts): distinct (seed, step, stream) never collide in
    practice, and nothing depends on Python's randomised ``hash``."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
        x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = x
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        x = z ^ (z >> 31)
    return x & 0x7FFFFFFFFFFFFFFF


class StepRandom:
    """Random numbers of one micro-batch as slices of the global batch's: the k-th draw of step ``s`` is made for
    all ``B`` samples from a generator seeded by ``(seed, s, k)`` and this process keeps its rows. Noises,
    timesteps, condition dropout and GAN latents are thus the same for a sample whatever the world size, the
    gradient accumulation or a resume — the condition for DDP == one process and for bitwise resume."""

    def __init__(self, seed: int, step: int, rows: Tensor, global_batch: int, device: torch.device):
        self.seed, self.step, self.rows, self.global_batch, self.device = seed, step, rows, global_batch, device
        self._draws = 0

    def _generator(self) -> torch.Generator:
        self._draws += 1
        return torch.Generator().manual_seed(hash_seed(self.seed, self.step, self._draws))

    def _take(self, full: Tensor, dtype=None) -> Tensor:
        out = full.index_select(0, self.rows)
        return out.to(device=self.device, dtype=dtype) if dtype is not None else out.to(self.device)

    def randn(self, *shape: int, dtype=torch.float32) -> Tensor:
        return self._take(torch.randn((self.global_batch, *shape), generator=self._generator()), dtype)

    def rand(self, *shape: int, dtype=torch.float32) -> Tensor:
        return self._take(torch.rand((self.global_batch, *shape), generator=self._generator()), dtype)

    def randint(self, low: int, high: int, *shape: int) -> Tensor:
        return self._take(torch.randint(low, high, (self.global_batch, *shape), generator=self._generator()))

    def randn_like(self, x: Tensor) -> Tensor:
        return self.randn(*x.shape[1:], dtype=x.dtype)


def all_reduce_mean(value: Tensor, ctx: DistContext) -> Tensor:
    if ctx.enabled:
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= ctx.world_size
    return value
