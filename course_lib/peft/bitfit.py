"""BitFit: train only the bias terms (Ben Zaken et al., 2022, arXiv:2106.10199).

Every weight matrix stays frozen; the bias vectors of the chosen modules train. Nothing is added
to the model, so BitFit costs nothing at inference and its checkpoint is tiny (on BERT about 0.1%
of the parameters). Point-PEFT also trains the biases of its frozen layers this way.

Derived in notebooks/part1_foundations/02_peft_zoo.ipynb.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from course_lib.peft.matching import ModulePattern, name_matches

__all__ = ["BitFitConfig", "bias_parameters"]


@dataclass
class BitFitConfig:
    """Settings of BitFit. `target_modules=None` means every module that has a bias."""

    target_modules: ModulePattern | None = None

    method = "bitfit"


def bias_parameters(model: nn.Module, pattern: ModulePattern | None = None) -> dict[str, nn.Parameter]:
    """The `bias` parameters of `model`'s modules (only those whose names match `pattern`, if given).

    Keys are module names ("" for the model itself). Derived in
    notebooks/part1_foundations/02_peft_zoo.ipynb.
    """
    biases = {}
    for name, module in model.named_modules():
        bias = getattr(module, "bias", None)
        if not isinstance(bias, nn.Parameter):
            continue
        if pattern is None or name_matches(name, pattern):
            biases[name] = bias
    return biases
