"""A pytest plugin: the notebooks nbval runs are also stored, with their outputs, in a jupyter-cache.

`make test` runs every notebook under nbval in fast mode, and then checks the whole site in a
browser (issue 17). Executing the notebooks a second time for the site would double the longest
part of `make test`, so this plugin keeps what nbval already has: the outputs of each code cell
(nbval collects them from the kernel to compare them) are put back into the notebook, and a
notebook whose every cell passed is stored in the jupyter-cache at `--nbval-cache`, under the key
Jupyter Book looks it up by (jupyter-cache's hash of the code cells). A book build pointed at that
cache (`scripts/build_fast_site.py`) then finds every notebook executed and only renders.

    python -m pytest --nbval-lax notebooks -p scripts.nbval_cache --nbval-cache _build/fast/.jupyter_cache

A notebook with a failing cell is not stored (its earlier record, if any, is removed), so a site
built from the cache never shows outputs of a run that did not pass.

nbval reads no widget messages, so the widgets' state (which nbclient saves in the notebook's
metadata for `make book`) is asked from the kernel after a notebook's last cell, with ipywidgets'
own `Widget.get_manager_state()`: the widgets still open then. A progress bar that closed itself
(tqdm's `leave=False`) is not in it; the site leaves such views out as it leaves out progress bars
(`_ext/course_site.py`). nbval also ignores `clear_output` and `update_display_data` messages, which
the course's notebooks do not send.
"""

from __future__ import annotations

import ast
import contextlib
import json
import queue
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import nbformat
import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--nbval-cache", default=None, metavar="PATH",
                     help="store each notebook that passes, with its outputs, in this jupyter-cache")  # fmt: skip


def pytest_configure(config: pytest.Config) -> None:
    path = config.getoption("--nbval-cache")
    if path:
        config.pluginmanager.register(NotebookRecorder(Path(path)), "nbval-cache-recorder")


class NotebookRecorder:
    """Collects each nbval cell's outputs, and stores each notebook that passed when the session ends."""

    def __init__(self, cache_path: Path) -> None:
        self.cache_path = cache_path
        # notebook path -> cell number -> (outputs, passed, seconds)
        self.cells: dict[Path, dict[int, tuple[list, bool, float]]] = defaultdict(dict)
        self.widget_states: dict[Path, dict] = {}  # notebook path -> ipywidgets' manager state at its end
        self.stored: list[Path] = []

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Any:
        start = time.perf_counter()
        outcome = yield
        if hasattr(item, "cell_num") and hasattr(item, "test_outputs"):  # an nbval cell (IPyNbCell)
            passed = outcome.excinfo is None
            path = Path(str(item.path))
            self.cells[path][item.cell_num] = (list(item.test_outputs or []), passed, time.perf_counter() - start)
            code_cells = sum(1 for cell in item.parent.nb.cells if cell.cell_type == "code")
            if passed and item.cell_num == code_cells - 1:  # the notebook's last cell: its kernel is still up
                state = widget_state(item.parent.kernel)
                if state:
                    self.widget_states[path] = state

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        from jupyter_cache import get_cache
        from jupyter_cache.base import CacheBundleIn

        if not self.cells:
            return
        cache = get_cache(str(self.cache_path))
        for path, cells in sorted(self.cells.items()):
            notebook = executed_notebook(path, cells)
            if notebook is not None and path in self.widget_states:  # where nbclient keeps it
                notebook.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": self.widget_states[path]}
            record = cache.add_nb_to_project(str(path))
            if notebook is None:  # a cell failed, or did not run: the build must not find an earlier run
                with contextlib.suppress(KeyError), warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # nbformat warns about cells without an id (tests/test_repo.py requires them in the course)
                    cache.remove_cache(cache.match_cache_notebook(nbformat.read(path, as_version=4)).pk)
                continue
            seconds = sum(seconds for _, _, seconds in cells.values())
            cache.cache_notebook_bundle(CacheBundleIn(notebook, record.uri, data={"execution_seconds": seconds}),
                                        check_validity=False, overwrite=True)  # fmt: skip
            self.stored.append(path)

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.cells:
            terminalreporter.write_line(f"nbval-cache: {len(self.stored)} of {len(self.cells)} notebooks stored "
                                        f"with their outputs in {self.cache_path}")  # fmt: skip


#: Evaluated in the kernel as a user expression (no cell, no output, nothing left in its namespace).
WIDGET_STATE_EXPRESSION = (
    "__import__('json').dumps(__import__('sys').modules['ipywidgets'].Widget.get_manager_state()"
    " if 'ipywidgets' in __import__('sys').modules else None)"
)


def widget_state(kernel: Any, timeout: float = 60.0) -> dict | None:
    """ipywidgets' state of the widgets open in nbval's kernel (`nbval.kernel.RunningKernel`), in
    the form nbclient saves (version_major, version_minor, state); None when the kernel has none."""
    msg_id = kernel.kc.execute("", silent=True, store_history=False, user_expressions={"state": WIDGET_STATE_EXPRESSION})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            reply = kernel.kc.get_shell_msg(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:  # no answer in time: the notebook is stored without widget state
            return None
        if reply["parent_header"].get("msg_id") != msg_id:
            continue
        result = reply["content"].get("user_expressions", {}).get("state", {})
        if result.get("status") != "ok":
            return None
        state = json.loads(ast.literal_eval(result["data"]["text/plain"]))  # the repr of a JSON string
        return state if state and state.get("state") else None
    return None


def executed_notebook(path: Path, cells: dict[int, tuple[list, bool, float]]) -> nbformat.NotebookNode | None:
    """The notebook at `path` with nbval's outputs in its code cells (numbered as nbval numbers
    them: code cells only, from 0), or None unless every code cell ran and passed."""
    notebook = nbformat.read(path, as_version=4)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    if len(cells) != len(code_cells) or not all(passed for _, passed, _ in cells.values()):
        return None
    for number, cell in enumerate(code_cells):
        outputs, _, _ = cells[number]
        cell.outputs = [nbformat.from_dict(output) for output in outputs]
        cell.execution_count = number + 1
        for output in cell.outputs:
            if output.output_type == "execute_result":
                output.execution_count = number + 1
    with warnings.catch_warnings():  # nbformat warns about cells without an id (tests/test_repo.py requires them in the course)
        warnings.simplefilter("ignore")
        nbformat.validate(notebook)
    return notebook
