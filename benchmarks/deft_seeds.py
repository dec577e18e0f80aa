"""Notebook 22's DEFT table over three seeds: are its verdicts the seed's or the method's?

Notebook 22 trains LoRA, the Pfeiffer adapter and prefix tuning under the paper's protocol and the
course's masked recipe, each without and with the density loss, once (seed 0): what the book's CPU
budget allows. This benchmark trains the same twelve runs with `course_lib.deft.train_deft_run`
(the function the notebook calls, on the notebook's task, recipes and sizes) for seeds 0, 1 and 2
(the seed decides the new weights' initialisation, the data order and dropout) and reports, per
recipe and method, mean and sample std over the seeds of:

- test accuracy without and with the density loss, and the change (points);
- the relative density reduction by the three measures: all positions (the paper's), real tokens,
  padding positions;
- `collapsed_seeds`: on how many seeds the density-loss run ends at chance (within 1 point) while
  its plain twin learned (>= 10 points above chance), notebook 22's definition of a collapse.

Verdicts by the means: the largest reduction by the paper's measure, and which runs keep their
accuracy within 1 point of their plain twin (mean over seeds). Notebook 22 prints the table and
these verdicts when the benchmark has been run on this machine.

Runs go through notebook 22's run cache (`.cache/runs/<mode>/deft`, same keys): seed 0 is read back
when the notebook has run in this clone, and an interrupted benchmark resumes.

    .venv/bin/python -m benchmarks.deft_seeds [--workers 2] [--seeds 0 1 2]

Full mode: 2 recipes x 3 methods x 2 weights x 3 seeds = 36 runs, half of them short (the paper
protocol's 16 steps); 841 s for the three seeds with two workers on a 2-core machine (2026-12-07),
about 9 CPU minutes per seed.
"""

from __future__ import annotations

import functools
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from benchmarks.common import seeds_arguments, torch_environment, write_bench
from course_lib.config import fast_or_full

NAME = "deft_seeds"
METHODS = ("lora", "adapter", "prefix")
PROTOCOLS = ("paper", "masked")
MEASURES = ("all", "real", "padding")


def notebook_sizes() -> dict[str, int]:
    """Notebook 22's sizes: training, test and density sentences, and the paper protocol's split."""
    num_train, num_test, num_density = fast_or_full((48, 32, 16), (1280, 500, 96))
    return {"num_train": num_train, "num_test": num_test, "num_density": num_density,
            "num_paper_train": fast_or_full(32, 128)}  # fmt: skip


def notebook_recipes() -> dict[str, Any]:
    """Notebook 22's two recipes (its cell that defines `recipes` builds them the same way; it checks)."""
    from course_lib.deft import COURSE_RECIPE, course_recipe, paper_protocol

    return {
        "paper": paper_protocol(num_epochs=1, batch_size=8, lr=dict(COURSE_RECIPE.lr)),
        "masked": course_recipe(num_epochs=fast_or_full(1, 2), batch_size=fast_or_full(16, 32)),
    }


@functools.lru_cache(maxsize=1)
def notebook_setup() -> dict[str, Any]:
    """Notebook 22's task, tokenizer, pre-trained classifier, loaders and training splits, made as its
    setup cell makes them; once per worker process, one torch thread (as the notebook)."""
    import warnings

    import torch
    from transformers.utils import logging

    from course_lib.config import SEED
    from course_lib.text import (
        load_classifier,
        load_tokenizer,
        make_loader,
        make_sentiment_task,
    )
    from course_lib.text.data import TextSplit
    from course_lib.train import set_seed

    logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(1)
    sizes = notebook_sizes()
    task = make_sentiment_task(sizes["num_train"], 32, sizes["num_test"], seed=SEED)
    tokenizer = load_tokenizer()
    set_seed(SEED)
    pretrained = load_classifier(task.num_labels)
    density = TextSplit(task.test.texts[: sizes["num_density"]], task.test.labels[: sizes["num_density"]], task.test.label_names)
    paper = TextSplit(task.train.texts[: sizes["num_paper_train"]], task.train.labels[: sizes["num_paper_train"]], task.train.label_names)
    return {
        "task": task, "tokenizer": tokenizer, "pretrained": pretrained,
        "test_loader": make_loader(task.test, tokenizer, batch_size=125),
        "density_loader": make_loader(density, tokenizer, batch_size=32, pad_to_max_length=True, max_length=128),
        "train_splits": {"paper": paper, "masked": task.train},
    }  # fmt: skip


