"""Does `make book` hold up on a busy machine, and resume after a kill? (issue 13)

One experiment, as a new user would meet it, on a fresh clone of this repository's HEAD:

1. a second CPU-heavy process spins on one core for the whole experiment (`--no-busy` skips it);
2. `make book` starts; once notebook 16 has stored `--kill-after-runs` finished training runs in
   its run cache, the whole build is killed (the process group, as a closed terminal would);
3. `make book` starts again and must finish: the notebooks executed before the kill come from
   Jupyter Book's cache, notebook 16 reads its finished runs back from the run cache.

Writes results/bench/book_robustness.json: the time to the kill, the resumed build's time and
exit status, how many runs were stored at the kill and whether any of them was trained again
(their files must be untouched), and the resumed build's per-notebook times with the longest
cell against its timeout (from the clone's results/book_execution.json).

    python -m benchmarks.book_robustness [--kill-after-runs 8] [--no-busy] [--workdir DIR]

It takes as long as two book builds (an hour or more on 2 cores), so `make bench` skips it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import write_bench

REPO_ROOT = Path(__file__).resolve().parent.parent
RUN_CACHE = Path(".cache") / "runs" / "full" / "point_peft"


def start(command: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    """Start `command` in its own process group (so that the whole build can be killed)."""
    handle = open(log, "ab")
    return subprocess.Popen(command, cwd=cwd, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)


def kill_group(process: subprocess.Popen) -> None:
    """SIGTERM to the whole process group, then SIGKILL to whatever is left of it after 20 s.

    Waiting for the group, not only for `make`: on 2026-12-06 two of execute_book's pool workers
    outlived a SIGTERM that ended make within the wait, orphaned and asleep (they died at a second
    SIGTERM)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                os.killpg(process.pid, 0)  # is any member left?
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            continue
        break
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5)


def stored_runs(clone: Path) -> dict[str, int]:
    """{entry name: mtime_ns} of notebook 16's run cache in the clone."""
    folder = clone / RUN_CACHE
    return {path.name: path.stat().st_mtime_ns for path in folder.glob("*.json")} if folder.exists() else {}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kill-after-runs", type=int, default=8, help="notebook 16 runs stored before the kill")
    parser.add_argument("--no-busy", action="store_true", help="no second CPU-heavy process")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/course_book_robustness"))
    parser.add_argument("--timeout-minutes", type=float, default=150.0, help="give up on a build after this long")
    args = parser.parse_args(argv)
    if args.kill_after_runs < 1:
        parser.error("--kill-after-runs must be at least 1")

    clone = args.workdir / "clone"
    if args.workdir.exists():
        shutil.rmtree(args.workdir)
    args.workdir.mkdir(parents=True)
    subprocess.run(["git", "clone", "--quiet", str(REPO_ROOT), str(clone)], check=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True).stdout.strip()
    log = args.workdir / "make_book.log"
    busy = None
    if not args.no_busy:
        spin = [sys.executable, "-c", "while True: pass"]
        busy = subprocess.Popen((["taskset", "-c", "0"] if shutil.which("taskset") else []) + spin,
                                start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 60 * args.timeout_minutes
    result: dict = {"commit": commit, "busy_second_process": busy is not None, "cpus": os.cpu_count(),
                    "kill_after_runs": args.kill_after_runs}  # fmt: skip
    try:
        # --- first build, killed in the middle of notebook 16 -----------------------------------
        begin = time.perf_counter()
        build = start(["make", "book"], clone, log)
        while build.poll() is None and len(stored_runs(clone)) < args.kill_after_runs:
            if time.monotonic() > deadline:
                raise TimeoutError("the first build did not reach the kill point in time")
            time.sleep(2)
        if build.poll() is not None:
            raise RuntimeError(f"make book ended (status {build.returncode}) before the kill point; see {log}")
        kill_group(build)
        at_kill = stored_runs(clone)
        result.update(seconds_to_kill=round(time.perf_counter() - begin, 1), runs_stored_at_kill=len(at_kill))
        print(f"killed make book after {result['seconds_to_kill']:.0f} s with {len(at_kill)} runs of notebook 16 stored",
              flush=True)  # fmt: skip

        # --- second build: must finish, resuming --------------------------------------------------
        begin = time.perf_counter()
        build = start(["make", "book"], clone, log)
        while build.poll() is None:
            if time.monotonic() > deadline:
                kill_group(build)
                raise TimeoutError("the resumed build did not finish in time")
            time.sleep(5)
        after = stored_runs(clone)
        retrained = sorted(name for name, mtime in at_kill.items() if after.get(name) != mtime)
        result.update(
            resumed_seconds=round(time.perf_counter() - begin, 1),
            resumed_exit_status=build.returncode,
            runs_stored_after=len(after),
            runs_trained_again=len(retrained),
        )
        execution = clone / "results" / "book_execution.json"
        if execution.exists():
            result["resumed_execution"] = json.loads(execution.read_text())
        result["total_seconds"] = round(result["seconds_to_kill"] + result["resumed_seconds"], 1)
    finally:
        if busy is not None:
            kill_group(busy)
    write_bench("book_robustness", result)
    if result.get("resumed_exit_status") != 0 or result.get("runs_trained_again"):
        sys.exit(1)


if __name__ == "__main__":
    main()
