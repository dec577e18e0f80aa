"""Open the built site in headless Chromium, as a teacher's readers will, and report what they see.

For every page: whether MathJax typeset its formulas (rendered `mjx-container`s, and no raw TeX
left in the text), how many results tables render as HTML tables, JavaScript errors and console
errors, and every request that left the local server (the offline course must not need one).
The site is served from 127.0.0.1 by Python's own HTTP server, so relative links, MathJax's
fonts and the search index load as they would from any web server.

    python scripts/check_site.py                 # _build/html, every page of toc.yml
    python scripts/check_site.py --site DIR page.html other.html

Also: every notebook figure's tick labels on screen (a 1280 x 800 window), figures that did not
load (and, with `--expect-figures-from CACHE`, any image of the executed notebook not shown), a
notebook the build did not execute, paths of the machine
that built the site in cell outputs, blank gaps left by empty outputs, error outputs and
tracebacks, widget cells without a static figure before them, and each page's title; a
full-page screenshot of each page goes to `_build/browser/`. Exit status 1 when a page has any
of these problems. Chromium comes from the system (Debian: `apt-get install chromium`; `CHROMIUM=/path` to choose another);
Playwright drives it (`playwright install` is never needed). `tests/test_browser_site.py` runs the
same checks on a scratch book.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import http.server
import json
import os
import re
import shutil
import struct
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent

#: Flags that keep Chromium off the network it has no business on (updates, sync, telemetry).
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")  # fmt: skip

#: The screen a reader of the site has in mind: a laptop's browser window (CSS pixels).
VIEWPORT = {"width": 1280, "height": 800}

#: matplotlib's tick labels are 10 pt (rcParams "xtick.labelsize" = "medium" = font.size); the
#: course's figures never set them smaller. On screen they must be at least this many CSS pixels.
TICK_LABEL_POINTS = 10.0
MIN_TICK_LABEL_PX = 9.0

#: An output area this tall with nothing in it is a blank gap (a hidden progress bar left 250 px).
BLANK_OUTPUT_PX = 40

#: Paths of the machine that built the site: home folders, this checkout, temporary folders.
MACHINE_PATH = re.compile(
    "(" + "|".join([re.escape(str(REPO_ROOT)), r"/home/\w+", r"/Users/\w+", r"/root/", r"/tmp/\w+", r"[A-Z]:\\Users"]) + r")[^\s'\"]*"
)

#: TeX that should never reach a reader as text once MathJax has run.
RAW_TEX_MARKERS = ("\\frac", "\\sum", "\\mathcal", "\\operatorname", "\\lambda", "\\alpha", "$$")


def find_chromium() -> str | None:
    """The system's Chromium: $CHROMIUM, else chromium / chromium-browser on PATH."""
    candidates = [os.environ.get("CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser")]
    return next((c for c in candidates if c and Path(c).exists()), None)


