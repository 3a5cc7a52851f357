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


def _cmd_bench(args) -> int:
    import torch

    from .bench import SUITES, run_suites, save_results
    from .bench._runner import device_name, format_table

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
    p_bench.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
