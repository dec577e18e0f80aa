"""A Sphinx extension for the course's site: what an offline book must not load.

Jupyter Book 1 always loads sphinx-thebe, and sphinx-thebe adds its configuration script
(`const THEBE_JS_URL = ...`) once per environment read, so a page ends up declaring the same
constant twice and the browser stops that script with "Identifier 'THEBE_JS_URL' has already
been declared". Thebe runs code on a Binder server, which an offline course does not have
(`launch_buttons: thebe: false` in book.yml), so this extension takes sphinx-thebe's scripts off
every page, and any other script a page lists twice. It also gives the theme its light/dark
`default_mode` ("auto": follow the reader's system), which pydata-sphinx-theme reads from the
page context; left empty, every page logged "Got invalid theme mode" as a console error.

Checked in a real browser by `scripts/check_site.py` and `tests/test_browser_site.py`.
"""

from __future__ import annotations

from typing import Any


def _offline_page(app: Any, pagename: str, templatename: str, context: dict, doctree: Any) -> None:
    if not context.get("default_mode"):
        context["default_mode"] = "auto"
    scripts = context.get("script_files")
    if not scripts:
        return
    kept, seen = [], set()
    for script in scripts:
        filename = str(getattr(script, "filename", script) or "")
        attributes = getattr(script, "attributes", {}) or {}
        body = attributes.get("body", "")
        if "THEBE_JS_URL" in body or filename.endswith("sphinx-thebe.js"):
            continue  # Thebe is off: it needs a Binder server, the offline course has none
        key = (filename, body)
        if key in seen:
            continue
        seen.add(key)
        kept.append(script)
    scripts[:] = kept


def setup(app: Any) -> dict[str, Any]:
    app.connect("html-page-context", _offline_page, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
