"""Run every benchmark in this folder (`make bench`): each module with a main() function."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path

SKIP = {"common", "run_all", "book_robustness"}  # book_robustness builds the book twice: run it by hand


def main() -> None:
    folder = Path(__file__).parent
    names = sorted(m.name for m in pkgutil.iter_modules([str(folder)]) if m.name not in SKIP)
    if len(sys.argv) > 1:
        unknown = sorted(set(sys.argv[1:]) - set(names))
        if unknown:
            raise SystemExit(f"unknown benchmarks {unknown}; choose from {names}")
        names = [n for n in names if n in sys.argv[1:]]
    sys.argv[1:] = []  # each benchmark's own argument parser sees no names: it runs with its defaults
    for name in names:
        print(f"=== benchmark {name} ===", flush=True)
        importlib.import_module(f"benchmarks.{name}").main()


if __name__ == "__main__":
    main()