def run(protocol: str, method: str, weight: float, seed: int) -> dict[str, Any]:
    """One of notebook 22's runs on one seed (read back from its run cache when stored)."""
    from course_lib.deft import build_deft_model, deft_run_key, train_deft_run
    from course_lib.run_cache import RunCache

    setup, recipe = notebook_setup(), notebook_recipes()[protocol]
    split = setup["train_splits"][protocol]
    # the notebook's key: run(protocol, method, weight) passes lr=None (the recipe's rate)
    key = deft_run_key(setup["task"], recipe, method, weight=weight, lr=None, seed=seed, num_train=len(split),
                       num_density=notebook_sizes()["num_density"])  # fmt: skip
    cache = RunCache("deft")
    row, _ = cache.run_with_model(
        key,
        lambda: train_deft_run(setup["pretrained"], recipe, method, split, setup["tokenizer"], test_loader=setup["test_loader"],
                               density_loader=setup["density_loader"], weight=weight, seed=seed),
        rebuild=lambda: build_deft_model(setup["pretrained"], recipe, method),
    )  # fmt: skip
    print(f"{protocol:6s} {method:8s} w={weight:g} seed {seed}: accuracy {row['acc']:5.1f}%  density real "
          f"{row['density']['real']:.4f}{'  (read back)' if cache.hits else ''}", flush=True)  # fmt: skip
    return {"protocol": protocol, "method": method, "weight": weight, "seed": seed, "acc": row["acc"],
            "density": row["density"], "majority_share": row["majority_share"]}  # fmt: skip


def mean_std(values: list[float]) -> dict[str, Any]:
    return {"values": values, "mean": statistics.mean(values), "std": statistics.stdev(values)}


def summarise(rows: list[dict[str, Any]], seeds: list[int], num_labels: int) -> dict[str, Any]:
    """The per-(recipe, method) table over seeds and the verdicts by the means."""
    from course_lib.deft import relative_reduction

    recipes = notebook_recipes()
    by_key = {(r["protocol"], r["method"], r["weight"], r["seed"]): r for r in rows}
    chance = 100 / num_labels
    table: dict[str, dict[str, Any]] = {}
    for protocol in PROTOCOLS:
        weight = recipes[protocol].weight
        for method in METHODS:
            plain = [by_key[protocol, method, 0.0, s] for s in seeds]
            deft = [by_key[protocol, method, weight, s] for s in seeds]
            table[f"{protocol}/{method}"] = {
                "acc": mean_std([r["acc"] for r in plain]),
                "deft_acc": mean_std([r["acc"] for r in deft]),
                "accuracy_change_points": mean_std([d["acc"] - p["acc"] for p, d in zip(plain, deft, strict=True)]),
                "reduction": {m: mean_std([relative_reduction(p["density"][m], d["density"][m])
                                           for p, d in zip(plain, deft, strict=True)]) for m in MEASURES},
                "collapsed_seeds": sum(d["acc"] <= chance + 1.0 and p["acc"] >= chance + 10.0
                                       for p, d in zip(plain, deft, strict=True)),
            }  # fmt: skip
    best = max(table, key=lambda name: table[name]["reduction"]["all"]["mean"])
    kept = [name for name, row in table.items() if row["accuracy_change_points"]["mean"] >= -1.0]
    return {"table": table, "largest_reduction_all": best,
            "kept_accuracy_within_1_point": {name: table[name]["reduction"]["real"]["mean"] for name in kept}}


def main() -> None:
    args = seeds_arguments(__doc__.split("\n\n")[0])
    recipes = notebook_recipes()
    jobs = [(protocol, method, weight, seed) for seed in args.seeds for protocol in PROTOCOLS
            for method in METHODS for weight in (0.0, recipes[protocol].weight)]  # fmt: skip
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        rows = list(pool.map(run, *zip(*jobs)))
    write_bench(NAME, {
        "seconds": round(time.perf_counter() - start, 1),  # wall time of the runs (read-back runs cost ~nothing)
        "seeds": args.seeds, **summarise(rows, args.seeds, num_labels=notebook_setup()["task"].num_labels), "runs": rows,
        "recipes": {protocol: recipe.to_dict() for protocol, recipe in recipes.items()}, "sizes": notebook_sizes(),
        "measures": "exact non-zero fraction of the MLP activations, mean over the 6 layers, on the density split "
                    "padded to 128: all positions (the paper's), real tokens, padding positions",
        "fast": fast_or_full(True, False), "workers": args.workers, **torch_environment(),
    })  # fmt: skip


if __name__ == "__main__":
    main()
