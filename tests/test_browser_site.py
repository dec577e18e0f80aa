"""The built site in a real browser: headless Chromium (Debian's, driven by Playwright) opens the
scratch book of `conftest.scratch_site` served on 127.0.0.1, as a teacher's readers open the
course's site, with `scripts/check_site.py`'s checks: MathJax typesets every formula (no raw TeX
left in the text), the results table is an HTML table, no JavaScript or console error, no request
leaves the local server (the course is offline), no file is missing.

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


def test_a_widget_cell_says_where_to_use_it(scratch_site):
    page = (scratch_site / "table.html").read_text()
    assert page.count("application/vnd.jupyter.widget-view+json") == 1  # the scratch notebook's slider
    assert page.count("course-widget-offline") == 1 and "make lab" in page
    assert "course-widget-offline" not in (scratch_site / "intro.html").read_text()


def test_the_checks_can_fail(scratch_site, tmp_path):
    """A page with raw TeX, a script error and an outside request is reported on all three."""
    if check_site.find_chromium() is None:
        pytest.skip("no Chromium: run `sudo apt-get install -y chromium` (Debian/Ubuntu), then make test again")
    pytest.importorskip("playwright")
    (tmp_path / "bad.html").write_text(
        "<html><body><p>$$\\frac{a}{b}$$</p><script>const X = 1;</script><script>const X = 2;</script>"
        '<script src="https://cdn.example.org/lib.js"></script></body></html>'
    )
    row = check_site.check_pages(tmp_path, ["bad.html"])["bad.html"]
    assert row["raw_tex"] and row["page_errors"] and row["outside_requests"]