@contextlib.contextmanager
def serve(folder: Path) -> Iterator[str]:
    """Serve `folder` on 127.0.0.1 (a free port) in a thread; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # the base class names it format
        pass


def check_pages(site: Path, pages: Sequence[str], *, chromium: str | None = None, timeout_ms: int = 30_000,
                screenshots: Path | None = None) -> dict[str, dict]:  # fmt: skip
    """Open each page (a path relative to `site`) and report what a reader gets.

    Per page: `mathjax_rendered` (typeset formulas), `raw_tex` (TeX markers left in the visible
    text), `tables` (HTML tables), `page_errors` (uncaught JavaScript errors), `console_errors`,
    `outside_requests` (URLs not on the local server), `missing` (local files that answered 404),
    `figures` (PNG outputs of notebook cells, each with its on-screen `tick_label_px`) and
    `small_figures` (those whose tick labels are below `MIN_TICK_LABEL_PX` in a `VIEWPORT`-sized window),
    `diagrams` (images of the text, not of outputs), `broken_images` (images of the text or the outputs
    that did not load or have no size), `not_executed` (the page carries
    the notice of a notebook the build did not execute),
    `machine_paths` (the build machine's paths in cell outputs) and `blank_outputs` (heights of empty
    output areas at least `BLANK_OUTPUT_PX` tall), `title` and `title_matches` (the browser tab's
    title begins with the page's first heading), `error_outputs` (cell outputs that are errors or
    tracebacks), `widgets_without_figure` (widget cells with no figure in the two cells before
    them). With `screenshots`, a full-page PNG of each page goes there for a person to look at.
    """
    from playwright.sync_api import sync_playwright

    chromium = chromium or find_chromium()
    if chromium is None:
        raise FileNotFoundError("no Chromium found: install it (Debian: apt-get install chromium) or set CHROMIUM=/path")
    report: dict[str, dict] = {}
    with serve(site) as base, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=list(CHROMIUM_FLAGS))
        try:
            for page_path in pages:
                report[page_path] = _check_page(browser, base, page_path, timeout_ms, screenshots)
        finally:
            browser.close()
    return report


def png_dpi(data: bytes) -> float | None:
    """The resolution a PNG declares in its pHYs chunk (matplotlib writes the figure's dpi), or None."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return None
    offset = 8
    while offset + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[offset : offset + 8])
        if kind == b"pHYs" and length >= 9:
            per_x, _per_y, unit = struct.unpack(">IIB", data[offset + 8 : offset + 17])
            return per_x * 0.0254 if unit == 1 else None  # unit 1: dots per metre
        if kind == b"IDAT":  # pHYs must come before the image data
            return None
        offset += 12 + length
    return None


def tick_label_px(display_width: float, natural_width: float, dpi: float) -> float:
    """On-screen height of a 10-pt tick label: its pixels in the PNG (points x dpi / 72), scaled
    as the page scales the image (display width / natural width)."""
    return TICK_LABEL_POINTS * dpi / 72.0 * display_width / natural_width


def _figures(page: Any, base: str) -> list[dict[str, Any]]:
    """Every PNG output of a notebook cell on the page: natural and displayed width, dpi, tick label px."""
    images = page.evaluate(
        """() => [...document.querySelectorAll('.cell_output img')].map(image => ({
                src: image.currentSrc || image.src, natural_width: image.naturalWidth,
                display_width: image.getBoundingClientRect().width}))"""
    )
    figures = []
    for image in images:
        src = image.pop("src")
        if src.startswith("data:image/png;base64,"):
            data = base64.b64decode(src.split(",", 1)[1])
        elif src.startswith(base) and src.lower().endswith(".png"):
            data = page.request.get(src).body()
        else:
            continue  # not a PNG (an SVG scales with its text)
        dpi = png_dpi(data) or 72.0  # a PNG without pHYs is shown at one pixel per CSS pixel
        if image["natural_width"] and image["display_width"]:
            image["dpi"] = round(dpi, 1)
            image["tick_label_px"] = round(tick_label_px(image["display_width"], image["natural_width"], dpi), 1)
            image["name"] = src.rsplit("/", 1)[-1][:60] if not src.startswith("data:") else "(inline)"
            figures.append(image)
    return figures


