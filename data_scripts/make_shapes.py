"""Generate the embedded procedural shape sets (ScanObjectNN's 15 classes) into data/shapes/.

    python -m data_scripts.make_shapes            # writes what is missing or stale
    python -m data_scripts.make_shapes --force    # regenerates everything
    python -m data_scripts.make_shapes --workers 1  # one process (default: one per CPU core)

Writes `config.DATA_DIR / "shapes" / {clean,obj_only,obj_bg,pb_t50_rs}.npz` (see
`course_lib.points.datasets` for the contents and `course_lib.points.scans` for what each
scan-like variant does). Deterministic by seed; each file is written to a temporary file and
renamed. Idempotent: files holding the same generator version, seed and sizes are kept.
Run by `make data` (data_scripts/make_all.py).
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace

from course_lib.points.datasets import SHAPE_VARIANTS, ShapeSetConfig, shape_set_is_current, shapes_path, write_shape_sets


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="regenerate even if the files are up to date")
    parser.add_argument("--seed", type=int, default=ShapeSetConfig.seed, help="seed of the whole set (default %(default)s)")
    parser.add_argument("--data-dir", default=None, help="write under DATA_DIR/shapes (default: course_lib.config.DATA_DIR)")
    parser.add_argument("--variants", nargs="+", default=list(SHAPE_VARIANTS), choices=SHAPE_VARIANTS, help="which sets")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="processes that share the generation; the files do not depend on it (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")

    shape_config = replace(ShapeSetConfig(), seed=args.seed)
    start = time.perf_counter()
    written = write_shape_sets(shape_config, args.data_dir, tuple(args.variants), force=args.force,
                               progress=not args.no_progress, workers=args.workers)
    for variant in args.variants:
        path = shapes_path(variant, args.data_dir)
        state = "written" if path in written else ("up to date" if shape_set_is_current(path, shape_config) else "?")
        print(f"[shapes] {variant:10s} {state:10s} {path}")
    if written:
        print(f"[shapes] generated in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
