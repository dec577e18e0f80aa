"""Build Point-PEFT's memory bank: the downstream training set through the frozen pretrained encoder.

    python -m data_scripts.build_memory_bank                          # pb_t50_rs train set, 1024 points
    python -m data_scripts.build_memory_bank --variant obj_bg --output /tmp/bank.pt
    COURSE_FAST=1 python -m data_scripts.build_memory_bank            # the small fast-mode train set

The official Point-PEFT repository loads such a file (`train_f_pos_shape_scan.pt`) but ships no
script that makes it (its issue #3 asks for one). This one:

1. seeds torch with `--seed` (default `course_lib.config.SEED`) and loads the shipped tiny
   Point-MAE with `load_pretrained_point_mae(num_classes=...)`; the seed fixes the freshly drawn
   CLS token, which the features depend on, so fine-tune with the same seed and head size
   (a bank from another encoder is refused when it is used, with a message);
2. passes `load_shapes(variant, "train")` in order through the frozen encoder in eval mode
   (`course_lib.point_peft.build_memory_bank`): one max-pooled feature per shape, row i = shape i;
3. writes features (S, C) float32, labels, the encoder's SHA-256 and how the bank was made,
   atomically, to `default_memory_bank_path(variant, num_points)` under config.CACHE_DIR
   (or `--output`).

It takes under a minute on a laptop CPU (one encoder forward pass per training shape).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from course_lib import config
from course_lib.point_peft.memory_bank import build_memory_bank, default_memory_bank_path, save_memory_bank
from course_lib.points.checkpoint import default_checkpoint_path, file_sha256, load_pretrained_point_mae
from course_lib.points.datasets import load_shapes


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="pb_t50_rs", help="shape-set variant (default %(default)s)")
    parser.add_argument("--num-points", type=int, default=1024, help="points per cloud (default %(default)s)")
    parser.add_argument("--num-classes", type=int, default=15, help="head size used when fine-tuning (default %(default)s)")
    parser.add_argument("--seed", type=int, default=config.SEED, help="seed before loading the encoder (default %(default)s)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="Point-MAE checkpoint (default: the shipped one)")
    parser.add_argument("--max-per-class", type=int, default=None, help="keep the first shapes of each class")
    parser.add_argument("--output", type=Path, default=None, help="default: config.CACHE_DIR/point_peft/...")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    torch.manual_seed(args.seed)
    encoder = load_pretrained_point_mae(args.checkpoint, num_classes=args.num_classes, progress=not args.no_progress)
    train_set = load_shapes(args.variant, "train", num_points=args.num_points, max_per_class=args.max_per_class)
    checkpoint = args.checkpoint if args.checkpoint is not None else default_checkpoint_path()
    info = {
        "variant": args.variant,
        "split": "train",
        "num_points": args.num_points,
        "max_per_class": args.max_per_class,
        "fast": config.is_fast(),
        "seed": args.seed,
        "num_classes": args.num_classes,
        "checkpoint": checkpoint.name,
        "checkpoint_sha256": file_sha256(checkpoint) if checkpoint.exists() else None,
        "date": time.strftime("%Y-%m-%d"),
    }
    start = time.perf_counter()
    bank = build_memory_bank(encoder, train_set, batch_size=args.batch_size, progress=not args.no_progress, info=info)
    output = args.output or default_memory_bank_path(args.variant, args.num_points)
    save_memory_bank(bank, output)
    print(
        f"[memory_bank] {bank.num_shapes} shapes x {bank.dim} features from {args.variant}/train in "
        f"{time.perf_counter() - start:.1f} s -> {output} (encoder {bank.encoder_sha256[:12]}...)"
    )
    return output


if __name__ == "__main__":
    main()
