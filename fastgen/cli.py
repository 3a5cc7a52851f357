"""The ``fastgen`` command: ``fastgen info`` and ``fastgen bench``."""

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
    from .bench._runner import device_name, format_table

    if args.tune:
        return _cmd_tune_attention(args)
    suites = args.suites or list(SUITES)
    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        print(f"fastgen bench: unknown suite(s) {', '.join(unknown)}; available: {', '.join(SUITES)}", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("fastgen bench: --device cuda asked for, but torch sees no CUDA device", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    print(f"fastgen bench {' '.join(suites)} on {device_name(device)}" + (" (quick)" if args.quick else ""))
    rows = run_suites(suites, device, quick=args.quick, min_run_time=args.min_time)
    print(format_table(rows))
    if not args.no_save:
        path = save_results(rows, suites, device, Path(args.out))
        print(f"saved {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastgen", description="fast generative image models for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)

    p_info = sub.add_parser("info", help="versions, backends, extension build and device")
    p_info.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p_info.set_defaults(func=_cmd_info)

    p_bench = sub.add_parser("bench", help="benchmark fastgen against its baselines (ratios in one run)")
    p_bench.add_argument("suites", nargs="*", help="suites to run (default: all)")
    p_bench.add_argument("--quick", action="store_true", help="fewer cases and shorter timing, for a smoke run")
    p_bench.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    p_bench.add_argument("--min-time", type=float, default=None, help="seconds of timing per measurement")
    p_bench.add_argument("--out", default="benchmarks/results", help="folder for the JSON results")
    p_bench.add_argument("--no-save", action="store_true", help="print only, write no JSON")
    p_bench.add_argument("--tune", action="store_true",
                         help="with the attention suite: measure the C++ CPU attention kernel against SDPA on a grid "
                              "of shapes and write the choice file the automatic CPU backend choice reads "
                              "($FASTGEN_CACHE_DIR or ~/.cache/fastgen/attention_cpu_choice.json)")
    p_bench.add_argument("--tune-out", default=None, help="with --tune: write the choice file here instead")
    p_bench.add_argument("--tune-budget", type=float, default=None,
                         help="with --tune: seconds of measuring at most (default 900, 120 with --quick)")
    p_bench.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
