"""Writing results JSON files atomically (used by notebooks, `course_lib.train` and benchmarks)."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from course_lib import config

__all__ = ["read_json", "results_path", "update_json", "write_json"]


def results_path(name: str, subdir: str | None = None) -> Path:
    """Path of `results/[subdir/]<name>.json` under `config.RESULTS_DIR`.

    Without `subdir`, results of a fast run (COURSE_FAST=1) go to `results/fast/`, so that the
    seconds-long runs of `make test` never overwrite the real results of `make book`.
    """
    if subdir is not None:
        base = config.RESULTS_DIR / subdir
    elif config.is_fast():
        base = config.RESULTS_DIR / "fast"
    else:
        base = config.RESULTS_DIR
    return base / f"{name}.json"


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write `data` as indented JSON to `path` via a temporary file and a rename.

    The rename is atomic, so a reader never sees a half-written file and an interrupted run
    leaves the previous result in place. Returns the path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2, sort_keys=False, default=_to_jsonable)
            handle.write("\n")
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def write_folder(directory: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Write a folder whole or not at all: `write(staging)` fills a temporary sibling folder, which
    then replaces `directory` (an older folder there is renamed away first and removed after).

    An exception in `write` removes the staging folder and leaves `directory` as it was; a crash
    leaves at most a hidden `.<name>.*` sibling that no reader looks at. Returns `directory`.
    Used by `course_lib.peft.save_adapter` and `course_lib.meft.save_meft`.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        write(staging)
        if directory.exists():
            retired = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            directory.rename(retired)
            staging.rename(directory)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file written by `write_json`."""
    with open(path) as handle:
        return json.load(handle)


def update_json(path: str | os.PathLike, updates: dict[str, Any]) -> Path:
    """Replace the top-level keys `updates` names in the JSON object at `path`, keeping the others.

    For a results file that several notebooks fill in part (notebooks 22 and 23 both write
    `results/deft.json`), possibly at the same time: the read-modify-write runs under an
    exclusive lock on `<path>.lock`, and the write itself is `write_json`'s atomic rename.
    A missing file starts empty; a file that is not a JSON object raises ValueError.
    """
    if not isinstance(updates, dict):
        raise TypeError(f"updates must be a dict of top-level keys, got {type(updates).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f"{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        data: Any = read_json(path) if path.exists() else {}
        if not isinstance(data, dict):
            raise ValueError(f"{path} holds a JSON {type(data).__name__}, not an object: move it away and run again")
        data.update(updates)
        return write_json(path, data)


def _to_jsonable(value: Any) -> Any:
    # numpy / torch scalars and arrays -> plain Python numbers and lists
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
