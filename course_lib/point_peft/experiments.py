"""The fine-tuning settings that notebook 16 compares, as functions a worker process can run.

Derived in notebooks/part2_point_peft/16_point_peft_results.ipynb (the recipe itself in
13_point_baselines.ipynb). What a run *is* (settings, `PointRecipe`, `SettingRun`, the tiny
sizes, the augmentations) lives in `course_lib.point_peft.recipes` and is re-exported here;
this module builds, trains and measures runs, alone or in a process pool.

One *run* is (setting, seed, recipe): build the model for the setting from the shipped
pretrained tiny Point-MAE (or from scratch), fine-tune it on a shape variant, and measure
test accuracy, trainable share, seconds per epoch and activation memory per step:

    row = run_setting(SettingRun("point_peft", seed=0, recipe=PointRecipe()))
    rows = run_settings([SettingRun(s, seed, recipe) for s in SETTINGS for seed in (0, 1, 2)], workers=2)
    table = summarize(rows)                    # {setting: {"acc_mean", "acc_std", ...}}

The recipe (notebook 13): one epoch that trains only the parts the checkpoint does not have
(head, CLS token and position), then `num_epochs` that train the setting's set, AdamW with
cosine decay and warm-up, scale + up-axis rotation augmentation on the scans; after training
the BatchNorm statistics are recomputed over the training set ("precise BN",
`course_lib.train.recalibrate_batch_norm`) before testing.

Sizes for the tiny backbone (C = 128, a third of the paper's 384): the head's hidden width and
the bottlenecks are scaled down with it, `TINY_HEAD_HIDDEN_DIM = 48` (paper 256 at C = 384) and
`tiny_point_peft_config()` with C -> 4 -> C adapter and retrieval bottlenecks (paper 16 and 8),
and adapters that start as the identity, without the anchor term (see the function).
With them Point-PEFT trains 4.8% of the parameters (the official sizes: 15.5%, a third of it the
head). All settings use the same head, so their accuracies compare like for like.

Runs are independent and seeded, so `run_settings` can spread them over worker processes (one
torch thread each): on a 2-core laptop two workers finish a grid in about half the time, and
every result is the same as in one process.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import multiprocessing
import statistics
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from course_lib import config
from course_lib.meft import MEFTConfig, meft
from course_lib.meters import (
    count_parameters,
    measure_activation_memory,
    measure_peak_memory,
)
from course_lib.peft import inject_peft
from course_lib.point_peft.memory_bank import build_memory_bank
from course_lib.point_peft.model import PointPEFTModel
from course_lib.point_peft.recipes import (  # re-exported: their earlier home
    LORA_TARGETS,
    NEW_PARTS,
    REVERSIBLE_SETTINGS,
    SETTINGS,
    TINY_HEAD_HIDDEN_DIM,
    TINY_POINT_PEFT_OVERRIDES,
    PointRecipe,
    SettingRun,
    clean_augmentation,
    results_recipe,
    scan_augmentation,
    tiny_point_peft_config,
)
from course_lib.points.checkpoint import (
    default_checkpoint_path,
    load_pretrained_point_mae,
)
from course_lib.points.datasets import load_shapes, shapes_path
from course_lib.points.point_mae import (
    ClassificationHead,
    PointMAEConfig,
    PointMAEEncoder,
    extract_features,
)
from course_lib.points.pretrain import linear_probe_accuracy
from course_lib.run_cache import RunCache, code_version, file_version
from course_lib.train import evaluate, recalibrate_batch_norm, set_seed, train

__all__ = [
    "REVERSIBLE_SETTINGS",
    "SETTINGS",
    "TINY_HEAD_HIDDEN_DIM",
    "TINY_POINT_PEFT_OVERRIDES",
    "PointRecipe",
    "SettingRun",
    "build_setting",
    "clean_augmentation",
    "fit_head_on_features",
    "recipe_model_config",
    "results_recipe",
    "run_setting",
    "run_settings",
    "scan_augmentation",
    "setting_run_key",
    "step_peak_memory",
    "summarize",
    "tiny_point_peft_config",
]

class _DictDataset(Dataset):
    """(points, label) items as {"points", "labels"} dicts, plus "indices" (the bank rows) and
    "query_features" (row `index` of `query_features` (S, C): the item's retrieval query, given)."""

    def __init__(self, dataset: Dataset, with_indices: bool, query_features: Tensor | None = None) -> None:
        if query_features is not None and len(query_features) != len(dataset):
            raise ValueError(f"{len(query_features)} query features for {len(dataset)} items")
        self.dataset, self.with_indices, self.query_features = dataset, with_indices, query_features

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        points, label = self.dataset[index]
        item = {"points": points, "labels": label}
        if self.with_indices:
            item["indices"] = index
        if self.query_features is not None:
            item["query_features"] = self.query_features[index]
        return item


def _is_new_part(name: str) -> bool:
    return name.removeprefix("encoder.").startswith(NEW_PARTS)


def recipe_model_config(recipe: PointRecipe, num_classes: int) -> PointMAEConfig:
    """The checkpoint's encoder sizes with the recipe's head (what `build_setting` takes).

    Derived in notebooks/part2_point_peft/16_point_peft_results.ipynb.
    """
    base = load_pretrained_point_mae(progress=False).config
    return dataclasses.replace(
        base, num_classes=num_classes, head_hidden_dim=recipe.head_hidden_dim, head_dropout=recipe.head_dropout
    )


def build_setting(
    run: SettingRun, model_config: PointMAEConfig, bank_train_set: Dataset | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """The model of `run.setting`, seeded with `run.seed`, and facts about it.

    Returns (model, info) with info["trainable"] / info["total"] (the probe: its C x classes
    weights on top of the frozen encoder; Point-PEFT: its report, the query-encoder copy aside),
    info["uses_indices"] (the model takes the batch's bank rows). `bank_train_set` (the
    un-augmented training set) is needed by the settings that retrieve from a memory bank.

    Derived in notebooks/part2_point_peft/16_point_peft_results.ipynb.
    """
    set_seed(run.seed)
    if run.setting == "from_scratch":
        model = PointMAEEncoder(model_config)
    else:
        model = load_pretrained_point_mae(config=model_config, progress=False)  # CLS and head: fresh, seeded
    info: dict[str, Any] = {"uses_indices": False}
    if run.setting in ("from_scratch", "full_finetune"):
        report = count_parameters(model)
        info.update(trainable=report.trainable, total=report.total)
    elif run.setting == "linear_probe":
        head = count_parameters(model.head).total
        probe = model_config.dim * model_config.num_classes + model_config.num_classes
        total = count_parameters(model).total - head + probe
        info.update(trainable=probe, total=total)
    elif run.setting in REVERSIBLE_SETTINGS:
        model, _ = meft(model, run.meft or MEFTConfig("meft1"))  # adapters, CLS token, final norm, head train
        report = count_parameters(model)
        info.update(trainable=report.trainable, total=report.total)
    elif run.setting == "lora":
        rank = run.recipe.lora_rank
        inject_peft(model, "lora", r=rank, alpha=2.0 * rank, target_modules=LORA_TARGETS, trainable_modules=None)
        for name, parameter in model.named_parameters():  # + the parts Point-PEFT trains too, biases aside
            if _is_new_part(name) or name.startswith("norm."):
                parameter.requires_grad_(True)
        report = count_parameters(model)
        info.update(trainable=report.trainable, total=report.total)
    else:
        base = run.point_peft or tiny_point_peft_config()
        if run.setting == "prompt_only":
            peft_config = dataclasses.replace(base, use_adapter=False, use_prompt=True)
        elif run.setting == "adapter_only":
            peft_config = dataclasses.replace(base, use_prompt=False, use_adapter=True)
        else:
            peft_config = base
        bank = None
        if peft_config.uses_bank:
            if bank_train_set is None:
                raise ValueError(f"setting {run.setting!r} retrieves from a memory bank: pass bank_train_set")
            bank = build_memory_bank(model, bank_train_set, info={"variant": run.recipe.variant, "split": "train"})
        model = PointPEFTModel(model, peft_config, bank)
        report = model.report()
        info.update(trainable=report.trainable, total=report.total, uses_indices=peft_config.uses_bank)
    return model, info


def _classification_loss(model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    logits = model(**inputs)  # (B, classes)
    return F.cross_entropy(logits, batch["labels"]), logits


def _forward_for_batch_norm(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    return model(**{key: value for key, value in batch.items() if key != "labels"})


def _classification_head(model: nn.Module) -> ClassificationHead:
    heads = [m for m in model.modules() if isinstance(m, ClassificationHead)]
    if len(heads) != 1:
        raise ValueError(f"expected one ClassificationHead in the model, found {len(heads)}")
    return heads[0]


def fit_head_on_features(
    model: nn.Module, dataset: Dataset, *, epochs: int, lr: float, weight_decay: float, batch_size: int = 32,
    seed: int = 0, with_indices: bool = False, query_features: Tensor | None = None,
) -> list[float]:  # fmt: skip
    """Fit the model's `ClassificationHead` alone on the head inputs [CLS, max over tokens] (2C) of
    `dataset`, computed once with the model in eval mode (no augmentation). Returns the mean loss
    per epoch. The rest of the model is untouched; the head ends in train mode. `query_features`
    (S, C), row i for `dataset[i]`: retrieval queries given to the model instead of computed
    (a Point-PEFT model's own bank rows, when `dataset` is the bank's training set).

    Derived in notebooks/part2_point_peft/16_point_peft_results.ipynb.
    """
    head = _classification_head(model)
    captured: list[Tensor] = []
    hook = head.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach()))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in DataLoader(_DictDataset(dataset, with_indices, query_features), batch_size=64):
                _forward_for_batch_norm(model, batch)
    finally:
        hook.remove()
        model.train(was_training)
    tokens = torch.cat(captured)  # (S, 1+G, C)
    features = torch.cat([tokens[:, 0], tokens[:, 1:].amax(dim=1)], dim=-1)  # the head's input  (S, 2C)
    labels = torch.as_tensor([dataset[i][1] for i in range(len(dataset))])
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    head.train()
    losses = []
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        total = 0.0
        for start in range(0, len(order) - batch_size + 1, batch_size):  # full batches (BatchNorm)
            chosen = order[start : start + batch_size]
            loss = F.cross_entropy(head.mlp(features[chosen]), labels[chosen])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(chosen)
        losses.append(total / (len(order) // batch_size * batch_size))
    return losses


def _linear_probe(model: PointMAEEncoder, train_set: Dataset, test_set: Dataset) -> dict[str, Any]:
    start = time.perf_counter()
    train_features, train_labels = extract_features(model, train_set, batch_size=64)
    feature_seconds = time.perf_counter() - start
    test_features, test_labels = extract_features(model, test_set, batch_size=64)
    accuracy = linear_probe_accuracy(train_features, train_labels, test_features, test_labels)
    # one pass over the training set is the probe's "epoch"; nothing is stored for a backward
    return {"acc": accuracy, "sec_per_epoch": feature_seconds, "activation_mib": 0.0, "train_loss": []}


def _fine_tune(model: nn.Module, run: SettingRun, info: dict[str, Any], train_set: Dataset, plain_train_set: Dataset,
               test_set: Dataset) -> dict[str, Any]:  # fmt: skip
    recipe = run.recipe
    with_indices = info["uses_indices"]
    # Retrieval queries of the un-augmented clouds, computed once per run: the frozen query
    # encoder's feature of a cloud never changes, so the plain training set reads its own bank
    # rows (the bank holds exactly those features) and the test set is encoded once, instead of
    # one query-encoder pass per forward (head fit, both evaluations, precise BN). The augmented
    # training batches are untouched (bank_query_in_training decides what they query with).
    train_queries = test_queries = None
    if with_indices:
        train_queries = model.bank_features  # (S, C): row i is plain_train_set[i]
        test_queries, _ = extract_features(model.query_encoder, test_set, batch_size=64)  # (S_test, C)
    plain_train_items = _DictDataset(plain_train_set, with_indices, train_queries)
    train_loader = DataLoader(
        _DictDataset(train_set, with_indices), batch_size=recipe.batch_size, shuffle=True, drop_last=True,
        generator=torch.Generator().manual_seed(run.seed),
    )  # fmt: skip
    lr = recipe.lr if run.setting in ("from_scratch", "full_finetune") else recipe.peft_lr
    setting_trains = {name for name, p in model.named_parameters() if p.requires_grad}  # the setting's set
    head_fit_losses = []
    if recipe.head_fit_epochs:
        set_seed(run.seed)
        head_fit_losses = fit_head_on_features(
            model, plain_train_set, epochs=recipe.head_fit_epochs, lr=recipe.lr, weight_decay=recipe.weight_decay,
            batch_size=recipe.batch_size, seed=run.seed, with_indices=with_indices, query_features=train_queries,
        )  # fmt: skip
    histories = []
    for phase, num_epochs in (("head", recipe.head_epochs), ("setting", recipe.num_epochs)):
        if num_epochs == 0:
            continue
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name in setting_trains and (phase == "setting" or _is_new_part(name)))
        histories.append(train(
            model, train_loader, num_epochs=num_epochs, loss_fn=_classification_loss, lr=lr,
            weight_decay=recipe.weight_decay, scheduler="cosine", warmup_ratio=recipe.warmup_ratio,
            seed=run.seed, progress=False,
        ))  # fmt: skip

    # activation memory of one training step: tensors saved for backward, parameters excluded
    model.train()
    batch = next(iter(DataLoader(plain_train_items, batch_size=recipe.activation_batch)))
    memory = measure_activation_memory(lambda: _classification_loss(model, batch)[0], model, backward=False)

    test_loader = DataLoader(_DictDataset(test_set, False, test_queries), batch_size=64)
    measured: dict[str, Any] = {}
    if recipe.running_stats_accuracy or not recipe.precise_batch_norm:
        measured["acc_running_bn_stats"] = evaluate(model, test_loader, _classification_loss)["accuracy"]
    if recipe.precise_batch_norm:
        recalibrate_batch_norm(model, plain_train_items, batch_size=recipe.batch_size,
                               forward=_forward_for_batch_norm)  # fmt: skip
        measured["acc"] = evaluate(model, test_loader, _classification_loss)["accuracy"]
    else:
        measured["acc"] = measured["acc_running_bn_stats"]  # nothing recomputed: one test pass
    if recipe.peak_memory:
        measured.update(step_peak_memory(model, batch))
    setting_history = histories[-1]
    return {
        **measured,
        "sec_per_epoch": statistics.median(setting_history.epoch_seconds),
        "sec_per_step": setting_history.seconds_per_step,
        "activation_mib": memory.activation_mib,
        "train_loss": [loss for history in histories for loss in history.train_loss],
        "head_fit_loss": head_fit_losses,
        "lr": lr,
    }


def step_peak_memory(model: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
    """Peak of live allocated bytes of one steady-state training step (forward, backward, AdamW
    with its state) on `batch` ({"points", "labels"}, plus "indices" for Point-PEFT), measured on a
    copy of `model`: {"peak_allocated_mib", "peak_minus_weights_mib", "peak_by_category_mib"}.

    Derived in notebooks/part4_meft/33_reversible_point_transformer.ipynb.
    """
    model = copy.deepcopy(model).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        _classification_loss(model, batch)[0].backward()
        optimizer.step()

    step()  # AdamW's state exists from now on
    report = measure_peak_memory(step)
    return {"peak_allocated_mib": report.peak_mib, "peak_minus_weights_mib": report.peak_minus_weights_mib,
            "peak_by_category_mib": {name: value / 2**20 for name, value in report.by_category.items()}}  # fmt: skip


def run_setting(run: SettingRun) -> dict[str, Any]:
    """Build, fine-tune and test one run; a JSON-ready row (accuracy in [0, 1]).

    Keys: setting, label, seed, variant, acc, trainable, total, trainable_pct, sec_per_epoch,
    activation_mib (one training step at `recipe.activation_batch` shapes, parameters excluded;
    0 for the probe), peak_allocated_mib / peak_minus_weights_mib / peak_by_category_mib (with
    `recipe.peak_memory`), train_loss (per epoch), seconds (the whole run); acc_running_bn_stats (the
    accuracy before precise BN) when the recipe asks for it.

    Derived in notebooks/part2_point_peft/16_point_peft_results.ipynb.
    """
    start = time.perf_counter()
    recipe = run.recipe
    test_set = load_shapes(recipe.variant, "test", num_points=recipe.num_points, max_per_class=recipe.test_per_class)
    plain_train_set = load_shapes(recipe.variant, "train", num_points=recipe.num_points,
                                  max_per_class=recipe.train_per_class)  # fmt: skip
    augmentation = scan_augmentation if recipe.variant != "clean" else clean_augmentation
    train_set = load_shapes(recipe.variant, "train", num_points=recipe.num_points,
                            max_per_class=recipe.train_per_class, transform=augmentation)  # fmt: skip
    model_config = recipe_model_config(recipe, test_set.num_classes)
    model, info = build_setting(run, model_config, bank_train_set=plain_train_set)
    if run.setting == "linear_probe":
        measured = _linear_probe(model, plain_train_set, test_set)
    else:
        measured = _fine_tune(model, run, info, train_set, plain_train_set, test_set)
    return {
        "setting": run.setting,
        "label": run.name,
        "seed": run.seed,
        "variant": recipe.variant,
        "trainable": info["trainable"],
        "total": info["total"],
        "trainable_pct": 100.0 * info["trainable"] / info["total"],
        **measured,
        "point_peft": (run.point_peft or tiny_point_peft_config()).to_dict()
        if run.setting in ("prompt_only", "adapter_only", "point_peft")
        else None,
        "meft": (run.meft or MEFTConfig("meft1")).to_dict() if run.setting in REVERSIBLE_SETTINGS else None,
        "seconds": time.perf_counter() - start,
    }


def setting_run_key(run: SettingRun) -> dict[str, Any]:
    """Everything that decides `run_setting(run)`'s row, as a `RunCache` key: the run (setting,
    seed, label, recipe, Point-PEFT options), the versions of its shape set and of the shipped
    checkpoint, the code of the modules it runs, and the fast switch.

    Derived in notebooks/part2_point_peft/16_point_peft_results.ipynb.
    """
    import course_lib.meft
    import course_lib.meters
    import course_lib.peft
    import course_lib.point_peft
    import course_lib.points
    import course_lib.train

    point_peft = run.point_peft or tiny_point_peft_config()
    modules = [course_lib.point_peft, course_lib.points, course_lib.train, course_lib.peft, course_lib.meters]
    if run.setting in REVERSIBLE_SETTINGS:
        modules.append(course_lib.meft)
    return {
        "run": {
            "setting": run.setting,
            "seed": run.seed,
            "label": run.name,
            "recipe": run.recipe.to_dict(),
            "point_peft": point_peft.to_dict() if run.setting in ("prompt_only", "adapter_only", "point_peft") else None,
            "meft": (run.meft or MEFTConfig("meft1")).to_dict() if run.setting in REVERSIBLE_SETTINGS else None,
        },
        "data": file_version(shapes_path(run.recipe.variant)),
        "checkpoint": file_version(default_checkpoint_path()),
        "code": code_version(*modules),
        "fast": config.is_fast(),
    }


def run_settings(
    runs: Sequence[SettingRun],
    *,
    workers: int = 1,
    progress: bool = True,
    threads_per_worker: int = 1,
    cache: RunCache | None = None,
) -> list[dict[str, Any]]:
    """`run_setting` for every run, in `workers` processes (1: in this process); rows in `runs` order.

    Each worker process runs torch on `threads_per_worker` threads (small matrices: one thread
    each and one process per core beats two threads in one process on a shared machine).
    With a `cache` (`course_lib.run_cache.RunCache`), a run whose `setting_run_key` is stored is
    read back instead of trained, and every run is stored the moment it finishes: an execution
    stopped by a timeout, a crash or Ctrl-C loses only the runs that were still training.

    Derived in notebooks/part2_point_peft/16_point_peft_results.ipynb.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    runs = list(runs)
    rows: list[dict[str, Any] | None] = [None] * len(runs)
    keys = [setting_run_key(run) for run in runs] if cache is not None else []
    todo = []
    for i in range(len(runs)):
        stored = cache.get(keys[i]) if cache is not None else None
        if stored is None:
            todo.append(i)
        else:
            rows[i] = stored
            cache.hits += 1  # type: ignore[union-attr]

    def finish(i: int, row: dict[str, Any]) -> None:
        rows[i] = row
        if cache is not None:
            cache.put(keys[i], row)
            cache.misses += 1

    if workers == 1 or len(todo) <= 1:
        for i in tqdm(todo, disable=not progress, desc="runs"):
            finish(i, run_setting(runs[i]))
        return rows  # type: ignore[return-value]
    context = multiprocessing.get_context("spawn")  # fresh interpreters: safe from a notebook kernel
    initializer = functools.partial(torch.set_num_threads, threads_per_worker)  # picklable, unlike a lambda
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=initializer)
    try:
        futures = {pool.submit(run_setting, runs[i]): i for i in todo}
        for future in tqdm(as_completed(futures), total=len(futures), disable=not progress, desc="runs"):
            finish(futures[future], future.result())
    except BaseException:
        # Ctrl-C, a cell timeout or a failed run: drop the queued runs and stop the running ones
        # now (the finished ones are stored), instead of waiting for the whole grid to finish.
        workers_running = list((getattr(pool, "_processes", None) or {}).values())  # before shutdown clears it
        pool.shutdown(wait=False, cancel_futures=True)
        for process in workers_running:
            process.terminate()
        raise
    pool.shutdown()
    return rows  # type: ignore[return-value]


def summarize(rows: Iterable[dict[str, Any]], key: str = "label") -> dict[str, dict[str, Any]]:
    """Group rows by `key` (label by default): mean and sample std of accuracy over seeds, and the
    means of trainable %, seconds per epoch and activation MiB. Accuracy stays in [0, 1].

    Derived in notebooks/part2_point_peft/16_point_peft_results.ipynb.
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row[key], []).append(row)
    table = {}
    for name, group in groups.items():
        accuracies = [row["acc"] for row in group]
        table[name] = {
            "setting": group[0]["setting"],
            "acc_mean": statistics.fmean(accuracies),
            "acc_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            "accs": accuracies,
            "seeds": [row["seed"] for row in group],
            "trainable_pct": statistics.fmean(row["trainable_pct"] for row in group),
            "trainable": group[0]["trainable"],
            "total": group[0]["total"],
            "sec_per_epoch": statistics.fmean(row["sec_per_epoch"] for row in group),
            "activation_mib": statistics.fmean(row["activation_mib"] for row in group),
        }
    return table
