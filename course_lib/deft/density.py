"""Measuring DEFT's quantity: how many MLP activations are non-zero, per layer and on average.

The counting itself lives in `course_lib.meters.density` (hooks on the activation modules,
`count_active`); this module adds what Part 3 reports and plots:

- `measure_density`      per-layer density over batches -> a `DensityReport` (mean over layers:
                         the number DEFT puts in its tables, x100)
- `collect_activations`  the post-activation MLP outputs of one batch, per layer (for histograms)
- `gelu_zero_range`      below which pre-activation GELU gives an exact 0 in a given dtype

    density = #{ |a| > tau } / #a       tau = 0: the exact non-zero fraction (DEFT's metric)

The official DEFT code counts padding tokens too (`mask_padding=False`); with
`mask_padding=True` only real tokens count.

Derived in notebooks/part3_deft/20_activation_sparsity.ipynb.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from course_lib.batches import call_model, model_inputs, move_to_device
from course_lib.meters.density import (
    ActivationCollector,
    _forward,
    _model_device,
    count_active,
    density_over_batches,
    find_activation_modules,
)

__all__ = [
    "DensityByPosition",
    "DensityReport",
    "collect_activations",
    "gelu_zero_range",
    "measure_density",
    "measure_density_by_position",
    "relative_reduction",
]


@dataclass(frozen=True)
class DensityReport:
    """Per-layer activation density (0..1) and how it was counted.

    Derived in notebooks/part3_deft/20_activation_sparsity.ipynb.
    """

    per_layer: dict[str, float]  # module name -> fraction of |a| > threshold
    threshold: float
    mask_padding: bool

    @property
    def mean(self) -> float:
        """Mean over layers (DEFT's reported density, as a fraction; x100 for %)."""
        return sum(self.per_layer.values()) / len(self.per_layer)

    def __str__(self) -> str:
        counted = "real tokens" if self.mask_padding else "all tokens (padding too)"
        kind = "exact non-zero" if self.threshold == 0 else f"|a| > {self.threshold:g}"
        layers = ", ".join(f"{value:.3f}" for value in self.per_layer.values())
        return f"density ({kind}, {counted}): mean {self.mean:.4f} over {len(self.per_layer)} layers [{layers}]"


def measure_density(
    model: nn.Module,
    batches: Iterable[Any],
    module_pattern: str | None = None,
    *,
    threshold: float = 0.0,
    mask_padding: bool = True,
) -> DensityReport:
    """Density of the MLP activations of `model` over `batches`, per layer, in eval mode.

    `batches`: HF-style dict batches (a DataLoader of `course_lib.text.make_loader`), tensors or
    (inputs, labels) pairs. `module_pattern` names the activation modules (a whole-name regex or a list of name endings, as in `course_lib.peft`; default: the
    known architectures of `course_lib.meters.DEFAULT_ACTIVATION_PATTERNS`; the tiny Point-MAE
    needs `r".*mlp\\.activation"`). `threshold=0` counts exact non-zeros, as DEFT does.

    Derived in notebooks/part3_deft/20_activation_sparsity.ipynb.
    """
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    per_layer = density_over_batches(model, batches, module_pattern, threshold=threshold, mask_padding=mask_padding)
    return DensityReport(per_layer=per_layer, threshold=float(threshold), mask_padding=mask_padding)


@dataclass(frozen=True)
class DensityByPosition:
    """The three densities DEFT's results are reported with, side by side (fractions, 0..1).

    - `all`:     every position, padding included: the paper's measure (official code,
                 `count_nonzero(output, dim=[1, 2]) / (T * 4C)` with no mask);
    - `real`:    real tokens only (what an inference on unpadded inputs computes);
    - `padding`: padding positions only (None when the batches have no padding).

    Each is a mean over layers of the per-layer fraction; per-layer values are kept too.
    With padded batches, `all` = (real tokens x real + padding x padding) / positions, layer
    by layer, so it mixes the two in the proportion of the padding.

    Derived in notebooks/part3_deft/22_deft_in_practice.ipynb.
    """

    all: float
    real: float
    padding: float | None
    per_layer: dict[str, dict[str, float | None]]  # layer -> {"all", "real", "padding"}
    padding_share: float  # fraction of the positions that are padding
    threshold: float = 0.0

    def as_dict(self) -> dict[str, float | None]:
        """{"all", "real", "padding"}: the shape `results/deft.json` stores."""
        return {"all": self.all, "real": self.real, "padding": self.padding}

    def __str__(self) -> str:
        padding = "n/a" if self.padding is None else f"{self.padding:.4f}"
        return (
            f"density all positions {self.all:.4f} | real tokens {self.real:.4f} | padding {padding} "
            f"({100 * self.padding_share:.0f}% of positions are padding)"
        )


@torch.no_grad()
def measure_density_by_position(
    model: nn.Module, batches: Iterable[Any], module_pattern: str | None = None, *, threshold: float = 0.0
) -> DensityByPosition:
    """Density over all positions, real tokens and padding positions, in one pass, in eval mode.

    `batches`: dict batches with an "attention_mask" (1 = real token); a batch without one
    counts as all real tokens. Raises ValueError for a negative threshold or an empty loader.

    Derived in notebooks/part3_deft/22_deft_in_practice.ipynb.
    """
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    modules = find_activation_modules(model, module_pattern)
    counts = {name: {"real": [0, 0], "padding": [0, 0]} for name in modules}
    current_mask: list[torch.Tensor | None] = [None]

    def make_hook(name: str):
        def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            mask = current_mask[0]
            if mask is None or tuple(output.shape[:2]) != tuple(mask.shape):
                if mask is not None:
                    raise ValueError(
                        f"{name}: activation tokens {tuple(output.shape[:2])} do not match the attention mask "
                        f"{tuple(mask.shape)} (a method that adds tokens, such as prompt tuning): use measure_density"
                    )
                mask = torch.ones(output.shape[:2], dtype=torch.long, device=output.device)
            for part, part_mask in (("real", mask), ("padding", 1 - mask.long())):
                active, counted = count_active(output, threshold, part_mask)
                counts[name][part][0] += active
                counts[name][part][1] += counted

        return hook

    device = _model_device(model)
    was_training = model.training
    model.eval()
    handles = [module.register_forward_hook(make_hook(name)) for name, module in modules.items()]
    seen = 0
    try:
        for batch in batches:
            inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
            current_mask[0] = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
            _forward(model, move_to_device(batch, device))
            seen += 1
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if seen == 0:
        raise ValueError("no batches: pass a non-empty DataLoader or list of batches")

    def fraction(active: int, counted: int) -> float | None:
        return active / counted if counted else None

    per_layer: dict[str, dict[str, float | None]] = {}
    for name, parts in counts.items():
        (real_active, real_counted), (pad_active, pad_counted) = parts["real"], parts["padding"]
        per_layer[name] = {
            "all": fraction(real_active + pad_active, real_counted + pad_counted),
            "real": fraction(real_active, real_counted),
            "padding": fraction(pad_active, pad_counted),
        }
    first = next(iter(counts.values()))
    positions = first["real"][1] + first["padding"][1]
    padding_share = first["padding"][1] / positions if positions else 0.0

    def mean_of(part: str) -> float | None:
        values = [layer[part] for layer in per_layer.values()]
        return None if any(v is None for v in values) else sum(values) / len(values)

    return DensityByPosition(
        all=mean_of("all"), real=mean_of("real"), padding=mean_of("padding"), per_layer=per_layer,
        padding_share=padding_share, threshold=float(threshold),
    )


@torch.no_grad()
def collect_activations(
    model: nn.Module, batch: Any, module_pattern: str | None = None, *, mask_padding: bool = True
) -> dict[str, torch.Tensor]:
    """Post-activation MLP outputs of one forward pass, per layer, as (tokens, hidden) tensors.

    With `mask_padding` (and a dict batch with an "attention_mask"), padding tokens are dropped,
    so the rows are the real tokens of the batch, in order. Eval mode, no gradients; the model's
    mode is restored.

    Derived in notebooks/part3_deft/20_activation_sparsity.ipynb.
    """
    inputs = model_inputs(batch)
    if isinstance(inputs, Mapping):
        inputs = model_inputs(inputs)  # a pair whose inputs are a dict with labels
    if not isinstance(inputs, (Mapping, torch.Tensor)):
        raise TypeError(f"batch must be a dict of tensors, a tensor or an (inputs, labels) pair, got {type(batch).__name__}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with ActivationCollector(model, module_pattern) as collector:
            call_model(model, move_to_device(inputs, device))
            activations = dict(collector.activations)
    finally:
        model.train(was_training)
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) and mask_padding else None
    result = {}
    for name, activation in activations.items():  # (B, T, H)
        if mask is not None:
            if activation.shape[:2] != mask.shape:
                raise ValueError(
                    f"{name}: activation tokens {tuple(activation.shape[:2])} do not match the attention mask "
                    f"{tuple(mask.shape)}; pass mask_padding=False"
                )
            result[name] = activation[mask.to(activation.device).bool()]  # (real tokens, H)
        else:
            result[name] = activation.reshape(-1, activation.shape[-1])  # (B * T, H)
    return result


def gelu_zero_range(
    dtype: torch.dtype = torch.float32, approximate: str = "none", low: float = -8.0, high: float = -4.0, step: float = 1e-5
) -> tuple[float, float]:
    """(x_all_zero, x_last_zero): GELU(x) == 0 exactly for every x < x_all_zero and for no x > x_last_zero.

    GELU(x) = x Phi(x) only rounds to an exact 0 deep in the negative tail: in float32 below
    about -5.54 (GELU(-5.5) = -1.6e-7 is still non-zero). Where the edge is ragged, rounding
    gives some zeros and some non-zeros between the two values (x_all_zero <= x_last_zero); where
    it is clean they are neighbouring grid points (x_all_zero = x_last_zero + step): which one
    depends on the CPU (PyTorch's vectorised erf differs in the last bits between AVX2 and
    AVX-512). This is why a pre-trained BERT has almost no exact-zero
    MLP activations, and why DEFT has to push pre-activations that far down. Found by scanning
    `[low, high]` in steps of `step` in `dtype`.

    Derived in notebooks/part3_deft/20_activation_sparsity.ipynb.
    """
    if not low < high or step <= 0:
        raise ValueError(f"need low < high and step > 0, got low={low}, high={high}, step={step}")
    xs = torch.arange(low, high, step, dtype=torch.float64).to(dtype)  # (S,)
    is_zero = F.gelu(xs, approximate=approximate) == 0
    if not is_zero.any() or is_zero.all():
        raise ValueError(f"GELU in {dtype} does not cross from zero to non-zero inside [{low}, {high}]: widen the range")
    nonzero_xs, zero_xs = xs[~is_zero], xs[is_zero]
    return float(nonzero_xs.min()), float(zero_xs.max())


def relative_reduction(before: float, after: float) -> float:
    """1 - after / before: the fraction of the density that went away (DEFT's "reduced by 44.9%").

    Derived in notebooks/part3_deft/20_activation_sparsity.ipynb.
    """
    if before <= 0:
        raise ValueError(f"the density before must be > 0, got {before}")
    return 1.0 - after / before
