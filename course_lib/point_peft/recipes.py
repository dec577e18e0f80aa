"""What a run of notebook 16's experiments is: the settings, the recipe, the run's description.

- `SETTINGS` (notebook 16's, from no pretraining to Point-PEFT) and `REVERSIBLE_SETTINGS`
  (MEFT on the point transformer, notebook 33);
- `PointRecipe`: data and training recipe of one run; `results_recipe(variant)`: notebook 16's;
- `SettingRun`: (setting, seed, recipe, options), what `course_lib.point_peft.experiments`
  builds, trains and measures, alone (`run_setting`) or in worker processes (`run_settings`);
- the tiny backbone's sizes (`TINY_HEAD_HIDDEN_DIM`, `tiny_point_peft_config`) and the
  augmentations of the scans and of the clean set.

Derived in notebooks/part2_point_peft/16_point_peft_results.ipynb.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from course_lib import config
from course_lib.meft import MEFTConfig
from course_lib.point_peft.model import PointPEFTConfig
from course_lib.points.datasets import SHAPE_VARIANTS
from course_lib.points.transforms import random_scale_translate, rotate_about_up_axis

__all__ = [
    "LORA_TARGETS",
    "NEW_PARTS",
    "REVERSIBLE_SETTINGS",
    "SETTINGS",
    "TINY_HEAD_HIDDEN_DIM",
    "TINY_POINT_PEFT_OVERRIDES",
    "PointRecipe",
    "SettingRun",
    "clean_augmentation",
    "results_recipe",
    "scan_augmentation",
    "tiny_point_peft_config",
]

#: The settings of notebook 16, from no pretraining to Point-PEFT.
SETTINGS = ("from_scratch", "linear_probe", "full_finetune", "lora", "prompt_only", "adapter_only", "point_peft")

#: MEFT on the point transformer (`course_lib.meft.point`): reversible blocks with adapters, trained
#: like the PEFT settings (notebook 33, benchmarks/point_reversible.py); `SettingRun.meft` says which.
REVERSIBLE_SETTINGS = ("meft",)

#: Hidden width of the classification head for the tiny backbone (Point-MAE: 256 at C = 384).
TINY_HEAD_HIDDEN_DIM = 48

#: Parameters that the pretrained checkpoint does not have: trained alone in the first epoch.
NEW_PARTS = ("head.", "cls_token", "cls_position")

#: LoRA on the attention's query and value projections of every block (peft's BERT default).
LORA_TARGETS = r"blocks\.\d+\.attention\.(query|value)"


#: Where the tiny recipe departs from the official Point-PEFT config (`PointPEFTConfig()`).
TINY_POINT_PEFT_OVERRIDES: dict[str, Any] = {
    "adapter_bottleneck": 4,
    "retrieval_bottleneck": 4,
    "bank_query_in_training": True,
    "zero_init": True,
    "anchor_scale": 0.0,
}


def tiny_point_peft_config(**overrides: Any) -> PointPEFTConfig:
    """Point-PEFT for the tiny backbone and a short budget: the official config with the
    `TINY_POINT_PEFT_OVERRIDES` (then `overrides`).

    - C -> 4 -> C bottlenecks: the official adapter (C -> 16 -> C) and retrieval (C -> 8 -> C)
      bottlenecks are for C = 384; scaled by 128 / 384 they are about 5 and 3.
    - `bank_query_in_training=True`: a training shape's retrieval query is its bank row (see
      `PointPEFTConfig`), which saves one frozen forward per step.
    - `zero_init=True, anchor_scale=0`: the adapters start as the identity, so the wrapped model
      starts from the pretrained encoder's function (prompts aside) instead of a randomly
      perturbed one. The paper trains 300 epochs, notebook 16's recipe 44 steps: too few to undo
      a random start. `anchor_scale` is a fixed scale, not an initial value, so this also drops
      the anchor term 0.3 x_a for all of training. Notebook 16 measures the official init beside
      it, and the anchor term put back (`anchor_scale=0.3`) as an ablation.

    Derived in notebooks/part2_point_peft/16_point_peft_results.ipynb.
    """
    return PointPEFTConfig(**(TINY_POINT_PEFT_OVERRIDES | overrides))


def scan_augmentation(points: Tensor) -> Tensor:
    """(N, 3) -> (N, 3): scale U(0.9, 1.1) per axis, turn U(0, 2 pi) about the up axis (PB_T50_RS).

    Derived in notebooks/part2_point_peft/16_point_peft_results.ipynb.
    """
    return rotate_about_up_axis(random_scale_translate(points, scale_range=(0.9, 1.1), translate_range=0.0))


def clean_augmentation(points: Tensor) -> Tensor:
    """(N, 3) -> (N, 3): scale U(2/3, 3/2) per axis and shift U(-0.2, 0.2) (the clean set).

    Derived in notebooks/part2_point_peft/16_point_peft_results.ipynb.
    """
    return random_scale_translate(points)


@dataclass(frozen=True)
class PointRecipe:
    """Data and training recipe of one run (defaults: notebook 13's, with the tiny head).

    Attributes:
        variant: shape variant ("pb_t50_rs", "clean", ...).
        train_per_class / test_per_class: shapes per class (None: all stored).
        num_points: points per cloud the encoder sees (it was pretrained on 1024).
        head_fit_epochs: first, the head alone is fitted on the model's frozen features of the
            un-augmented training set (computed once, in eval mode): "linear probe, then
            fine-tune" (LP-FT, Kumar et al. 2022), so fine-tuning starts from a head that already
            reads the features, not from a random one. 0 skips it.
        head_epochs: then epochs that train only `NEW_PARTS` (head, CLS) on augmented clouds.
        num_epochs: epochs of the setting's parameters.
        lr: full fine-tuning and from scratch; peft_lr: every other trained setting.
        lora_rank: LoRA's r (alpha = 2 r).
        activation_batch: batch size for the activation-memory meter (one training step).
        precise_batch_norm: recompute the trained BatchNorms' statistics over the training set
            before testing (`recalibrate_batch_norm`).
        running_stats_accuracy: with precise BN, also test before it, with the running
            statistics training left ("acc_running_bn_stats"): one more pass over the test set.
        peak_memory: also measure the peak of live allocated bytes of one training step
            (forward, backward, AdamW with its state) at `activation_batch` shapes, after the
            test, on a copy of the trained model (`course_lib.meters.measure_peak_memory`).

    Derived in notebooks/part2_point_peft/16_point_peft_results.ipynb.
    """

    variant: str = "pb_t50_rs"
    train_per_class: int | None = 40
    test_per_class: int | None = None
    num_points: int = 1024
    batch_size: int = 32
    head_fit_epochs: int = 0
    head_epochs: int = 1
    num_epochs: int = 7
    lr: float = 1e-3
    peft_lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_ratio: float = 0.1
    head_hidden_dim: int = TINY_HEAD_HIDDEN_DIM
    head_dropout: float = 0.1
    lora_rank: int = 8
    precise_batch_norm: bool = True
    activation_batch: int = 32
    running_stats_accuracy: bool = True
    peak_memory: bool = False

    def __post_init__(self) -> None:
        if self.variant not in SHAPE_VARIANTS:
            raise ValueError(f"unknown shape variant {self.variant!r}; choose one of {list(SHAPE_VARIANTS)}")
        if self.num_epochs < 1 or self.head_epochs < 0 or self.head_fit_epochs < 0:
            raise ValueError(
                f"need num_epochs >= 1, head_epochs >= 0 and head_fit_epochs >= 0, got {self.num_epochs}, "
                f"{self.head_epochs} and {self.head_fit_epochs}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def results_recipe(variant: str = "pb_t50_rs") -> PointRecipe:
    """Notebook 16's recipe for `variant` (PB_T50_RS: 24 training scans per class, all test scans,
    30 epochs of head fit on frozen features, then 4 epochs of the setting; the clean set: 1), as
    the notebook, the reversible notebook 33 and benchmarks/point_reversible.py use it; with
    COURSE_FAST=1 the tiny version of `make test`.

    Full fine-tuning and training from scratch at lr 1e-3 (notebook 13), the PEFT settings at
    3e-3 (few parameters, larger steps); the accuracy before precise BN is not measured.

    Derived in notebooks/part2_point_peft/16_point_peft_results.ipynb.
    """
    recipe = PointRecipe(
        variant="pb_t50_rs",
        train_per_class=config.fast_or_full(2, 24),
        test_per_class=config.fast_or_full(1, None),
        batch_size=config.fast_or_full(8, 32),
        head_fit_epochs=config.fast_or_full(2, 30),
        head_epochs=0,
        num_epochs=config.fast_or_full(1, 4),
        lr=1e-3,
        peft_lr=3e-3,
        activation_batch=config.fast_or_full(8, 32),
        running_stats_accuracy=False,
    )
    if variant == "pb_t50_rs":
        return recipe
    return dataclasses.replace(recipe, variant=variant, num_epochs=1)  # the clean set is easy (notebook 13)


@dataclass(frozen=True)
class SettingRun:
    """One run: a setting of `SETTINGS` (or `REVERSIBLE_SETTINGS`), a seed, a recipe, and Point-PEFT options for the
    prompt/adapter settings (`tiny_point_peft_config()` when None), MEFT's for "meft"
    (`MEFTConfig("meft1")` when None). `label` names the run in
    tables (default: the setting).

    Derived in notebooks/part2_point_peft/16_point_peft_results.ipynb.
    """

    setting: str
    seed: int = 0
    recipe: PointRecipe = field(default_factory=PointRecipe)
    point_peft: PointPEFTConfig | None = None
    label: str | None = None
    meft: MEFTConfig | None = None

    def __post_init__(self) -> None:
        if self.setting not in SETTINGS + REVERSIBLE_SETTINGS:
            raise ValueError(f"unknown setting {self.setting!r}; choose one of {list(SETTINGS + REVERSIBLE_SETTINGS)}")

    @property
    def name(self) -> str:
        return self.label or self.setting
