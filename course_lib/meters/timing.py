"""Wall-clock timing that survives a shared, noisy machine: medians, and contenders in alternation.

Timed tests are never used for performance claims; these helpers serve the benchmarks
(`benchmarks/`) and the notebooks that compare two ways of computing the same thing in one run.

Derived in notebooks/part1_foundations/03_measuring_finetuning.ipynb (why one thread and the
median) and used in notebooks/part3_deft/22_deft_in_practice.ipynb and 23_sparse_inference.ipynb.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

__all__ = ["median_seconds", "interleaved_median_seconds"]


def median_seconds(fn: Callable[[], Any], repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of `fn()` in seconds over `repeats` calls after `warmup` untimed calls.

    The median, not the mean: the machines are shared, and a few slow outliers should not move
    the figure. Compare two functions only with timings taken in the same run.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_median_seconds(fns: dict[str, Callable[[], Any]], repeats: int = 20, warmup: int = 3) -> dict[str, float]:
    """Median times of several functions measured in alternation (A, B, A, B, ...).

    Alternating spreads machine noise evenly over the contenders, which makes their ratio
    much steadier than timing one after the other.
    """
    if not fns:
        raise ValueError("fns is empty: pass {name: function} for at least one function")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}
