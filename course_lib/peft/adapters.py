"""Bottleneck adapters: small down-project / nonlinearity / up-project blocks added to a frozen model.

    adapter(z) = scale * W_up act(W_down z),   W_down: (bottleneck, dim), W_up: (dim, bottleneck)

W_up starts at zero, so every placement below starts as the identity: the model starts where the
pre-trained one is. Three placements are supported, and the papers differ on where they go:

- "houlsby" (Houlsby et al., 2019, arXiv:1902.00751): *serial*, two adapters per layer, one
  after the attention output projection and one after the feed-forward output projection,
  each before the residual add + LayerNorm:  z <- z + adapter(z).
- "pfeiffer" (Pfeiffer et al., 2021, AdapterFusion, arXiv:2005.00247): *serial*, one adapter
  per layer, after the feed-forward output only. DEFT uses it with reduction factor 16
  (bottleneck = dim / 16). AdapterHub's version also re-uses the layer's LayerNorm around the
  adapter; here it sits before the residual LayerNorm, like Houlsby's second adapter.
- "parallel" (He et al., 2022, "Towards a Unified View of PEFT", arXiv:2110.04366): the adapter
  reads the feed-forward block's *input* x and its scaled output is added next to the block's
  output, FFN(x) + scale * adapter(x); He et al. use scale 4. (This is not Pfeiffer's design,
  although the two names are sometimes used together.)

On Hugging Face BERT the serial adapters wrap the output projections by name
(`attention.output.dense`, `layer.N.output.dense`); the parallel one wraps the `BertOutput`
block (`layer.N.output`), whose forward(h, x) = LayerNorm(dropout(dense(h)) + x) receives the FFN
input x as its residual. Any other nn.Module works with explicit `target_modules`.

Derived in notebooks/part1_foundations/02_peft_zoo.ipynb.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from course_lib.peft.matching import ModulePattern

__all__ = [
    "ADAPTER_PLACEMENTS",
    "BERT_ADAPTER_TARGETS",
    "AdapterConfig",
    "BottleneckAdapter",
    "ParallelAdapter",
    "SerialAdapter",
]

#: The placements `AdapterConfig.placement` accepts.
ADAPTER_PLACEMENTS = ("houlsby", "pfeiffer", "parallel")

#: Default target patterns on Hugging Face BERT-family models, per placement.
BERT_ADAPTER_TARGETS: dict[str, str] = {
    "houlsby": r".*layer\.\d+\.(attention\.output|output)\.dense",
    "pfeiffer": r".*layer\.\d+\.output\.dense",
    "parallel": r".*layer\.\d+\.output",
}

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


@dataclass
class AdapterConfig:
    """Settings of bottleneck adapters.

    Give either `bottleneck` (the hidden width) or `reduction_factor` (bottleneck = dim // factor,
    16 in DEFT); `scale=None` means 1 for serial placements and 4 for "parallel" (He et al.).
    `target_modules=None` means the BERT default of the placement (`BERT_ADAPTER_TARGETS`).
    """

    placement: str = "pfeiffer"
    bottleneck: int | None = None
    reduction_factor: int = 16
    activation: str = "relu"
    scale: float | None = None
    target_modules: ModulePattern | None = None

    method = "adapter"

    def __post_init__(self) -> None:
        if self.placement not in ADAPTER_PLACEMENTS:
            raise ValueError(f"unknown adapter placement {self.placement!r}; choose one of {ADAPTER_PLACEMENTS}")
        if self.bottleneck is not None and self.bottleneck <= 0:
            raise ValueError(f"adapter bottleneck must be a positive integer, got {self.bottleneck}")
        if self.reduction_factor <= 0:
            raise ValueError(f"adapter reduction_factor must be positive, got {self.reduction_factor}")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"unknown adapter activation {self.activation!r}; choose one of {list(_ACTIVATIONS)}")

    def bottleneck_for(self, dim: int) -> int:
        """The bottleneck width for a model width `dim`."""
        return self.bottleneck if self.bottleneck is not None else max(1, dim // self.reduction_factor)

    def scale_or_default(self) -> float:
        return self.scale if self.scale is not None else (4.0 if self.placement == "parallel" else 1.0)


class BottleneckAdapter(nn.Module):
    """scale * up(act(down(z))): dim -> bottleneck -> dim, with `up` zero-initialised.

    It returns only the *update*; the placements add it to the stream. Derived in
    notebooks/part1_foundations/02_peft_zoo.ipynb.
    """

    def __init__(self, dim: int, bottleneck: int, activation: str = "relu", scale: float = 1.0) -> None:
        super().__init__()
        if dim <= 0 or bottleneck <= 0:
            raise ValueError(f"adapter sizes must be positive, got dim={dim}, bottleneck={bottleneck}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"unknown adapter activation {activation!r}; choose one of {list(_ACTIVATIONS)}")
        self.down = nn.Linear(dim, bottleneck)  # default nn.Linear init
        self.activation = _ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, dim)
        self.scale = scale
        # up = 0 at init: the adapter adds nothing, the model starts as the pre-trained one
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # z: (..., dim)
        return self.scale * self.up(self.activation(self.down(z)))  # (..., dim)

    def extra_repr(self) -> str:
        return f"scale={self.scale:g}"


class SerialAdapter(nn.Module):
    """A frozen module followed by an adapter on its output: y = f(x); y + adapter(y).

    Houlsby and Pfeiffer placements wrap an output projection (an nn.Linear) this way.
    """

    def __init__(self, base: nn.Module, adapter: BottleneckAdapter) -> None:
        super().__init__()
        self.base = base
        self.adapter = adapter

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base(x, *args, **kwargs)  # (..., dim)
        return y + self.adapter(y)  # serial: the adapter sees the sublayer's output


class ParallelAdapter(nn.Module):
    """A frozen block with an adapter beside it that reads the block's input (He et al., 2022).

    - one-input block f (dim -> dim, e.g. a whole FFN):  y = f(x) + adapter(x)
    - BERT-style output block f(h, x) = LayerNorm(g(h) + x), where x is the residual stream that
      entered the FFN:  y = f(h, x + adapter(x)) = LayerNorm(g(h) + adapter(x) + x),
      i.e. exactly "FFN(x) + s * adapter(x)" before the residual add and LayerNorm.
    """

    def __init__(self, base: nn.Module, adapter: BottleneckAdapter) -> None:
        super().__init__()
        self.base = base
        self.adapter = adapter

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if residual is None:
            return self.base(hidden) + self.adapter(hidden)  # parallel to a one-input block
        return self.base(hidden, residual + self.adapter(residual))  # parallel to BERT's FFN
