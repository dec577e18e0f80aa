"""The built site works offline where a reader needs it, and says what the build could not do.

A scratch book built with the sphinx settings of book.yml (`conftest.scratch_site`) serves
MathJax from its own _static folder (no script or stylesheet from another host), renders a
results table printed as Markdown as an HTML table, not as "| a | b |" text, and marks a notebook
whose execution failed (a notice on its page, and a line under the execution-times table).
(The course's own pages are built by `make book`; this checks the settings in seconds.)"""

from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.slow


def test_mathjax_is_served_from_the_site(scratch_site):
    for page in ("intro.html", "table.html"):
        html = (scratch_site / page).read_text()
        sources = re.findall(r'<script[^>]*src="([^"]+)"', html) + re.findall(r'<link[^>]*href="([^"]+)"', html)
        remote = [source for source in sources if source.startswith(("http:", "https:", "//"))]
        assert not remote, f"{page} loads {remote} from the network"
        mathjax = [source for source in sources if "mathjax" in source.lower()]
        assert mathjax, f"{page} loads no MathJax"
        for source in mathjax:
            assert (scratch_site / source.split("?")[0]).is_file(), f"{page}: {source} is not in the built site"


def test_markdown_results_tables_render_as_tables(scratch_site):
    html = (scratch_site / "table.html").read_text()
    assert re.search(r"<th[^>]*>\s*(<p>)?method", html), "the Markdown table output was not rendered as a table"


def test_a_notebook_the_build_could_not_execute_says_so(scratch_site):
    assert "Not executed in this build" in (scratch_site / "broken.html").read_text()
    assert "Not executed in this build" not in (scratch_site / "table.html").read_text()
    times = (scratch_site / "times.html").read_text()
    assert "Left out of the table, not executed in this build" in times and "<code>broken</code>" in times


def test_widget_views_the_static_site_keeps():
    """A control gets a note on where to use it; a progress bar, and a widget the saved state does
    not hold (closed before the notebook ended, as tqdm's leave=False bars are), are left out."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "_ext"))
    import course_site

    def view(model: str) -> str:
        return f'<script type="application/vnd.jupyter.widget-view+json">{{"model_id": "{model}"}}</script>'

    state = {"bar": {"model_name": "HBoxModel", "state": {"children": ["IPY_MODEL_progress"]}},
             "progress": {"model_name": "FloatProgressModel", "state": {}},
             "slider": {"model_name": "IntSliderModel", "state": {}}}  # fmt: skip
    assert course_site._shown_widget(view("slider"), state) == view("slider") + course_site.WIDGET_NOTE
    assert course_site._shown_widget(view("bar"), state) == ""
    assert course_site._shown_widget(view("closed"), state) == ""
    # no saved state at all (a notebook saved without it): every view is kept, with the note
    assert course_site._shown_widget(view("closed"), None) == view("closed") + course_site.WIDGET_NOTE
