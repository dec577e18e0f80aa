"""Helpers shared by the benchmarks: robust timing and writing results/bench/<name>.json."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from course_lib.meters.timing import interleaved_median_seconds, median_seconds
from course_lib.results import results_path, write_json

__all__ = ["interleaved_median_seconds", "median_seconds", "seeds_arguments", "text_task_and_classifier", "torch_environment",
           "write_bench"]


def write_bench(name: str, payload: dict[str, Any]) -> Path:
    """Write results/bench/<name>.json (atomically) and print it; returns the path."""
    import json

    path = write_json(results_path(name, subdir="bench"), payload)
    print(json.dumps(payload, indent=2))
    print(f"wrote {path}")
    return path


def seeds_arguments(description: str) -> Any:
    """The command line of a seeds benchmark: --workers (>= 1, default 2) and --seeds (at least
    two, default 0 1 2: the point is the spread); a bad value stops with argparse's message."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    if len(args.seeds) < 2 or len(set(args.seeds)) != len(args.seeds):
        parser.error("give at least two different seeds: the point is the spread")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    return args


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


@functools.lru_cache(maxsize=1)
def text_task_and_classifier() -> tuple[Any, Any, Any]:
    """Notebooks 02's and 32's text task (1,280 / 300 / 500 sentences; 16 / 16 / 32 in fast mode),
    the tokenizer and the pre-trained classifier with its head initialised after `set_seed(SEED)`,
    as those notebooks make them; once per (worker) process, with one torch thread."""
    import warnings

    import torch
    from transformers.utils import logging

    from course_lib.config import SEED, fast_or_full
    from course_lib.text import load_classifier, load_tokenizer, make_sentiment_task
    from course_lib.train import set_seed

    logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(1)
    num_train, num_validation, num_test = fast_or_full((16, 16, 32), (1280, 300, 500))
    task = make_sentiment_task(num_train, num_validation, num_test, seed=SEED)
    set_seed(SEED)
    return task, load_tokenizer(), load_classifier(task.num_labels)