def _check_page(browser: Any, base: str, page_path: str, timeout_ms: int, screenshots: Path | None = None) -> dict[str, Any]:
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    found: dict[str, list[str]] = {"page_errors": [], "console_errors": [], "outside_requests": [], "missing": []}
    page.on("pageerror", lambda error: found["page_errors"].append(str(error)))
    page.on("console", lambda message: found["console_errors"].append(message.text) if message.type == "error" else None)

    def route(request_route: Any) -> None:  # answer outside requests with an error instead of waiting on them
        url = request_route.request.url
        if url.startswith((base, "data:", "blob:", "about:")):
            request_route.continue_()
        else:
            found["outside_requests"].append(url)
            request_route.abort()

    page.route("**/*", route)
    page.on("response", lambda response: found["missing"].append(response.url) if response.status == 404 else None)
    page.goto(base + page_path, wait_until="load", timeout=timeout_ms)
    has_math = page.evaluate("() => !!document.querySelector('.math, .MathJax_Preview, script[type^=\"math/tex\"]')")
    if has_math:  # MathJax 3 typesets after load: wait for it, or for the timeout
        with contextlib.suppress(Exception):
            page.wait_for_function("() => window.MathJax && MathJax.startup && MathJax.startup.promise", timeout=timeout_ms)
            page.evaluate("() => MathJax.startup.promise")
    text = page.inner_text("body")
    result = {
        "mathjax_rendered": page.locator("mjx-container").count(),
        "raw_tex": sorted({marker for marker in RAW_TEX_MARKERS if marker in text}),
        "tables": page.locator("table").count(),
        **found,
    }
    result["figures"] = _figures(page, base)
    result["output_images"] = page.locator(".cell_output img").count()
    result["diagrams"] = page.locator("article img:not(.cell_output img)").count()  # Markdown images: the diagrams
    result["broken_images"] = page.evaluate(  # a figure or diagram that did not load, or has no size on the page
        """() => [...document.querySelectorAll('article img')]
            .filter(image => !image.complete || image.naturalWidth === 0 || image.getBoundingClientRect().width === 0)
            .map(image => (image.getAttribute('src') || '').slice(0, 80))"""
    )
    result["not_executed"] = page.locator(".course-not-executed").count() > 0  # _ext/course_site.py's notice
    result["small_figures"] = [f for f in result["figures"] if f["tick_label_px"] < MIN_TICK_LABEL_PX]
    outputs = page.evaluate("() => [...document.querySelectorAll('.cell_output')].map(o => o.innerText).join('\\n')")
    result["machine_paths"] = sorted({match.group(0) for match in MACHINE_PATH.finditer(outputs)})[:5]  # in outputs
    result["blank_outputs"] = page.evaluate(
        """(minimum) => [...document.querySelectorAll('.cell_output .output')]
            .filter(o => !o.innerText.trim() && !o.querySelector('img, svg, table, mjx-container, iframe, canvas')
                         && o.getBoundingClientRect().height >= minimum)
            .map(o => Math.round(o.getBoundingClientRect().height))""",
        BLANK_OUTPUT_PX,
    )
    heading = page.evaluate("() => { const h = document.querySelector('main h1, article h1, h1'); "
                            "return h ? h.innerText.replace(/[#¶]/g, '').trim() : ''; }")  # fmt: skip
    result["title"] = page.title()
    result["title_matches"] = bool(heading) and result["title"].startswith(heading)
    result["error_outputs"] = page.evaluate(
        """() => [...document.querySelectorAll('.cell_output .output')]
            .filter(o => o.classList.contains('error') || o.classList.contains('traceback')
                         || o.innerText.includes('Traceback (most recent call last)'))
            .map(o => o.innerText.slice(0, 120))"""
    )
    result["widgets_without_figure"] = page.evaluate(
        """() => [...document.querySelectorAll('.course-widget-offline')]
            .map(note => note.closest('.cell')).filter(cell => cell).filter(cell => {
                let previous = cell.previousElementSibling, seen = 0;
                while (previous && seen < 2) {
                    if (previous.classList.contains('cell')) {
                        if (previous.querySelector('.cell_output img')) return false;
                        seen += 1;
                    }
                    previous = previous.previousElementSibling;
                }
                return true; }).length"""
    )
    if screenshots is not None:
        screenshots.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(screenshots / (page_path.replace("/", "__").removesuffix(".html") + ".png")), full_page=True)
    context.close()
    return result


def problems(report: dict[str, dict]) -> list[str]:
    """One line per failure: raw TeX, a JavaScript error, a console error, an outside request, a 404,
    a figure whose tick labels are too small to read, a figure that did not load or is not shown, a notebook the
    build did not execute, a path of the build machine, a blank output
    gap, an error output, a widget with no figure before it, a title that is not the page's."""
    lines = []
    for page, row in report.items():
        for key in ("raw_tex", "page_errors", "console_errors", "outside_requests", "missing", "small_figures",
                    "broken_images", "figures_not_shown", "not_executed", "machine_paths", "blank_outputs", "error_outputs",
                    "widgets_without_figure"):  # fmt: skip
            if row.get(key):
                lines.append(f"{page}: {key} {row[key][:3] if isinstance(row[key], list) else row[key]}")
        if "title_matches" in row and not row["title_matches"]:
            lines.append(f"{page}: title {row.get('title')!r} does not begin with the page's first heading")
    return lines


