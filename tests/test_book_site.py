"""The built site works offline where a reader needs it: a scratch book built with the sphinx
settings of book.yml serves MathJax from its own _static folder (no script or stylesheet from
another host) and renders a results table printed as Markdown as an HTML table, not as
"| a | b |" text. (The course's own pages are built by `make book`; this checks the settings on a
two-page book in seconds.)"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    jupyter_book = Path(sys.executable).parent / "jupyter-book"
    if not jupyter_book.exists():
        pytest.skip("jupyter-book is not installed in this environment")
    book = yaml.safe_load((REPO_ROOT / "book.yml").read_text())
    root = tmp_path_factory.mktemp("book")
    config = {"title": "scratch", "execute": {"execute_notebooks": "force"}, "parse": book["parse"],
              "sphinx": book["sphinx"]}  # fmt: skip
    (root / "_config.yml").write_text(yaml.safe_dump(config))
    (root / "_toc.yml").write_text("format: jb-book\nroot: intro\nchapters:\n- file: table\n")
    (root / "intro.md").write_text("# Intro\n\nInline $a^2 + b^2$ and display\n\n$$\\sum_i x_i$$\n")
    notebook = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("# Results\n\nA formula $W + \\frac{\\alpha}{r} B A$."),
        nbformat.v4.new_code_cell("from IPython.display import Markdown, display\n"
                                  "display(Markdown('| method | acc |\\n| --- | ---: |\\n| LoRA | 0.9 |'))"),
    ])  # fmt: skip
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, root / "table.ipynb")
    result = subprocess.run([str(jupyter_book), "build", str(root)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    yield root / "_build" / "html"
    shutil.rmtree(root, ignore_errors=True)


def test_mathjax_is_served_from_the_site(site):
    for page in ("intro.html", "table.html"):
        html = (site / page).read_text()
        sources = re.findall(r'<script[^>]*src="([^"]+)"', html) + re.findall(r'<link[^>]*href="([^"]+)"', html)
        remote = [source for source in sources if source.startswith(("http:", "https:", "//"))]
        assert not remote, f"{page} loads {remote} from the network"
        mathjax = [source for source in sources if "mathjax" in source.lower()]
        assert mathjax, f"{page} loads no MathJax"
        for source in mathjax:
            assert (site / source.split("?")[0]).is_file(), f"{page}: {source} is not in the built site"


def test_markdown_results_tables_render_as_tables(site):
    html = (site / "table.html").read_text()
    assert re.search(r"<th[^>]*>\s*(<p>)?method", html), "the Markdown table output was not rendered as a table"
