"""Reversible fine-tuning of the point transformer (MEFT's couplings on the tiny Point-MAE,
`course_lib.meft.point`) beside full fine-tuning, LoRA and Point-PEFT, on PB_T50_RS and the
clean set, with notebook 16's recipes and seeds.

Per setting and shape set (mean and std over the seeds): test accuracy, trainable share,
seconds per epoch, bytes saved for backward by one training step (`activation_mib`) and the peak
of live allocated bytes of one training step (forward, backward, AdamW; `peak_minus_weights_mib`
leaves the parameters out), all at 32 clouds of 1024 points.

- `peak_reduction_vs_full_pct`: 100 (1 - reversible / full fine-tuning), peak minus weights;
  goal >= 80 (issue 16).
- `acc_gap_vs_point_peft_points`: reversible minus Point-PEFT, mean test accuracy in points;
  goal >= -1 (within one point).
- `lr_check`: the learning rate of each PEFT setting (LoRA, Point-PEFT, MEFT) chosen among
  `--lrs` on seed 0 of PB_T50_RS (notebook 16 uses 3e-3 for all; the course's shape sets have no
  validation split, so the choice is made on one seed's test set: the gaps are also given over
  the other seeds alone). Full fine-tuning keeps the recipe's 1e-3.
- `variants` (with `--variants`): on PB_T50_RS, all seeds, MEFT1/2/3 in four pieces, MEFT1 in
  one piece (no ghost batch) and MEFT1 with the blocks' LayerNorms trained, at MEFT's lr: is
  the accuracy gap the variant's, the pieces', or the trained set's?
- MEFT runs with `batch_chunks=4`: the couplings' recomputation one quarter of the batch at a
  time (gradients unchanged) and the frozen patch embedding in quarters (ghost batch norm in
  training mode); `peak_minus_weights_mib` of LoRA with the same stem in quarters is given too,
  since the stem's share of the peak is every frozen-stem method's.

    .venv/bin/python -m benchmarks.point_reversible          # writes results/bench/point_reversible.json

Full mode trains 4 settings x 3 seeds x 2 shape sets and 9 lr-check runs in `--workers`
processes (11 minutes of wall time with 2 workers on this project's 2-core machine, 2026-12-06); COURSE_FAST=1
runs a tiny version.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from typing import Any

import torch

from benchmarks.common import torch_environment, write_bench
from course_lib.config import fast_or_full
from course_lib.meft import MEFTConfig
from course_lib.point_peft.experiments import (
    PointRecipe,
    SettingRun,
    build_setting,
    recipe_model_config,
    results_recipe,
    run_settings,
    step_peak_memory,
)

NAME = "point_reversible"
SETTINGS = ("full_finetune", "lora", "point_peft", "meft")
TUNED = ("lora", "point_peft", "meft")


def recipes() -> dict[str, PointRecipe]:
    """Notebook 16's recipes (`results_recipe`: PB_T50_RS and the clean set), measuring the peak."""
    return {variant: dataclasses.replace(results_recipe(variant), peak_memory=True) for variant in ("pb_t50_rs", "clean")}


