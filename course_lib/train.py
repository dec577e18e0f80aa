"""A small, seeded training and evaluation loop used by every notebook of the course.

The loop is the usual one (forward, loss, backward, AdamW step, learning-rate schedule), with
three choices that the PEFT methods rely on:

- only parameters with `requires_grad=True` go into the optimizer, so freezing a parameter is
  all it takes to leave it untouched (and to spend no optimizer memory on it);
- `loss_fn(model, batch) -> (loss, logits)` replaces the default cross-entropy, so a method can
  add a term (DEFT's density loss) or run a model with its own calling convention (points);
- everything random (initialisation, dropout, shuffling) is seeded by `set_seed(seed)` at the
  start, so two runs with the same seed give the same numbers.

Batches are HF-style dicts with a "labels" entry, or `(inputs, labels)` pairs.

Derived in notebooks/part1_foundations/02_peft_zoo.ipynb.
"""

from __future__ import annotations

import math
import os
import random
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from course_lib import config
from course_lib.batches import (  # re-exported: earlier home
    call_model,
    move_to_device,
    split_batch,
)
from course_lib.distributed import (
    rank_and_world,
    shard_evaluation_loader,
    shard_training_loader,
    sum_over_ranks,
)
from course_lib.results import write_json

__all__ = ["History", "default_loss", "evaluate", "move_to_device", "recalibrate_batch_norm", "set_seed", "split_batch", "train"]

LossFn = Callable[[nn.Module, Any], tuple[torch.Tensor, torch.Tensor | None]]


def set_seed(seed: int) -> None:
    """Seed Python's, NumPy's and torch's random number generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _call_model(model: nn.Module, inputs: Any) -> torch.Tensor:
    output = call_model(model, inputs)
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):  # Hugging Face ModelOutput
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find logits in the model output of type {type(output).__name__}; pass loss_fn=")


def default_loss(model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of the model's logits against the batch labels: returns (loss, logits)."""
    inputs, labels = split_batch(batch)
    logits = _call_model(model, inputs)  # (B, num_classes)
    if logits.dim() != 2 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"expected logits (batch, classes) for {labels.shape[0]} labels, got {tuple(logits.shape)}")
    return F.cross_entropy(logits, labels), logits


@dataclass
class History:
    """What a training run did, epoch by epoch (lists have one entry per epoch)."""

    train_loss: list[float] = field(default_factory=list)
    eval_accuracy: list[float] = field(default_factory=list)
    eval_loss: list[float] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)
    step_losses: list[float] = field(default_factory=list)  # one per optimizer step
    seconds_per_step: float = float("nan")  # median over all steps
    trainable_parameters: int = 0
    total_parameters: int = 0
    num_steps: int = 0
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        # NaN is not valid JSON: write null instead
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in data.items()}


