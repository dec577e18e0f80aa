"""The learning-rate sweep behind notebook 02's table: every method of the PEFT zoo trained with
the notebook's budget (2 epochs of 1,280 sentences, batch 32, AdamW, 10% warm-up, linear decay,
seed 0) at each candidate rate, and scored on the validation split (the test split is not
looked at). Notebook 02 reads `results/bench/lr_sweep.json`, prints it and checks that its
chosen rates are the sweep's best.

- `validation_accuracy[method][lr]`, `best_lr[method]` (ties: the smaller rate);
- `notebook_lr[method]`: the rate notebook 02 trains with; `agrees[method]`.

    .venv/bin/python -m benchmarks.lr_sweep [--workers 2]     # 30 runs of about notebook 02's length each (not yet timed)
"""

from __future__ import annotations

import argparse
import copy
import functools
import warnings
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import torch

from benchmarks.common import torch_environment, write_bench
from course_lib.config import SEED, fast_or_full

NAME = "lr_sweep"

#: notebook 02's methods: (how to make it, inject_peft options, the notebook's rate, the candidates)
METHODS: dict[str, tuple[str, dict[str, Any], float, tuple[float, ...]]] = {
    "full fine-tuning": ("full", {}, 2e-4, (5e-5, 1e-4, 2e-4, 5e-4)),
    "head only": ("head", {}, 3e-1, (3e-2, 1e-1, 3e-1, 1.0)),
    "LoRA (r=8, query+value)": ("peft", {"method": "lora", "r": 8, "alpha": 16}, 1e-2, (2e-3, 5e-3, 1e-2, 2e-2)),
    "Pfeiffer adapters": ("peft", {"method": "adapter", "placement": "pfeiffer"}, 1e-2, (2e-3, 5e-3, 1e-2, 3e-2)),
    "prefix tuning (P=20)": ("peft", {"method": "prefix_tuning", "num_virtual_tokens": 20}, 1e-1,
                             (3e-3, 1e-2, 3e-2, 1e-1, 3e-1)),
    "prompt tuning (P=20)": ("peft", {"method": "prompt_tuning", "num_virtual_tokens": 20, "init": "vocab"}, 1e-1,
                             (3e-2, 1e-1, 3e-1)),
    "BitFit": ("peft", {"method": "bitfit"}, 3e-3, (1e-3, 3e-3, 1e-2)),
    "(IA)³": ("peft", {"method": "ia3"}, 1e-1, (1e-2, 3e-2, 1e-1, 3e-1)),
}  # fmt: skip


@functools.lru_cache(maxsize=1)
def _setup() -> tuple[Any, Any, Any]:
    """The task, tokenizer and pre-trained classifier, once per worker process (notebook 02's)."""
    from transformers.utils import logging

    from course_lib.text import load_classifier, load_tokenizer, make_sentiment_task
    from course_lib.train import set_seed

    logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(1)
    num_train, num_validation, num_test = fast_or_full((16, 16, 32), (1280, 300, 500))
    task = make_sentiment_task(num_train, num_validation, num_test, seed=SEED)
    set_seed(SEED)
    return task, load_tokenizer(), load_classifier(task.num_labels)


def run(method: str, lr: float) -> tuple[str, float, float]:
    """Train `method` at `lr` with notebook 02's budget; (method, lr, validation accuracy)."""
    from course_lib.peft import inject_peft
    from course_lib.text import make_loader
    from course_lib.train import evaluate, set_seed, train

    task, tokenizer, pretrained = _setup()
    kind, options, _, _ = METHODS[method]
    set_seed(SEED)  # as notebook 02's make_model
    model = copy.deepcopy(pretrained)
    if kind == "head":
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name.startswith("classifier."))
    elif kind == "peft":
        inject_peft(model, **options)
    batch_size, num_epochs = fast_or_full(16, 32), fast_or_full(1, 2)
    loader = make_loader(task.train, tokenizer, batch_size=batch_size, shuffle=True, seed=SEED)
    train(model, loader, num_epochs=num_epochs, lr=lr, warmup_ratio=0.1, seed=SEED, progress=False)
    accuracy = evaluate(model, make_loader(task.validation, tokenizer, batch_size=128))["accuracy"]
    print(f"{method:24s} lr {lr:g}: validation accuracy {accuracy:.3f}", flush=True)
    return method, lr, accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--methods", nargs="*", default=list(METHODS), help="a subset of notebook 02's methods")
    args = parser.parse_args()
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {list(METHODS)}")
    jobs = [(method, lr) for method in args.methods for lr in METHODS[method][3]]
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        results = list(pool.map(run, *zip(*jobs)))
    accuracy: dict[str, dict[str, float]] = {method: {} for method in args.methods}
    for method, lr, value in results:
        accuracy[method][f"{lr:g}"] = value
    best = {method: min((float(lr) for lr, v in scores.items() if v == max(scores.values()))) for method, scores in accuracy.items()}
    notebook = {method: METHODS[method][2] for method in args.methods}
    write_bench(NAME, {
        "validation_accuracy": accuracy, "best_lr": best, "notebook_lr": notebook,
        "agrees": {method: best[method] == notebook[method] for method in args.methods},
        "budget": {"num_epochs": fast_or_full(1, 2), "batch_size": fast_or_full(16, 32), "seed": SEED,
                   "warmup_ratio": 0.1, "scheduler": "linear", "split": "validation"},
        "fast": fast_or_full(True, False), "workers": args.workers, **torch_environment(),
    })  # fmt: skip


if __name__ == "__main__":
    main()
