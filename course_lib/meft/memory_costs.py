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

Derived in notebooks/part4_meft/30_where_memory_goes.ipynb.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from course_lib.meft.methods import METHOD_NAMES, build_method
from course_lib.meters.memory import MIB, measure_activation_memory

__all__ = ["COST_TERMS", "ActivationCostModel", "fit_activation_costs", "measure_saved_bytes"]

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


def measure_saved_bytes(model: nn.Module, batch_size: int, seq_len: int, vocab_size: int = 30522, seed: int = 0) -> int:
    """Activation bytes (parameters excluded) one forward pass of `model` saves on random tokens, all real.

    Derived in notebooks/part4_meft/30_where_memory_goes.ipynb.
    """
    generator = torch.Generator().manual_seed(seed)
    batch = {
        "input_ids": torch.randint(1000, vocab_size, (batch_size, seq_len), generator=generator),
        "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long),
        "labels": torch.zeros(batch_size, dtype=torch.long),
    }
    return measure_activation_memory(lambda: model(**batch).loss, model, backward=False).activation_bytes


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
    methods = list(methods)
    unknown = [m for m in methods if m not in METHOD_NAMES]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {METHOD_NAMES}")
    if len(set(batch_sizes)) < 2 or len(set(seq_lens)) < 3 or len(set(layer_counts)) < 2:
        raise ValueError("the grid needs >= 2 batch sizes, >= 3 sequence lengths and >= 2 layer counts to fit 8 coefficients")
    vocab_size = getattr(getattr(pretrained, "config", None), "vocab_size", 30522)
    grid = list(itertools.product(batch_sizes, seq_lens, layer_counts))
    costs: dict[str, ActivationCostModel] = {}
    bar = tqdm(total=len(methods) * len(grid), desc="measuring", disable=not progress, leave=False)
    try:
        for method in methods:
            measured: dict[tuple[int, int, int], int] = {}
            models = {}
            for B, T, L in grid:
                if L not in models:
                    torch.manual_seed(0)
                    models[L] = build_method(method, pretrained, num_layers=L)
                measured[(B, T, L)] = measure_saved_bytes(models[L], B, T, vocab_size)
                bar.update(1)
            X = np.stack([_features(*key) for key in measured])
            y = np.array(list(measured.values()), dtype=float)
            coefficients, *_ = np.linalg.lstsq(X, y, rcond=None)
            residual = float(np.max(np.abs(X @ coefficients - y) / np.maximum(y, 1.0)))
            costs[method] = ActivationCostModel(method, tuple(float(c) for c in coefficients), residual, measured)
    finally:
        bar.close()
    return costs
