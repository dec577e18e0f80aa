"""Execute the book's notebooks in parallel into Jupyter Book's execution cache (`make book`).

Jupyter Book 1 (`execute_notebooks: cache`) runs every notebook that has no cached execution,
one after the other. Most notebooks here use one CPU thread, so on a 2-core machine half of the
machine would sit idle: this script runs the missing executions first, `--workers` at a time
(longest first, as far as earlier runs tell), and stores each executed notebook in the same
cache with the same key Jupyter Book uses (jupyter-cache's hash of the code cells), so the
build that follows finds every notebook executed and only renders. A notebook that is already
cached is skipped; one that fails is reported and left uncached (the book build then runs it
again and shows the error).

A cell timeout or a dead kernel is retried once (`--attempts`): the results notebooks store each
finished training run on disk (`course_lib.run_cache`), so the retry resumes instead of
starting over. Each notebook's time and its longest cell against the cell timeout are printed
and written to results/book_execution.json (a longest cell over half its timeout is flagged), with
each notebook's three slowest cells (where the book's time goes).

    python scripts/execute_book.py [--workers 2] [--timeout 1800]

Run it in full mode (COURSE_FAST unset), as `make book` does.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import nbformat
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
#: Full-mode minutes of the long notebooks on a 2-core CPU (README's course map, clean-clone build
#: of 2026-12-06 at d7b37dd), to start them first on a fresh machine; a cached earlier run takes precedence.
EXPECTED_MINUTES = {
    "notebooks/part2_point_peft/16_point_peft_results.ipynb": 20,
    "notebooks/part4_meft/32_meft.ipynb": 15,
    "notebooks/part3_deft/23_sparse_inference.ipynb": 9,
    "notebooks/part3_deft/22_deft_in_practice.ipynb": 9,
    "notebooks/part1_foundations/02_peft_zoo.ipynb": 7,
    "notebooks/part2_point_peft/13_point_baselines.ipynb": 6,
    "notebooks/part4_meft/30_where_memory_goes.ipynb": 1,
    "notebooks/part4_meft/33_reversible_point_transformer.ipynb": 1,
}
CACHE_PATH = REPO_ROOT / "_build" / ".jupyter_cache"  # where `jupyter-book build .` keeps it


def toc_notebooks(toc_path: Path) -> list[Path]:
    """The .ipynb files named in the table of contents, in its order."""
    toc = yaml.safe_load(toc_path.read_text())
    files = [toc["root"]]
    for part in toc.get("parts", []):
        files += [chapter["file"] for chapter in part.get("chapters", [])]
    return [REPO_ROOT / f"{name}.ipynb" for name in files if (REPO_ROOT / f"{name}.ipynb").exists()]


def cell_seconds(notebook: nbformat.NotebookNode) -> dict[int, float]:
    """{cell index: seconds} of an executed notebook's code cells, from nbclient's timing records."""
    from datetime import datetime

    seconds = {}
    for index, cell in enumerate(notebook.cells):
        timing = cell.get("metadata", {}).get("execution", {})
        start, end = timing.get("iopub.execute_input"), timing.get("shell.execute_reply")
        if start and end:
            seconds[index] = (datetime.fromisoformat(end.replace("Z", "+00:00"))
                              - datetime.fromisoformat(start.replace("Z", "+00:00"))).total_seconds()  # fmt: skip
    return seconds


def longest_cell_seconds(notebook: nbformat.NotebookNode) -> float:
    """The longest code cell of an executed notebook, from nbclient's timing records (0 if none)."""
    return max(cell_seconds(notebook).values(), default=0.0)


def slowest_cells(notebook: nbformat.NotebookNode, count: int = 3) -> list[dict[str, float]]:
    """The `count` longest code cells, longest first: [{"cell": index, "seconds": s}] (where the time goes)."""
    ranked = sorted(cell_seconds(notebook).items(), key=lambda item: item[1], reverse=True)[:count]
    return [{"cell": index, "seconds": round(seconds, 1)} for index, seconds in ranked]


