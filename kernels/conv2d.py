"""Triton 2-D convolution with a fused epilogue: ``out = (conv2d(x, weight) + bias + residual) * output_scale``.

Same contract as conv2d_fwd_{cpu,cuda} in csrc/ops.h and as the torch reference ``_reference_fwd`` in
fastgen/ops/conv2d.py:

    conv2d_fwd(x, weight, bias, residual, packed, stride_h, stride_w, pad_t, pad_b, pad_l, pad_r,
               output_scale, algo) -> out

x is (N, C, H, W), contiguous or channels-last dense; weight (K, C, R, S) contiguous in x's dtype, R and S
1 or 3; strides 1 or 2; zero padding (top, bottom, left, right), possibly asymmetric. bias is None or a
contiguous fp32 (K,) tensor; residual is None or has the output's shape, x's dtype and the output's strides.
``packed`` and ``algo`` belong to the CPU kernel and are ignored. out is (N, K, Ho, Wo) in x's dtype with
Ho = (H + pad_t + pad_b - R) // stride_h + 1 (Wo alike), contiguous when x is contiguous, else channels-last
(the reference's ``_out_format``). The public op arranges every precondition; the launcher only asserts them
and never copies x or the residual.

Kernel: an implicit GEMM. GEMM rows are the M = N * Ho * Wo output pixels, GEMM columns the K output
channels, and the reduction runs over (r, s, c): for each of the R * S filter taps (unrolled, R and S are
constexpr) the tap's input pixel of every output row is computed once, masked where it falls into the
padding, and the loop over C in BLOCK_K blocks loads a [BLOCK_M, BLOCK_K] tile of x -- unit-stride along C
for a channels-last x, along the output row for a contiguous one -- and a [BLOCK_K, BLOCK_N] tile of the
weight, and accumulates their ``tl.dot`` in fp32. The epilogue adds the bias, adds the residual, multiplies
by output_scale and rounds once to x's dtype while the tile is still in registers, exactly the reference's
order (conv + bias, + residual, * scale, one rounding).

The weight is read as (K, R, S, C), C innermost, so a weight tile is unit-stride along C like the x tile.
That is ``weight.permute(0, 2, 3, 1).contiguous()``: free for 1x1 (the same memory, no copy) and one copy of
the weight per call for 3x3 -- K * C * 9 elements, e.g. 4.7 MB for SD's 512 -> 512 fp16 layer, against a
convolution that reads the activations (usually much larger) and the weight once per M block anyway.

Layout: a constexpr (CHANNELS_LAST), so each layout compiles to its own kernel; offsets are computed from
the shapes with the dense formulas (n*C*H*W + c*H*W + h*W + w, or n*H*W*C + (h*W + w)*C + c), which also
address the output and residual correctly where size-1 dims make their strides ambiguous. Sample offsets
are int64 (large VAE batches exceed 2^31 elements).

Precision: fp16 / bf16 operands run on tensor cores with fp32 accumulation. fp32 operands use
``input_precision="ieee"``: Triton's default for fp32 ``tl.dot`` is TF32 (10-bit mantissa inputs), whose
error is far outside the fp32 tolerance (docs/design.md "Numerics and tolerances"); IEEE fp32 is slower
(no tensor cores) but matches the fp32 reference.

Tuning: on a GPU the kernel is autotuned over a handful of tile shapes suited to Ampere / Hopper, keyed on
the channel counts, the kernel size, the strides and the layout (and, by Triton, the dtypes); configs whose
BLOCK_K / BLOCK_N exceed the (power-of-two rounded) C / K are shrunk to it, since such lanes would be masked
anyway (the VAE's conv_in has C = 3, conv_out K = 3). The output is only written, so re-running a config
while tuning is harmless. Under TRITON_INTERPRET=1 autotuning would run every config and the interpreter
pays per program and per op, so one fixed config is used there. Known interpreter limit: ``tl.dot`` on
bf16 operands is wrong there (docs/design.md), so the interpreter tests feed fp32 and fp16; bf16 takes the
same code path on a GPU.
"""

import os

import torch
import triton
import triton.language as tl

from fastgen.ops._layout import is_channels_last_dense

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MIN_DOT = 16  # smallest tl.dot tile dimension

