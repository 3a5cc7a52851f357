"""Benchmark suites shared by ``fastgen bench`` and ``benchmarks/bench_*.py``.

Each suite module defines ``cases(device, quick)`` returning :class:`Case`
objects; a case times fastgen against a baseline in the same run, so results
are ratios that do not depend on how loaded the machine is overall.
"""

from ._runner import SUITES, Case, run_suites, save_results

__all__ = ["SUITES", "Case", "run_suites", "save_results"]
