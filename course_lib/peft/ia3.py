"""(IA)^3: learned vectors that rescale activations (Liu et al., 2022, arXiv:2205.05638).

"Infused Adapter by Inhibiting and Amplifying Inner Activations": a frozen linear layer gets one
trainable vector l, initialised to ones (so the model starts as the pre-trained one):

- on attention keys and values, the *output* is rescaled:  h = l * (W x + b),   l: (out,)
- on the feed-forward layer, the *input* is rescaled:       h = W (l * x) + b,   l: (in,)

The paper rescales the FFN's inner activation, which is the input of its second linear layer.
Hugging Face peft's BERT defaults, followed here: targets `["key", "value", "output.dense"]`, with
every name ending in `output.dense` treated as feed-forward (input-scaled). On BERT that includes
the attention output projection `attention.output.dense` as well as the FFN's `output.dense`.

Derived in notebooks/part1_foundations/02_peft_zoo.ipynb.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from course_lib.peft.matching import ModulePattern

__all__ = ["IA3Config", "IA3Linear"]


@dataclass
class IA3Config:
    """Settings of (IA)^3. `None` patterns mean peft's BERT defaults (see the module docstring)."""

    target_modules: ModulePattern | None = None
    feedforward_modules: ModulePattern | None = None

    method = "ia3"


class IA3Linear(nn.Module):
    """A frozen nn.Linear whose output (or, with `feedforward=True`, input) is rescaled by a vector.

    Derived in notebooks/part1_foundations/02_peft_zoo.ipynb.
    """

    def __init__(self, base: nn.Linear, feedforward: bool = False) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"IA3Linear wraps an nn.Linear, got {type(base).__name__}")
        self.base = base
        self.feedforward = feedforward
        width = base.in_features if feedforward else base.out_features
        # l = 1 at init: nothing is inhibited or amplified yet
        self.scale = nn.Parameter(torch.ones(width, device=base.weight.device, dtype=base.weight.dtype))
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in)
        if self.merged:
            return self.base(x)
        if self.feedforward:
            return self.base(x * self.scale)  # W (l * x) + b
        return self.base(x) * self.scale  # l * (W x + b)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold l into the weight: scale W's columns (feed-forward) or W's rows and b (output)."""
        if self.merged:
            return
        if self.feedforward:
            self.base.weight *= self.scale[None, :]  # W diag(l)
        else:
            self.base.weight *= self.scale[:, None]  # diag(l) W
            if self.base.bias is not None:
                self.base.bias *= self.scale
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Divide l out again (exact only while no entry of l is zero)."""
        if not self.merged:
            return
        if self.feedforward:
            self.base.weight /= self.scale[None, :]
        else:
            self.base.weight /= self.scale[:, None]
            if self.base.bias is not None:
                self.base.bias /= self.scale
        self.merged = False

    def merged_linear(self) -> nn.Linear:
        """A plain nn.Linear with l folded in (the base layer itself, merged in place)."""
        self.merge()
        return self.base

    def extra_repr(self) -> str:
        return f"feedforward={self.feedforward}, merged={self.merged}"
