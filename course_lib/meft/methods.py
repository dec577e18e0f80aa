"""The fine-tuning methods Part 4 compares, built the same way from one pre-trained classifier.

    model = build_method("lora_checkpointing", pretrained)          # a fresh copy, ready to train
    model = build_method("meft1", pretrained, num_layers=24)        # 24 stacked copies of the layers

| name                 | what trains                               | what a step keeps for backward         |
| -------------------- | ----------------------------------------- | -------------------------------------- |
| `full_finetune`      | everything                                | every activation                       |
| `lora`               | LoRA r 8 on query/value + head            | nearly every activation                |
| `adapter`            | Pfeiffer adapters (C/16) + head           | most activations                       |
| `lora_checkpointing` | as `lora`, gradient checkpointing per layer | each layer's input                   |
| `meft1/2/3`          | MEFT adapters (C -> 8 -> C) + head        | the two output streams of the stack    |

`num_layers` makes a deeper (or shallower) model by repeating the pre-trained layers (copies),
for measuring how memory grows with depth; such a model is for measurement, not for training.

Derived in notebooks/part4_meft/30_where_memory_goes.ipynb.
"""

from __future__ import annotations

import copy

from torch import nn

from course_lib.meft.model import MEFT_VARIANTS, meft_from_hf
from course_lib.peft import inject_peft

__all__ = ["METHOD_LABELS", "METHOD_NAMES", "build_method", "enable_checkpointing", "with_num_layers"]

#: Method names `build_method` accepts, in the order the course shows them.
METHOD_NAMES: tuple[str, ...] = ("full_finetune", "lora", "adapter", "lora_checkpointing", "meft1", "meft2", "meft3")

#: Readable labels for tables and plots.
METHOD_LABELS: dict[str, str] = {
    "full_finetune": "full fine-tuning",
    "lora": "LoRA",
    "adapter": "adapter (Pfeiffer)",
    "lora_checkpointing": "LoRA + checkpointing",
    "meft1": "MEFT1",
    "meft2": "MEFT2",
    "meft3": "MEFT3",
}


def _bert_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(getattr(model, "bert", model), "encoder", None), "layer", None)
    if layers is None:
        raise TypeError(f"expected a Hugging Face BERT-family model (.bert.encoder.layer), got {type(model).__name__}")
    return layers


def with_num_layers(model: nn.Module, num_layers: int) -> nn.Module:
    """A copy of a Hugging Face BERT model with `num_layers` layers: layer i is a copy of layer i mod L.

    Fewer layers than the original keeps the lowest ones. For measuring memory against depth.

    Derived in notebooks/part4_meft/30_where_memory_goes.ipynb.
    """
    if not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
    original = _bert_layers(model)
    result = copy.deepcopy(model)
    base = getattr(result, "bert", result)
    base.encoder.layer = nn.ModuleList(copy.deepcopy(original[i % len(original)]) for i in range(num_layers))
    if hasattr(result, "config"):
        result.config.num_hidden_layers = num_layers
    return result


def enable_checkpointing(model: nn.Module) -> nn.Module:
    """Hugging Face gradient checkpointing per layer (non-reentrant); returns the model.

    Derived in notebooks/part4_meft/30_where_memory_goes.ipynb.
    """
    enable = getattr(model, "activation_checkpointing_enable", None) or getattr(model, "gradient_checkpointing_enable", None)
    if enable is None:
        raise TypeError(f"{type(model).__name__} has no gradient checkpointing switch (not a Hugging Face model?)")
    enable()
    return model


def build_method(method: str, pretrained: nn.Module, *, num_layers: int | None = None, **meft_options) -> nn.Module:
    """A fresh copy of `pretrained` (a Hugging Face BertForSequenceClassification) set up for `method`.

    `meft_options` go to `meft_from_hf` (e.g. `num_reversible_layers`, `lambda_`). Adapters and
    LoRA matrices are initialised from torch's global RNG: seed first. Returned in train mode.

    Derived in notebooks/part4_meft/30_where_memory_goes.ipynb.
    """
    if method not in METHOD_NAMES:
        raise ValueError(f"unknown method {method!r}; choose one of {METHOD_NAMES}")
    if meft_options and method not in MEFT_VARIANTS:
        raise ValueError(f"options {sorted(meft_options)} apply to MEFT variants only, not to {method!r}")
    _bert_layers(pretrained)
    if num_layers is not None:
        model = with_num_layers(pretrained, num_layers)
    elif method not in MEFT_VARIANTS:
        model = copy.deepcopy(pretrained)
    else:
        model = pretrained  # meft_from_hf copies what it uses
    if method in MEFT_VARIANTS:
        model = meft_from_hf(model, method, **meft_options)
    elif method in ("lora", "lora_checkpointing"):
        inject_peft(model, "lora", r=8, alpha=16)  # query and value, Hugging Face peft's BERT default
        if method == "lora_checkpointing":
            enable_checkpointing(model)
    elif method == "adapter":
        inject_peft(model, "adapter", placement="pfeiffer")  # bottleneck C/16 after each FFN output
    return model.train()