def strip_timing(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Remove nbclient's per-cell timing records (metadata "execution"), in place.

    jupyter-cache hashes every cell's metadata: a notebook stored with them would not match the
    source notebook, and the book build would execute it all over again."""
    for cell in notebook.cells:
        cell.get("metadata", {}).pop("execution", None)
    return notebook


def cell_timeout(notebook: nbformat.NotebookNode, default: int) -> int:
    """The per-cell timeout a notebook states (metadata execution.timeout), else `default`."""
    return int(notebook.metadata.get("execution", {}).get("timeout", default))


def children_cpu_seconds() -> float:
    """User + system CPU seconds of this process's finished (reaped) children and their own
    reaped children: a notebook's kernel and the worker processes it started."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def execute(path: str, timeout: int, attempts: int = 2) -> tuple[str, nbformat.NotebookNode, float, str | None, int, float]:
    """Run one notebook in its own folder, as Jupyter Book does: (path, notebook, seconds, error,
    attempts used, CPU seconds of its kernel and the kernel's workers). A cell timeout or a dead
    kernel is retried (`attempts` in all): the results notebooks store every finished training
    run (`course_lib.run_cache`), so the retry resumes where the first try stopped instead of
    starting over. A cell that raises is not retried."""
    from jupyter_cache.executors.utils import single_nb_execution

    seconds, cpu_before = 0.0, children_cpu_seconds()
    for attempt in range(1, attempts + 1):
        notebook = nbformat.read(path, as_version=4)
        result = single_nb_execution(notebook, cwd=str(Path(path).parent), timeout=timeout, allow_errors=False,
                                     meta_override=True, record_timing=True)  # fmt: skip
        seconds += result.time
        error = result.exc_string if result.err is not None else None
        retry = error is not None and any(kind in error for kind in ("CellTimeoutError", "DeadKernelError"))
        if not retry or attempt == attempts:
            return path, notebook, seconds, error, attempt, children_cpu_seconds() - cpu_before
        print(f"  {Path(path).name}: {type(result.err).__name__} after {result.time:.0f} s, retrying "
              f"(finished runs are read back from the run cache)", flush=True)  # fmt: skip
    raise AssertionError("unreachable")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="notebooks run at once")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell (book.yml's execute.timeout)")
    parser.add_argument("--attempts", type=int, default=2, help="tries per notebook when a cell times out")
    parser.add_argument("--dry-run", action="store_true", help="list the notebooks that would run, run none")
    args = parser.parse_args()
    if args.attempts < 1:
        parser.error(f"--attempts must be at least 1, got {args.attempts}")
    if os.environ.get("COURSE_FAST"):
        print("execute_book: COURSE_FAST is set; the book shows full-mode results, run it without", file=sys.stderr)
        return 2

    from jupyter_cache import get_cache
    from jupyter_cache.base import CacheBundleIn

    cache = get_cache(str(CACHE_PATH))
    previous = {record.uri: record.data.get("execution_seconds") or 0.0 for record in cache.list_cache_records()}
    missing = []
    for path in toc_notebooks(REPO_ROOT / "toc.yml"):
        try:
            cache.match_cache_notebook(nbformat.read(path, as_version=4))
        except KeyError:
            missing.append(str(path))
    if not missing:
        print("execute_book: every notebook is already executed in the cache")
        return 0
    # longest first: by an earlier run of the same file, else by EXPECTED_MINUTES (else short)
    def expected_seconds(path: str) -> float:
        if path in previous:
            return previous[path]
        return 60.0 * EXPECTED_MINUTES.get(str(Path(path).relative_to(REPO_ROOT)), 0.5)

    missing.sort(key=expected_seconds, reverse=True)
    if args.dry_run:
        print("\n".join(f"would run {Path(p).relative_to(REPO_ROOT)} (last run: {previous.get(p, 'never')} s)" for p in missing))
        return 0
    print(f"execute_book: running {len(missing)} notebook(s), {args.workers} at a time", flush=True)
    start, failures, report = time.perf_counter(), [], {}
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        futures = [pool.submit(execute, path, args.timeout, args.attempts) for path in missing]
        for future in as_completed(futures):
            path, notebook, seconds, error, attempts, cpu_seconds = future.result()
            name = Path(path).relative_to(REPO_ROOT)
            timeout = cell_timeout(notebook, args.timeout)
            longest, slowest = longest_cell_seconds(notebook), slowest_cells(notebook)
            strip_timing(notebook)  # what is cached must hash like the source notebook
            report[str(name)] = {"seconds": round(seconds, 1), "cpu_seconds": round(cpu_seconds, 1), "longest_cell_seconds": round(longest, 1),
                                 "cell_timeout_seconds": timeout, "longest_cell_over_timeout": round(longest / timeout, 3),
                                 "slowest_cells": slowest, "attempts": attempts, "failed": error is not None}  # fmt: skip
            if error is not None:
                failures.append(name)
                print(f"  FAILED {name} after {seconds:.0f} s ({attempts} attempt(s)):\n{error}", flush=True)
                continue
            record = cache.add_nb_to_project(path)
            cache.cache_notebook_bundle(CacheBundleIn(notebook, record.uri, data={"execution_seconds": seconds}),
                                        check_validity=False, overwrite=True)  # fmt: skip
            budget = "" if longest <= 0.5 * timeout else "  <- over half the cell timeout"
            print(f"  {name}: {seconds:.0f} s ({cpu_seconds:.0f} CPU s), longest cell {longest:.0f} s of its {timeout} s timeout "
                  f"({longest / timeout:.2f}){'' if attempts == 1 else f', {attempts} attempts'} "
                  f"(elapsed {time.perf_counter() - start:.0f} s){budget}", flush=True)  # fmt: skip
    total = time.perf_counter() - start
    cpu_total = sum(row["cpu_seconds"] for row in report.values())
    print(f"execute_book: done in {total:.0f} s, {len(failures)} failed; {cpu_total:.0f} CPU s in all "
          f"({cpu_total / max(total, 1e-9):.2f} CPUs busy on average)", flush=True)
    write_report(report, total, args.workers)
    return 1 if failures else 0


def write_report(report: dict, total_seconds: float, workers: int) -> None:
    """results/book_execution.json: each notebook's time, longest cell against its timeout, tries."""
    sys.path.insert(0, str(REPO_ROOT))
    from course_lib.results import results_path, write_json

    write_json(results_path("book_execution"), {
        "total_seconds": round(total_seconds, 1), "workers": workers, "cpus": os.cpu_count(),
        "total_cpu_seconds": round(sum(row["cpu_seconds"] for row in report.values()), 1),
        "max_longest_cell_over_timeout": max((row["longest_cell_over_timeout"] for row in report.values()), default=0.0),
        "notebooks": dict(sorted(report.items())),
    })  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
