"""One DEFT run as notebook 22 trains it: a PEFT method under a recipe, with or without the
density loss, then accuracy and the three densities (all positions, real tokens, padding).

    model = build_deft_model(pretrained, recipe, "lora")          # the copy training starts from
    row, model = train_deft_run(pretrained, recipe, "lora", train_split, tokenizer,
                                test_loader=test_loader, density_loader=density_loader, weight=1.0)

The row is plain JSON (what a table and `course_lib.run_cache` need); the model is returned beside
it so that later cells can look inside it. `benchmarks/deft_seeds.py` calls the same function for
seeds 1 and 2, so the notebook's table and the benchmark's are the same recipe.

Derived in notebooks/part3_deft/22_deft_in_practice.ipynb.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
from torch import nn

from course_lib import config
from course_lib.deft.density import measure_density_by_position
from course_lib.deft.recipe import DEFTRecipe

__all__ = ["build_deft_model", "deft_run_key", "train_deft_run"]


def build_deft_model(pretrained: nn.Module, recipe: DEFTRecipe, method: str) -> nn.Module:
    """A copy of `pretrained` with `recipe`'s options for `method` injected (untrained: LoRA's B and
    the adapter's up-projection are zero). Call `set_seed` first for a reproducible initialisation.

    Derived in notebooks/part3_deft/22_deft_in_practice.ipynb.
    """
    from course_lib.peft import inject_peft

    if method not in recipe.methods:
        raise KeyError(f"recipe {recipe.name!r} has no method {method!r}; it has {sorted(recipe.methods)}")
    model = copy.deepcopy(pretrained)
    inject_peft(model, **recipe.methods[method])
    return model


def deft_run_key(
    task: Any,
    recipe: DEFTRecipe,
    method: str,
    *,
    weight: float | None,
    lr: float | None,
    seed: int,
    num_train: int,
    num_density: int,
) -> dict[str, Any]:
    """The `course_lib.run_cache` key of one `train_deft_run`: the task's content and MiniLM's
    weights, the code that trains and measures, the recipe, the run's arguments, the sizes of the
    training and density splits, and torch's thread count (it changes the last bits).

    Derived in notebooks/part3_deft/22_deft_in_practice.ipynb.
    """
    import course_lib.deft
    import course_lib.meters
    import course_lib.peft
    import course_lib.text
    import course_lib.train
    from course_lib.run_cache import code_version
    from course_lib.text import text_run_key

    return {
        **text_run_key(task),
        "code": code_version(course_lib.deft, course_lib.peft, course_lib.train, course_lib.meters, course_lib.text),
        "recipe": recipe.to_dict(), "method": method, "weight": weight, "lr": lr, "seed": seed,
        "num_train": num_train, "num_density": num_density, "threads": torch.get_num_threads(),
    }  # fmt: skip


def train_deft_run(
    pretrained: nn.Module,
    recipe: DEFTRecipe,
    method: str,
    train_split: Any,
    tokenizer: Any,
    *,
    test_loader: Any,
    density_loader: Any,
    weight: float | None = None,
    lr: float | None = None,
    seed: int = config.SEED,
) -> tuple[dict[str, Any], nn.Module]:
    """Train `method` under `recipe` with the density loss at `weight` (None: the recipe's; 0: plain
    PEFT), then measure; returns (row, trained model in eval mode).

    `seed` decides the new weights' initialisation, the data order and dropout. The row: test
    accuracy % (`acc`), `density` (all / real / padding) and `per_layer` densities on
    `density_loader`, the last density and task losses, the share of the most predicted class
    (`majority_share`: a collapsed run predicts one class), seconds, steps, lr, weight.

    Derived in notebooks/part3_deft/22_deft_in_practice.ipynb.
    """
    from course_lib.meters import count_parameters
    from course_lib.train import default_loss, set_seed, train

    weight = recipe.weight if weight is None else weight
    lr = recipe.lr[method] if lr is None else lr
    set_seed(seed)
    model = build_deft_model(pretrained, recipe, method)
    loader = recipe.loader(train_split, tokenizer, shuffle=True, seed=seed)  # one per run: the same order whatever ran before
    loss_fn = recipe.loss(weight)  # None at weight 0: plain PEFT
    start = time.perf_counter()
    history = train(model, loader, lr=lr, loss_fn=loss_fn, progress=False, seed=seed, **recipe.train_options())
    model.eval()
    with torch.no_grad():
        batches = list(test_loader)
        predictions = torch.cat([default_loss(model, batch)[1].argmax(-1) for batch in batches])  # (num_test,)
        labels = torch.cat([batch["labels"] for batch in batches])
    density = measure_density_by_position(model, density_loader)
    num_labels = getattr(getattr(model, "config", None), "num_labels", None) or int(labels.max()) + 1  # HF config, else the labels seen
    row = {
        "acc": 100 * (predictions == labels).float().mean().item(),
        "density": density.as_dict(),
        "per_layer": {part: [v[part] for v in density.per_layer.values()] for part in ("all", "real", "padding")},
        "seconds": time.perf_counter() - start,
        "seconds_per_step": history.seconds_per_step,
        "steps": history.num_steps,
        "lr": lr,
        "weight": weight,
        "seed": seed,
        "trainable_params": count_parameters(model).trainable,
        "final_density_loss": loss_fn.density_losses[-1] if loss_fn else None,
        "final_task_loss": loss_fn.last_task_loss if loss_fn else history.step_losses[-1],  # last training batch
        "majority_share": predictions.bincount(minlength=num_labels).max().item() / len(predictions),
    }
    return row, model
