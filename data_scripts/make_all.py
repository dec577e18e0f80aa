"""Generate every embedded data set the notebooks need (idempotent: existing files are kept).

Run by `make data`, `make book` and `make test`. Each generator writes to a temporary file and
renames it, so an interrupted run never leaves a half-written data set behind.
"""

from __future__ import annotations

GENERATORS: list[tuple[str, str]] = [
    # (module, description); each module has main() -> None
    ("data_scripts.make_shapes", "procedural point-cloud shapes, ScanObjectNN's 15 classes (about 30 s on two cores, 40 s on one)"),
]


def main() -> None:
    import importlib

    for module_name, description in GENERATORS:
        print(f"[data] {description}")
        importlib.import_module(module_name).main()
    print("[data] embedded data ready")


if __name__ == "__main__":
    main()
