"""Helpers shared by the benchmarks: robust timing and writing results/bench/<name>.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from course_lib.meters.timing import interleaved_median_seconds, median_seconds
from course_lib.results import results_path, write_json

__all__ = ["median_seconds", "interleaved_median_seconds", "write_bench"]


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
