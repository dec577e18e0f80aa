"""Sparsity that a kernel can use: MLP activations set to exact zeros in the forward pass.

DEFT's density loss lowers the count of *exact* GELU zeros, and fp32 GELU is exactly 0 only
below about -5.5, so that count hardly moves (notebook 22). The methods after DEFT make zeros
on purpose, in the forward pass, so that the second projection h W2 can skip the rows of W2
whose activation is 0 (`course_lib.deft.sparse_mlp`):

- **threshold** (CATS, TEAL): a = act(z); a <- a * 1[|a| > tau_l], one tau per layer, set at a
  percentile of |a| on training data so that a fraction d of the activations is kept;
- **relu** (ReLU-fication, ProSparse's shifted ReLU): a = ReLU(z - tau_l); tau = 0 is plain
  ReLU, tau > 0 a shifted one, calibrated the same way (tau_l = the (1 - d) quantile of z).

Both change what the layer computes, so the pre-trained model moves away from its starting
point. The largest part of that move is a constant: the dropped part a - a_sparse has a mean
m_l (GELU's negative lobe alone is -0.17 at its lowest), and W2 turns it into the same offset
W2 m_l on every token. **Bias correction** folds it back into the second projection:

    b2 <- b2 + W2 m_l,     m_l = mean over real calibration tokens of (act(z) - sparse(z))   # (H,)

as in post-training quantisation. Layers are calibrated in order, each on the inputs that the
already sparsified and corrected layers below it produce. Fine-tuning (LoRA, ...) then trains
through the sparse forward: zeroed units get no gradient, the kept ones do, and accuracy is
measured on the sparsified model itself.

    report = sparsify_activations(model, calibration_loader, SparsityConfig("threshold", target_density=0.12))
    inject_peft(model, "lora", ...)   # then train as usual

Derived in notebooks/part3_deft/23_sparse_inference.ipynb (and introduced in notebook 20).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from course_lib.batches import move_to_device
from course_lib.meters.density import _forward, _model_device, find_activation_modules

__all__ = [
    "SPARSITY_KINDS",
    "SparseActivation",
    "SparsificationReport",
    "SparsityConfig",
    "calibrate_thresholds",
    "second_projection_name",
    "sparsify_activations",
]

SPARSITY_KINDS = ("threshold", "relu")

#: How to find the second MLP projection from the activation module's name: (suffix, replacement).
SECOND_PROJECTION_RULES: tuple[tuple[str, str], ...] = (
    ("intermediate.intermediate_act_fn", "output.dense"),  # BERT, RoBERTa, MiniLM (Hugging Face)
    ("mlp.activation", "mlp.fc2"),  # course_lib.transformer blocks (the tiny Point-MAE)
    ("mlp.act", "mlp.fc2"),  # ViT/timm-style blocks
)


class SparseActivation(nn.Module):
    """An MLP activation whose small outputs are exact zeros: z (..., H) -> a (..., H).

    kind "threshold": a = act(z) * 1[|act(z)| > threshold] (CATS-style, `act` is the original
    activation module); kind "relu": a = ReLU(z - threshold) (threshold 0: plain ReLU).
    The threshold is a buffer (saved with the model, never trained).

    Derived in notebooks/part3_deft/23_sparse_inference.ipynb.
    """

    def __init__(self, activation: nn.Module, kind: str = "threshold", threshold: float = 0.0) -> None:
        super().__init__()
        if kind not in SPARSITY_KINDS:
            raise ValueError(f"kind must be one of {SPARSITY_KINDS}, got {kind!r}")
        if not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
            raise ValueError(f"threshold must be a finite number, got {threshold!r}")
        if kind == "threshold" and threshold < 0:
            raise ValueError(f"a magnitude threshold must be >= 0, got {threshold}")
        self.kind = kind
        self.activation = activation  # kept for "threshold"; "relu" replaces it
        self.register_buffer("threshold", torch.tensor(float(threshold)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.kind == "relu":
            return F.relu(z - self.threshold)  # exact zeros wherever z <= tau
        a = self.activation(z)
        return a * (a.abs() > self.threshold)  # |a| <= tau -> exact 0; the gradient flows through the kept ones

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, threshold={self.threshold.item():.4g}"


@dataclass(frozen=True)
class SparsityConfig:
    """How to sparsify the MLP activations of a model (`sparsify_activations`).

    kind: "threshold" (|act(z)| > tau kept) or "relu" (ReLU(z - tau)).
    target_density: the fraction of activations kept on the calibration data, per layer
        (threshold: tau = the (1 - d) quantile of |act(z)|; relu: tau = the (1 - d) quantile
        of z). None for "relu" means plain ReLU (tau = 0); "threshold" needs a value.
    correct_bias: fold the mean of the dropped part into the second projection's bias.
    module_pattern: the activation modules (a whole-name regex or a list of name endings, as in `course_lib.peft`; default: `course_lib.meters`' known names).
    mask_padding: calibrate on real tokens only (dict batches with an "attention_mask").
    max_values: values per layer used for the quantile (an even subsample beyond that).

    Derived in notebooks/part3_deft/23_sparse_inference.ipynb.
    """

    kind: str = "threshold"
    target_density: float | None = 0.15
    correct_bias: bool = True
    module_pattern: str | None = None
    mask_padding: bool = True
    max_values: int = 2_000_000

    def __post_init__(self) -> None:
        if self.kind not in SPARSITY_KINDS:
            raise ValueError(f"kind must be one of {SPARSITY_KINDS}, got {self.kind!r}")
        if self.target_density is None:
            if self.kind == "threshold":
                raise ValueError("kind 'threshold' needs a target_density in (0, 1), e.g. 0.15")
        elif not 0.0 < self.target_density < 1.0:
            raise ValueError(f"target_density must be in (0, 1) (the fraction of activations kept), got {self.target_density}")
        if self.max_values < 1:
            raise ValueError(f"max_values must be >= 1, got {self.max_values}")

    @property
    def percentile(self) -> float | None:
        """The calibration percentile, 100 (1 - target_density), or None for plain ReLU."""
        return None if self.target_density is None else 100.0 * (1.0 - self.target_density)


@dataclass
class SparsificationReport:
    """What `sparsify_activations` changed: per layer, the threshold, the kept fraction, the bias shift.

    Derived in notebooks/part3_deft/23_sparse_inference.ipynb.
    """

    kind: str
    thresholds: dict[str, float]  # activation module -> tau
    calibration_density: dict[str, float]  # kept fraction of the calibration activations, per layer
    bias_corrected: dict[str, str] = field(default_factory=dict)  # activation module -> second projection
    bias_shift_norm: dict[str, float] = field(default_factory=dict)  # ||W2 m_l|| per layer
    num_calibration_tokens: int = 0

    @property
    def mean_calibration_density(self) -> float:
        return sum(self.calibration_density.values()) / len(self.calibration_density)

    def __str__(self) -> str:
        taus = ", ".join(f"{value:.3g}" for value in self.thresholds.values())
        corrected = "bias corrected" if self.bias_corrected else "no bias correction"
        return (
            f"sparsified {len(self.thresholds)} activations ({self.kind}, {corrected}): calibration density "
            f"{self.mean_calibration_density:.3f} on {self.num_calibration_tokens} tokens; thresholds [{taus}]"
        )


def second_projection_name(activation_name: str, rules: Iterable[tuple[str, str]] = SECOND_PROJECTION_RULES) -> str:
    """The name of the Linear that follows an activation module (its W2), by the known layouts.

    Raises ValueError for an unknown layout: pass `second_projection=` to `sparsify_activations`.
    Derived in notebooks/part3_deft/23_sparse_inference.ipynb.
    """
    for suffix, replacement in rules:
        if activation_name == suffix or activation_name.endswith("." + suffix):
            return activation_name[: len(activation_name) - len(suffix)] + replacement
    raise ValueError(
        f"no known second projection for the activation {activation_name!r}: pass second_projection=<a function from the "
        f"activation's name to the name of the nn.Linear after it>, or correct_bias=False"
    )


def _batches_list(batches: Iterable[Any]) -> list[Any]:
    batches = list(batches)
    if not batches:
        raise ValueError("the calibration data is empty: pass a DataLoader (or list) with at least one batch")
    return batches


def _real_token_mask(batch: Any, mask_padding: bool) -> torch.Tensor | None:
    inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
    if not mask_padding or not isinstance(inputs, Mapping):
        return None
    mask = inputs.get("attention_mask")
    return None if mask is None else mask.bool()


@torch.no_grad()
def _pre_activations(model: nn.Module, module: nn.Module, batches: list[Any], mask_padding: bool) -> torch.Tensor:
    """The inputs z of `module` over the calibration batches, real tokens only: (tokens, H)."""
    rows: list[torch.Tensor] = []
    current_mask: list[torch.Tensor | None] = [None]

    def hook(_module: nn.Module, inputs: tuple[Any, ...]) -> None:
        z = inputs[0].detach()
        mask = current_mask[0]
        if mask is not None and tuple(z.shape[:2]) == tuple(mask.shape):
            rows.append(z[mask.to(z.device)])  # (real tokens, H)
        else:
            rows.append(z.reshape(-1, z.shape[-1]))  # (B * T, H)

    device = _model_device(model)
    handle = module.register_forward_pre_hook(hook)
    try:
        for batch in batches:
            current_mask[0] = _real_token_mask(batch, mask_padding)
            _forward(model, move_to_device(batch, device))
    finally:
        handle.remove()
    return torch.cat(rows)


def _quantile(values: torch.Tensor, q: float, max_values: int) -> float:
    flat = values.flatten().float()
    if flat.numel() > max_values:  # torch.quantile has an input size limit; an even subsample is plenty
        flat = flat[:: math.ceil(flat.numel() / max_values)]
    return torch.quantile(flat, q).item()


def calibrate_thresholds(
    model: nn.Module,
    batches: Iterable[Any],
    percentile: float,
    module_pattern: str | None = None,
    *,
    mask_padding: bool = True,
    max_values: int = 2_000_000,
) -> dict[str, float]:
    """Per-layer tau = the `percentile` of |act(z)| over the calibration batches (CATS-style).

    Measured on the model as it is (no layer changed): `sparsify_activations` calibrates layer
    by layer instead, each on the outputs of the already sparsified layers below it.
    Raises ValueError for a percentile outside (0, 100), an empty loader or a pattern that
    matches nothing.

    Derived in notebooks/part3_deft/23_sparse_inference.ipynb.
    """
    if not 0.0 < percentile < 100.0:
        raise ValueError(f"percentile must be in (0, 100), got {percentile}")
    modules = find_activation_modules(model, module_pattern)
    batches = _batches_list(batches)
    was_training = model.training
    model.eval()
    try:
        thresholds = {}
        for name, module in modules.items():
            z = _pre_activations(model, module, batches, mask_padding)
            with torch.no_grad():
                thresholds[name] = _quantile(module(z).abs(), percentile / 100.0, max_values)
        return thresholds
    finally:
        model.train(was_training)


def sparsify_activations(
    model: nn.Module,
    batches: Iterable[Any],
    config: SparsityConfig | None = None,
    *,
    second_projection: Callable[[str], str] | None = None,
) -> SparsificationReport:
    """Replace each MLP activation of `model` by a `SparseActivation`, calibrated on `batches`, in place.

    Layer by layer, in order: collect the layer's pre-activations z on the calibration data
    (real tokens), set tau from `config.target_density`, swap the module, and (with
    `config.correct_bias`) add W2 m_l to the second projection's bias. `second_projection`
    maps an activation's name to its W2's name (default: `second_projection_name`).
    A module that is already a `SparseActivation` is refused (sparsify once).

    Derived in notebooks/part3_deft/23_sparse_inference.ipynb.
    """
    config = config if config is not None else SparsityConfig()
    modules = find_activation_modules(model, config.module_pattern)
    already = [name for name, module in modules.items() if isinstance(module, SparseActivation)]
    if already:
        raise ValueError(f"these activations are already sparsified: {already[:3]}; sparsify a fresh copy of the model")
    batches = _batches_list(batches)
    find_projection = second_projection or second_projection_name
    projections: dict[str, nn.Linear] = {}
    if config.correct_bias:
        for name in modules:
            projection_name = find_projection(name)
            try:
                projection = model.get_submodule(projection_name)
            except AttributeError:
                raise ValueError(f"{name}: its second projection {projection_name!r} is not a module of the model") from None
            if not isinstance(projection, nn.Linear) or projection.bias is None:
                raise ValueError(f"{projection_name} must be an nn.Linear with a bias to correct, got {type(projection).__name__}")
            projections[name] = projection

    report = SparsificationReport(kind=config.kind, thresholds={}, calibration_density={})
    was_training = model.training
    model.eval()
    try:
        for name, module in modules.items():
            z = _pre_activations(model, module, batches, config.mask_padding)  # (tokens, H)
            report.num_calibration_tokens = z.shape[0]
            with torch.no_grad():
                if config.kind == "threshold":
                    tau = _quantile(module(z).abs(), config.percentile / 100.0, config.max_values)
                else:  # relu: z - tau > 0 for a fraction d of the values
                    tau = 0.0 if config.target_density is None else _quantile(z, config.percentile / 100.0, config.max_values)
                sparse = SparseActivation(module, config.kind, tau).to(z.device)
                kept = sparse(z)  # (tokens, H)
                report.thresholds[name] = tau
                report.calibration_density[name] = (kept != 0).float().mean().item()
                if config.correct_bias:
                    projection = projections[name]
                    dropped_mean = (module(z) - kept).mean(dim=0)  # m_l (H,)
                    shift = projection.weight @ dropped_mean.to(projection.weight.dtype)  # W2 m_l (C,)
                    projection.bias.add_(shift)
                    report.bias_corrected[name] = find_projection(name)
                    report.bias_shift_norm[name] = shift.norm().item()
            parent_name, _, attribute = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attribute, sparse)
    finally:
        model.train(was_training)
    return report
