"""scripts/execute_book.py: a timed-out notebook is retried once (resuming from the run cache),
a failing cell is not, and each notebook's longest cell is measured against its timeout."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import nbformat
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def execute_book():
    spec = importlib.util.spec_from_file_location("execute_book", REPO_ROOT / "scripts" / "execute_book.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _notebook(*sources: str, timeout: int | None = None) -> nbformat.NotebookNode:
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source) for source in sources])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    if timeout is not None:
        notebook.metadata["execution"] = {"timeout": timeout}
    return notebook


def test_longest_cell_and_stated_timeout(execute_book):
    notebook = _notebook("a = 1", "b = 2", "c = 3", timeout=120)
    notebook.cells[0].metadata["execution"] = {"iopub.execute_input": "2026-12-06T10:00:00.000Z",
                                               "shell.execute_reply": "2026-12-06T10:00:02.500Z"}  # fmt: skip
    notebook.cells[1].metadata["execution"] = {"iopub.execute_input": "2026-12-06T10:00:03Z",
                                               "shell.execute_reply": "2026-12-06T10:01:03Z"}  # fmt: skip
    assert execute_book.longest_cell_seconds(notebook) == pytest.approx(60.0)
    assert execute_book.slowest_cells(notebook) == [{"cell": 1, "seconds": 60.0}, {"cell": 0, "seconds": 2.5}]
    assert execute_book.longest_cell_seconds(_notebook("x = 1")) == 0.0   # never executed: no record
    assert execute_book.cell_timeout(notebook, 1800) == 120
    assert execute_book.cell_timeout(_notebook("x = 1"), 1800) == 1800


class _Result:
    def __init__(self, time, err=None, exc_string=None):
        self.time, self.err, self.exc_string = time, err, exc_string


def test_a_timeout_is_retried_once_and_a_raising_cell_is_not(execute_book, tmp_path, monkeypatch):
    from jupyter_cache.executors import utils

    path = tmp_path / "nb.ipynb"
    nbformat.write(_notebook("x = 1"), path)
    outcomes = [_Result(30.0, TimeoutError(), "nbclient.exceptions.CellTimeoutError: cell timed out"), _Result(10.0)]
    monkeypatch.setattr(utils, "single_nb_execution", lambda *a, **k: outcomes.pop(0))
    _, _, seconds, error, attempts, _ = execute_book.execute(str(path), 60)
    assert (seconds, error, attempts) == (40.0, None, 2)  # both tries count in the notebook's time

    outcomes = [_Result(5.0, ValueError(), "ValueError: an assertion of the notebook"), _Result(1.0)]
    _, _, seconds, error, attempts, _ = execute_book.execute(str(path), 60)
    assert attempts == 1 and "ValueError" in error and len(outcomes) == 1  # a real error is not retried

    outcomes = [_Result(60.0, TimeoutError(), "CellTimeoutError"), _Result(60.0, TimeoutError(), "CellTimeoutError")]
    _, _, seconds, error, attempts, _ = execute_book.execute(str(path), 60)
    assert attempts == 2 and "CellTimeoutError" in error and seconds == 120.0


def test_a_real_cell_timeout_is_recognised(execute_book, tmp_path):
    """nbclient's own exception, through jupyter-cache, is the one the retry looks for."""
    path = tmp_path / "slow.ipynb"
    nbformat.write(_notebook("import time\ntime.sleep(30)", timeout=3), path)
    _, _, seconds, error, attempts, _ = execute_book.execute(str(path), 1800, attempts=1)
    assert attempts == 1 and error is not None and "CellTimeoutError" in error
    assert seconds < 30


def test_the_stored_notebook_matches_its_source_in_jupyter_cache(execute_book, tmp_path):
    """Timing records must not reach the cache: jupyter-cache hashes cell metadata, and a stored
    notebook that hashes differently from its source is executed again by the book build."""
    from jupyter_cache import get_cache

    source = _notebook("a = 1", "b = a + 1")
    executed = nbformat.from_dict(source)
    for cell in executed.cells:
        cell.metadata["execution"] = {"iopub.execute_input": "2026-12-06T10:00:00Z",
                                      "shell.execute_reply": "2026-12-06T10:00:01Z"}  # fmt: skip
    cache = get_cache(str(tmp_path / "cache"))
    _, source_hash = cache.create_hashed_notebook(source)
    _, timed_hash = cache.create_hashed_notebook(executed)
    assert timed_hash != source_hash  # why strip_timing exists
    _, stored_hash = cache.create_hashed_notebook(execute_book.strip_timing(executed))
    assert stored_hash == source_hash


def test_cpu_seconds_count_the_kernel_and_its_worker_processes(execute_book, tmp_path):
    """The CPU time of a notebook includes what its own worker processes burn (notebook 16 trains
    in a process pool): a notebook that spins two processes for about 1 s each reports >= 1.5 s."""
    path = tmp_path / "busy.ipynb"
    spin = "def spin(_):\n    import time\n    end = time.process_time() + 1.0\n    while time.process_time() < end:\n        pass\n"
    pool = ("from concurrent.futures import ProcessPoolExecutor\nimport multiprocessing\n"
            "with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context('fork')) as pool:\n"
            "    list(pool.map(spin, range(2)))")
    nbformat.write(_notebook(spin, pool), path)
    _, _, _, error, _, cpu_seconds = execute_book.execute(str(path), 120, attempts=1)
    assert error is None, error
    assert cpu_seconds >= 1.5
