"""The built site works offline where a reader needs it: a scratch book built with the sphinx
settings of book.yml serves MathJax from its own _static folder (no script or stylesheet from
another host) and renders a results table printed as Markdown as an HTML table, not as
"| a | b |" text. (The course's own pages are built by `make book`; this checks the settings on a
two-page book in seconds.)"""

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
