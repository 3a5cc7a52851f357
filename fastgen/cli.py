"""The ``fastgen`` command: ``info``, ``bench``, (``cli_train``) ``quickstart``, ``train``, ``sample``, ``evaluate``,
and (``cli_serve``) ``serve``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence


def _cmd_info(args) -> int:
    from .info import format_info, info

    data = info()
    print(json.dumps(data, indent=1) if args.json else format_info(data))
    return 0


def _cmd_tune_attention(args) -> int:
    from .bench._runner import device_name
    from .bench.attention import tune
    from .ops._attention_cpu_choice import cpu_isa

    import torch

    if args.suites != ["attention"] or args.device == "cuda":
        print("fastgen bench: --tune measures CPU attention only: run `fastgen bench attention --tune`",
              file=sys.stderr)
        return 2
    print(f"fastgen bench attention --tune on {device_name(torch.device('cpu'))} ({cpu_isa()})"
          + (" (quick)" if args.quick else ""))
    try:
        path, table = tune(quick=args.quick, path=args.tune_out, min_time=args.min_time, budget_s=args.tune_budget)
    except RuntimeError as exc:
        print(f"fastgen bench: {exc}", file=sys.stderr)
        return 1
    faster = sum(e["choice"] == "kernel" for e in table["entries"])
    print(f"the C++ kernel is faster in {faster} of {len(table['entries'])} measured cells")
    print(f"wrote {path}")
    return 0


def _cmd_bench(args) -> int:
    import torch

    from .bench import SUITES, run_suites, save_results
    from .bench._runner import DEFAULT_SUITES, RUN_SUITES, device_name, format_table, resolve_quick

    if args.tune:
        return _cmd_tune_attention(args)
    if args.gpu_check:
        from .bench import gpu_check

        return gpu_check.main((["--dry-run"] if args.dry_run else []) + ["--out", args.out])
    if args.dry_run:
        print("fastgen bench: --dry-run goes with --gpu-check", file=sys.stderr)
        return 2
    suites = args.suites or list(DEFAULT_SUITES)
    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        print(f"fastgen bench: unknown suite(s) {', '.join(unknown)}; available: {', '.join(SUITES)}", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("fastgen bench: --device cuda asked for, but torch sees no CUDA device", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # one value for the whole run, the same for every suite (e2e included): see resolve_quick
    quick = resolve_quick(named=bool(args.suites), quick=args.quick, full=args.full)
    if not quick:
        mode = " (full)"
    else:
        mode = " (quick)" if args.quick else " (quick: the reduced cases; --full for all of them)"
    print(f"fastgen bench {' '.join(suites)} on {device_name(device)}{mode}")
    try:
        e2e_options = _e2e_options(args)
    except ValueError as exc:
        print(f"fastgen bench: {exc}", file=sys.stderr)
        return 2
    others = [s for s in suites if s not in RUN_SUITES]
    rows = run_suites(others, device, quick=quick, min_run_time=args.min_time) if others else []
    e2e_rows, serve_rows = [], []
    if "e2e" in suites:
        from .bench import e2e

        try:
            e2e_rows = e2e.run(device, quick=quick, **e2e_options)
        except ValueError as exc:
            print(f"fastgen bench: {exc}", file=sys.stderr)
            return 2
    if "serve" in suites:
        from .bench import serve as bench_serve

        serve_rows = bench_serve.run(device, quick=quick)
    rows += e2e_rows + serve_rows
    # lists, dicts and worker logs stay in the JSON: the table has one line per row
    print(format_table([{k: v for k, v in r.items() if not isinstance(v, (list, dict)) and k != "log_tail"}
                        for r in rows]))
    if not args.no_save:
        path = save_results(rows, suites, device, Path(args.out), quick=quick)
        print(f"saved {path}")
        charts = [(e2e, e2e_rows, ".png")] if e2e_rows else []
        if serve_rows:
            charts.append((bench_serve, serve_rows, ".serve.png" if e2e_rows else ".png"))
        for module, suite_rows, suffix in charts:
            chart = module.save_chart(suite_rows, path.with_suffix(suffix), device=device_name(device))
            if chart is not None:
                print(f"saved {chart}")
    if serve_rows:
        for r in serve_rows:
            if "summary" in r:
                verdict = ("not judged: arrivals only %.2fx what one-by-one answers" % r["arrival_bound_ratio"]
                           if r["target_met"] is None else "met" if r["target_met"] else "NOT met")
                print(f"serve {r['summary']}: batched throughput {r['throughput_ratio']:.2f}x one-by-one, p95 "
                      f"{r['p95_batched_s']:.2f} s vs {r['p95_one_by_one_s']:.2f} s (target >= 2x, p95 no worse: "
                      f"{verdict})")
    return 1 if any("error" in r for r in e2e_rows) else 0


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise ValueError(f"expected comma-separated positive integers, got {text!r}")
    return values


def _e2e_options(args) -> dict:
    """The e2e suite's overrides from the command line (None: the suite's default for the device / --quick)."""
    return dict(
        batches=_int_list(args.e2e_batches) if args.e2e_batches else None,
        steps=args.e2e_steps,
        size=args.e2e_size,
        variants=[v.strip() for v in args.e2e_variants.split(",") if v.strip()] if args.e2e_variants else None,
        rounds=args.e2e_rounds,
        threads=args.e2e_threads,
        timeout_s=args.e2e_timeout,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastgen", description="fast generative image models for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)

    p_info = sub.add_parser("info", help="versions, backends, extension build and device")
    p_info.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p_info.set_defaults(func=_cmd_info)

    p_bench = sub.add_parser("bench", help="benchmark fastgen against its baselines (ratios in one run)")
    p_bench.add_argument("suites", nargs="*",
                         help="suites to run (default: all but train, e2e and serve, which run only when named: each "
                              "takes many minutes at full size on a 2-core CPU). With no suite named the run "
                              "uses every suite's reduced cases (minutes); named suites run their full cases")
    size = p_bench.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="reduced cases and shorter timing for every suite, named or not (the default when no "
                           "suite is named; e2e: the tiny pipeline)")
    size.add_argument("--full", action="store_true",
                      help="full cases for every suite, named or not (the default for named suites): plain "
                           "`fastgen bench --full` takes about an hour on a 2-core CPU")
    p_bench.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    p_bench.add_argument("--min-time", type=float, default=None, help="seconds of timing per measurement")
    p_bench.add_argument("--out", default="benchmarks/results", help="folder for the JSON results")
    p_bench.add_argument("--no-save", action="store_true", help="print only, write no JSON")
    p_bench.add_argument("--tune", action="store_true",
                         help="with the attention suite: measure the C++ CPU attention kernel against SDPA on a grid "
                              "of shapes and write the choice file the automatic CPU backend choice reads "
                              "($FASTGEN_CACHE_DIR or ~/.cache/fastgen/attention_cpu_choice.json)")
    p_bench.add_argument("--gpu-check", action="store_true",
                         help="the GPU validation run of benchmarks/gpu_check.sh: build with CUDA, the gpu tests and "
                              "the cuda/triton halves of the op tests, then the benchmarks in order of value, in 8 "
                              "minutes on an H100/H200; a JSON + markdown report in --out")
    p_bench.add_argument("--dry-run", action="store_true",
                         help="with --gpu-check: the same steps with CPU stand-ins (checks the script on a CPU)")
    p_bench.add_argument("--tune-out", default=None, help="with --tune: write the choice file here instead")
    p_bench.add_argument("--tune-budget", type=float, default=None,
                         help="with --tune: seconds of measuring at most (default 900, 120 with --quick)")
    e2e = p_bench.add_argument_group(
        "e2e suite", "SD1.5-architecture pipeline with random weights, DPM-Solver++ with CFG 7.5: diffusers eager, "
                     "+ fastgen.patch, + torch.compile(unet), each in its own process. Default 256x256 (512x512 "
                     "fp16 on CUDA), 20 steps, batches 1,4 (also with --full); --quick: a tiny pipeline, 32x32, "
                     "3 steps, batches 1,2, eager and patched, 1 thread. A PNG chart is saved beside the JSON")
    e2e.add_argument("--e2e-batches", default=None, metavar="B[,B...]", help="batch sizes, e.g. 1,4")
    e2e.add_argument("--e2e-steps", type=int, default=None, help="denoising steps")
    e2e.add_argument("--e2e-size", type=int, default=None, help="image height and width (multiple of 8)")
    e2e.add_argument("--e2e-variants", default=None, metavar="V[,V...]",
                     help="some of eager,patched,compiled (eager is the reference of the pixel differences)")
    e2e.add_argument("--e2e-rounds", type=int, default=1, help="steady-state calls after the first (best of)")
    e2e.add_argument("--e2e-threads", type=int, default=None,
                     help="torch threads per worker (default: torch's, 1 with --quick; 1 is steadier on a shared "
                          "machine)")
    e2e.add_argument("--e2e-timeout", type=float, default=None,
                     help="seconds per worker process (default 3600, 600 with --quick)")
    p_bench.set_defaults(func=_cmd_bench)

    from .cli_serve import add_command as add_serve
    from .cli_train import add_commands

    add_commands(sub)
    add_serve(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