def expected_figures(cache: Path, pages: Sequence[str], root: Path = REPO_ROOT) -> dict[str, int]:
    """Per page (its HTML path; its notebook is the same path under `root` with .ipynb), the images
    the executed notebook in jupyter-cache `cache` holds in its outputs (PNG, JPEG or SVG): the
    site must show each of them."""
    import nbformat
    from jupyter_cache import get_cache

    store = get_cache(str(cache))
    expected = {}
    for page in pages:
        source = root / Path(page).with_suffix(".ipynb")
        if not source.exists():
            continue
        try:
            with warnings.catch_warnings():  # nbformat warns about cells without an id (tests/test_repo.py requires them in the course)
                warnings.simplefilter("ignore")
                notebook = nbformat.read(source, as_version=4)
            record = store.match_cache_notebook(notebook)
        except KeyError:
            continue  # not executed: the page's notice says so, and `not_executed` reports it
        notebook = store.get_cache_bundle(record.pk).nb
        expected[page] = sum(1 for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])
                             if {"image/png", "image/jpeg", "image/svg+xml"} & set(output.get("data", {})))  # fmt: skip
    return expected


def toc_pages(toc: Path = REPO_ROOT / "toc.yml") -> list[str]:
    """The HTML page of every file in the table of contents."""
    import yaml

    files: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key in ("root", "file"):
                if isinstance(node.get(key), str):
                    files.append(node[key])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(yaml.safe_load(toc.read_text()))
    return [str(Path(name).with_suffix(".html")) for name in files]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pages", nargs="*", help="pages relative to the site (default: every page of toc.yml)")
    parser.add_argument("--site", type=Path, default=REPO_ROOT / "_build" / "html")
    parser.add_argument("--json", type=Path, help="also write the report here")
    parser.add_argument("--screenshots", type=Path, default=REPO_ROOT / "_build" / "browser",
                        help="a full-page PNG of each page goes here (default _build/browser)")  # fmt: skip
    parser.add_argument("--expect-figures-from", type=Path, metavar="CACHE",
                        help="the jupyter-cache the site was built from: each page must show every image its notebook's outputs hold")  # fmt: skip
    args = parser.parse_args(argv)
    if not (args.site / "index.html").exists():
        print(f"check_site: no built site in {args.site}: run `make book` first", file=sys.stderr)
        return 2
    if find_chromium() is None:
        print("check_site: no Chromium to open the site with. Install it (Debian/Ubuntu: "
              "`sudo apt-get update && sudo apt-get install -y chromium`; elsewhere your package manager's "
              "chromium) or set CHROMIUM=/path/to/chromium, then run this again", file=sys.stderr)  # fmt: skip
        return 2
    pages = args.pages or toc_pages()
    report = check_pages(args.site, pages, screenshots=args.screenshots)
    if args.expect_figures_from:  # every figure of the executed notebooks is on its page
        for page, count in expected_figures(args.expect_figures_from, pages).items():
            if page in report:
                report[page]["figures_expected"] = count
                report[page]["figures_not_shown"] = max(0, count - report[page]["output_images"])
    for page, row in report.items():
        print(f"{page:60s} formulas {row['mathjax_rendered']:4d}  tables {row['tables']:3d}  raw TeX {len(row['raw_tex'])}  "
              f"errors {len(row['page_errors']) + len(row['console_errors'])}  outside {len(row['outside_requests'])}  "
              + (f"diagrams {row['diagrams']}  " if row.get("diagrams") else "")
              + (f"figures {len(row['figures'])}" + (f" of {row['figures_expected']}" if "figures_expected" in row else "")
                 + (f" (smallest tick labels {min(f['tick_label_px'] for f in row['figures']):.1f} px)" if row["figures"] else "")))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    failures = problems(report)
    print("\n".join(failures) if failures else f"check_site: {len(report)} pages, no problem found")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
