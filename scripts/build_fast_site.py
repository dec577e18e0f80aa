"""Build the whole site from the notebooks `make nbval` executed in fast mode, for the browser check.

`make test` checks every page of the book in headless Chromium (issue 17). The full-mode site
takes `make book` about 40 minutes; the fast-mode executions that nbval has just run are enough
to check that each page renders: `scripts/nbval_cache.py` stored them in a jupyter-cache, and
this script builds the book (book.yml's settings, toc.yml's pages) from that cache into its own
folder, without executing anything:

    python scripts/build_fast_site.py [--cache _build/fast/.jupyter_cache] [--out _build/fast]

The site is `<out>/_build/html`. A notebook of the table of contents missing from the cache (nbval
did not run it, or a cell failed) stops the build with its name: its page would show code without
outputs, or the book build would run it again in full mode.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "scripts"))
from execute_book import toc_notebooks  # scripts/ is not a package: imported by path

FAST_BUILD = REPO_ROOT / "_build" / "fast"


def fast_config(cache: Path) -> dict:
    """book.yml with the execution read from `cache` only: every notebook must be in it."""
    config = yaml.safe_load((REPO_ROOT / "book.yml").read_text())
    config["execute"] = {**config["execute"], "execute_notebooks": "cache", "cache": str(cache.resolve())}
    sphinx = config["sphinx"]
    # the config file is not in the book's folder: its local extension folder is given absolute
    sphinx["local_extensions"] = {name: str(REPO_ROOT / path) for name, path in sphinx.get("local_extensions", {}).items()}
    return config


def missing_from_cache(cache: Path) -> list[str]:
    """The notebooks of toc.yml that the cache holds no execution of (as their code is now)."""
    from jupyter_cache import get_cache

    store = get_cache(str(cache))
    missing = []
    for path in toc_notebooks(REPO_ROOT / "toc.yml"):
        try:
            store.match_cache_notebook(nbformat.read(path, as_version=4))
        except KeyError:
            missing.append(str(path.relative_to(REPO_ROOT)))
    return missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=FAST_BUILD / ".jupyter_cache", help="the jupyter-cache nbval filled")
    parser.add_argument("--out", type=Path, default=FAST_BUILD, help="the site goes to OUT/_build/html")
    args = parser.parse_args(argv)
    if not (args.cache / "global.db").exists():
        print(f"build_fast_site: no executed notebooks in {args.cache}: run `make nbval` first", file=sys.stderr)
        return 2
    missing = missing_from_cache(args.cache)
    if missing:
        print("build_fast_site: not in the cache as their code is now (nbval failed on them, or did not run them): "
              + ", ".join(missing) + "; run `make nbval` and mend what fails", file=sys.stderr)  # fmt: skip
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    config_path = args.out / "book.yml"
    config_path.write_text(yaml.safe_dump(fast_config(args.cache), sort_keys=False))
    jupyter_book = Path(sys.executable).parent / "jupyter-book"
    # COURSE_FAST=1: should anything be executed after all, it runs in fast mode, not for 40 minutes
    env = {**os.environ, "COURSE_FAST": "1", "TQDM_DISABLE": "1"}
    command = [str(jupyter_book), "build", str(REPO_ROOT), "--config", str(config_path), "--toc", str(REPO_ROOT / "toc.yml"),
               "--path-output", str(args.out), "--all"]  # fmt: skip  (--all: the cache changed, the sources did not)
    result = subprocess.run(command, env=env, check=False)
    if result.returncode == 0:
        print(f"build_fast_site: {args.out / '_build' / 'html' / 'index.html'}")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
