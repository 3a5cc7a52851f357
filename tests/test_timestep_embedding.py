"""fastgen.ops.timestep_embedding: bit-identical to diffusers' get_timestep_embedding."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from fastgen.ops.timestep_embedding import timestep_embedding

TIMESTEPS = {
    "int64 DDPM steps": torch.tensor([0, 1, 37, 500, 999]),
    "int32": torch.tensor([3, 981], dtype=torch.int32),
    "float fractional": torch.tensor([0.0, 0.5, 1.25, 261.7, 999.999]),
    "float64": torch.rand(7, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 1000,
    "float16": torch.tensor([0.5, 12.0, 999.0], dtype=torch.float16),
    "unit interval (flow matching)": torch.rand(4, generator=torch.Generator().manual_seed(1)),
    "single": torch.tensor([500]),
    "empty": torch.tensor([], dtype=torch.int64),
}
# 320 / 1280: SD U-Net; 256: SD3/Flux; odd and tiny widths exercise the zero pad.
DIMS = [1, 4, 5, 7, 32, 256, 320, 321, 1280]


def _reference_fp64(t, dim, flip, shift, scale, max_period):
    half = dim // 2
    i = torch.arange(half, dtype=torch.float64)
    args = scale * t.double()[:, None] * torch.exp(-math.log(max_period) * i / (half - shift))[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)] if flip else [torch.sin(args), torch.cos(args)], dim=-1)
    return torch.nn.functional.pad(emb, (0, dim % 2))


@pytest.mark.parametrize("name", list(TIMESTEPS))
@pytest.mark.parametrize("flip,shift", list(itertools.product([False, True], [0, 1])))
def test_bit_identical_to_diffusers(name, flip, shift):
    embeddings = pytest.importorskip("diffusers.models.embeddings")
    t = TIMESTEPS[name]
    for dim, scale, max_period in itertools.product(DIMS, [1, 1000.0, 0.5], [10000, 10]):
        ours = timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift, scale=scale,
                                  max_period=max_period)
        theirs = embeddings.get_timestep_embedding(t, dim, flip, shift, scale, max_period)
        assert ours.dtype == theirs.dtype == torch.float32 and ours.shape == (t.shape[0], dim)
        assert torch.equal(ours, theirs), (name, dim, flip, shift, scale, max_period)


def test_diffusers_timesteps_modules_identical():
    # The module the SD U-Net uses: Timesteps(320, flip_sin_to_cos=True, downscale_freq_shift=0).
    embeddings = pytest.importorskip("diffusers.models.embeddings")
    t = torch.tensor([999, 981, 0])
    for num_channels, flip, shift in [(320, True, 0), (128, False, 1), (256, True, 1)]:
        module = embeddings.Timesteps(num_channels, flip_sin_to_cos=flip, downscale_freq_shift=shift)
        ours = timestep_embedding(t, num_channels, flip_sin_to_cos=flip, downscale_freq_shift=shift)
        assert torch.equal(ours, module(t))


@pytest.mark.parametrize("dim", [4, 320, 321])
@pytest.mark.parametrize("flip,shift", list(itertools.product([False, True], [0, 1])))
def test_matches_fp64_formula(dim, flip, shift):
    t = torch.tensor([0.0, 1.0, 17.5, 999.0])
    ours = timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
    ref = _reference_fp64(t, dim, flip, shift, 1.0, 10000)
    # fp32 arguments up to 999 carry ~1000 * 2**-24 = 6e-5 of rounding into sin/cos.
    torch.testing.assert_close(ours.double(), ref, rtol=0, atol=2e-4)
    if dim % 2:
        assert torch.equal(ours[:, -1], torch.zeros(4))
    half = dim // 2
    first = ours[:, :half] if not flip else ours[:, half:2 * half]
    torch.testing.assert_close(first[0], torch.zeros(half))  # sin(0) = 0


def test_keeps_device_and_integer_equals_float():
    t = torch.tensor([0, 10, 999])
    out = timestep_embedding(t, 64)
    assert out.device == t.device and out.dtype == torch.float32
    assert torch.equal(out, timestep_embedding(t.float(), 64))


def test_bad_inputs():
    with pytest.raises(TypeError, match="torch.Tensor"):
        timestep_embedding([1, 2, 3], 32)
    with pytest.raises(ValueError, match="1-D"):
        timestep_embedding(torch.tensor(5), 32)
    with pytest.raises(ValueError, match="1-D"):
        timestep_embedding(torch.zeros(2, 1), 32)
    with pytest.raises(ValueError, match=">= 1"):
        timestep_embedding(torch.zeros(2), 0)
    with pytest.raises(TypeError, match="int"):
        timestep_embedding(torch.zeros(2), 32.0)
    with pytest.raises(TypeError, match="dtype"):
        timestep_embedding(torch.zeros(2, dtype=torch.bool), 32)
    # dim // 2 == shift divides by zero (diffusers returns NaNs): a clear error instead.
    with pytest.raises(ValueError, match="divides by zero"):
        timestep_embedding(torch.zeros(2), 3, downscale_freq_shift=1)
    with pytest.raises(ValueError, match="max_period"):
        timestep_embedding(torch.zeros(2), 8, max_period=0)
