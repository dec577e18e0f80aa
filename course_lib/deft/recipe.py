"""DEFT recipes: everything that decides a DEFT run except the data, as one frozen object.

Two recipes are compared in notebook 22:

- `PAPER_PROTOCOL`, the official IBM/DEFT GLUE scripts (`GLUE/lora.py`, `adapter.py`,
  `prefix_tune.py`, `glue.sh`): every sequence padded to 128 tokens (`--pad_to_max_length
  --max_seq_length 128`), the density loss and the density both over every position, padding
  included (no mask), eps 1e-7, w = 1, AdamW at lr 3e-4 with 6% warm-up and linear decay,
  LoRA r 8 / alpha 16 / dropout 0.1 on query and value, a Pfeiffer adapter with reduction 16,
  prefix tuning with 60 virtual tokens. The official batch is 64 for 10 epochs; the course's
  CPU budget keeps the batch of 32 and a few epochs (the notebook states the steps);
- `COURSE_RECIPE`, the course's own: batches padded to their longest sentence, padding masked
  in the loss, the learning rates notebook 02 picked for its two-epoch budget, 10% warm-up,
  prefix tuning with 20 virtual tokens.

    recipe = paper_protocol(num_epochs=2)
    loader = recipe.loader(task.train, tokenizer, shuffle=True, seed=0)
    inject_peft(model, **recipe.methods["lora"])
    train(model, loader, lr=recipe.lr["lora"], loss_fn=recipe.loss(), **recipe.train_options())

Derived in notebooks/part3_deft/22_deft_in_practice.ipynb.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from course_lib.deft.loss import DEFAULT_EPS, DEFTLoss

__all__ = ["COURSE_RECIPE", "PAPER_PROTOCOL", "DEFTRecipe", "course_recipe", "paper_protocol"]


def _frozen(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType({key: MappingProxyType(dict(value)) if isinstance(value, Mapping) else value
                             for key, value in mapping.items()})


@dataclass(frozen=True)
class DEFTRecipe:
    """How a DEFT run pads, counts, weighs and trains; `methods` are `inject_peft` options.

    name: a label for tables. pad_to_max_length / max_length: the loader's padding.
    mask_padding: the density loss over real tokens only (False: every position, official).
    weight, eps: the density loss L_task + weight * L_density and its surrogate's eps.
    lr: learning rate per method. num_epochs, batch_size, warmup_ratio, scheduler: training.

    Derived in notebooks/part3_deft/22_deft_in_practice.ipynb.
    """

    name: str
    pad_to_max_length: bool
    mask_padding: bool
    lr: Mapping[str, float]
    methods: Mapping[str, Mapping[str, Any]]
    max_length: int = 128
    weight: float = 1.0
    eps: float = DEFAULT_EPS
    num_epochs: int = 2
    batch_size: int = 32
    warmup_ratio: float = 0.1
    scheduler: str = "linear"
    notes: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if set(self.lr) != set(self.methods):
            raise ValueError(f"lr and methods must name the same methods, got {sorted(self.lr)} and {sorted(self.methods)}")
        if any(not value > 0 for value in self.lr.values()):
            raise ValueError(f"every learning rate must be > 0, got {dict(self.lr)}")
        if not self.weight >= 0 or not self.eps > 0:
            raise ValueError(f"need weight >= 0 and eps > 0, got weight={self.weight}, eps={self.eps}")
        if self.num_epochs < 1 or self.batch_size < 1 or self.max_length < 2:
            raise ValueError("num_epochs and batch_size must be >= 1 and max_length >= 2")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        object.__setattr__(self, "lr", MappingProxyType(dict(self.lr)))
        object.__setattr__(self, "methods", _frozen(self.methods))

    def loader(self, split: Any, tokenizer: Any, *, shuffle: bool = False, seed: int | None = None,
               batch_size: int | None = None) -> Any:
        """A `course_lib.text.make_loader` DataLoader padded as the recipe says."""
        from course_lib.text import make_loader

        return make_loader(split, tokenizer, batch_size=batch_size or self.batch_size, shuffle=shuffle,
                           max_length=self.max_length, pad_to_max_length=self.pad_to_max_length, seed=seed)

    def loss(self, weight: float | None = None, **options: Any) -> DEFTLoss | None:
        """The recipe's `DEFTLoss` (None when the weight is 0: plain PEFT, no hooks)."""
        weight = self.weight if weight is None else weight
        if weight == 0:
            return None
        return DEFTLoss(weight=weight, eps=self.eps, mask_padding=self.mask_padding, **options)

    def train_options(self) -> dict[str, Any]:
        """Keywords for `course_lib.train.train`: num_epochs, warmup_ratio, scheduler."""
        return {"num_epochs": self.num_epochs, "warmup_ratio": self.warmup_ratio, "scheduler": self.scheduler}

    def to_dict(self) -> dict[str, Any]:
        """Plain values, for results JSON."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["lr"] = dict(self.lr)
        data["methods"] = {name: dict(options) for name, options in self.methods.items()}
        return data


_LORA = {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.1}  # on query and value (the default targets)
_ADAPTER = {"method": "adapter", "placement": "pfeiffer", "reduction_factor": 16}

#: The official DEFT GLUE protocol (see the module docstring); epochs and batch at the course's budget.
PAPER_PROTOCOL = DEFTRecipe(
    name="paper protocol",
    pad_to_max_length=True,
    mask_padding=False,
    lr={"lora": 3e-4, "adapter": 3e-4, "prefix": 3e-4},
    methods={"lora": _LORA, "adapter": _ADAPTER, "prefix": {"method": "prefix_tuning", "num_virtual_tokens": 60}},
    warmup_ratio=0.06,
    notes="official: batch 64, 10 epochs; here the course's batch of 32 and its epochs",
)

#: The course's masked recipe (notebook 02's learning rates for two epochs).
COURSE_RECIPE = DEFTRecipe(
    name="course recipe (masked)",
    pad_to_max_length=False,
    mask_padding=True,
    lr={"lora": 5e-3, "adapter": 5e-3, "prefix": 1e-1},  # the best of benchmarks/lr_sweep.py (validation split)
    methods={"lora": _LORA, "adapter": _ADAPTER, "prefix": {"method": "prefix_tuning", "num_virtual_tokens": 20}},
    warmup_ratio=0.1,
)


def paper_protocol(**changes: Any) -> DEFTRecipe:
    """`PAPER_PROTOCOL` with some fields changed (`paper_protocol(num_epochs=4)`).

    Derived in notebooks/part3_deft/22_deft_in_practice.ipynb.
    """
    return dataclasses.replace(PAPER_PROTOCOL, **changes)


def course_recipe(**changes: Any) -> DEFTRecipe:
    """`COURSE_RECIPE` with some fields changed.

    Derived in notebooks/part3_deft/22_deft_in_practice.ipynb.
    """
    return dataclasses.replace(COURSE_RECIPE, **changes)
