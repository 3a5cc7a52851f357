"""2-D convolution with a fused epilogue: ``out = (conv2d(x, weight) + bias + residual) * output_scale``.

These are the convolutions of diffusers' ResNet blocks, down/up-samplers and VAE: 3x3 at stride 1 or 2 and
the 1x1 shortcut. Eager PyTorch runs the convolution (bias fused by oneDNN / cuDNN), then the residual add,
then ``/ output_scale_factor`` as separate passes over the output; here they happen while the output tile is
still in registers or cache. Padding may be asymmetric (``(left, right, top, bottom)``, F.pad's order), which
folds the ``F.pad(x, (0, 1, 0, 1))`` of the VAE's stride-2 ``Downsample2D`` into the convolution.

Kernels (the contract is :func:`_reference_fwd`):

* CPU C++ (``csrc/cpu/conv2d.cpp``): for 3x3 stride 1, Winograd F(4x4, 3x3) or F(2x2, 3x3) — 4x / 2.25x fewer
  multiplies than a direct convolution — with the input transform, the Winograd-domain GEMMs and the output
  transform (which applies the epilogue) blocked over tiles; the weights are transformed once and cached
  on the weight tensor (:func:`_packed_weight`, invalidated when the weight changes). Other shapes run
  PyTorch's convolution (oneDNN) followed by one fused epilogue pass. Which path runs is chosen per shape
  from measurements (fastgen/ops/_conv2d_cpu_choice.py).
* Triton (``kernels/conv2d.py``): an implicit-GEMM convolution with the epilogue fused.
* CUDA (``csrc/cuda/conv2d.cu``): cuDNN's convolution and one fused epilogue pass.
* ``torch``: the reference, ``F.conv2d`` in fp32 plus the epilogue.

Numerics: every backend accumulates in fp32 and rounds once to x's dtype. Winograd F(4,3)'s transforms
amplify rounding: its fp32 max error against fp64 is ~4x that of PyTorch's own fp32 convolution (measured;
docs/design.md "Numerics"), F(2,3)'s is below it.

Gradients: ``dz = dy * output_scale``; dx and dweight are PyTorch's convolution backward of dz (oneDNN /
cuDNN, which a fastgen kernel would not beat for these shapes), dbias is ``dz`` summed over (N, H, W) and
dresidual is ``dz``. They are written in differentiable torch ops, so second derivatives work (R1 penalty).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _backend
from ._checks import check_dtype, check_same_device, check_tensor
from . import _conv2d_cpu_choice as _cpu_choice
from ._dispatch import _tracing_mode, declare_op
from ._layout import _same_strides, is_channels_last_dense, match_layout

OP = "conv2d"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Kernel sizes fastgen's kernels implement; others run on the torch backend (F.conv2d + the epilogue).
KERNEL_SIZES = ((1, 1), (3, 3))
STRIDES = (1, 2)
PACK_ATTR = "_fastgen_conv2d_packed"

Padding = Union[int, str, Sequence[int]]


# ------------------------------------------------------------------ reference


def conv2d_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, stride=1, padding: Padding = 0,
                     residual: Optional[Tensor] = None, output_scale: float = 1.0) -> Tensor:
    """Plain PyTorch, computed in fp32 (see :func:`conv2d` for the arguments)."""
    sh, sw = _pair("stride", stride)
    pads = _padding(padding, weight.shape[2], weight.shape[3], (sh, sw))
    return _reference_fwd(x, weight, bias, residual, None, sh, sw, *pads, float(output_scale), "")


def _reference_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
                   packed: Optional[Tensor], stride_h: int, stride_w: int, pad_t: int, pad_b: int, pad_l: int,
                   pad_r: int, output_scale: float, algo: str) -> Tensor:
    """The kernel contract.

    x: (N, C, H, W), contiguous or channels-last dense; weight: (K, C, R, S) contiguous, x's dtype; bias: (K,)
    fp32 or None; residual: None or the output's shape, dtype and strides. ``packed`` / ``algo``: the CPU
    kernel's pre-transformed weight and path (other backends ignore them). Returns (N, K, Ho, Wo) in x's
    dtype, channels-last when x is (and not also contiguous), else contiguous.
    """
    xp = F.pad(x.float(), (pad_l, pad_r, pad_t, pad_b)) if pad_t or pad_b or pad_l or pad_r else x.float()
    y = F.conv2d(xp, weight.float(), None if bias is None else bias.float(), stride=(stride_h, stride_w))
    if residual is not None:
        y = y + residual.float()
    if output_scale != 1.0:
        y = y * output_scale
    fmt = _out_format(x)
    if y.dtype == x.dtype and y.stride() == _out_strides(x, y.shape):
        # F.conv2d's fresh output already is the contract's (strides exactly, size-1 dims included): copying
        # it would be a whole extra pass
        return y
    return torch.empty(y.shape, dtype=x.dtype, device=x.device, memory_format=fmt).copy_(y)


def _out_format(x: Tensor) -> torch.memory_format:
    return torch.contiguous_format if x.is_contiguous() else torch.channels_last


# ---------------------------------------------------------------- declaration


def _save(ctx, inputs, output):
    x, weight, bias, residual, _packed, sh, sw, pt, pb, pl, pr, scale, _algo = inputs
    ctx.save_for_backward(x, weight)
    ctx.geometry = (sh, sw, pt, pb, pl, pr)
    ctx.scale = scale
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.residual_dtype = None if residual is None else residual.dtype


def _grads(ctx, dy):
    x, weight = ctx.saved_tensors
    sh, sw, pt, pb, pl, pr = ctx.geometry
    dz = dy if ctx.scale == 1.0 else dy * ctx.scale
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dx = dw = None
    if need_x or need_w:
        symmetric = pt == pb and pl == pr
        xin = x if symmetric else F.pad(x, (pl, pr, pt, pb))
        pad = [pt, pl] if symmetric else [0, 0]
        dxin, dw, _ = torch.ops.aten.convolution_backward(
            dz.to(x.dtype), xin, weight, None, [sh, sw], pad, [1, 1], False, [0, 0], 1, [need_x, need_w, False]
        )
        if need_x:
            dx = dxin if symmetric else dxin[:, :, pt:pt + x.shape[2], pl:pl + x.shape[3]]
            dx = match_layout(dx, x)
    db = None if ctx.bias_dtype is None else dz.float().sum((0, 2, 3)).to(ctx.bias_dtype)
    dr = None if ctx.residual_dtype is None else dz.to(ctx.residual_dtype)
    return dx, dw, db, dr, None, None, None, None, None, None, None, None, None


def _kernels(backend: str):
    return _backend.native_kernel(OP, "conv2d_fwd", backend)


_op = declare_op(OP, reference=_reference_fwd, kernels=_kernels, save=_save, grads=_grads)


# ------------------------------------------------------------ weight packing


def _packed_weight(weight: Tensor, algo: str) -> Optional[Tensor]:
    """The CPU kernel's transformed weight for ``algo``, cached on the weight tensor.

    The cache entry is valid while the weight keeps its storage (``data_ptr``), its version counter (every
    in-place update through autograd-visible ops bumps it: optimizer steps, ``load_state_dict``,
    ``copy_`` under ``no_grad``) and a fingerprint of evenly spread elements, which catches updates through
    ``.data`` (peft's ``merge``, diffusers' ``fuse_lora``) that the version counter does not see. A caller
    that changes single weight elements through ``.data`` calls :func:`release_packed_weights`.
    """
    if not algo.startswith("winograd"):
        return None
    w = weight.detach()
    fingerprint = _fingerprint(w)
    key = (w.data_ptr(), weight._version, tuple(w.shape), w.dtype)
    cache = getattr(weight, PACK_ATTR, None)
    if cache is not None:
        hit = cache.get(algo)
        if hit is not None and hit[0] == key and torch.equal(hit[1], fingerprint):
            return hit[2]
    else:
        cache = {}
    packed = _cpu_choice.pack_weight(w, algo)
    cache = {a: v for a, v in cache.items() if v[0] == key and torch.equal(v[1], fingerprint)}
    cache[algo] = (key, fingerprint, packed)
    try:
        setattr(weight, PACK_ATTR, cache)
    except (AttributeError, RuntimeError):  # a tensor subclass that refuses attributes: no cache
        pass
    return packed


_FINGERPRINT_SAMPLES = 509  # a prime, so the sample stride does not line up with the (C, 3, 3) layout


def _fingerprint(w: Tensor) -> Tensor:
    flat = w.reshape(-1)
    step = max(1, flat.numel() // _FINGERPRINT_SAMPLES)
    return flat[::step].clone()


def release_packed_weights(module_or_weight) -> int:
    """Drop the cached CPU conv2d weight transforms of a weight tensor or of every parameter of a module
    (they are rebuilt on the next call); returns how many were dropped."""
    tensors = module_or_weight.parameters() if isinstance(module_or_weight, torch.nn.Module) else [module_or_weight]
    dropped = 0
    for t in tensors:
        if getattr(t, PACK_ATTR, None) is not None:
            delattr(t, PACK_ATTR)
            dropped += 1
    return dropped


# ------------------------------------------------------------------ public op


def conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, stride=1, padding: Padding = 0,
           residual: Optional[Tensor] = None, output_scale: float = 1.0, backend: Optional[str] = None) -> Tensor:
    """``(F.conv2d(x, weight, bias, stride, padding) + residual) * output_scale``, fused.

    Args:
        x: (N, C, H, W), float32, float16 or bfloat16; contiguous or channels-last (other strides are copied).
        weight: (K, C, R, S), x's dtype (under autocast everything is cast to the autocast dtype, as
            ``F.conv2d`` is). fastgen's kernels take 1x1 and 3x3; other sizes run on the torch backend.
        bias: (K,) or None.
        stride: 1 or 2, or a pair (sh, sw) of them.
        padding: an int, a pair (ph, pw), four ints (left, right, top, bottom) as ``F.pad`` takes them, or
            ``"valid"`` / ``"same"`` (stride 1).
        residual: None or a tensor of the output's shape, added before the scale (diffusers' ResNet block
            ``(shortcut + h) / output_scale_factor`` is ``residual=shortcut, output_scale=1 / factor``).
        output_scale: multiplies the sum.
        backend: ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"torch"``; None chooses.

    Returns (N, K, Ho, Wo) in x's dtype (the autocast dtype under autocast), channels-last when x is.
    """
    check_tensor("x", x)
    check_tensor("weight", weight)
    if x.dim() != 4:
        raise ValueError(f"conv2d: expected x of shape (N, C, H, W), a 4-D tensor, got {x.dim()}-D shape "
                         f"{tuple(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"conv2d: expected weight of shape (K, C, R, S), a 4-D tensor, got {weight.dim()}-D "
                         f"shape {tuple(weight.shape)}")
    check_dtype("x", x, DTYPES)
    check_same_device(x=x, weight=weight, bias=bias, residual=residual)
    if torch.is_autocast_enabled(x.device.type):
        dt = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dt), weight.to(dt)
        residual = None if residual is None else residual.to(dt)
    elif weight.dtype != x.dtype:
        raise TypeError(f"conv2d: weight must have x's dtype {_name(x.dtype)}, got {_name(weight.dtype)} "
                        "(cast one of them, or run under torch.autocast)")
    n, c, h, w_in = x.shape
    k, wc, r, s = weight.shape
    if wc != c:
        raise ValueError(f"conv2d: weight {tuple(weight.shape)} expects {wc} input channels, x "
                         f"{tuple(x.shape)} has {c} (groups are not supported)")
    if bias is not None:
        check_tensor("bias", bias)
        if tuple(bias.shape) != (k,):
            raise ValueError(f"conv2d: bias must have shape ({k},) (one per output channel), got "
                             f"{tuple(bias.shape)}")
        check_dtype("bias", bias, DTYPES)
    sh, sw = _pair("stride", stride)
    pads = _padding(padding, r, s, (sh, sw))
    ho = (h + pads[0] + pads[1] - r) // sh + 1
    wo = (w_in + pads[2] + pads[3] - s) // sw + 1
    if ho <= 0 or wo <= 0:
        raise ValueError(f"conv2d: the {r}x{s} kernel does not fit x's padded {h + pads[0] + pads[1]}x"
                         f"{w_in + pads[2] + pads[3]} image")
    if not isinstance(output_scale, (int, float)) or isinstance(output_scale, bool):
        raise TypeError(f"conv2d: output_scale must be a float, got {type(output_scale).__name__}")

    unsupported = None
    if (r, s) not in KERNEL_SIZES or sh not in STRIDES or sw not in STRIDES:
        why = (f"its kernels take 1x1 and 3x3 kernels at stride 1 or 2, got a {r}x{s} kernel at stride "
               f"({sh}, {sw}); backend=None runs it on the torch backend (F.conv2d + the epilogue)")
        unsupported = {"cpu": why, "cuda": why, "triton": why}
    chosen = _op.resolve(x.device, backend, dtype=x.dtype, unsupported_reason=unsupported)

    xk = x if (x.is_contiguous() or is_channels_last_dense(x)) else x.contiguous()
    wk = weight.contiguous()
    out_shape = (n, k, ho, wo)
    if residual is not None:
        check_tensor("residual", residual)
        if tuple(residual.shape) != out_shape:
            raise ValueError(f"conv2d: residual must have the output's shape {out_shape}, got "
                             f"{tuple(residual.shape)}")
        if residual.dtype != xk.dtype:
            residual = residual.to(xk.dtype)
        strides = _out_strides(xk, out_shape)
        if not _same_strides(residual, strides):
            residual = torch.empty_strided(out_shape, strides, dtype=residual.dtype,
                                           device=residual.device).copy_(residual)
    bk = None if bias is None else bias.float()
    if x.numel() == 0 or k == 0 or n == 0:
        chosen = "torch"
    algo, packed = "", None
    if chosen == "cpu":
        training = torch.is_grad_enabled() and weight.requires_grad
        algo = _cpu_choice.choose(n, c, k, h, w_in, r, s, sh, sw, pads, xk.dtype, training)
        if algo.startswith("winograd"):
            # Traced (torch.compile): the transform becomes part of the graph instead of a cached tensor.
            packed = _cpu_choice.pack_weight(wk, algo, blocked=False) if _tracing_mode() else _packed_weight(weight, algo)
    return _op(xk, wk, bk, residual, packed, sh, sw, *pads, float(output_scale), algo, chosen)


def _out_strides(x: Tensor, shape) -> tuple[int, ...]:
    n, k, h, w = shape
    if x.is_contiguous():
        return (k * h * w, h * w, w, 1)
    return (h * w * k, 1, w * k, k)


def _name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def _pair(name: str, v) -> tuple[int, int]:
    if isinstance(v, int) and not isinstance(v, bool):
        return v, v
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(i, int) for i in v):
        return int(v[0]), int(v[1])
    raise TypeError(f"conv2d: {name} must be an int or a pair of ints, got {v!r}")


def _padding(padding: Padding, r: int, s: int, stride: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, bottom, left, right)."""
    if isinstance(padding, str):
        if padding == "valid":
            return 0, 0, 0, 0
        if padding == "same":
            if stride != (1, 1):
                raise ValueError("conv2d: padding='same' needs stride 1, as in F.conv2d")
            return (r - 1) // 2, r // 2, (s - 1) // 2, s // 2
        raise ValueError(f"conv2d: padding must be an int, a pair, four ints, 'valid' or 'same', got {padding!r}")
    if isinstance(padding, int) and not isinstance(padding, bool):
        pads = (padding,) * 4
    elif isinstance(padding, (tuple, list)) and len(padding) == 2 and all(isinstance(i, int) for i in padding):
        pads = (padding[0], padding[0], padding[1], padding[1])
    elif isinstance(padding, (tuple, list)) and len(padding) == 4 and all(isinstance(i, int) for i in padding):
        left, right, top, bottom = padding
        pads = (top, bottom, left, right)
    else:
        raise TypeError(f"conv2d: padding must be an int, a pair (ph, pw), four ints (left, right, top, bottom), "
                        f"'valid' or 'same', got {padding!r}")
    if any(p < 0 for p in pads):
        raise ValueError(f"conv2d: padding must be non-negative, got {padding!r}")
    return tuple(int(p) for p in pads)
