"""Counting trainable parameters: the first number every PEFT method reports.

Derived in notebooks/part1_foundations/03_measuring_finetuning.ipynb.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

__all__ = ["ParameterReport", "count_parameters"]


@dataclass(frozen=True)
class ParameterReport:
    """How many parameters a model has and how many of them will be trained.

    `per_module` maps each top-level child module (`model.named_children()`) to
    `(trainable, total)`; parameters registered directly on the model go under `"(own)"`.
    """

    trainable: int
    total: int
    per_module: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def frozen(self) -> int:
        return self.total - self.trainable

    @property
    def trainable_pct(self) -> float:
        """Trainable share in percent (0 for a model without parameters)."""
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        lines = [f"trainable {self.trainable:,} of {self.total:,} parameters ({self.trainable_pct:.3f}%)"]
        width = max((len(name) for name in self.per_module), default=0)
        for name, (trainable, total) in self.per_module.items():
            lines.append(f"  {name:<{width}}  {trainable:>12,} / {total:>12,}")
        return "\n".join(lines)


def count_parameters(model: nn.Module) -> ParameterReport:
    """Count trainable (`requires_grad`) and total parameters of `model`.

    A parameter shared by several modules (tied embeddings) is counted once, where it first
    appears, exactly as `model.parameters()` yields it.

    Derived in notebooks/part1_foundations/03_measuring_finetuning.ipynb.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"count_parameters expects an nn.Module, got {type(model).__name__}")
    per_module: dict[str, list[int]] = {}
    trainable = total = 0
    # named_parameters() removes duplicates (tied weights) by default
    for name, parameter in model.named_parameters():
        top = name.split(".", 1)[0] if "." in name else "(own)"
        counts = per_module.setdefault(top, [0, 0])
        n = parameter.numel()
        total += n
        counts[1] += n
        if parameter.requires_grad:
            trainable += n
            counts[0] += n
    return ParameterReport(trainable, total, {k: (v[0], v[1]) for k, v in per_module.items()})