if _INTERPRET:
    _CONFIGS = [triton.Config({"BLOCK_M": 128, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
else:
    _CONFIGS = [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    ]

_TUNE_KEY = ["C", "K", "R", "S", "STRIDE_H", "STRIDE_W", "CHANNELS_LAST"]


def _shrink_configs(configs, named_args, **kwargs):
    """Cap BLOCK_K at C and BLOCK_N at K (rounded up to a power of two, at least 16); drop duplicates."""
    cap_k = max(_MIN_DOT, triton.next_power_of_2(int(named_args["C"])))
    cap_n = max(_MIN_DOT, triton.next_power_of_2(int(named_args["K"])))
    out, seen = [], set()
    for cfg in configs:
        kw = dict(cfg.kwargs)
        kw["BLOCK_K"] = min(kw["BLOCK_K"], cap_k)
        kw["BLOCK_N"] = min(kw["BLOCK_N"], cap_n)
        key = (tuple(sorted(kw.items())), cfg.num_warps, cfg.num_stages)
        if key not in seen:
            seen.add(key)
            out.append(triton.Config(kw, num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    return out


def _tuned(fn):
    if _INTERPRET:
        return fn  # the launcher passes the one interpreter config
    return triton.autotune(configs=_CONFIGS, key=_TUNE_KEY,
                           prune_configs_by={"early_config_prune": _shrink_configs})(fn)


@_tuned
@triton.jit
def _conv2d_fwd_kernel(
    X, W, B, RES, OUT,
    M, C, H, W_IN, K, HO, WO, pad_t, pad_l, output_scale,
    R: tl.constexpr, S: tl.constexpr, STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
    IEEE_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Programs with the same M block are adjacent (the N blocks vary fastest): they read the same x tiles,
    # which then come from L2; the weight is small and stays there.
    pid = tl.program_id(0)
    n_nblocks = tl.cdiv(K, BLOCK_N)
    pid_m = pid // n_nblocks
    pid_n = pid % n_nblocks

    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = m < M
    hw_out = HO * WO
    n = m // hw_out
    p = m % hw_out
    oh = p // WO
    ow = p % WO
    k = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_mask = k < K
    kc = tl.arange(0, BLOCK_K)

    x_sample = n.to(tl.int64) * C * H * W_IN
    if CHANNELS_LAST:
        x_cstride = 1
    else:
        x_cstride = H * W_IN
    w_row = k.to(tl.int64) * (R * S * C)  # weight is (K, R, S, C)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for r in tl.static_range(R):
        ih = oh * STRIDE_H - pad_t + r
        h_ok = (ih >= 0) & (ih < H)
        for s in tl.static_range(S):
            iw = ow * STRIDE_W - pad_l + s
            a_mask_m = m_mask & h_ok & (iw >= 0) & (iw < W_IN)
            pix = ih * W_IN + iw
            if CHANNELS_LAST:
                a_ptrs = X + (x_sample + pix.to(tl.int64) * C)[:, None] + kc[None, :]
            else:
                a_ptrs = X + (x_sample + pix)[:, None] + kc[None, :] * x_cstride
            b_ptrs = W + (w_row + (r * S + s) * C)[None, :] + kc[:, None]
            for c0 in range(0, C, BLOCK_K):
                c_ok = (c0 + kc) < C
                a = tl.load(a_ptrs, mask=a_mask_m[:, None] & c_ok[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=c_ok[:, None] & k_mask[None, :], other=0.0)
                if IEEE_FP32:
                    acc = tl.dot(a, b, acc, input_precision="ieee")
                else:
                    acc = tl.dot(a, b, acc)
                a_ptrs += BLOCK_K * x_cstride
                b_ptrs += BLOCK_K

    # Epilogue, in the reference's order: (conv + bias + residual) * scale, rounded once.
    if HAS_BIAS:
        acc += tl.load(B + k, mask=k_mask, other=0.0)[None, :]
    out_sample = n.to(tl.int64) * K * hw_out
    if CHANNELS_LAST:
        offs = (out_sample + p.to(tl.int64) * K)[:, None] + k[None, :]
    else:
        offs = (out_sample + p)[:, None] + k.to(tl.int64)[None, :] * hw_out
    mask = m_mask[:, None] & k_mask[None, :]
    if HAS_RES:
        acc += tl.load(RES + offs, mask=mask, other=0.0).to(tl.float32)
    acc = acc * output_scale
    tl.store(OUT + offs, acc.to(OUT.dtype.element_ty), mask=mask)


def _same_strides(t, like):
    # Strides of size-1 dims never matter for addressing.
    return all(size == 1 or a == b for size, a, b in zip(like.shape, t.stride(), like.stride()))


def conv2d_fwd(x, weight, bias, residual, packed, stride_h: int, stride_w: int, pad_t: int, pad_b: int,
               pad_l: int, pad_r: int, output_scale: float, algo: str):
    """(conv2d(x, weight) + bias + residual) * output_scale; ``packed`` and ``algo`` are ignored."""
    del packed, algo  # the CPU kernel's
    assert x.dim() == 4 and x.dtype in _DTYPES and (x.is_contiguous() or is_channels_last_dense(x)), \
        f"conv2d (triton): x must be a contiguous or channels-last (N, C, H, W) float tensor, got {x.dtype} " \
        f"{tuple(x.shape)} strides {x.stride()}"
    N, C, H, W_in = x.shape
    assert weight.dim() == 4 and weight.dtype == x.dtype and weight.is_contiguous() and weight.shape[1] == C, \
        f"conv2d (triton): weight must be a contiguous (K, {C}, R, S) {x.dtype} tensor, got {weight.dtype} " \
        f"{tuple(weight.shape)} strides {weight.stride()}"
    K, _, R, S = weight.shape
    assert (R, S) in ((1, 1), (3, 3)) and stride_h in (1, 2) and stride_w in (1, 2), \
        f"conv2d (triton): 1x1 or 3x3 kernels at stride 1 or 2, got {R}x{S} at stride ({stride_h}, {stride_w})"
    assert min(pad_t, pad_b, pad_l, pad_r) >= 0, "conv2d (triton): padding must be non-negative"
    Ho = (H + pad_t + pad_b - R) // stride_h + 1
    Wo = (W_in + pad_l + pad_r - S) // stride_w + 1
    assert Ho > 0 and Wo > 0, f"conv2d (triton): the {R}x{S} kernel does not fit the padded input"
    has_bias = bias is not None
    if has_bias:
        assert bias.dtype == torch.float32 and bias.is_contiguous() and tuple(bias.shape) == (K,), \
            f"conv2d (triton): bias must be a contiguous float32 ({K},) tensor"

    channels_last = not x.is_contiguous()  # where both layouts hold, both kernels address alike
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty((N, K, Ho, Wo), dtype=x.dtype, device=x.device, memory_format=fmt)
    has_res = residual is not None
    if has_res:
        assert residual.dtype == x.dtype and residual.shape == out.shape and _same_strides(residual, out), \
            f"conv2d (triton): residual must have the output's shape {tuple(out.shape)}, dtype {x.dtype} and " \
            f"strides {out.stride()}, got {residual.dtype} {tuple(residual.shape)} strides {residual.stride()}"
    M = N * Ho * Wo
    if M == 0 or K == 0:
        return out

    # (K, R, S, C): C innermost, like the x tile. A view for 1x1, one copy of the (small) weight for 3x3.
    w = weight.permute(0, 2, 3, 1).contiguous()
    args = (x, w, bias if has_bias else w, residual if has_res else out, out,
            M, C, H, W_in, K, Ho, Wo, int(pad_t), int(pad_l), float(output_scale))
    consts = dict(R=R, S=S, STRIDE_H=int(stride_h), STRIDE_W=int(stride_w), CHANNELS_LAST=channels_last,
                  HAS_BIAS=has_bias, HAS_RES=has_res, IEEE_FP32=x.dtype == torch.float32)

    if _INTERPRET:
        (cfg,) = _shrink_configs(_CONFIGS, {"C": C, "K": K})
        grid = (triton.cdiv(M, cfg.kwargs["BLOCK_M"]) * triton.cdiv(K, cfg.kwargs["BLOCK_N"]),)
        _conv2d_fwd_kernel[grid](*args, **consts, **cfg.kwargs, num_warps=cfg.num_warps)
    else:
        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_N"]),)

        _conv2d_fwd_kernel[grid](*args, **consts)
    return out
