"""Fixtures shared by several test files."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def scratch_site(tmp_path_factory) -> Path:
    """A small book built with book.yml's parse and sphinx settings (the course's own extension
    included): a Markdown page with inline and display math, an executed notebook with a formula,
    a Markdown results table, printed machine paths, a 10-inch matplotlib figure, a tqdm progress bar and an ipywidgets slider, a notebook whose execution fails, and a
    page with the execution-times table. Returns its _build/html.
    The course's own pages are built by `make book`; this checks the settings in seconds."""
    jupyter_book = Path(sys.executable).parent / "jupyter-book"
    if not jupyter_book.exists():
        pytest.skip("jupyter-book is not installed in this environment")
    book = yaml.safe_load((REPO_ROOT / "book.yml").read_text())
    sphinx = dict(book["sphinx"])
    sphinx["local_extensions"] = {name: str(REPO_ROOT / path) for name, path in sphinx.get("local_extensions", {}).items()}
    root = tmp_path_factory.mktemp("book")
    config = {"title": "scratch", "execute": {"execute_notebooks": "force"}, "parse": book["parse"],
              "launch_buttons": book["launch_buttons"], "sphinx": sphinx}  # fmt: skip
    (root / "_config.yml").write_text(yaml.safe_dump(config))
    (root / "_toc.yml").write_text("format: jb-book\nroot: intro\nchapters:\n- file: table\n- file: broken\n- file: times\n")
    (root / "times.md").write_text("# Times\n\n```{nb-exec-table}\n```\n")
    (root / "intro.md").write_text("# Intro\n\nInline $a^2 + b^2$ and display\n\n$$\\sum_i x_i$$\n")
    notebook = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("# Results\n\nA formula $W + \\frac{\\alpha}{r} B A$."),
        nbformat.v4.new_code_cell("from IPython.display import Markdown, display\n"
                                  "display(Markdown('| method | acc |\\n| --- | ---: |\\n| LoRA | 0.9 |'))"),
        nbformat.v4.new_code_cell("import os, tempfile\nprint('wrote', os.path.abspath('results/x.json'))\n"
                                  "print('read', os.path.join(tempfile.mkdtemp(), 'bank.pt'))"),  # machine paths
        nbformat.v4.new_code_cell("import matplotlib.pyplot as plt\nfig, ax = plt.subplots(figsize=(10, 3))\n"
                                  "ax.plot([1, 2, 3], [3, 1, 2])\nplt.show()"),  # as wide as the course's figures may be
        nbformat.v4.new_code_cell("from tqdm.auto import tqdm\nfor _ in tqdm(range(3), disable=False):\n    pass"),  # a progress bar
        nbformat.v4.new_code_cell("import ipywidgets\nipywidgets.IntSlider(value=3, max=10)"),
    ])  # fmt: skip
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, root / "table.ipynb")
    broken = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("raise RuntimeError('this notebook fails')")])
    broken.metadata["kernelspec"] = notebook.metadata["kernelspec"]
    nbformat.write(broken, root / "broken.ipynb")  # a notebook the build cannot execute
    result = subprocess.run([str(jupyter_book), "build", str(root)], check=False, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    yield root / "_build" / "html"
    shutil.rmtree(root, ignore_errors=True)
