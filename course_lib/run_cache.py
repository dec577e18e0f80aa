"""A disk cache of finished training runs, so that a long notebook resumes instead of restarting.

Notebook 16 trains dozens of (setting, seed, variant) runs in one cell. If the kernel dies, a
cell times out or the learner presses Ctrl-C, every finished run would be lost; with this cache
each run's result row is written to disk the moment the run ends, under a key made of everything
that decides it, and the next execution reads it back instead of training again:

    cache = RunCache("point_peft")                                 # .cache/runs/point_peft/
    key = {"run": run.to_dict(), "data": file_version(shapes_path("pb_t50_rs")),
           "checkpoint": file_version(default_checkpoint_path()),
           "code": code_version(course_lib.point_peft, course_lib.train)}
    row = cache.run(key, lambda: run_setting(run))                 # trains once, then reads back

- The key is a JSON-able dict; its SHA-256 (over canonical JSON) names the entry. A changed
  config, seed, data file, checkpoint or source file gives another key, so only the runs it
  touches are trained again. `code_version` hashes the code of the modules named, so an edit
  to them invalidates their runs (and only theirs); comments and docstrings do not count.
- An entry is written through a temporary file and a rename: an interrupted run leaves no entry
  and a reader never sees half a file. An entry that cannot be read, or whose stored key is not
  the key asked for, counts as missing (and is replaced by the fresh run).
- Values are JSON (result rows: numbers, strings, lists, dicts): what a notebook tabulates.
- A run whose trained model later cells use (a widget, a timing, a model sparsified after
  training) goes through `run_with_model`: beside the row it stores the model's trained state
  (every parameter with requires_grad and every buffer) as safetensors, and a re-execution
  rebuilds the untrained model and loads that state into it. The tensors are written first and
  the row names their SHA-256, so a row never points at missing or other tensors.
- `COURSE_FRESH_RUNS=1` (or `RunCache(..., enabled=False)`) ignores the entries and trains
  every run again, writing the new results over the old ones.

The cache lives in `config.CACHE_DIR` (`.cache/` of the clone): deleting it is always safe.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import os
import tempfile
import textwrap
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from course_lib import config

__all__ = [
    "RunCache",
    "code_fingerprint",
    "code_version",
    "content_version",
    "file_version",
    "fresh_runs_requested",
    "function_version",
    "run_key_digest",
    "trained_state",
]

T = TypeVar("T")
FORMAT_VERSION = 1
STATE_SUFFIX = ".state.safetensors"  # the trained state of a `run_with_model` entry, beside its JSON
_FILE_VERSIONS: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256, per process


def trained_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What training changed in `model`: every parameter with requires_grad and every buffer
    (BatchNorm statistics, quantised codes), by state_dict name, as contiguous CPU copies."""
    keep = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    keep |= {name for name, _ in model.named_buffers()}
    return {name: tensor.detach().cpu().clone().contiguous()
            for name, tensor in model.state_dict(keep_vars=True).items() if name in keep}


def fresh_runs_requested() -> bool:
    """True when the environment variable COURSE_FRESH_RUNS is 1/true/yes/on (read each call)."""
    return os.environ.get("COURSE_FRESH_RUNS", "0").strip().lower() in {"1", "true", "yes", "on"}


