"""The built site in a real browser: headless Chromium (Debian's, driven by Playwright) opens the
scratch book of `conftest.scratch_site` served on 127.0.0.1, as a teacher's readers open the
course's site, with `scripts/check_site.py`'s checks: MathJax typesets every formula (no raw TeX
left in the text), the results table is an HTML table, no JavaScript or console error, no request
leaves the local server (the course is offline), no file is missing, a figure's tick labels are
at least 9 px on screen, no path of the build machine and no blank gap in the outputs.

`make test` installs Chromium where it can (`scripts/setup_browser.sh`); without it these tests
are skipped with the command to run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "scripts"))
import check_site  # scripts/ is not a package: imported by path

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def browser_report(scratch_site):
    pytest.importorskip("playwright", reason="Playwright is in requirements.lock: run make setup")
    if check_site.find_chromium() is None:
        pytest.skip("no Chromium: run `sudo apt-get install -y chromium` (Debian/Ubuntu), then make test again")
    return check_site.check_pages(scratch_site, ["intro.html", "table.html", "search.html"])


def test_formulas_are_typeset_offline(browser_report):
    assert browser_report["intro.html"]["mathjax_rendered"] == 2  # inline and display
    assert browser_report["table.html"]["mathjax_rendered"] >= 1
    assert all(not row["raw_tex"] for row in browser_report.values())


def test_results_table_renders_as_a_table(browser_report):
    assert browser_report["table.html"]["tables"] >= 1


def test_no_script_error_no_outside_request_no_missing_file(browser_report):
    assert check_site.problems(browser_report) == []


def test_the_widest_figure_the_course_allows_is_legible(browser_report):
    """A 10-inch figure (tests/test_repo.py's limit is 10.5) in the book's own theme, at 1280 px."""
    (figure,) = browser_report["table.html"]["figures"]
    assert figure["dpi"] == 100 and 800 <= figure["natural_width"] <= 1000  # tight bounding box
    assert figure["display_width"] < figure["natural_width"]  # the page scales it down...
    assert check_site.MIN_TICK_LABEL_PX <= figure["tick_label_px"] < 13.9  # ...and its labels stay readable


def test_tick_label_size_from_the_png():
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, _ = plt.subplots(figsize=(15, 4))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    assert check_site.png_dpi(buffer.getvalue()) == pytest.approx(80, abs=0.1)
    assert check_site.png_dpi(b"GIF89a") is None
    # 10 pt at 80 dpi is 11.1 image pixels; shown at half size, 5.6 CSS px
    assert check_site.tick_label_px(600, 1200, 80) == pytest.approx(10 * 80 / 72 / 2)


def test_machine_paths_are_not_shown(scratch_site, browser_report):
    """The scratch notebook prints an absolute path under the book and a temporary file's path."""
    page = (scratch_site / "table.html").read_text()
    assert "wrote results/x.json" in page and "read (a temporary folder)/bank.pt" in page
    assert browser_report["table.html"]["machine_paths"] == []


def test_a_widget_cell_says_where_to_use_it(scratch_site, browser_report):
    page = (scratch_site / "table.html").read_text()
    assert page.count("application/vnd.jupyter.widget-view+json") == 1  # the slider; the progress bar is left out
    assert page.count("course-widget-offline") == 1 and "make lab" in page
    assert "course-widget-offline" not in (scratch_site / "intro.html").read_text()
    assert browser_report["table.html"]["widgets_without_figure"] == 0  # the figure comes two cells before it
    assert browser_report["table.html"]["title_matches"] and browser_report["table.html"]["error_outputs"] == []


def test_the_checks_can_fail(scratch_site, tmp_path):
    """A page with raw TeX, a script error, an outside request, a 15-inch figure squeezed to the
    page's width, a home folder's path, a 250-px empty output, a traceback, a widget without a
    figure before it and a title that is not its heading is reported on each."""
    if check_site.find_chromium() is None:
        pytest.skip("no Chromium: run `sudo apt-get install -y chromium` (Debian/Ubuntu), then make test again")
    pytest.importorskip("playwright")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, _ = plt.subplots(figsize=(15, 4))  # 1500 px at 100 dpi, shown 690 px wide as on the course's pages
    fig.savefig(tmp_path / "wide.png", format="png", dpi=100)
    plt.close(fig)
    (tmp_path / "bad.html").write_text(
        "<html><body><p>$$\\frac{a}{b}$$</p><script>const X = 1;</script><script>const X = 2;</script>"
        '<script src="https://cdn.example.org/lib.js"></script>'
        '<div class="cell_output"><img src="wide.png" style="width: 690px"></div>'
        '<div class="cell_output"><div class="output"><pre>wrote /home/alice/course/results/x.json</pre></div>'
        '<div class="output" style="height: 250px"></div></div>'
        '<div class="cell"><div class="cell_output"><div class="output error"><pre>Traceback (most recent call last): boom</pre>'
        '</div></div></div><div class="cell"><div class="admonition course-widget-offline">widget</div></div>'
        '<article><img src="missing-diagram.svg" alt="a diagram"><div class="cell_output"><img src="missing.png"></div>'
        '<div class="admonition warning course-not-executed">Not executed in this build</div></article>'
        "<h1>Results</h1><title>Something else</title></body></html>"
    )
    row = check_site.check_pages(tmp_path, ["bad.html"])["bad.html"]
    assert row["raw_tex"] and row["page_errors"] and row["outside_requests"]
    (small,) = row["small_figures"]
    assert small["tick_label_px"] == pytest.approx(10 * 100 / 72 * 690 / 1500, abs=0.1)  # 6.4 px
    assert any("small_figures" in line for line in check_site.problems({"bad.html": row}))
    assert row["machine_paths"] == ["/home/alice/course/results/x.json"] and row["blank_outputs"] == [250]
    assert row["error_outputs"] and row["widgets_without_figure"] == 1 and not row["title_matches"]
    assert row["diagrams"] == 1 and row["broken_images"] == ["missing-diagram.svg", "missing.png"] and row["not_executed"]
    assert {url.rsplit("/", 1)[-1] for url in row["missing"]} >= {"missing-diagram.svg", "missing.png"}


def test_every_figure_of_the_executed_notebook_is_expected_on_its_page(tmp_path):
    """`--expect-figures-from`: the images of a notebook's outputs in the jupyter-cache the site was
    built from, per page (a figure the site drops is then reported as `figures_not_shown`)."""
    import nbformat
    from jupyter_cache import get_cache

    png = {"image/png": "iVBORw0KGgo=", "text/plain": "<Figure>"}
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("plot()"), nbformat.v4.new_code_cell("two()")])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    (tmp_path / "part").mkdir()
    nbformat.write(notebook, tmp_path / "part" / "page.ipynb")
    executed = nbformat.from_dict(notebook)
    for number, cell in enumerate(executed.cells, start=1):
        cell.execution_count = number
        cell.outputs = [nbformat.v4.new_output("display_data", data=png)] * number  # 1 + 2 images
    cache = get_cache(str(tmp_path / "cache"))
    from jupyter_cache.base import CacheBundleIn

    cache.cache_notebook_bundle(CacheBundleIn(executed, str(tmp_path / "part" / "page.ipynb")), check_validity=False)
    pages = ["part/page.html", "part/not_a_notebook.html"]
    assert check_site.expected_figures(tmp_path / "cache", pages, root=tmp_path) == {"part/page.html": 3}
