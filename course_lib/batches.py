"""Batches as the course's loops see them: one place for the plumbing every loop needs.

A batch is a dict of tensors with a "labels" entry (Hugging Face style, what
`course_lib.text.make_loader` yields), an (inputs, labels) pair, or, where no labels are
needed (density meters, calibration), the inputs alone: a dict of tensors or one tensor.

- `split_batch(batch)`       -> (inputs, labels); a clear error for any other shape
- `model_inputs(batch)`      -> the inputs only (labels dropped, pairs unpacked)
- `move_to_device(x, device)` tensors inside dicts, lists and tuples (None: unchanged)
- `call_model(model, inputs)` model(**dict), model(*pair) or model(tensor)

Derived in notebooks/part1_foundations/03_measuring_finetuning.ipynb (the training loop).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["call_model", "model_inputs", "move_to_device", "split_batch"]


def split_batch(batch: Any) -> tuple[Any, torch.Tensor]:
    """(model inputs, labels) of a dict batch with "labels" or of an (inputs, labels) pair."""
    if isinstance(batch, Mapping):
        if "labels" not in batch:
            raise ValueError(f"a dict batch needs a 'labels' entry; it has {sorted(batch)}")
        return {key: value for key, value in batch.items() if key != "labels"}, batch["labels"]
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError(
        f"a batch must be a dict with 'labels' or an (inputs, labels) pair, got {type(batch).__name__}"
        + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
    )


def model_inputs(batch: Any) -> Any:
    """The inputs of a batch with or without labels: a dict without "labels", a pair's first item,
    or the batch itself (a tensor)."""
    if isinstance(batch, Mapping):
        return {key: value for key, value in batch.items() if key != "labels"}
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("an empty batch")
        return batch[0]
    return batch


def move_to_device(value: Any, device: torch.device | str | None) -> Any:
    """Move tensors inside dicts, lists and tuples to `device` (None: return `value` unchanged)."""
    if device is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {key: move_to_device(item, device) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(move_to_device(item, device) for item in value)
    return value


def call_model(model: nn.Module, inputs: Any) -> Any:
    """model(**inputs) for a dict, model(*inputs) for a tuple or list, else model(inputs)."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)
