"""nbval's runs feed the site check (scripts/nbval_cache.py): a notebook whose cells all pass is
stored in a jupyter-cache with the outputs nbval collected, under the key a book build looks it up
by; a notebook with a failing cell is not stored, and its earlier record is removed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow

KERNEL = {"name": "python3", "display_name": "Python 3", "language": "python"}


def _notebook(path: Path, *sources: str) -> nbformat.NotebookNode:
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# A page")]
                                        + [nbformat.v4.new_code_cell(source) for source in sources])  # fmt: skip
    notebook.metadata["kernelspec"] = KERNEL
    nbformat.write(notebook, path)
    return notebook


def _run_nbval(folder: Path, cache: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pytest", "--nbval-lax", str(folder), "-q", "-p", "no:cacheprovider",
               "-p", "scripts.nbval_cache", "--nbval-cache", str(cache)]  # fmt: skip
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert "INTERNALERROR" not in result.stdout + result.stderr, result.stdout[-3000:]
    return result


def test_passing_notebooks_are_stored_with_their_outputs_failing_ones_are_not(tmp_path):
    from jupyter_cache import get_cache

    folder, cache_path = tmp_path / "notebooks", tmp_path / "cache"
    folder.mkdir()
    good = _notebook(folder / "good.ipynb", "print('hello')", "import matplotlib.pyplot as plt\nplt.plot([1, 2]); plt.show()", "6 * 7",
                     "import ipywidgets\nipywidgets.IntSlider(value=3)")
    bad = _notebook(folder / "bad.ipynb", "x = 1", "raise ValueError('a failing cell')")

    result = _run_nbval(folder, cache_path)
    assert result.returncode == 1, result.stdout[-2000:]  # the bad notebook fails nbval
    assert "nbval-cache: 1 of 2 notebooks stored" in result.stdout

    cache = get_cache(str(cache_path))
    record = cache.match_cache_notebook(good)  # the source notebook finds its execution: the book build would
    stored = cache.get_cache_bundle(record.pk).nb
    code = [cell for cell in stored.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code] == [1, 2, 3, 4]
    assert code[0].outputs[0].output_type == "stream" and code[0].outputs[0].text == "hello\n"
    assert any("image/png" in output.get("data", {}) for output in code[1].outputs)
    assert code[2].outputs[0].data["text/plain"] == "42"
    assert cache.get_cache_bundle(record.pk).record.data["execution_seconds"] > 0
    # the slider's state, read from the kernel at the end, where nbclient would have saved it
    view = code[3].outputs[0].data["application/vnd.jupyter.widget-view+json"]
    state = stored.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    assert state[view["model_id"]]["model_name"] == "IntSliderModel" and state[view["model_id"]]["state"]["value"] == 3
    with pytest.raises(KeyError):
        cache.match_cache_notebook(bad)

    # the same code failing later (here: a file it refuses appears) takes its stored execution away
    flaky = _notebook(folder / "bad.ipynb", "import os\nassert not os.path.exists('STOP'), 'STOP is there'")
    assert _run_nbval(folder, cache_path).returncode == 0
    cache.match_cache_notebook(flaky)
    (folder / "STOP").touch()
    assert _run_nbval(folder, cache_path).returncode == 1
    with pytest.raises(KeyError):
        cache.match_cache_notebook(flaky)
    cache.match_cache_notebook(good)  # still there
