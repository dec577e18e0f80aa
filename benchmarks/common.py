"""Helpers shared by the benchmarks: robust timing and writing results/bench/<name>.json."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Callable

from course_lib.results import results_path, write_json

__all__ = ["median_seconds", "interleaved_median_seconds", "write_bench"]


def median_seconds(fn: Callable[[], Any], repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of `fn()` in seconds over `repeats` calls after `warmup` untimed calls.

    The median, not the mean: the machines are shared, and a few slow outliers should not move
    the figure. Compare two functions only with timings taken in the same run.
    """
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


def write_bench(name: str, payload: dict[str, Any]) -> Path:
    """Write results/bench/<name>.json (atomically) and print it; returns the path."""
    import json

    path = write_json(results_path(name, subdir="bench"), payload)
    print(json.dumps(payload, indent=2))
    print(f"wrote {path}")
    return path


def torch_environment() -> dict[str, Any]:
    """Where a CPU timing was taken: torch's threads and version, the machine. Spread into a payload."""
    import platform

    import torch

    return {
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "machine": platform.machine(),
        "device": "cpu",
    }
