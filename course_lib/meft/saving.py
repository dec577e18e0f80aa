"""Saving and loading a MEFT model's trained state, in course_lib's own documented format.

Hugging Face peft has no MEFT, so there is no peft format to follow. A MEFT model is rebuilt from
its base model and its config, then its trained tensors are loaded, so a folder holds only:

- `meft_config.json`: `{"format": "course_lib.meft", "format_version": 1, "config": MEFTConfig.to_dict()}`
- `meft_trainable.safetensors`: every parameter with requires_grad (adapters, the task head, the
  LayerNorms with `train_layer_norms`), under its name in the MEFT model.

    model, report = meft(base, MEFTConfig("meft3"))
    ...train...
    save_meft(model, "my-meft")
    again, _ = load_meft(fresh_base, "my-meft")      # the same logits

Written whole or not at all (a staged folder renamed into place).
Derived in notebooks/part4_meft/32_meft.ipynb.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from course_lib.meft.model import MEFTConfig, MEFTVariant, meft
from course_lib.peft.saving import (
    copy_trained_state,
    read_versioned_folder,
    trained_state_problems,
)
from course_lib.report import PEFTReport
from course_lib.results import write_folder

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "load_meft", "meft_config_from_dict", "save_meft"]

CONFIG_NAME = "meft_config.json"
WEIGHTS_NAME = "meft_trainable.safetensors"
_FORMAT, _VERSION = "course_lib.meft", 1


def meft_config_from_dict(values: dict[str, Any]) -> MEFTConfig:
    """The inverse of `MEFTConfig.to_dict()`."""
    values = dict(values)
    variant = values.get("variant", "meft1")
    if isinstance(variant, dict):
        values["variant"] = MEFTVariant(**variant)
    dtype = values.get("stream_dtype")
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"unknown stream_dtype {dtype!r} in the MEFT config")
        values["stream_dtype"] = getattr(torch, dtype)
    return MEFTConfig(**values)


def save_meft(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the MEFT model's config and trained tensors to `directory`; returns it.

    ValueError for a model that `meft` did not build (no `.meft_config`).
    """
    from safetensors.torch import save_file

    config = getattr(model, "meft_config", None)
    if not isinstance(config, MEFTConfig):
        raise ValueError("save_meft: this model has no .meft_config; build it with course_lib.meft.meft(model, MEFTConfig(...))")
    tensors = {name: p.detach().contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad}
    payload = {"format": _FORMAT, "format_version": _VERSION, "config": config.to_dict()}

    def write(staging: Path) -> None:
        (staging / CONFIG_NAME).write_text(json.dumps(payload, indent=2) + "\n")
        save_file(tensors, str(staging / WEIGHTS_NAME), metadata={"format": "pt"})

    return write_folder(directory, write)  # whole or not at all


def load_meft(base: nn.Module, directory: str | os.PathLike) -> tuple[nn.Module, PEFTReport]:
    """Rebuild MEFT from `base` (the base model it was trained from) with the saved config and load
    the trained tensors: (model, report). FileNotFoundError / ValueError say what is wrong."""
    directory = Path(directory)
    missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(f"load_meft: {directory} lacks {missing}; save_meft writes {CONFIG_NAME} and {WEIGHTS_NAME}")
    payload, tensors = read_versioned_folder(directory, CONFIG_NAME, WEIGHTS_NAME, _FORMAT, _VERSION, "load_meft")
    config = meft_config_from_dict(payload["config"])
    model, report = meft(base, config)
    problems = trained_state_problems(model, tensors)
    if problems:
        raise ValueError(f"load_meft: the saved state does not fit this base model ({'; '.join(problems)}); "
                         "load it onto the base model it was trained from")  # fmt: skip
    copy_trained_state(model, tensors)
    return model, report


