"""One entry point for every method: `get_peft_model(model, config) -> (model, PEFTReport)`.

Each method of the course has a config dataclass; this function picks the method from the
config's type, as Hugging Face peft's `get_peft_model` does:

| config                                   | method                          | in place? |
| ---------------------------------------- | ------------------------------- | --------- |
| `course_lib.peft` `LoRAConfig`, `AdapterConfig`, `PrefixTuningConfig`, `PromptTuningConfig`, `BitFitConfig`, `IA3Config`, or a Hugging Face peft config | `inject_peft` | yes: the model passed in is changed and returned |
| `course_lib.point_peft.PointPEFTConfig`  | `point_peft` (pass `memory_bank=`) | yes: the encoder is frozen and wrapped; train the returned wrapper |
| `course_lib.meft.MEFTConfig`             | `meft`                          | no: a new reversible model; the one passed in is unchanged |

The report is a `course_lib.report.PEFTReport` in every case (`report.in_place` says which row
applied). DEFT is not a change of the model but a training loss: `course_lib.deft.DEFTConfig`
and `DEFTLoss.from_config` (with any of the above).

Derived across the notebooks of parts 1, 2 and 4 (each method's own notebook derives it).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from course_lib.report import PEFTReport

__all__ = ["get_peft_model"]


def get_peft_model(model: nn.Module, config: Any, **inputs: Any) -> tuple[nn.Module, PEFTReport]:
    """Apply the method that `config` configures to `model`: (the model to train, its report).

    `inputs`: what a method needs besides the config (`memory_bank=` for Point-PEFT;
    `trainable_modules=` / `modules_to_save=` for `inject_peft`). Raises TypeError for a config
    of no known method, naming the ones it knows.
    """
    from course_lib.meft.model import MEFTConfig, meft
    from course_lib.peft.inject import PEFT_METHODS, inject_peft
    from course_lib.point_peft.model import PointPEFTConfig, point_peft

    if isinstance(config, PointPEFTConfig):
        unknown = sorted(set(inputs) - {"memory_bank"})
        if unknown:
            raise TypeError(f"point_peft takes memory_bank= besides its config, not {unknown}")
        return point_peft(model, config, inputs.get("memory_bank"))
    if isinstance(config, MEFTConfig):
        if inputs:
            raise TypeError(f"meft takes only its config, not {sorted(inputs)}")
        return meft(model, config)
    if type(config) in PEFT_METHODS or hasattr(config, "peft_type"):
        return model, inject_peft(model, config, **inputs)
    known = sorted([c.__name__ for c in PEFT_METHODS] + ["PointPEFTConfig", "MEFTConfig", "peft.*Config"])
    raise TypeError(f"get_peft_model: {type(config).__name__} is not the config of a known method; known: {known}")
