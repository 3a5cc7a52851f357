"""Gaussian noise with per-sample determinism.

``generator`` may be

* ``None``: the global torch RNG;
* one ``torch.Generator``: the whole batch in one draw, ``torch.randn(shape, generator=g)``, exactly as
  diffusers draws it, so trajectories line up with diffusers' for the same generator state;
* a list of generators, one per sample: sample i's noise comes from generator i alone (shape
  ``shape[1:]``), so sample i is the same whatever batch it is drawn in;
* a list of int seeds: one generator per seed, as above. Samplers and schedulers turn the seeds into
  generators once and keep drawing from them across steps (never reseeding per step). The step-noise
  stream of a seed is a derived seed (``noise_stream_seed``), not the seed itself, so that initial latents
  drawn with :func:`randn_tensor` from the same seed are not reused as step noise.
"""

from __future__ import annotations

from typing import List, Sequence, Union

import torch
from torch import Tensor

GeneratorLike = Union[None, torch.Generator, Sequence[torch.Generator], Sequence[int]]

_MASK64 = (1 << 64) - 1


def noise_stream_seed(seed: int, stream: int = 1) -> int:
    """A well-mixed seed for stream ``stream`` of ``seed`` (splitmix64); stream 0 is the seed itself."""
    if stream == 0:
        return int(seed)
    z = (int(seed) + stream * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def make_generators(seeds: Sequence[int], device="cpu", stream: int = 0) -> List[torch.Generator]:
    """One ``torch.Generator`` per seed (stream 0: seeded with the seed itself)."""
    gens = []
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int):
            raise TypeError(f"seeds must be ints, got {type(s).__name__}")
        gens.append(torch.Generator(device=device).manual_seed(noise_stream_seed(s, stream)))
    return gens


def _is_seed_list(generator) -> bool:
    return isinstance(generator, (list, tuple)) and len(generator) > 0 and all(
        isinstance(g, int) and not isinstance(g, bool) for g in generator
    )


def resolve_generator(generator: GeneratorLike, stream: int = 0):
    """Turn int seeds into generators (on the CPU, so results do not depend on the device); pass others through.

    A list of one is a single generator (as in diffusers): for a batch of one that is the same draw anyway.
    """
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if _is_seed_list(generator):
        gens = make_generators(generator, stream=stream)
        return gens[0] if len(gens) == 1 else gens
    if isinstance(generator, (list, tuple)) and generator and all(isinstance(g, torch.Generator) for g in generator):
        return generator[0] if len(generator) == 1 else list(generator)
    raise TypeError(
        "generator must be None, a torch.Generator, a list of torch.Generator (one per sample) or a list of int seeds; "
        f"got {type(generator).__name__}"
    )


def randn_tensor(shape, generator: GeneratorLike = None, device=None, dtype=None) -> Tensor:
    """Standard normal noise of ``shape`` (see the module docstring for ``generator``).

    Like diffusers, a CPU generator draws on the CPU and the result is moved to ``device``.
    Int seeds use stream 0, i.e. ``torch.Generator().manual_seed(seed)``.
    """
    shape = tuple(shape)
    device = torch.device(device) if device is not None else torch.device("cpu")
    gen = resolve_generator(generator, stream=0)
    if gen is None:
        return torch.randn(shape, device=device, dtype=dtype)
    if isinstance(gen, torch.Generator):
        return torch.randn(shape, generator=gen, device=_draw_device(gen, device), dtype=dtype).to(device)
    if len(gen) != shape[0]:
        raise ValueError(f"got {len(gen)} generators for a batch of {shape[0]}: pass one per sample")
    rows = [torch.randn(shape[1:], generator=g, device=_draw_device(g, device), dtype=dtype) for g in gen]
    return torch.stack(rows).to(device)


def _draw_device(gen: torch.Generator, device: torch.device):
    if gen.device.type == device.type:
        return device
    if gen.device.type == "cpu":
        return "cpu"
    raise ValueError(f"cannot draw a {device} tensor from a generator on {gen.device}")


class NoiseSource:
    """Draws step noise across a whole sampling run from one resolved generator spec.

    Int seeds become generators once (on the step-noise stream); re-resolving with the same seed list keeps
    the existing generators, so a scheduler that is handed ``generator=[1, 2]`` at every ``step`` continues
    the same per-sample streams instead of restarting them.
    """

    def __init__(self, generator: GeneratorLike = None):
        self._spec = generator
        self._gen = resolve_generator(generator, stream=1)

    def update(self, generator: GeneratorLike) -> "NoiseSource":
        if _is_seed_list(generator) and _is_seed_list(self._spec) and list(generator) == list(self._spec):
            return self
        return NoiseSource(generator)

    def randn(self, shape, device, dtype) -> Tensor:
        return randn_tensor(shape, self._gen, device=device, dtype=dtype)
