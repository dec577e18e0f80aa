"""Masked-autoencoder pretraining of the tiny Point-MAE, its checkpoint, and a linear probe.

Derived in notebooks/part2_point_peft/12_point_mae.ipynb.

Point-MAE pretraining, step by step:

1. Cut each cloud into G patches (FPS + kNN) as the encoder's tokenizer does.
2. Hide a random 60% of the patches (`random_patch_mask`): int(0.6 G) per cloud, drawn anew
   for every cloud and every step.
3. Encode the *visible* patches only: mini-PointNet, centre position embedding, the transformer
   blocks (no CLS token in pretraining). The hidden patches never reach the encoder, so it
   cannot copy them. Their centres do reach the decoder (it must know where to rebuild), and
   centres alone outline the shape; a high mask ratio keeps the task hard all the same.
4. A light decoder gets the encoded visible tokens plus one shared, learned mask token per
   hidden patch, every token with the embedding of its centre (added at each block), and
   predicts the k points of each hidden patch (relative to its centre): (B, M, k, 3).
5. Loss: the L2 Chamfer distance between predicted and true hidden patches
   (`course_lib.points.chamfer`), averaged over patches. Only the encoder is kept for later.

The model (steps 1-5) is `course_lib.points.masked_autoencoder`; this module trains it. The
checkpoint (`save_checkpoint` / `load_pretrained_point_mae`: the encoder's pretrained weights, the
decoder's, the configs and a record of the run, listed with its SHA-256) is written and read by
`course_lib.points.checkpoint`; its functions are re-exported here. Loading never pretrains by
itself: `pretrain_and_save` (what `python -m data_scripts.pretrain_point_mae` runs) writes it.

The shipped `course_lib/checkpoints/point_mae_tiny.pt` is written by `python -m data_scripts.pretrain_point_mae`.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from course_lib import config as course_config
from course_lib.points.checkpoint import (  # the checkpoint code lives there; re-exported for existing imports
    _REPRODUCE,
    CHECKPOINT_NAME,
    _encoder_pretrained_state,
    _to_storage,
    default_checkpoint_path,
    file_sha256,
    load_pretrained_masked_autoencoder,
    load_pretrained_point_mae,
    read_checkpoint,
    read_sha256sums,
    save_checkpoint,
    update_sha256sums,
)
from course_lib.points.masked_autoencoder import (  # the model: re-exported for existing imports
    MaskedAutoencoder,
    MaskedAutoencoderOutput,
    PatchMask,
    PretrainConfig,
    num_masked_patches,
    random_patch_mask,
)
from course_lib.points.point_mae import PointMAEConfig, PointMAEEncoder
from course_lib.points.transforms import random_scale_translate, rotate_about_up_axis

__all__ = [
    "CHECKPOINT_NAME",
    "MaskedAutoencoder",
    "MaskedAutoencoderOutput",
    "PatchMask",
    "PretrainConfig",
    "PretrainResult",
    "default_checkpoint_path",
    "file_sha256",
    "linear_probe_accuracy",
    "load_pretrained_masked_autoencoder",
    "load_pretrained_point_mae",
    "num_masked_patches",
    "pretrain",
    "pretrain_and_save",
    "random_patch_mask",
    "read_checkpoint",
    "read_sha256sums",
    "save_checkpoint",
    "update_sha256sums",
]


# ----------------------------------------------------------------------------------------------
# Pretraining


@dataclass
class PretrainResult:
    """What `pretrain` returns: the model and a record of the run."""

    model: MaskedAutoencoder
    step_losses: list[float] = field(default_factory=list)  # one per optimizer step
    epoch_losses: list[float] = field(default_factory=list)  # mean per epoch
    seconds: float = 0.0  # wall-clock time
    cpu_seconds: float = 0.0  # CPU time of this process (all threads): the cost on a shared machine
    num_steps: int = 0
    num_shapes: int = 0


def _as_point_tensor(data: Dataset | Tensor) -> Tensor:
    """(S, N, 3) float tensor from a tensor or a Dataset of (points, label) / points items."""
    if isinstance(data, Tensor):
        points = data
    elif hasattr(data, "points") and isinstance(data.points, Tensor) and getattr(data, "transform", None) is None:
        points = data.points  # a PointCloudDataset without transform: take the array directly
    elif isinstance(data, Dataset):
        items = [data[i] for i in range(len(data))]  # type: ignore[arg-type]
        points = torch.stack([torch.as_tensor(item[0] if isinstance(item, (tuple, list)) else item) for item in items])
    else:
        raise TypeError(f"pretraining data must be a tensor (S, N, 3) or a Dataset, got {type(data).__name__}")
    if points.dim() != 3 or points.shape[-1] != 3 or not points.is_floating_point():
        raise ValueError(f"pretraining data must be float clouds (S, N, 3), got {tuple(points.shape)} {points.dtype}")
    if points.shape[0] < 2:
        raise ValueError(f"pretraining needs at least 2 clouds (BatchNorm needs batches of 2), got {points.shape[0]}")
    return points.float()


def pretrain(
    data: Dataset | Tensor | None = None,
    *,
    config: PointMAEConfig = PointMAEConfig(),
    pretrain_config: PretrainConfig = PretrainConfig(),
    max_steps: int | None = None,
    model: MaskedAutoencoder | None = None,
    progress: bool = True,
) -> PretrainResult:
    """Pretrain a tiny Point-MAE as a masked autoencoder; returns the model and its loss curve.

    Args:
        data: clouds (S, N, 3) or a Dataset of (points, label); default: the clean shape set's
            training split, `load_shapes("clean", "train", num_points=config.num_points)`.
        config: the encoder's sizes (ignored when `model` is given).
        pretrain_config: mask ratio, decoder, optimizer, schedule, augmentation, seed.
        max_steps: stop after this many optimizer steps (a quick run); the schedule still
            spans them, so the learning rate decays to 0 at the last step.
        model: continue training this MaskedAutoencoder instead of a fresh one.
        progress: show a tqdm progress bar.

    Each epoch visits the clouds in a fresh random order in batches of `batch_size` (the last,
    incomplete batch is dropped), scales each cloud by a random factor per axis and shifts it
    (Point-MAE's augmentation), turns it about the up axis (`rotate_about_up_axis`), and hides
    a fresh random set of patches. AdamW with a linear warm-up and cosine decay; biases and
    norm weights get no weight decay. The initialisation comes from torch's global generator,
    seeded here with `pretrain_config.seed`; order, augmentation and masks from one generator
    seeded with the same number. With one CPU thread two runs give bit-identical weights.

    Derived in notebooks/part2_point_peft/12_point_mae.ipynb.
    """
    pc = pretrain_config
    if data is None:
        from course_lib.points.datasets import load_shapes

        data = load_shapes("clean", "train", num_points=config.num_points)
    points = _as_point_tensor(data)  # (S, N, 3)
    num_shapes = points.shape[0]
    batch_size = min(pc.batch_size, num_shapes)
    steps_per_epoch = num_shapes // batch_size
    num_steps = steps_per_epoch * pc.num_epochs
    if max_steps is not None:
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        num_steps = min(num_steps, max_steps)
    warmup_steps = min(pc.warmup_epochs * steps_per_epoch, num_steps // 2)

    torch.manual_seed(pc.seed)  # the initialisation
    if model is None:
        model = MaskedAutoencoder(PointMAEEncoder(config), pc.mask_ratio, pc.decoder_depth, pc.decoder_num_heads)
    generator = torch.Generator().manual_seed(pc.seed)  # order, augmentation, masks
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in trainable if p.dim() >= 2], "weight_decay": pc.weight_decay},
            {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=pc.lr,
    )

    def lr_factor(step: int) -> float:  # linear warm-up, then cosine decay to 0
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress_fraction = (step - warmup_steps) / max(1, num_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress_fraction)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    result = PretrainResult(model=model, num_shapes=num_shapes)
    device = next(model.parameters()).device
    model.train()
    start, cpu_start = time.perf_counter(), time.process_time()
    bar = tqdm(total=num_steps, desc="pretraining Point-MAE", disable=not progress, leave=False)
    try:
        step = 0
        while step < num_steps:
            order = torch.randperm(num_shapes, generator=generator)
            epoch_losses = []
            for first in range(0, steps_per_epoch * batch_size, batch_size):
                if step >= num_steps:
                    break
                batch = points[order[first : first + batch_size]]  # (B, N, 3)
                batch = random_scale_translate(batch, pc.scale_range, pc.translate_range, generator=generator)
                if pc.rotate_about_up_axis:  # a random turn about y per cloud
                    batch = rotate_about_up_axis(batch, generator=generator)
                output = model(batch.to(device), generator=generator)
                optimizer.zero_grad(set_to_none=True)
                output.loss.backward()
                optimizer.step()
                schedule.step()
                step += 1
                epoch_losses.append(output.loss.item())
                bar.update(1)
                bar.set_postfix(loss=f"{epoch_losses[-1]:.5f}")
            result.step_losses.extend(epoch_losses)
            result.epoch_losses.append(sum(epoch_losses) / len(epoch_losses))
    finally:
        bar.close()
    model.eval()
    result.seconds = time.perf_counter() - start
    result.cpu_seconds = time.process_time() - cpu_start
    result.num_steps = num_steps
    return result


# ----------------------------------------------------------------------------------------------
# Are the features useful? A linear probe


def linear_probe_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    *,
    l2: float = 1e-3,
    max_iterations: int = 300,
) -> float:
    """Test accuracy of a logistic regression trained on frozen features.

    The features are standardised with the training set's mean and std, then a linear layer
    (C -> classes) is fitted to the whole training set by L-BFGS on cross-entropy
    + l2 * ||W||^2. Deterministic (zero start, full batch). A probe measures how linearly
    separable the classes are in the feature space: the better the pretraining, the higher.

    Derived in notebooks/part2_point_peft/12_point_mae.ipynb.
    """
    for name, features, labels in (("train", train_features, train_labels), ("test", test_features, test_labels)):
        if features.dim() != 2 or labels.dim() != 1 or features.shape[0] != labels.shape[0]:
            raise ValueError(
                f"{name} features must be (S, C) with labels (S,), "
                f"got {tuple(features.shape)} and {tuple(labels.shape)}"
            )
    if train_features.shape[1] != test_features.shape[1]:
        widths = (train_features.shape[1], test_features.shape[1])
        raise ValueError(f"train and test features differ in width: {widths[0]} vs {widths[1]}")
    x_train, x_test = train_features.double(), test_features.double()
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-8)
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    y_train = train_labels.long()
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    weight = torch.zeros(x_train.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iterations, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x_train @ weight + bias, y_train) + l2 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        predictions = (x_test @ weight + bias).argmax(dim=1)
    return float((predictions == test_labels.long()).double().mean())


def _run_record(result: PretrainResult) -> dict[str, Any]:
    return {
        "step_losses": result.step_losses,
        "epoch_losses": result.epoch_losses,
        "seconds": result.seconds,
        "cpu_seconds": result.cpu_seconds,
        "num_steps": result.num_steps,
        "num_shapes": result.num_shapes,
        "torch_version": str(torch.__version__),
    }


def pretrain_and_save(path: str | os.PathLike | None = None, *, progress: bool = True) -> dict[str, Any]:
    """Pretrain the tiny Point-MAE with the shipped defaults and write its checkpoint to `path`
    (default: the shipped location) with its hash; returns what `read_checkpoint` reads back.

    Under COURSE_FAST=1: five steps, kept in memory and not saved (a warning says so), so that a
    missing checkpoint cannot stall a fast test run. What `load_pretrained_point_mae(...,
    pretrain_if_missing=True)` calls. Derived in notebooks/part2_point_peft/12_point_mae.ipynb.
    """

    path = Path(path) if path is not None else default_checkpoint_path()
    if course_config.is_fast():
        result = pretrain(max_steps=5, progress=progress)
        warnings.warn(
            f"no Point-MAE checkpoint at {path}: pretrained 5 steps instead (COURSE_FAST=1; not saved). "
            f"Create the real one with `{_REPRODUCE}`",
            stacklevel=3,
        )
        encoder = result.model.encoder
        return {"config": encoder.config.to_dict(), "encoder": _to_storage(_encoder_pretrained_state(encoder))}
    result = pretrain(progress=progress)
    save_checkpoint(result.model, path, pretrain_config=PretrainConfig(), record=_run_record(result))
    return read_checkpoint(path)
