"""Course-wide settings: the fast switch and where data, caches, checkpoints and results live.

`COURSE_FAST=1` (read here, nowhere else) shrinks data sets and epochs so that every notebook
runs in seconds under nbval; without it the notebooks produce the real results.

Paths default to folders of the repository when course_lib is used from a clone (the usual
case: `pip install -e .`), and to `~/.cache/course_lib` when it is installed elsewhere. Each can
be moved with an environment variable (`COURSE_DATA_DIR`, `COURSE_CACHE_DIR`,
`COURSE_RESULTS_DIR`, `COURSE_CHECKPOINT_DIR`).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "FAST",
    "is_fast",
    "fast_or_full",
    "REPO_ROOT",
    "DATA_DIR",
    "CACHE_DIR",
    "RESULTS_DIR",
    "CHECKPOINT_DIR",
    "SEED",
]

_TRUE = {"1", "true", "yes", "on"}


def is_fast() -> bool:
    """True when the environment variable COURSE_FAST is set to 1/true/yes/on (read each call)."""
    return os.environ.get("COURSE_FAST", "0").strip().lower() in _TRUE


def __getattr__(name: str):
    # `config.FAST` reads the environment when it is read, like `is_fast()`: one source of truth
    # (it used to be frozen at import time, so setting COURSE_FAST later changed fast_or_full but not FAST)
    if name == "FAST":
        return is_fast()
    raise AttributeError(f"module 'course_lib.config' has no attribute {name!r}")


def fast_or_full(fast_value, full_value):
    """Return `fast_value` under COURSE_FAST=1, else `full_value`.

    The one idiom every notebook uses for sizes: `num_epochs = fast_or_full(1, 5)`.
    """
    return fast_value if is_fast() else full_value


def _find_repo_root() -> Path | None:
    here = Path(__file__).resolve().parent.parent
    if (here / "pyproject.toml").exists() and (here / "course_lib").is_dir():
        return here
    return None


#: The repository root when course_lib runs from a clone, else None.
REPO_ROOT: Path | None = _find_repo_root()
_DEFAULT_BASE = REPO_ROOT if REPO_ROOT is not None else Path.home() / ".cache" / "course_lib"


def _path_from_env(variable: str, default: Path) -> Path:
    value = os.environ.get(variable)
    return Path(value).expanduser().resolve() if value else default


#: Generated and downloaded data sets (not committed).
DATA_DIR: Path = _path_from_env("COURSE_DATA_DIR", _DEFAULT_BASE / "data")
#: Caches that can be deleted at any time (not committed).
CACHE_DIR: Path = _path_from_env("COURSE_CACHE_DIR", _DEFAULT_BASE / ".cache")
#: Results JSON written by notebooks and benchmarks (`results/bench/<name>.json`).
RESULTS_DIR: Path = _path_from_env("COURSE_RESULTS_DIR", _DEFAULT_BASE / "results")
#: Small shipped checkpoints with their SHA256SUMS: package data (course_lib/checkpoints), so that
#: a pip-installed course_lib finds them as a clone does.
CHECKPOINT_DIR: Path = _path_from_env("COURSE_CHECKPOINT_DIR", Path(__file__).resolve().parent / "checkpoints")

#: The seed every notebook starts from.
SEED: int = 0
