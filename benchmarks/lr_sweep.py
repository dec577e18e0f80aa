"""The learning-rate sweeps behind notebooks 02 and 32 (and 22, which trains with notebook 02's rates).

`--notebook 02` (the default): every method of the PEFT zoo trained with notebook 02's budget (2
epochs of 1,280 sentences, batch 32, AdamW, 10% warm-up, linear decay, seed 0) at each candidate
rate, scored on the validation split (the test split is not looked at). Writes
`results/bench/lr_sweep.json`; notebook 02 prints it and checks that its chosen rates are the
sweep's best, and notebook 22 cites it for the rates its course recipe takes from notebook 02.

`--notebook 32`: LoRA, the Pfeiffer adapter and MEFT1-3 with notebook 32's budget (4 epochs, the
rest as above) at each candidate rate; writes `results/bench/lr_sweep_meft.json`. Notebook 32
trains LoRA and the adapter at the rates this sweep picks, and MEFT1-3 at one untuned rate: the
sweep says what tuning MEFT's rate would change.

- `validation_accuracy[method][lr]`, `best_lr[method]` (ties: the smaller rate);
- `notebook_lr[method]`: the rate the notebook trains with; `agrees[method]`.

    .venv/bin/python -m benchmarks.lr_sweep [--notebook 02|32] [--workers 2]
"""

from __future__ import annotations

import argparse
import copy
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from benchmarks.common import text_task_and_classifier, torch_environment, write_bench
from benchmarks.meft_seeds import RECIPES as MEFT_RECIPES
from course_lib.config import SEED, fast_or_full

NAME = "lr_sweep"

#: notebook 02's methods: (how to make it, inject_peft options, the notebook's rate, the candidates);
#: tests/test_benchmarks_lr_sweep.py checks the methods, options and rates against the notebook's `recipes`
METHODS: dict[str, tuple[str, dict[str, Any], float, tuple[float, ...]]] = {
    "full fine-tuning": ("full", {}, 2e-4, (5e-5, 1e-4, 2e-4, 5e-4)),
    "head only": ("head", {}, 3e-2, (1e-2, 3e-2, 1e-1, 3e-1, 1.0)),
    "LoRA (r=8, query+value)": ("peft", {"method": "lora", "r": 8, "alpha": 16}, 5e-3, (2e-3, 5e-3, 1e-2, 2e-2)),
    "Pfeiffer adapters": ("peft", {"method": "adapter", "placement": "pfeiffer"}, 5e-3, (2e-3, 5e-3, 1e-2, 3e-2)),
    "prefix tuning (P=20)": ("peft", {"method": "prefix_tuning", "num_virtual_tokens": 20}, 1e-1,
                             (3e-3, 1e-2, 3e-2, 1e-1, 3e-1)),
    "prompt tuning (P=20)": ("peft", {"method": "prompt_tuning", "num_virtual_tokens": 20, "init": "vocab"}, 1e-2,
                             (3e-3, 1e-2, 3e-2, 1e-1, 3e-1)),
    "BitFit": ("peft", {"method": "bitfit"}, 1e-2, (1e-3, 3e-3, 1e-2, 3e-2)),
    "(IA)³": ("peft", {"method": "ia3"}, 3e-2, (1e-2, 3e-2, 1e-1, 3e-1)),
}  # fmt: skip

#: notebook 32's sweep: the candidates per method; the method, its options and the notebook's rate
#: are benchmarks/meft_seeds.py's copy of notebook 32's recipes (one copy, tested against the notebook)
_MEFT_CANDIDATES: dict[str, tuple[float, ...]] = {
    "lora": (3e-3, 5e-3, 1e-2),
    "adapter": (3e-3, 5e-3, 1e-2),
    "meft1": (3e-3, 1e-2, 3e-2),
    "meft2": (3e-3, 1e-2, 3e-2),
    "meft3": (3e-3, 1e-2, 3e-2),
}
MEFT_METHODS: dict[str, tuple[str, dict[str, Any], float, tuple[float, ...]]] = {
    name: (*MEFT_RECIPES[name], candidates) for name, candidates in _MEFT_CANDIDATES.items()
}

#: per notebook: its methods, epochs (fast, full), the JSON's name
NOTEBOOKS = {"02": (METHODS, (1, 2), NAME), "32": (MEFT_METHODS, (1, 4), "lr_sweep_meft")}


