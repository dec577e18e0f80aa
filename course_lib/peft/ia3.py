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

from course_lib.peft.layers import linear_layout
from course_lib.peft.matching import ModulePattern

__all__ = ["IA3Config", "IA3Linear"]


@dataclass
class IA3Config:
    """Settings of (IA)^3. `None` patterns mean peft's BERT defaults (see the module docstring)."""

    target_modules: ModulePattern | None = None
    feedforward_modules: ModulePattern | None = None

    method = "ia3"


class IA3Linear(nn.Module):
    """A frozen nn.Linear (or GPT-2's Conv1D) whose output (or, with `feedforward=True`, input) is
    rescaled by a vector.

    Derived in notebooks/part1_foundations/02_peft_zoo.ipynb.
    """

    def __init__(self, base: nn.Module, feedforward: bool = False) -> None:
        super().__init__()
        try:
            in_features, out_features, self.fan_in_fan_out = linear_layout(base)
        except TypeError:
            raise TypeError(f"IA3Linear wraps an nn.Linear or a Conv1D, got {type(base).__name__}") from None
        self.base = base
        self.feedforward = feedforward
        width = in_features if feedforward else out_features
        # l = 1 at init: nothing is inhibited or amplified yet
        self.scale = nn.Parameter(torch.ones(width, device=base.weight.device, dtype=base.weight.dtype))
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in)
        if self.merged:
            return self.base(x)
        if self.feedforward:
            return self.base(x * self.scale)  # W (l * x) + b
        return self.base(x) * self.scale  # l * (W x + b)

    def _weight_factor(self) -> torch.Tensor:
        """l shaped to multiply the stored weight: it scales the input axis (feed-forward) or the
        output axis; nn.Linear stores W as (out, in), Conv1D as (in, out)."""
        input_axis = 0 if self.fan_in_fan_out else 1
        scales_axis = input_axis if self.feedforward else 1 - input_axis
        return self.scale[:, None] if scales_axis == 0 else self.scale[None, :]

    @torch.no_grad()
    def merge(self) -> None:
        """Fold l into the weight: W diag(l) (feed-forward) or diag(l) W and l * b (output)."""
        if self.merged:
            return
        self.base.weight *= self._weight_factor()
        if not self.feedforward and self.base.bias is not None:
            self.base.bias *= self.scale
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Divide l out again (exact only while no entry of l is zero)."""
        if not self.merged:
            return
        self.base.weight /= self._weight_factor()
        if not self.feedforward and self.base.bias is not None:
            self.base.bias /= self.scale
        self.merged = False

    def merged_linear(self) -> nn.Module:
        """The plain base layer (nn.Linear or Conv1D) with l folded in, merged in place."""
        self.merge()
        return self.base

    def extra_repr(self) -> str:
        return f"feedforward={self.feedforward}, merged={self.merged}"
