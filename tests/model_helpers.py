"""Shared helpers of the model tests: random diffusers models with non-trivial weights, and the fp32 rule
(max |fastgen - diffusers| <= 1e-4 x the output's scale, docs/design.md)."""

from __future__ import annotations

import torch

FP32_REL = 1e-4


def perturbed(model: torch.nn.Module, seed: int = 0, scale: float = 0.02) -> torch.nn.Module:
    """Move every parameter off its init (zero biases, unit norms, zero-initialised convs) so a wrongly wired
    parameter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def pair(diffusers_cls, fastgen_cls, config: dict, seed: int = 0):
    torch.manual_seed(seed)
    ref = perturbed(diffusers_cls(**config), seed)
    ours = fastgen_cls(**config).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def assert_fp32_close(out: torch.Tensor, ref: torch.Tensor, what: str = "") -> None:
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert out.dtype == ref.dtype, f"{what}: dtype {out.dtype} != {ref.dtype}"
    scale = max(ref.abs().max().item(), 1.0)
    err = (out - ref).abs().max().item()
    assert err <= FP32_REL * scale, f"{what}: max abs diff {err:.3g} > {FP32_REL} x output scale {scale:.3g}"


def assert_grads_close(ours: torch.nn.Module, ref: torch.nn.Module, names, rtol: float = 1e-4) -> None:
    ours_p, ref_p = dict(ours.named_parameters()), dict(ref.named_parameters())
    for name in names:
        a, b = ours_p[name].grad, ref_p[name].grad
        assert a is not None and b is not None, f"{name}: no gradient"
        scale = b.abs().max().item()
        assert scale > 0, f"{name}: diffusers' gradient is zero (test would prove nothing)"
        err = (a - b).abs().max().item()
        assert err <= rtol * scale + 1e-7, f"{name}: grad max diff {err:.3g} > {rtol} x {scale:.3g}"
