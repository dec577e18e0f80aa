"""LoRA: a low-rank update of a frozen linear layer (Hu et al., 2021, arXiv:2106.09685).

A frozen weight W (out x in) gets a trainable update of rank r:

    h = W x + b + (alpha / r) * B A dropout(x),     A: (r, in), B: (out, r)

A starts Kaiming-uniform and B starts at zero, so Delta W = B A = 0 and the model starts exactly
where the pre-trained one is. After training, Delta W can be merged into W (`merge()`), after
which the layer costs nothing extra at inference; `unmerge()` subtracts it again.

The numerics follow Hugging Face peft (scaling alpha / r, A ~ kaiming_uniform(a=sqrt(5)),
B = 0, dropout before A), so that logits match peft's to float precision; the tests check it.

Derived in notebooks/part1_foundations/02_peft_zoo.ipynb.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from course_lib.peft.layers import linear_layout
from course_lib.peft.matching import ModulePattern

__all__ = ["LoRAConfig", "LoRALinear"]


@dataclass
class LoRAConfig:
    """Settings of LoRA. `target_modules=None` means BERT's default, `["query", "value"]`."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: ModulePattern | None = None

    method = "lora"

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got r={self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` (or GPT-2's `Conv1D`) plus a trainable low-rank update (alpha / r) * B A.

    `base` is kept as a sub-module (its weight stays where it was, frozen); `lora_A` (r, in) and
    `lora_B` (out, r) are the only new parameters, in the same shapes for both layer kinds (a
    Conv1D stores W as (in, out): `fan_in_fan_out`, and merging adds (B A)^T). Derived in
    notebooks/part1_foundations/02_peft_zoo.ipynb.
    """

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0) -> None:
        super().__init__()
        try:
            in_features, out_features, self.fan_in_fan_out = linear_layout(base)
        except TypeError:
            raise TypeError(f"LoRALinear wraps an nn.Linear or a Conv1D, got {type(base).__name__}") from None
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got r={r!r}")
        self.base = base
        self.r = r
        self.alpha = alpha
        self.scaling = alpha / r  # the update is scaled so that changing r needs no new learning rate
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **factory))  # (r, in)
        self.lora_B = nn.Parameter(torch.empty(out_features, r, **factory))  # (out, r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """A like a fresh nn.Linear (Kaiming uniform, a = sqrt(5)), B = 0."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        # Delta W = B A, B = 0 at init, so the model starts where the pre-trained one is
        nn.init.zeros_(self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        """Delta W = (alpha / r) * B A, shape (out, in)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in)
        result = self.base(x)  # W x + b, (..., out)
        if self.merged:
            return result  # Delta W already lives inside W
        # two thin matmuls, (..., in) -> (..., r) -> (..., out): never forms the (out, in) Delta W
        update = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)
        return result + update * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Add Delta W into the base weight: W <- W + (alpha / r) B A. Forward then skips the update."""
        if not self.merged:
            delta = self.delta_weight()  # (out, in)
            self.base.weight += delta.T if self.fan_in_fan_out else delta
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract Delta W again, so that training can go on (W is restored up to rounding)."""
        if self.merged:
            delta = self.delta_weight()
            self.base.weight -= delta.T if self.fan_in_fan_out else delta
            self.merged = False

    def merged_linear(self) -> nn.Module:
        """The plain base layer (nn.Linear or Conv1D) holding W + Delta W, merged in place."""
        self.merge()
        return self.base

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"