def run_key_digest(key: dict[str, Any]) -> str:
    """SHA-256 (hex) of `key` as canonical JSON (sorted keys, no spaces): the entry's name."""
    if not isinstance(key, dict):
        raise TypeError(f"a run key must be a dict of what decides the run, got {type(key).__name__}")
    try:
        text = json.dumps(key, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as error:
        raise TypeError(f"a run key must be plain JSON (str, numbers, lists, dicts, no NaN): {error}") from None
    return hashlib.sha256(text.encode()).hexdigest()


def file_version(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (a data set, a checkpoint), computed once per process per version."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: its version cannot enter a run key (run `make data`?)")
    stat = path.stat()
    memo = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if memo not in _FILE_VERSIONS:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _FILE_VERSIONS[memo] = digest.hexdigest()
    return _FILE_VERSIONS[memo]


def content_version(*values: Any) -> str:
    """SHA-256 of plain-JSON values (a generated data set's texts and labels, ...), in order."""
    if not values:
        raise ValueError("pass the values whose content decides the result, e.g. content_version(texts, labels)")
    try:
        text = json.dumps(list(values), sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as error:
        raise TypeError(f"content_version takes plain JSON values (lists of str/int/float, dicts): {error}") from None
    return hashlib.sha256(text.encode()).hexdigest()


def function_version(function: Callable[..., Any]) -> str:
    """SHA-256 of a function's code: a notebook's own training function enters the key this way,
    so editing it invalidates its runs (works for functions defined in notebook cells too).
    Comments, docstrings and layout do not count (`code_fingerprint`)."""
    try:
        source = inspect.getsource(function)
    except (TypeError, OSError) as error:
        raise TypeError(f"function_version needs a Python function whose source can be read: {error}") from None
    return hashlib.sha256(code_fingerprint(textwrap.dedent(source)).encode()).hexdigest()


def code_version(*modules: types.ModuleType) -> str:
    """SHA-256 over the code of `modules` (a package counts with every .py file under it), plus the
    torch version: what changes when the code that produces a result changes. Comments, docstrings
    and layout do not count (`code_fingerprint`): rewording a docstring keeps the runs."""
    if not modules:
        raise ValueError("name the modules whose code decides the result, e.g. code_version(course_lib.train)")
    files: set[Path] = set()
    for module in modules:
        if not isinstance(module, types.ModuleType) or getattr(module, "__file__", None) is None:
            raise TypeError(f"code_version takes imported modules with source files, got {module!r}")
        source = Path(module.__file__)
        files.update(source.parent.rglob("*.py") if source.name == "__init__.py" else [source])
    digest = hashlib.sha256(f"torch {torch.__version__}\n".encode())
    for file in sorted(files):
        digest.update(f"{file.name}\n".encode())
        digest.update(code_fingerprint(file.read_text(encoding="utf-8", errors="replace")).encode())
    return digest.hexdigest()


def code_fingerprint(source: str) -> str:
    """What of Python source decides what it computes: its syntax tree (`ast.dump`) without
    docstrings; comments and layout are not in the tree. Source that does not parse (a fragment
    such as a lambda inside a call) is taken as it is."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return source
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body:
            first = body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


class RunCache:
    """Finished runs of one experiment, one JSON file per run key (see the module doc).

    Derived in notebooks/part2_point_peft/16_point_peft_results.ipynb (where a cell that times
    out or a kernel that dies keeps every finished run).
    """

    def __init__(self, name: str, *, root: str | os.PathLike | None = None, enabled: bool | None = None) -> None:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"a run cache name is one plain folder name (e.g. 'point_peft'), got {name!r}")
        base = Path(root) if root is not None else config.CACHE_DIR / "runs"
        self.folder = base / ("fast" if config.is_fast() else "full") / name
        self.enabled = (not fresh_runs_requested()) if enabled is None else enabled
        self.hits = 0  # runs read back since this object was made
        self.misses = 0  # runs computed

    def path(self, key: dict[str, Any]) -> Path:
        """Where the run of `key` is (or would be) stored."""
        return self.folder / f"{run_key_digest(key)}.json"

    def get(self, key: dict[str, Any]) -> Any | None:
        """The stored value of `key`, or None (not stored, unreadable, another key, or disabled)."""
        if not self.enabled:
            return None
        path = self.path(key)
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError):
            return None  # missing, or not ours to trust: the run is computed again
        if not isinstance(entry, dict) or entry.get("format_version") != FORMAT_VERSION or entry.get("key") != key:
            return None
        return entry["value"]

    def put(self, key: dict[str, Any], value: Any, *, state_sha256: str | None = None) -> Path:
        """Store `value` (JSON) for `key` atomically; returns the entry's path. `state_sha256`
        names the trained-state file the entry goes with (`run_with_model`)."""
        path = self.path(key)
        entry = {"format_version": FORMAT_VERSION, "key": key, "value": value}
        if state_sha256 is not None:
            entry["state_sha256"] = state_sha256
        try:
            text = json.dumps(entry, allow_nan=True)
        except TypeError as error:
            raise TypeError(f"a cached run's value must be JSON (numbers, strings, lists, dicts): {error}") from None
        self._write_atomically(path, lambda handle: handle.write(text.encode()))
        return path

    def _write_atomically(self, path: Path, write: Callable[[Any], Any]) -> None:
        # a temporary file in the same folder, then a rename: readers see the old file or the whole new one
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        except OSError as error:
            raise OSError(
                f"cannot write the run cache in {path.parent} ({error.strerror}): make it writable, point "
                "COURSE_CACHE_DIR at a writable folder, or pass RunCache(..., enabled=False)"
            ) from error
        try:
            with os.fdopen(fd, "wb") as handle:
                write(handle)
            os.replace(tmp_name, path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise

    def run(self, key: dict[str, Any], compute: Callable[[], T]) -> T:
        """The stored value of `key` if there is one, else `compute()`, stored once it returns."""
        value = self.get(key)
        if value is not None:
            self.hits += 1
            return value
        value = compute()
        self.misses += 1
        self.put(key, value)
        return value

    def state_path(self, key: dict[str, Any]) -> Path:
        """Where the trained state of `key`'s run (`run_with_model`) is (or would be) stored."""
        return self.folder / f"{run_key_digest(key)}{STATE_SUFFIX}"

    def run_with_model(
        self,
        key: dict[str, Any],
        compute: Callable[[], tuple[T, torch.nn.Module]],
        rebuild: Callable[[], torch.nn.Module],
    ) -> tuple[T, torch.nn.Module]:
        """`run` for a run whose trained model is used afterwards: `compute()` trains and returns
        (row, model); the row is stored as in `run` and the model's trained state beside it. When
        the run is stored, `rebuild()` must return the model as it was before training (same
        architecture, same parameters with requires_grad, e.g. the pre-trained copy with the PEFT
        method injected) and the stored state is loaded into it: (row, trained model) either way,
        the model in eval mode (where a run that ends with its evaluation leaves it).

        Derived in notebooks/part3_deft/22_deft_in_practice.ipynb (its runs feed a widget).
        """
        model = None
        value = self.get(key)
        if value is not None:
            model = self._load_state(key, rebuild)
        if model is not None:
            self.hits += 1
            return value, model.eval()
        value, model = compute()
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"run_with_model's compute() must return (row, model), got a {type(model).__name__} as the model")
        self.misses += 1
        from safetensors.torch import save

        data = save(trained_state(model))  # bytes; the digest goes into the row written after them
        self._write_atomically(self.state_path(key), lambda handle: handle.write(data))
        self.put(key, value, state_sha256=hashlib.sha256(data).hexdigest())
        return value, model.eval()

    def _load_state(self, key: dict[str, Any], rebuild: Callable[[], torch.nn.Module]) -> torch.nn.Module | None:
        # the stored state of `key` loaded into rebuild()'s model, or None when there is no whole, matching state
        try:
            entry = json.loads(self.path(key).read_text())
            data = self.state_path(key).read_bytes()
        except (OSError, ValueError):
            return None
        if entry.get("state_sha256") != hashlib.sha256(data).hexdigest():
            return None  # a state from another run or a torn write: train again
        from safetensors.torch import load

        state = load(data)
        model = rebuild()
        expected = trained_state(model)
        if set(state) != set(expected) or any(state[name].shape != expected[name].shape for name in state):
            raise ValueError(
                f"the stored trained state in {self.state_path(key)} does not fit the model rebuild() returns "
                f"(names or shapes differ: {sorted(set(state) ^ set(expected))[:5]}...): rebuild must make the "
                "model of the run before training; delete the entry or set COURSE_FRESH_RUNS=1 to train again"
            )
        model.load_state_dict(state, strict=False)
        return model

    def clear(self) -> int:
        """Delete every entry of this cache (rows and trained states); returns how many runs were deleted."""
        removed = 0
        for entry in self.folder.glob("*.json"):
            entry.unlink(missing_ok=True)
            removed += 1
        for state in self.folder.glob(f"*{STATE_SUFFIX}"):
            state.unlink(missing_ok=True)
        return removed

    def __repr__(self) -> str:
        return f"RunCache({self.folder}, enabled={self.enabled}, hits={self.hits}, misses={self.misses})"