def table(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """setting -> mean/std of accuracy (in %), the per-step memory and time."""
    out: dict[str, dict[str, Any]] = {}
    for setting in dict.fromkeys(row["setting"] for row in rows):
        mine = [row for row in rows if row["setting"] == setting]
        accs = [100 * row["acc"] for row in mine]
        out[setting] = {
            "acc_mean": statistics.mean(accs),
            "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "accs": accs,
            "seeds": [row["seed"] for row in mine],
            "trainable_pct": mine[0]["trainable_pct"],
            "sec_per_epoch": statistics.median(row["sec_per_epoch"] for row in mine),
            "activation_mib": mine[0]["activation_mib"],
            "peak_allocated_mib": mine[0]["peak_allocated_mib"],
            "peak_minus_weights_mib": mine[0]["peak_minus_weights_mib"],
            "peak_by_category_mib": mine[0]["peak_by_category_mib"],
            "lr": mine[0]["lr"],
        }
    return out


def lora_stem_peak(recipe: PointRecipe, chunks: int) -> float:
    """Peak minus weights of one LoRA training step with the frozen patch embedding in `chunks` pieces."""
    from course_lib.points.datasets import load_shapes

    shapes = load_shapes(recipe.variant, "train", num_points=recipe.num_points, max_per_class=recipe.train_per_class)
    model, _ = build_setting(SettingRun("lora", 0, recipe), recipe_model_config(recipe, shapes.num_classes))
    model.patch_embedding.batch_chunks = chunks
    batch = {"points": torch.stack([shapes[i][0] for i in range(recipe.activation_batch)]),
             "labels": torch.tensor([shapes[i][1] for i in range(recipe.activation_batch)])}  # fmt: skip
    return step_peak_memory(model, batch)["peak_minus_weights_mib"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="meft1", choices=("meft1", "meft2", "meft3"), help="the MEFT variant")
    parser.add_argument("--batch-chunks", type=int, default=4, help="MEFT's batch_chunks")
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2], help="lr check of the PEFT settings")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--variants", action="store_true", help="also the table of MEFT variants on PB_T50_RS")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = fast_or_full((0,), (0, 1, 2))
    by_variant = recipes()

    meft_config = MEFTConfig(args.variant, batch_chunks=args.batch_chunks)

    def run(setting: str, seed: int, recipe: PointRecipe) -> SettingRun:
        return SettingRun(setting, seed, recipe, meft=meft_config if setting == "meft" else None)

    # 1. each PEFT setting's learning rate, on seed 0 of PB_T50_RS
    pb = by_variant["pb_t50_rs"]
    check_runs = [run(setting, 0, dataclasses.replace(pb, peft_lr=lr)) for setting in TUNED for lr in args.lrs]
    check: dict[str, dict[float, float]] = {setting: {} for setting in TUNED}
    for row in run_settings(check_runs, workers=args.workers, progress=False):
        check[row["setting"]][row["lr"]] = 100 * row["acc"]
    chosen = {setting: max(accs, key=accs.get) for setting, accs in check.items()}
    print("lr check (seed 0, PB_T50_RS test accuracy %):", check, "->", chosen, flush=True)

    # 2. every setting on both shape sets and all seeds, each PEFT setting at its lr
    results: dict[str, Any] = {}
    for variant, recipe in by_variant.items():
        runs = [run(setting, seed, dataclasses.replace(recipe, peft_lr=chosen.get(setting, recipe.peft_lr)))
                for setting in SETTINGS for seed in seeds]  # fmt: skip
        rows = run_settings(runs, workers=args.workers, progress=False)
        results[variant] = table(rows)
        for setting, row in results[variant].items():
            print(f"{variant:10s} {setting:14s} acc {row['acc_mean']:5.1f} +- {row['acc_std']:4.1f}  "
                  f"trainable {row['trainable_pct']:6.2f}%  {row['sec_per_epoch']:5.1f} s/epoch  saved "
                  f"{row['activation_mib']:7.1f} MiB  peak-weights {row['peak_minus_weights_mib']:7.1f} MiB", flush=True)

    variants = None
    if args.variants:
        options = {"meft1": {}, "meft2": {}, "meft3": {}, "meft1_one_piece": {"variant": "meft1", "batch_chunks": 1},
                   "meft1_layer_norms": {"variant": "meft1", "train_layer_norms": True}}
        runs = [SettingRun("meft", seed, dataclasses.replace(pb, peft_lr=chosen["meft"]), label=name,
                           meft=MEFTConfig(**{"variant": name, "batch_chunks": args.batch_chunks, **extra}))
                for name, extra in options.items() for seed in seeds]  # fmt: skip
        rows = run_settings(runs, workers=args.workers, progress=False)
        variants = {name: {"acc_mean": statistics.mean(accs), "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                           "accs": accs}
                    for name in options for accs in [[100 * r["acc"] for r in rows if r["label"] == name]]}  # fmt: skip
        for name, row in variants.items():
            print(f"variant {name:18s} acc {row['acc_mean']:5.1f} +- {row['acc_std']:4.1f}", flush=True)

    pb_table, full = results["pb_t50_rs"], results["pb_t50_rs"]["full_finetune"]
    reversible = pb_table["meft"]
    payload = {
        "variant": args.variant,
        "batch_chunks": args.batch_chunks,
        "lr_check": {"seed": 0, "shape_set": "pb_t50_rs", "test_acc_by_lr": check, "chosen_lr": chosen},
        "lora_stem_in_pieces_peak_minus_weights_mib": lora_stem_peak(pb, args.batch_chunks),
        "results": results,
        "variants_pb_t50_rs": variants,
        "peak_reduction_vs_full_pct": 100 * (1 - reversible["peak_minus_weights_mib"] / full["peak_minus_weights_mib"]),
        "saved_reduction_vs_full_pct": 100 * (1 - reversible["activation_mib"] / full["activation_mib"]),
        "acc_gap_vs_point_peft_points": {
            variant: table_["meft"]["acc_mean"] - table_["point_peft"]["acc_mean"] for variant, table_ in results.items()
        },
        # the lr was picked on seed 0's test accuracy: the same gap on the other seeds only
        "acc_gap_vs_point_peft_points_other_seeds": {
            variant: statistics.mean(a for a, s in zip(table_["meft"]["accs"], table_["meft"]["seeds"]) if s != 0)
            - statistics.mean(a for a, s in zip(table_["point_peft"]["accs"], table_["point_peft"]["seeds"]) if s != 0)
            for variant, table_ in results.items()
        } if len(seeds) > 1 else None,
        "goals": {"peak_reduction_vs_full_pct": ">= 80", "acc_gap_vs_point_peft_points": ">= -1 on each shape set"},
        "seeds": list(seeds),
        "fast": fast_or_full(True, False),
        "batch": {"clouds": pb.activation_batch, "points": pb.num_points},
        **torch_environment(),
    }
    write_bench(NAME, payload)


if __name__ == "__main__":
    main()
