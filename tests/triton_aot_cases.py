"""Compile every Triton kernel in kernels/ for a CUDA GPU target without a GPU (run as a script).

The interpreter, which runs the kernels on CPU tensors in the other tests, accepts code that the
compiler rejects (shapes, dtypes, constexpr misuse) and says nothing about registers or shared memory;
this compiles one representative configuration of each kernel ahead of time with Triton's own
ptxas. ``tests/test_triton_compile.py`` runs it in a subprocess, since TRITON_INTERPRET must be off
before triton is imported.

usage: python tests/triton_aot_cases.py [ARCH ...]     (default: 90)
"""

import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from kernels import attention as A  # noqa: E402
from kernels import bias_act as BA  # noqa: E402
from kernels import conv2d as CV  # noqa: E402
from kernels import geglu as GG  # noqa: E402
from kernels import group_norm as GN  # noqa: E402
from kernels import sampling as SM  # noqa: E402
from kernels import vae_postprocess as VP  # noqa: E402


def unwrap(k):
    while not isinstance(k, triton.runtime.jit.JITFunction):
        k = k.fn
    return k

def compile_one(kernel, args, arch, num_warps=4, num_stages=2):
    fn = unwrap(kernel)
    sig, consts, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        v = args[name]
        p = fn.params[i]
        if p.is_constexpr:
            sig[name] = "constexpr"
            consts[name] = v
        elif isinstance(v, str):  # pointer dtype
            sig[name] = "*" + v
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = "fp32"
        elif isinstance(v, bool):
            sig[name] = "i1"
        else:
            sig[name] = "i32" if -2**31 <= v < 2**31 else "i64"  # as the launcher specialises it
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})