def run(notebook: str, method: str, lr: float) -> tuple[str, float, float]:
    """Train `method` at `lr` with the notebook's budget; (method, lr, validation accuracy)."""
    from course_lib.meft import build_method
    from course_lib.peft import inject_peft
    from course_lib.text import make_loader
    from course_lib.train import evaluate, set_seed, train

    task, tokenizer, pretrained = text_task_and_classifier()
    methods, epochs, _ = NOTEBOOKS[notebook]
    kind, options, _, _ = methods[method]
    set_seed(SEED)  # as notebook 02's make_model and notebook 32's fine_tune
    if notebook == "32":
        model = build_method(kind, pretrained.eval(), **options)
    else:
        model = copy.deepcopy(pretrained)
        if kind == "head":
            for name, parameter in model.named_parameters():
                parameter.requires_grad_(name.startswith("classifier."))
        elif kind == "peft":
            inject_peft(model, **options)
    batch_size, num_epochs = fast_or_full(16, 32), fast_or_full(*epochs)
    loader = make_loader(task.train, tokenizer, batch_size=batch_size, shuffle=True, seed=SEED)
    train(model, loader, num_epochs=num_epochs, lr=lr, warmup_ratio=0.1, seed=SEED, progress=False)
    accuracy = evaluate(model, make_loader(task.validation, tokenizer, batch_size=128))["accuracy"]
    print(f"{method:24s} lr {lr:g}: validation accuracy {accuracy:.3f}", flush=True)
    return method, lr, accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--notebook", choices=sorted(NOTEBOOKS), default="02", help="whose sweep (default 02)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--methods", nargs="*", help="a subset of the notebook's methods (default: all)")
    parser.add_argument("--reuse", action="store_true",
                        help="keep the accuracies an earlier run of the same sweep (same notebook, budget and mode) "
                             "measured, and train only the (method, rate) pairs it lacks, e.g. after a grid was extended")  # fmt: skip
    args = parser.parse_args()
    methods, epochs, name = NOTEBOOKS[args.notebook]
    args.methods = args.methods or list(methods)
    unknown = [m for m in args.methods if m not in methods]
    if unknown:
        raise SystemExit(f"unknown methods {unknown} for notebook {args.notebook}; choose from {list(methods)}")
    budget = {"num_epochs": fast_or_full(*epochs), "batch_size": fast_or_full(16, 32), "seed": SEED,
              "warmup_ratio": 0.1, "scheduler": "linear", "split": "validation"}  # fmt: skip
    earlier = _earlier_accuracies(name, budget) if args.reuse else {}
    accuracy, reused, pairs = plan(methods, args.methods, earlier)
    jobs = [(args.notebook, method, lr) for method, lr in pairs]
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        results = list(pool.map(run, *zip(*jobs))) if jobs else []
    for method, lr, value in results:
        accuracy[method][f"{lr:g}"] = value
    accuracy = {method: dict(sorted(scores.items(), key=lambda item: float(item[0]))) for method, scores in accuracy.items()}
    best = {method: min((float(lr) for lr, v in scores.items() if v == max(scores.values()))) for method, scores in accuracy.items()}
    notebook = {method: methods[method][2] for method in args.methods}
    write_bench(name, {
        "validation_accuracy": accuracy, "best_lr": best, "notebook_lr": notebook,
        "agrees": {method: best[method] == notebook[method] for method in args.methods},
        "notebook": args.notebook, "budget": budget, "trained": len(jobs), "reused_from_earlier_run": reused,
        "fast": fast_or_full(True, False), "workers": args.workers, **torch_environment(),
    })  # fmt: skip


def plan(methods: dict[str, tuple], names: list[str], earlier: dict[str, dict[str, float]]
         ) -> tuple[dict[str, dict[str, float]], list[str], list[tuple[str, float]]]:
    """What `--reuse` keeps and what is left to train: ({method: {rate: accuracy kept}}, the kept
    pairs as "method @ rate", the (method, rate) pairs to train). `earlier` is an earlier run's
    `validation_accuracy` ({} without `--reuse`); rates are keyed as `f"{lr:g}"`."""
    accuracy: dict[str, dict[str, float]] = {method: {} for method in names}
    reused, to_train = [], []
    for method in names:
        for lr in methods[method][3]:
            if f"{lr:g}" in earlier.get(method, {}):
                accuracy[method][f"{lr:g}"] = earlier[method][f"{lr:g}"]
                reused.append(f"{method} @ {lr:g}")
            else:
                to_train.append((method, lr))
    return accuracy, reused, to_train


def _earlier_accuracies(name: str, budget: dict) -> dict[str, dict[str, float]]:
    """The validation accuracies of an earlier run of this sweep with the same budget and mode, if any."""
    import json

    from course_lib.results import results_path

    path = results_path(name, subdir="bench")
    if not path.exists():
        return {}
    earlier = json.loads(path.read_text())
    if earlier.get("budget") != budget or earlier.get("fast") != fast_or_full(True, False):
        return {}
    return earlier.get("validation_accuracy", {})


if __name__ == "__main__":
    main()
