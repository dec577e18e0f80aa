"""What Point-PEFT needs from a point-cloud transformer: the `PointBackbone` protocol.

Point-PEFT never changes the backbone's layers; it runs the backbone's own pieces in its own
loop, inserting prompt tokens before some blocks and adding a Geometry-aware Adapter after each
(`PointPEFTModel.forward_features`). So any pre-norm point transformer can carry it if it exposes
these pieces (the tiny `PointMAEEncoder` of Part 2 does; a test wraps a hand-written one):

- `config` with `dim` (C), `depth` (number of blocks) and `num_groups` (G patch tokens);
- `embed(points (B, N, 3)) -> (x (B, 1+G, C), pos (B, 1+G, C), centres (B, G, 3))`: the CLS
  token then one token per patch, their position embeddings, and the patch centres (the adapter
  groups tokens by these 3-D positions);
- `blocks`: a sequence of pre-norm blocks, each with `attention_branch(h)` and `mlp_branch(h)`
  (the residual branches: `h + attention_branch(h)`, then `+ mlp_branch(...)`);
- `norm`: the final normalisation; `head`: the classification head module, and
  `classify(tokens (B, 1+G, C)) -> logits` that applies it;
- `pooled_features(points) -> (B, C)`: the frozen feature that the memory bank stores and that
  retrieval queries with.

The official trained set is chosen by name: `cls_token`, `cls_position`, `norm.*`, `head.*`, and
inside `blocks.*` the biases whose names end with one of `TRAINED_BLOCK_BIASES` (a backbone may
name its own with a `trained_block_biases` attribute).

Derived in notebooks/part2_point_peft/16_point_peft_results.ipynb.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

__all__ = ["PointBackbone", "check_point_backbone"]


@runtime_checkable
class PointBackbone(Protocol):
    """A pre-norm point transformer that Point-PEFT can wrap (see the module docstring)."""

    config: Any
    blocks: Sequence[nn.Module]
    norm: nn.Module
    head: nn.Module

    def embed(self, points: Tensor) -> tuple[Tensor, Tensor, Tensor]: ...

    def classify(self, tokens: Tensor) -> Tensor: ...

    def pooled_features(self, points: Tensor) -> Tensor: ...


def check_point_backbone(model: Any) -> None:
    """TypeError naming every piece `model` lacks for Point-PEFT (nothing when it has them all)."""
    missing = []
    if not isinstance(model, nn.Module):
        raise TypeError(f"point_peft wraps an nn.Module point transformer, got {type(model).__name__}")
    for name in ("embed", "classify", "pooled_features"):
        if not callable(getattr(model, name, None)):
            missing.append(f"{name}()")
    for name in ("blocks", "norm", "head", "config"):
        if getattr(model, name, None) is None:
            missing.append(name)
    config = getattr(model, "config", None)
    missing += [f"config.{field}" for field in ("dim", "depth", "num_groups") if config is not None and not hasattr(config, field)]
    blocks = getattr(model, "blocks", None) or []
    if blocks and not all(callable(getattr(b, "attention_branch", None)) and callable(getattr(b, "mlp_branch", None))
                          for b in blocks):  # fmt: skip
        missing.append("blocks[i].attention_branch() and .mlp_branch() (pre-norm residual branches)")
    if missing:
        raise TypeError(f"point_peft cannot wrap {type(model).__name__}: it lacks {missing}. A backbone must follow "
                        "course_lib.point_peft.backbone.PointBackbone (PointMAEEncoder does)")  # fmt: skip