def _schedule(kind: str | None, num_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Learning-rate multiplier per step: linear warm-up, then linear or cosine decay to 0."""
    if kind not in (None, "linear", "cosine", "constant"):
        raise ValueError(f"scheduler must be 'linear', 'cosine', 'constant' or None, got {kind!r}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind in (None, "constant"):
            return 1.0
        progress = (step - warmup_steps) / max(1, num_steps - warmup_steps)  # 0 -> 1
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _default_device(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Iterable[Any], loss_fn: LossFn | None = None, *, device: torch.device | str | None = None
) -> dict[str, float]:
    """Accuracy and mean loss of `model` over `loader`, in eval mode (the mode is restored).

    Under torch.distributed (`course_lib.distributed`) each rank evaluates its slice of a
    DataLoader's dataset and the sums are added over the ranks: every rank returns the figures
    of the whole set.

    Derived in notebooks/part1_foundations/02_peft_zoo.ipynb.
    """
    loss_fn = loss_fn or default_loss
    device = torch.device(device) if device is not None else _default_device(model)
    rank, world = rank_and_world()
    if world > 1 and isinstance(loader, DataLoader):
        loader = shard_evaluation_loader(loader, rank=rank, world=world)
    was_training = model.training
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    try:
        for batch in loader:
            batch = move_to_device(batch, device)
            _, labels = split_batch(batch)
            loss, logits = loss_fn(model, batch)
            n = labels.shape[0]
            total_loss += loss.detach().item() * n
            if logits is not None:
                correct += int((logits.argmax(-1) == labels).sum())
            count += n
    finally:
        model.train(was_training)
    if world > 1 and isinstance(loader, DataLoader):
        total_loss, correct, count = sum_over_ranks(total_loss, correct, count)
        correct, count = int(correct), int(count)
    if count == 0:
        raise ValueError("the evaluation loader is empty")
    return {"accuracy": correct / count, "loss": total_loss / count, "num_examples": count}


def train(
    model: nn.Module,
    train_loader: Iterable[Any],
    *,
    eval_loader: Iterable[Any] | None = None,
    num_epochs: int,
    lr: float,
    weight_decay: float = 0.0,
    loss_fn: LossFn | None = None,
    scheduler: str | None = "linear",
    warmup_ratio: float = 0.0,
    max_grad_norm: float | None = None,
    seed: int = config.SEED,
    progress: bool = True,
    results_path: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
) -> History:
    """Train `model` with AdamW on its trainable parameters; returns the History.

    `scheduler`: "linear" (decay to 0), "cosine", or None/"constant", after `warmup_ratio` of
    the steps of linear warm-up. `loss_fn(model, batch) -> (loss, logits)` defaults to
    cross-entropy on the logits (`output.logits` of HF models or a plain tensor). Evaluates
    on `eval_loader` after each epoch. With `results_path`, the history is written there as
    JSON (atomically) at the end. Call `set_seed` before building the model as well if its
    initialisation should be reproducible: `train` seeds again at its start, which fixes
    dropout and the shuffling of loaders without their own generator. A loader with its own
    generator (`make_loader(..., seed=)`) goes on from where its last iteration left it: build one
    per run when runs must not depend on what trained before them (a resumed notebook, a method
    comparison), as notebooks 02, 22, 23 and 32 do.

    Under `torchrun` (a torch.distributed process group initialised, `course_lib.distributed`):
    each rank trains on its shard of `train_loader` (a torch DataLoader; `batch_size` is per
    rank), the model is wrapped in `DistributedDataParallel` (gradients averaged over the ranks,
    so all ranks keep the same weights), the step losses are averaged over the ranks, evaluation
    covers the whole set, and only rank 0 shows progress and writes `results_path`. Every
    trainable parameter must get a gradient at every step (DDP's rule).

    Derived in notebooks/part1_foundations/02_peft_zoo.ipynb.
    """
    if num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1, got {num_epochs}")
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters (every requires_grad is False)")
    loss_fn = loss_fn or default_loss
    device = torch.device(device) if device is not None else _default_device(model)
    model.to(device)
    set_seed(seed)
    rank, world = rank_and_world()
    forward_model: nn.Module = model  # what the loss function calls: the model, or its DDP wrapper
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        train_loader = shard_training_loader(train_loader, seed=seed, rank=rank, world=world)  # type: ignore[arg-type]
        cuda_index = (device.index if device.index is not None else torch.cuda.current_device()) if device.type == "cuda" else None
        forward_model = DistributedDataParallel(model, device_ids=None if cuda_index is None else [cuda_index])

    steps_per_epoch = len(train_loader)  # type: ignore[arg-type]
    num_steps = steps_per_epoch * num_epochs
    warmup_steps = int(warmup_ratio * num_steps)
    # biases and norm weights (1-d) get no weight decay, as is usual for transformers
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(scheduler, num_steps, warmup_steps))

    history = History(
        trainable_parameters=sum(p.numel() for p in trainable),
        total_parameters=sum(p.numel() for p in model.parameters()),
        num_steps=num_steps,
        config={
            "num_epochs": num_epochs, "lr": lr, "weight_decay": weight_decay, "scheduler": scheduler,
            "warmup_ratio": warmup_ratio, "max_grad_norm": max_grad_norm, "seed": seed, "world_size": world,
        },
    )
    step_seconds: list[float] = []
    bar = tqdm(total=num_steps, desc="training", disable=not progress or rank != 0, leave=False)
    try:
        for epoch in range(num_epochs):
            model.train()
            epoch_start = time.perf_counter()
            losses = []
            sampler = getattr(train_loader, "sampler", None)
            if isinstance(sampler, DistributedSampler):
                sampler.set_epoch(epoch)  # a new shuffle of the shards every epoch
            for batch in train_loader:
                step_start = time.perf_counter()
                batch = move_to_device(batch, device)
                loss, _ = loss_fn(forward_model, batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
                optimizer.step()
                lr_schedule.step()
                step_seconds.append(time.perf_counter() - step_start)
                value = loss.detach().item()
                losses.append(value if world == 1 else sum_over_ranks(value)[0] / world)  # the global batch's mean
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{losses[-1]:.4f}")
            history.step_losses.extend(losses)
            history.train_loss.append(sum(losses) / max(1, len(losses)))
            history.epoch_seconds.append(time.perf_counter() - epoch_start)
            if eval_loader is not None:
                metrics = evaluate(model, eval_loader, loss_fn, device=device)
                history.eval_accuracy.append(metrics["accuracy"])
                history.eval_loss.append(metrics["loss"])
    finally:
        bar.close()
    history.seconds_per_step = statistics.median(step_seconds) if step_seconds else float("nan")
    if results_path is not None and rank == 0:
        write_json(results_path, history.to_dict())
    return history


@torch.no_grad()
def recalibrate_batch_norm(
    model: nn.Module,
    dataset: Any,
    *,
    batch_size: int = 32,
    forward: Callable[[nn.Module, Any], Any] | None = None,
) -> nn.Module:
    """Recompute every BatchNorm's running mean and variance over `dataset` with the final weights.

    "Precise BatchNorm" (Wu and Johnson, 2021): after training, the running statistics (an
    exponential average, momentum 0.1, of batch statistics seen while the weights moved) can lag
    behind the network; replacing them with a plain average over the training data fixes eval
    mode. BatchNorms that stay in eval mode under `model.train()` are left alone. `dataset`
    yields (inputs, label) pairs, or anything `forward(model, batch)` runs the
    model on (e.g. a model that also takes dataset indices). Returns the model in eval mode,
    momenta restored.

    Derived in notebooks/part2_point_peft/13_point_baselines.ipynb.
    """
    model.train()
    # only the BatchNorms that training updates: a sub-module that the model keeps in eval mode
    # while training (a frozen copy, e.g. Point-PEFT's query encoder) keeps its statistics
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    if not norms:
        raise ValueError("recalibrate_batch_norm: the model has no BatchNorm layer (in training mode) to recalibrate")
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()  # mean 0, variance 1, count 0
        norm.momentum = None  # None: a cumulative (plain) average over the batches
    try:
        for batch in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
            if forward is not None:
                forward(model, batch)
            else:
                model(split_batch(batch)[0])
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
    return model.eval()
