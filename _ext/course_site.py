"""A Sphinx extension for the course's site: what an offline book must not load.

Jupyter Book 1 always loads sphinx-thebe, and sphinx-thebe adds its configuration script
(`const THEBE_JS_URL = ...`) once per environment read, so a page ends up declaring the same
constant twice and the browser stops that script with "Identifier 'THEBE_JS_URL' has already
been declared". Thebe runs code on a Binder server, which an offline course does not have
(`launch_buttons: thebe: false` in book.yml), so this extension takes sphinx-thebe's scripts off
every page, and any other script a page lists twice. It also gives the theme its light/dark
`default_mode` ("auto": follow the reader's system), which pydata-sphinx-theme reads from the
page context; left empty, every page logged "Got invalid theme mode" as a console error.

A notebook that the build could not execute (it failed, or timed out) used to appear as code
without outputs and without a word, and the execution-times table left it out silently: such a
page now opens with a notice that says so and what to do, and the page that shows the table
lists the notebooks it leaves out.

A widget cell (ipywidgets) needs a running kernel to draw anything: on the static site its output
is an empty placeholder (the widget scripts come from a CDN, which the offline site does not
load, and the figure is drawn by Python). The placeholder gets a note saying so and where to use
the widget; the static figure each of the course's widget notebooks draws before its widget
stays as it is. Progress bars (tqdm's widgets, e.g. while transformers loads weights) are left
out of the page: they are not something to interact with; so are widgets that the saved state
does not hold (closed before the notebook ended, as a tqdm bar with `leave=False` is when the
notebook's state is read at its end, `scripts/nbval_cache.py`).

Notebooks print where they wrote their results (`wrote /home/you/course/results/meft.json`): useful
in JupyterLab, but on the site every reader would see the build machine's folders. Pages show
paths under the book's root relative to it (`results/meft.json`), a temporary folder as
`(a temporary folder)/...` and the home folder as `~`.

Checked in a real browser by `scripts/check_site.py` and `tests/test_browser_site.py`.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

NOT_EXECUTED = (
    '<div class="admonition warning course-not-executed"><p class="admonition-title">Not executed in this build</p>'
    "<p>The build of this site could not execute this notebook ({reason}), so its code is shown without "
    "outputs. Open it in JupyterLab (<code>make lab</code>) and run it there, or rebuild the site with "
    "<code>make book</code>, which prints the error.</p></div>"
)


WIDGET_VIEW = re.compile(r'<script type="application/vnd\.jupyter\.widget-view\+json">.*?</script>', re.DOTALL)
WIDGET_NOTE = (
    '<div class="admonition note course-widget-offline"><p class="admonition-title">Interactive widget</p>'
    "<p>This widget needs a running Python kernel, so the static site cannot show it. Open the notebook "
    "in JupyterLab (<code>make lab</code>) to move its controls; the figure drawn before it shows its "
    "first view.</p></div>"
)


def _without_machine_paths(app: Any, html: str) -> str:
    """The book root made relative, temporary folders and the home folder named, in a page's HTML."""
    root = str(Path(app.srcdir).resolve())
    html = html.replace(root + "/", "").replace(root, ".")
    temporary = re.escape(str(Path(tempfile.gettempdir()).resolve()))
    html = re.sub(temporary + r"/[\w.-]+", "(a temporary folder)", html)
    home = str(Path.home())
    if len(home) > 1:  # not "/"
        html = html.replace(home + "/", "~/")
    return html


def _view_model(view: str) -> str | None:
    """The model id a widget-view script refers to."""
    found = re.search(r'"model_id":\s*"([^"]+)"', view)
    return found.group(1) if found else None


def _saved_widget_state(script_files: list) -> dict | None:
    """The widget models' state saved with the page's notebook (model id -> entry), from the
    script myst-nb puts in the page; None when the notebook saved none."""
    for script in script_files:
        attributes = getattr(script, "attributes", {}) or {}
        if attributes.get("type") != "application/vnd.jupyter.widget-state+json":
            continue
        try:
            return dict(json.loads(attributes.get("body", ""))["state"])
        except (ValueError, KeyError, TypeError):
            return None
    return None


def _progress_bar_models(state: dict) -> set[str]:
    """Ids of the widget models that are progress bars (tqdm's: an HBox around a FloatProgress)."""
    progress = {"FloatProgressModel", "IntProgressModel"}
    bars = {model for model, entry in state.items() if entry.get("model_name") in progress}
    for model, entry in state.items():
        children = entry.get("state", {}).get("children", [])
        if any(str(child).removeprefix("IPY_MODEL_") in bars for child in children):
            bars.add(model)
    return bars


def _shown_widget(view: str, state: dict | None) -> str:
    """What the page shows for a widget view: nothing for a progress bar, nor for a widget the
    saved state does not hold (closed before the notebook ended, e.g. a tqdm bar with
    leave=False: JupyterLab shows nothing there either); else the view and a note on using it."""
    if state is not None:
        model = _view_model(view)
        if model not in state or model in _progress_bar_models(state):
            return ""
    return view + WIDGET_NOTE


def _execution(app: Any, docname: str) -> dict | None:
    """myst-nb's execution record of a notebook page: None when it was not executed at all."""
    data = getattr(app.env, "nb_metadata", {}).get(docname, {}).get("exec_data")
    return dict(data) if data else None


def _notebook_pages(app: Any) -> list[str]:
    return sorted(name for name in app.env.found_docs if str(app.env.doc2path(name)).endswith(".ipynb"))


def _not_executed(app: Any) -> dict[str, str]:
    """Notebook pages the build did not execute successfully, with the reason."""
    missing = {}
    for docname in _notebook_pages(app):
        record = _execution(app, docname)
        if record is None:
            missing[docname] = "it was not executed"
        elif record.get("succeeded") is False:
            missing[docname] = "its execution failed"
    return missing


def _offline_page(app: Any, pagename: str, templatename: str, context: dict, doctree: Any) -> None:
    body = context.get("body")
    if isinstance(body, str):
        not_executed = _not_executed(app)
        if pagename in not_executed:
            context["body"] = NOT_EXECUTED.format(reason=not_executed[pagename]) + body
        state = _saved_widget_state(context.get("script_files") or [])
        context["body"] = WIDGET_VIEW.sub(lambda match: _shown_widget(match.group(0), state), context["body"])
        context["body"] = _without_machine_paths(app, context["body"])
        if getattr(app.env, "nb_metadata", {}).get(pagename, {}).get("has_exec_table"):  # myst-nb's nb-exec-table
            listed = "".join(f"<li><code>{name}</code>: {reason}</li>" for name, reason in not_executed.items())
            note = (f"<p>Left out of the table, not executed in this build:</p><ul>{listed}</ul>" if listed
                    else "<p>Every notebook of the site was executed in this build.</p>")  # fmt: skip
            context["body"] += f'<div class="course-execution-summary">{note}</div>'
    if not context.get("default_mode"):
        context["default_mode"] = "auto"
    scripts = context.get("script_files")
    if not scripts:
        return
    kept, seen = [], set()
    for script in scripts:
        filename = str(getattr(script, "filename", script) or "")
        attributes = getattr(script, "attributes", {}) or {}
        inline = attributes.get("body", "")
        if "THEBE_JS_URL" in inline or filename.endswith("sphinx-thebe.js"):
            continue  # Thebe is off: it needs a Binder server, the offline course has none
        key = (filename, inline)
        if key in seen:
            continue
        seen.add(key)
        kept.append(script)
    scripts[:] = kept


def setup(app: Any) -> dict[str, Any]:
    app.connect("html-page-context", _offline_page, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
