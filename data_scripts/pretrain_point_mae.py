"""Pretrain the tiny Point-MAE on the clean shape set and write course_lib/checkpoints/point_mae_tiny.pt.

    python -m data_scripts.pretrain_point_mae                  # the shipped checkpoint (minutes)
    python -m data_scripts.pretrain_point_mae --num-threads 1  # on a CPU shared with other jobs
    COURSE_FAST=1 python -m data_scripts.pretrain_point_mae    # a few steps, written to the cache

Trains `course_lib.points.pretrain.MaskedAutoencoder` with the default `PointMAEConfig` and
`PretrainConfig` on `load_shapes("clean", "train")` (generated first if missing), then
measures how useful the features are: a linear probe (logistic regression on the max-pooled
frozen features) on the clean set and on the hardest scan-like set, pb_t50_rs, for the
pretrained encoder and for a randomly initialised one. The checkpoint is written atomically,
with the configs, the data's version and seed, the loss curve, the time and the probe results,
and its SHA-256 goes into SHA256SUMS beside it.

The weights are rounded to float16 (the storage precision) *before* the probe, so the probe
measures exactly the encoder that `load_pretrained_point_mae()` returns.

Under COURSE_FAST=1 the run stops after a few steps and is written to
`config.CACHE_DIR / "point_mae_tiny_fast.pt"` (never over the shipped checkpoint) unless
`--output` says otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from course_lib import config
from course_lib.points.datasets import SHAPES_VERSION, load_shapes, shapes_path
from course_lib.points.point_mae import PointMAEConfig, PointMAEEncoder, extract_features
from course_lib.points.pretrain import (
    PretrainConfig,
    default_checkpoint_path,
    linear_probe_accuracy,
    pretrain,
    save_checkpoint,
)

PROBE_VARIANTS = ("clean", "pb_t50_rs")


def round_to_storage_precision(module: torch.nn.Module) -> None:
    """Round every floating-point parameter and buffer to float16 and back, in place."""
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            if tensor.is_floating_point():
                tensor.copy_(tensor.half().float())


def probe(encoder: PointMAEEncoder, num_points: int, progress: bool) -> dict[str, float]:
    """Linear-probe test accuracy of `encoder`'s pooled features on each probe variant."""
    accuracies = {}
    for variant in PROBE_VARIANTS:
        train_set = load_shapes(variant, "train", num_points=num_points)
        test_set = load_shapes(variant, "test", num_points=num_points)
        train_features, train_labels = extract_features(encoder, train_set, progress=progress)
        test_features, test_labels = extract_features(encoder, test_set, progress=progress)
        accuracies[variant] = linear_probe_accuracy(train_features, train_labels, test_features, test_labels)
    return accuracies


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=None, help="default: course_lib/checkpoints/point_mae_tiny.pt")
    parser.add_argument("--epochs", type=int, default=None, help="epochs (default: PretrainConfig's)")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (fast mode: 5)")
    parser.add_argument("--seed", type=int, default=PretrainConfig.seed, help="seed of the run (default %(default)s)")
    parser.add_argument(
        "--rotate", action=argparse.BooleanOptionalAction, default=PretrainConfig.rotate_about_up_axis,
        help="turn each cloud about the up axis at random while pretraining (default %(default)s)",
    )
    parser.add_argument("--num-threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-probe", action="store_true", help="skip the linear probe")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    fast = config.is_fast()
    output = args.output or (config.CACHE_DIR / "point_mae_tiny_fast.pt" if fast else default_checkpoint_path())
    max_steps = args.max_steps if args.max_steps is not None else (5 if fast else None)
    model_config = PointMAEConfig()
    pretrain_config = PretrainConfig(seed=args.seed, rotate_about_up_axis=args.rotate)
    if args.epochs is not None:
        pretrain_config = dataclasses.replace(pretrain_config, num_epochs=args.epochs)
    progress = not args.no_progress

    data = load_shapes("clean", "train", num_points=model_config.num_points)
    with np.load(shapes_path("clean"), allow_pickle=False) as stored:
        data_seed, data_config = int(stored["seed"]), str(stored["config"])
    print(f"[point_mae] pretraining on {len(data)} clean shapes, {torch.get_num_threads()} threads ...")
    result = pretrain(
        data, config=model_config, pretrain_config=pretrain_config, max_steps=max_steps, progress=progress
    )
    print(
        f"[point_mae] {result.num_steps} steps in {result.seconds:.0f} s ({result.cpu_seconds:.0f} s of CPU time); "
        f"loss {result.step_losses[0]:.5f} -> {result.epoch_losses[-1]:.5f} (last epoch mean)"
    )

    model = result.model
    round_to_storage_precision(model)  # what the checkpoint will hold
    record = {
        "data": {
            "variant": "clean",
            "split": "train",
            "num_shapes": result.num_shapes,
            "num_points": model_config.num_points,
            "shapes_version": SHAPES_VERSION,
            "shapes_seed": data_seed,
            "shapes_config": data_config,
            "fast": fast,
        },
        "step_losses": result.step_losses,
        "epoch_losses": result.epoch_losses,
        "num_steps": result.num_steps,
        "seconds": result.seconds,
        "cpu_seconds": result.cpu_seconds,
        "num_threads": torch.get_num_threads(),
        "torch_version": str(torch.__version__),
        "date": time.strftime("%Y-%m-%d"),
        "parameters": {
            "encoder_pretrained": sum(
                p.numel() for n, p in model.encoder.named_parameters() if not n.startswith(("head.", "cls_"))
            ),
            "head": sum(p.numel() for p in model.encoder.head.parameters()),
            "decoder": sum(p.numel() for n, p in model.named_parameters() if not n.startswith("encoder.")),
        },
    }
    if not args.no_probe:
        start = time.perf_counter()
        torch.manual_seed(pretrain_config.seed)
        random_encoder = PointMAEEncoder(model_config)
        record["linear_probe"] = {
            "pretrained": probe(model.encoder, model_config.num_points, progress),
            "random_init": probe(random_encoder, model_config.num_points, progress),
            "features": "max over the final patch tokens (C values), frozen, eval mode",
            "classifier": "logistic regression (L-BFGS, l2 1e-3) on standardised features",
            "num_points": model_config.num_points,
        }
        print(f"[point_mae] linear probe ({time.perf_counter() - start:.0f} s), test accuracy:")
        for variant in PROBE_VARIANTS:
            pretrained = record["linear_probe"]["pretrained"][variant]
            random_init = record["linear_probe"]["random_init"][variant]
            print(f"[point_mae]   {variant:10s} pretrained {pretrained:.3f}   random init {random_init:.3f}")

    digest = save_checkpoint(model, output, pretrain_config=pretrain_config, record=record)
    size_mb = Path(output).stat().st_size / 1e6
    print(f"[point_mae] wrote {output} ({size_mb:.2f} MB), sha256 {digest}")


if __name__ == "__main__":
    main()