def cases():
    # attention: (dtype, D, block_d, chunks, BM, BN, even_n, warps, stages)
    for dt, D, bd, ch, bm, bn, even, nw, ns in [
        ("fp16", 64, 64, 1, 128, 64, True, 8, 3),
        ("fp16", 40, 64, 1, 64, 32, False, 4, 2),
        ("bf16", 512, 256, 2, 64, 32, False, 8, 2),
        ("fp32", 160, 128, 2, 32, 32, False, 4, 1),
    ]:
        prec = "tf32x3" if dt == "fp32" else "tf32"
        common = dict(HEAD_DIM=D, BLOCK_D=bd, D_CHUNKS=ch, BLOCK_M=bm, BLOCK_N=bn, DOT_PRECISION=prec,
                      Nq=4096, Nk=77)
        tag = f"{dt}_D{D}_{bm}x{bn}_{'even' if even else 'odd'}"
        yield f"attn_fwd_{tag}", A._attn_fwd_kernel, dict(common, Q=dt, K=dt, V=dt, O=dt, LSE="fp32",
              scale=0.1, qk_scale=0.14, EVEN_N=even), nw, ns
        yield f"attn_dkdv_{tag}", A._attn_bwd_dkdv_kernel, dict(common, Q=dt, K=dt, V=dt, DO=dt, LSE="fp32",
              DELTA="fp32", DK=dt, DV=dt, scale=0.1), nw, ns
        yield f"attn_dq_{tag}", A._attn_bwd_dq_kernel, dict(common, Q=dt, K=dt, V=dt, DO=dt, LSE="fp32",
              DELTA="fp32", DQ=dt, scale=0.1, EVEN_N=even), nw, ns
        yield f"attn_delta_{tag}", A._attn_bwd_delta_kernel, dict(O=dt, DO=dt, DELTA="fp32", Nq=4096,
              HEAD_DIM=D, BLOCK_D=bd, D_CHUNKS=ch, BLOCK_M=64), 4, 1
    # group norm
    for dt, cl, bg, bs, bc, silu, res in [
        ("fp16", False, 1, 4096, 1, True, True),
        ("fp32", True, 1, 64, 64, False, False),
        ("bf16", False, 4, 16, 64, True, False),
    ]:
        tag = f"{dt}_{'cl' if cl else 'nchw'}_g{bg}s{bs}c{bc}_{'silu' if silu else 'id'}"
        sizes = dict(C=320, S=4096, C_PER_G=10, G=32, NG=64, P=32, TILES_PER_CHUNK=4, n_chunks_s=8,
                     n_cblocks=1, n_gblocks=32, N=2)
        yield f"gn_stats_{tag}", GN._gn_fwd_stats_kernel, dict(sizes, X=dt, PART="fp32", BLOCK_G=bg,
              BLOCK_S=bs, BLOCK_C=bc, CHANNELS_LAST=cl), 4, 2
        yield f"gn_fapply_{tag}", GN._gn_fwd_apply_kernel, dict(sizes, X=dt, R=dt, Y=dt, W="fp32", B="fp32",
              PART="fp32", MEAN="fp32", RSTD="fp32", eps=1e-5, TILE=4096, BLOCK_G=bg, BLOCK_S=bs,
              BLOCK_C=bc, BLOCK_P=32, CHANNELS_LAST=cl, SILU=silu, HAS_RES=res), 4, 2
        yield f"gn_bpart_{tag}", GN._gn_bwd_partial_kernel, dict(sizes, X=dt, DY=dt, W="fp32", B="fp32",
              MEAN="fp32", RSTD="fp32", PART="fp32", BLOCK_G=bg, BLOCK_S=bs, BLOCK_C=bc,
              CHANNELS_LAST=cl, SILU=silu), 4, 2
        yield f"gn_bapply_{tag}", GN._gn_bwd_apply_kernel, dict(sizes, X=dt, DY=dt, DX=dt, W="fp32", B="fp32",
              MEAN="fp32", RSTD="fp32", COEF="fp32", inv_group_size=1e-4, TILE=4096, BLOCK_G=bg,
              BLOCK_S=bs, BLOCK_C=bc, CHANNELS_LAST=cl, SILU=silu), 4, 2
    # geglu
    for dt in ("fp16", "fp32"):
        for approx in (False, True):
            tag = f"{dt}_{'tanh' if approx else 'erf'}"
            yield f"geglu_fwd_{tag}", GG._geglu_fwd_kernel, dict(X=dt, OUT=dt, M=4096, H=1280, BLOCK_M=16,
                  BLOCK_H=256, APPROX_TANH=approx), 4, 2
            yield f"geglu_bwd_{tag}", GG._geglu_bwd_kernel, dict(DOUT=dt, X=dt, DX=dt, M=4096, H=1280,
                  BLOCK_M=16, BLOCK_H=256, APPROX_TANH=approx), 4, 2
    # bias_act: (dtype, bias, act, clamp, inner == 1, order): StyleGAN's fp16 lrelu + clamp layer (NCHW and
    # channels-last), bf16 gelu with the order-2 gradient, fp32 without a bias (tanh: the expm1 polynomial)
    for dt, bias, act, clamp, inner1, order in [
        ("fp16", True, 2, True, False, 1),
        ("fp16", True, 2, True, True, 2),
        ("bf16", True, 6, False, False, 2),
        ("fp32", False, 3, False, True, 1),
        ("fp32", True, 9, True, False, 2),
    ]:
        tag = f"{dt}_act{act}{'_b' if bias else ''}{'_c' if clamp else ''}{'_cl' if inner1 else ''}"
        flags = dict(ACT=act, HAS_BIAS=bias, INNER1=inner1, HAS_CLAMP=clamp, IDX64=False, ROUND_BF16=False,
                     BLOCK=2048)
        sizes = dict(numel=2 * 512 * 64 * 64, C=512, inner=1 if inner1 else 64 * 64, alpha=0.2, gain=1.41,
                     clamp=256.0)
        yield f"biasact_fwd_{tag}", BA._bias_act_fwd_kernel, dict(sizes, X=dt, B="fp32", Y=dt, **flags), 4, 2
        yield f"biasact_grad_{tag}_o{order}", BA._bias_act_grad_kernel, dict(sizes, DY=dt, X=dt, B="fp32", DX=dt,
              ORDER=order, **flags), 4, 2
    yield "biasact_fwd_fp16_act5_idx64", BA._bias_act_fwd_kernel, dict(
        X="fp16", B="fp32", Y="fp16", numel=2**31 + 7, C=3, inner=2**28, alpha=0.0, gain=1.41, clamp=-1.0,
        ACT=5, HAS_BIAS=True, INNER1=False, HAS_CLAMP=False, IDX64=True, ROUND_BF16=False, BLOCK=4096), 8, 2
    # sampling step: every optional input on, and the bare update
    for dt in ("fp32", "fp16", "bf16"):
        for on in (True, False):
            flags = dict(CFG=on, CLIP=on, X0=on, HAS_E1=on, HAS_E2=on, HAS_NOISE=on, ROUND_BF16=False)
            yield f"sampling_{dt}_{'all' if on else 'bare'}", SM._sampling_step_kernel, dict(
                x_ptr=dt, mo_ptr=dt, c_ptr="fp32", e1_ptr=dt, e2_ptr=dt, nz_ptr=dt, out_ptr=dt, x0_ptr=dt,
                S=16384, cond_off=32768, coeff_stride=7, blocks_per_sample=16, g=7.5, clip=1.0, BLOCK=1024,
                **flags), 4, 2
    # vae_postprocess: float and uint8 linear walks, the NCHW -> NHWC uint8 transpose, the backward
    for dt in ("fp32", "fp16", "bf16"):
        yield f"vae_fwd_{dt}_float", VP._vae_postprocess_fwd_kernel, dict(X=dt, OUT=dt, total=3 * 1024 * 1024,
              BLOCK=1024, TO_UINT8=False, ROUND_BF16=False), 4, 2
        yield f"vae_fwd_{dt}_uint8", VP._vae_postprocess_fwd_kernel, dict(X=dt, OUT="u8", total=3 * 1024 * 1024,
              BLOCK=1024, TO_UINT8=True, ROUND_BF16=False), 4, 2
        yield f"vae_nhwc_{dt}", VP._vae_postprocess_nhwc_kernel, dict(X=dt, OUT="u8", C=3, P=1024 * 1024,
              blocks_per_image=4096, BLOCK_P=256, BLOCK_C=4), 4, 2
        yield f"vae_bwd_{dt}", VP._vae_postprocess_bwd_kernel, dict(X=dt, DY=dt, DX=dt, total=3 * 1024 * 1024,
              BLOCK=1024), 4, 2
    # conv2d: 3x3 stride 1 channels-last with every epilogue input, the VAE's stride-2 downsampler, a 1x1
    for dt, cl, r, stride, bias, res, ieee in [
        ("fp16", True, 3, 1, True, True, False),
        ("bf16", False, 3, 2, True, False, False),
        ("fp32", True, 1, 1, False, True, True),
    ]:
        tag = f"{dt}_{'cl' if cl else 'nchw'}_{r}x{r}s{stride}"
        ho = 64 // stride
        yield f"conv_{tag}", CV._conv2d_fwd_kernel, dict(
            X=dt, W=dt, B="fp32", RES=dt, OUT=dt, M=2 * ho * ho, C=320, H=64, W_IN=64, K=320, HO=ho, WO=ho,
            pad_t=r // 2, pad_l=r // 2, output_scale=0.7, R=r, S=r, STRIDE_H=stride, STRIDE_W=stride,
            CHANNELS_LAST=cl, HAS_BIAS=bias, HAS_RES=res, IEEE_FP32=ieee, BLOCK_M=128, BLOCK_N=128,
            BLOCK_K=64 if dt != "fp32" else 32), 8, 3


def main() -> int:
    archs = [int(a) for a in sys.argv[1:]] or [90]
    failures = 0
    for arch in archs:
        for name, kernel, args, num_warps, num_stages in cases():
            t = time.time()
            try:
                compiled = compile_one(kernel, args, arch, num_warps, num_stages)
            except Exception as exc:  # report every kernel, not just the first failure
                failures += 1
                print(f"FAIL sm{arch} {name}: {type(exc).__name__}: {str(exc)[:2000]}", flush=True)
                continue
            print(f"ok   sm{arch} {name}: {len(compiled.asm['cubin'])} B cubin, "
                  f"{compiled.metadata.shared} B smem ({time.time() - t:.1f}s)", flush=True)
    print(f"failures: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
