"""One report for every method: what was changed and how many parameters now train.

`inject_peft` (LoRA, adapters, prefix / prompt tuning, BitFit, (IA)^3), `point_peft` and
`course_lib.meft.meft` all return a `PEFTReport` (or a subclass that adds its method's own
details), so that code comparing methods reads the same fields everywhere:

    report.method          "lora", "point_peft", "meft1", ...
    report.trainable       parameters with requires_grad (shared tensors counted once)
    report.total           all parameters of the returned model (frozen copies aside, see below)
    report.trainable_pct   100 * trainable / total
    report.changed         names of the modules the method replaced, wrapped or added
    report.parts           trainable parameters per part ("lora_A", "adapters", "head", ...)
    report.in_place        True when the model passed in was changed and is the one to train;
                           False when a new model was built and the one passed in is untouched
    report.config          the config that was applied

Derived in notebooks/part1_foundations/03_measuring_finetuning.ipynb (the parameter meter) and
used by every method's notebook.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from torch import nn

__all__ = ["PEFTReport", "trainable_parts"]


@dataclass
class PEFTReport:
    """What a method did to a model: trainable and total parameters, what changed, per part."""

    method: str
    trainable: int
    total: int
    changed: list[str] = field(default_factory=list)
    parts: dict[str, int] = field(default_factory=dict)
    in_place: bool = True
    config: Any = field(default=None, repr=False)

    @property
    def trainable_pct(self) -> float:
        """Trainable share of the parameters, in percent."""
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        shown = ", ".join(self.changed[:3]) + (", ..." if len(self.changed) > 3 else "")
        return (f"{self.method}: {len(self.changed)} modules changed ({shown}); "
                f"{self.trainable:,} / {self.total:,} parameters trainable ({self.trainable_pct:.2f}%)")  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the fields, the trainable %, and the config as a dict when it is a dataclass."""
        config = self.config
        if dataclasses.is_dataclass(config) and not isinstance(config, type):
            config = config.to_dict() if hasattr(config, "to_dict") else dataclasses.asdict(config)
        elif config is not None and not isinstance(config, (str, int, float, bool, dict, list)):
            config = repr(config)
        return {"method": self.method, "trainable": self.trainable, "total": self.total,
                "trainable_pct": self.trainable_pct, "changed": list(self.changed), "parts": dict(self.parts),
                "in_place": self.in_place, "config": config}  # fmt: skip


def trainable_parts(model: nn.Module, part_of: Any = None) -> dict[str, int]:
    """Trainable parameters per part: `part_of(name)` names a parameter's part (default: the last
    module name before the parameter's own, e.g. "lora_A", "classifier", "query")."""
    parts: dict[str, int] = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            pieces = name.split(".")
            part = part_of(name) if part_of is not None else (pieces[-2] if len(pieces) > 1 else pieces[0])
            parts[part] = parts.get(part, 0) + parameter.numel()
    return parts
