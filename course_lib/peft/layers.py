"""The layers a weight-level PEFT method can wrap: `nn.Linear`, and the `Conv1D` of GPT-2.

GPT-2 (and OpenAI GPT) in Hugging Face transformers compute their projections with
`transformers.pytorch_utils.Conv1D`: a linear layer whose weight is stored transposed,
(in, out) instead of `nn.Linear`'s (out, in), so that `y = x W + b`. Hugging Face peft calls that
layout `fan_in_fan_out=True`. LoRA, (IA)^3 and adapters only need the two widths and, to merge,
which way round the weight is; this module answers both without importing transformers
(a Conv1D is recognised by its class name and its `nf` / `nx` widths).

Derived in notebooks/part1_foundations/02_peft_zoo.ipynb.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import nn

__all__ = ["LinearLayout", "is_conv1d", "is_linear_like", "linear_layout"]


class LinearLayout(NamedTuple):
    """The widths of a linear layer and whether its weight is stored (in, out)."""

    in_features: int
    out_features: int
    fan_in_fan_out: bool  # True for Conv1D: weight (in, out); False for nn.Linear: weight (out, in)


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' Conv1D (GPT-2): y = x W + b with W of shape (nx, nf) = (in, out)."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(getattr(module, "nf", None), int)
            and isinstance(getattr(module, "nx", None), int) and weight is not None
            and tuple(weight.shape) == (module.nx, module.nf))  # fmt: skip


def is_linear_like(module: nn.Module) -> bool:
    """An nn.Linear or a Conv1D: what LoRA and (IA)^3 wrap."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


is_linear_like.expects = "nn.Linear or transformers Conv1D"  # for matching_module_names' error


def linear_layout(module: nn.Module) -> LinearLayout:
    """(in_features, out_features, fan_in_fan_out) of an nn.Linear or a Conv1D; TypeError otherwise."""
    if isinstance(module, nn.Linear):
        return LinearLayout(module.in_features, module.out_features, False)
    if is_conv1d(module):
        return LinearLayout(module.nx, module.nf, True)
    raise TypeError(f"expected an nn.Linear or a transformers Conv1D (GPT-2), got {type(module).__name__}")
