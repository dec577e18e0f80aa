"""Activation memory as a formula in batch size B, sequence length T and depth L, fitted to measurements.

Every tensor a training step saves has a batch dimension (or none), and its other dimensions are
T, T x T (attention), C or 4C; a model with L layers saves L copies of the per-layer tensors. So
the saved bytes of a method are exactly

    bytes(B, T, L) = B * (a + b T + c T L + d T^2 + e T^2 L) + (f + g L + h T)

(f, g, h: tensors without a batch dimension, such as MEFT's saved random-number-generator
states, or the token-type ids Hugging Face expands from a (1, T) buffer).
We measure a small grid of (B, T, L) once with `course_lib.meters.measure_activation_memory`
(forward only: the bytes are known when the forward pass ends), solve for the eight
coefficients by least squares, and then predict any size instantly: that is what the memory-curve
widget draws. The fit is checked against sizes it did not see (tests, notebook 30).

The **peak** of a training step (what decides whether a batch fits) is a maximum over time, and
the phase that holds it changes with the sizes: full fine-tuning peaks in the optimizer step
(gradients and AdamW's temporaries) for a tiny batch and at the start of backward for a big one.
So `fit_peak_costs` fits the same formula to the peak of each phase (forward, backward, optimizer
step, measured with `course_lib.meters.measure_phase_peaks`) and predicts the largest of the three:
a `PeakCostModel`. Each phase's peak is a sum of tensors of the same shapes as above (saved
activations, the gradients written so far, one layer's temporaries), but *which* tensors are live
at the phase's peak may change with the sizes too, so the peak grid is taken where activations
dominate (B in {2, 4}, T in {32, 64, 128}) and the fit is checked off the grid: notebook 30
prints the error at notebook 32's batch (16 x 128, 6 layers) and asserts it under 3%;
tests/test_meft_memory_costs.py holds LoRA and MEFT1 to 2% at 6 x 64, 4 layers.

Derived in notebooks/part4_meft/30_where_memory_goes.ipynb.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from course_lib.meft.methods import METHOD_NAMES, build_method
from course_lib.meters.memory import MIB, measure_activation_memory
from course_lib.meters.peak import measure_phase_peaks

__all__ = [
    "COST_TERMS",
    "PEAK_PHASES",
    "ActivationCostModel",
    "PeakCostModel",
    "fit_activation_costs",
    "fit_peak_costs",
    "measure_saved_bytes",
    "measure_step_peaks",
]

#: The phases of a training step whose peaks `fit_peak_costs` fits one formula each.
PEAK_PHASES: tuple[str, ...] = ("forward", "backward", "optimizer")

#: The terms of the formula, in the order of `ActivationCostModel.coefficients`.
COST_TERMS: tuple[str, ...] = ("B", "B*T", "B*T*L", "B*T^2", "B*T^2*L", "1", "L", "T")


def _features(batch_size: float, seq_len: float, num_layers: float) -> np.ndarray:
    B, T, L = float(batch_size), float(seq_len), float(num_layers)
    return np.array([B, B * T, B * T * L, B * T * T, B * T * T * L, 1.0, L, T])


@dataclass(frozen=True)
class ActivationCostModel:
    """Fitted saved-bytes formula of one method: `predict_bytes(B, T, L)`, `predict_mib(B, T, L)`.

    `coefficients` follow `COST_TERMS`; `max_relative_residual` is the worst misfit on the grid
    it was fitted to; `measurements` maps (B, T, L) to the measured bytes.

    Derived in notebooks/part4_meft/30_where_memory_goes.ipynb.
    """

    method: str
    coefficients: tuple[float, ...]
    max_relative_residual: float
    measurements: dict[tuple[int, int, int], int] = field(default_factory=dict)

    def predict_bytes(self, batch_size: float, seq_len: float, num_layers: float) -> float:
        if min(batch_size, seq_len, num_layers) <= 0:
            raise ValueError(f"batch_size, seq_len and num_layers must be positive, got {batch_size}, {seq_len}, {num_layers}")
        return float(_features(batch_size, seq_len, num_layers) @ np.asarray(self.coefficients))

    def predict_mib(self, batch_size: float, seq_len: float, num_layers: float) -> float:
        return self.predict_bytes(batch_size, seq_len, num_layers) / MIB

    def per_token_per_layer_bytes(self, seq_len: float) -> float:
        """Bytes one token adds per layer at length `seq_len`: c + e T (0 for MEFT: flat in depth)."""
        return self.coefficients[2] + self.coefficients[4] * seq_len


@dataclass(frozen=True)
class PeakCostModel:
    """Fitted peak of a training step without the weights: one `ActivationCostModel` per phase of
    `PEAK_PHASES` (`phases`), the prediction is the largest. `max_relative_residual` is the worst
    misfit of any phase on its grid.

    Derived in notebooks/part4_meft/30_where_memory_goes.ipynb.
    """

    method: str
    phases: dict[str, ActivationCostModel]

    @property
    def max_relative_residual(self) -> float:
        return max(model.max_relative_residual for model in self.phases.values())

    def predict_by_phase(self, batch_size: float, seq_len: float, num_layers: float) -> dict[str, float]:
        """phase -> predicted peak bytes (weights excluded)."""
        return {name: model.predict_bytes(batch_size, seq_len, num_layers) for name, model in self.phases.items()}

    def predict_bytes(self, batch_size: float, seq_len: float, num_layers: float) -> float:
        return max(self.predict_by_phase(batch_size, seq_len, num_layers).values())

    def predict_mib(self, batch_size: float, seq_len: float, num_layers: float) -> float:
        return self.predict_bytes(batch_size, seq_len, num_layers) / MIB


def _random_batch(batch_size: int, seq_len: int, vocab_size: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(1000, vocab_size, (batch_size, seq_len), generator=generator),
        "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long),
        "labels": torch.zeros(batch_size, dtype=torch.long),
    }


def _nbytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure_saved_bytes(model: nn.Module, batch_size: int, seq_len: int, vocab_size: int = 30522, seed: int = 0) -> int:
    """Activation bytes (parameters excluded) one forward pass of `model` saves on random tokens, all real.

    Derived in notebooks/part4_meft/30_where_memory_goes.ipynb.
    """
    batch = _random_batch(batch_size, seq_len, vocab_size, seed)
    return measure_activation_memory(lambda: model(**batch).loss, model, backward=False).activation_bytes


def measure_step_peaks(
    model: nn.Module, batch_size: int, seq_len: int, vocab_size: int = 30522, seed: int = 0, lr: float = 1e-4
) -> dict[str, int]:
    """Peak of live bytes, weights excluded, in each phase of one AdamW training step of `model`
    on random tokens (all real): phase of `PEAK_PHASES` -> bytes.

    One step runs first, so AdamW's state exists as in steady-state training; what is live before
    the measured step (the optimizer state, the buffers, the batch) is added to each phase's
    peak above the start, so the figures equal `measure_peak_memory(...).peak_minus_weights_bytes`
    phase by phase (tests/test_meft_memory_costs.py). The model is left trained by two steps.

    Derived in notebooks/part4_meft/30_where_memory_goes.ipynb.
    """
    batch = _random_batch(batch_size, seq_len, vocab_size, seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    carried: dict[str, torch.Tensor] = {}

    def forward() -> None:
        carried["loss"] = model(**batch).loss

    def backward() -> None:
        carried.pop("loss").backward()

    def update() -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    phases = dict(zip(PEAK_PHASES, (forward, backward, update)))
    for run in phases.values():
        run()
    peaks = measure_phase_peaks(list(phases.items()))
    state = [t for per_parameter in optimizer.state.values() for t in per_parameter.values() if torch.is_tensor(t)]
    live_before = _nbytes(state) + _nbytes(model.buffers()) + _nbytes(batch.values())
    return {name: peak + live_before for name, peak in peaks.items()}


def fit_activation_costs(
    pretrained: nn.Module,
    methods: Iterable[str] = METHOD_NAMES,
    *,
    batch_sizes: Sequence[int] = (1, 2),
    seq_lens: Sequence[int] = (8, 16, 32),
    layer_counts: Sequence[int] = (1, 2),
    progress: bool = True,
) -> dict[str, ActivationCostModel]:
    """Measure every method on the grid batch_sizes x seq_lens x layer_counts and fit its formula.

    `pretrained`: a Hugging Face BertForSequenceClassification (MiniLM in the course). The grid
    must have at least two batch sizes, three lengths and two depths (8 coefficients). Models are
    built with `build_method(method, pretrained, num_layers=L)` in train mode (dropout on).

    Derived in notebooks/part4_meft/30_where_memory_goes.ipynb.
    """
    measured = _measure_grid(pretrained, methods, batch_sizes, seq_lens, layer_counts, measure_saved_bytes, progress)
    return {method: _fit(method, values) for method, values in measured.items()}


def fit_peak_costs(
    pretrained: nn.Module,
    methods: Iterable[str] = METHOD_NAMES,
    *,
    batch_sizes: Sequence[int] = (2, 4),
    seq_lens: Sequence[int] = (32, 64, 128),
    layer_counts: Sequence[int] = (2, 3),
    progress: bool = True,
) -> dict[str, PeakCostModel]:
    """Measure the peak of each phase of a training step (`measure_step_peaks`) for every method on
    the grid batch_sizes x seq_lens x layer_counts and fit the formula to each phase.

    Same models and grid rules as `fit_activation_costs`; the default grid is larger because a
    phase's peak must be made of the same tensors on the whole grid for the fit to extrapolate
    (on the saved-bytes grid B in {1, 2}, T in {8, 16, 32}, MEFT1's backward peak extrapolates badly:
    notebook 30's exercise 6).
    About 0.6 s per grid point on one CPU thread (notebook 30's 72 points and 3 checks: about 50 s).

    Derived in notebooks/part4_meft/30_where_memory_goes.ipynb.
    """
    measured = _measure_grid(pretrained, methods, batch_sizes, seq_lens, layer_counts, measure_step_peaks, progress)
    return {
        method: PeakCostModel(
            method, {phase: _fit(method, {key: peaks[phase] for key, peaks in values.items()}) for phase in PEAK_PHASES}
        )
        for method, values in measured.items()
    }


def _measure_grid(
    pretrained: nn.Module,
    methods: Iterable[str],
    batch_sizes: Sequence[int],
    seq_lens: Sequence[int],
    layer_counts: Sequence[int],
    measure: Callable[..., Any],
    progress: bool,
) -> dict[str, dict[tuple[int, int, int], Any]]:
    """method -> {(B, T, L): measure(model with L layers, B, T, vocab_size)}."""
    methods = list(methods)
    unknown = [m for m in methods if m not in METHOD_NAMES]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {METHOD_NAMES}")
    if len(set(batch_sizes)) < 2 or len(set(seq_lens)) < 3 or len(set(layer_counts)) < 2:
        raise ValueError("the grid needs >= 2 batch sizes, >= 3 sequence lengths and >= 2 layer counts to fit 8 coefficients")
    vocab_size = getattr(getattr(pretrained, "config", None), "vocab_size", 30522)
    grid = list(itertools.product(batch_sizes, seq_lens, layer_counts))
    measured: dict[str, dict[tuple[int, int, int], Any]] = {}
    bar = tqdm(total=len(methods) * len(grid), desc="measuring", disable=not progress, leave=False)
    try:
        for method in methods:
            measured[method] = {}
            models = {}
            for B, T, L in grid:
                if L not in models:
                    torch.manual_seed(0)
                    models[L] = build_method(method, pretrained, num_layers=L)
                measured[method][(B, T, L)] = measure(models[L], B, T, vocab_size)
                bar.update(1)
    finally:
        bar.close()
    return measured


def _fit(method: str, measured: dict[tuple[int, int, int], int]) -> ActivationCostModel:
    """Least-squares fit of the eight coefficients of `COST_TERMS` to (B, T, L) -> bytes."""
    X = np.stack([_features(*key) for key in measured])
    y = np.array(list(measured.values()), dtype=float)
    coefficients, *_ = np.linalg.lstsq(X, y, rcond=None)
    residual = float(np.max(np.abs(X @ coefficients - y) / np.maximum(y, 1.0)))
    return ActivationCostModel(method, tuple(float(c) for c in coefficients), residual, dict(measured))
