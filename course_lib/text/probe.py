"""A linear probe: logistic regression on frozen features.

The cheapest way to "adapt" a pre-trained encoder is to train nothing inside it: take its
sentence embeddings as fixed features and fit a linear classifier on top. How far that gets
tells how much of the task the frozen features already contain; the gap to fine-tuning is
what parameter-efficient methods try to close while training little.

The probe is multinomial logistic regression with an L2 penalty on standardised features,
fitted full-batch with L-BFGS (convex: one optimum, no seed needed):

    min_W,b  mean_i CE(W z_i + b, y_i) + l2 * ||W||^2 / 2,    z = (x - mean) / std

Derived in notebooks/part1_foundations/02_peft_zoo.ipynb.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["LinearProbe", "fit_linear_probe"]


@dataclass
class LinearProbe:
    """A fitted linear classifier on standardised features."""

    weight: torch.Tensor  # (K, C)
    bias: torch.Tensor  # (K,)
    mean: torch.Tensor  # (C,)
    std: torch.Tensor  # (C,)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """(N, C) features -> (N, K) class scores."""
        return ((features - self.mean) / self.std) @ self.weight.T + self.bias

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        return self.logits(features).argmax(-1)

    def accuracy(self, features: torch.Tensor, labels: torch.Tensor | list[int]) -> float:
        labels = torch.as_tensor(labels)
        return float((self.predict(features) == labels).float().mean())


def fit_linear_probe(
    features: torch.Tensor, labels: torch.Tensor | list[int], *, l2: float = 1e-2, max_iter: int = 500
) -> LinearProbe:
    """Fit multinomial logistic regression with L2 penalty `l2` on (N, C) features.

    Derived in notebooks/part1_foundations/02_peft_zoo.ipynb.
    """
    labels = torch.as_tensor(labels, dtype=torch.long)
    if features.dim() != 2 or features.shape[0] != labels.shape[0]:
        raise ValueError(f"expected features (N, C) for {labels.shape[0]} labels, got {tuple(features.shape)}")
    if l2 < 0:
        raise ValueError(f"l2 must be >= 0, got {l2}")
    x = features.detach().double()
    mean, std = x.mean(0), x.std(0).clamp(min=1e-8)
    z = (x - mean) / std  # (N, C)
    num_classes = int(labels.max()) + 1
    weight = torch.zeros(num_classes, z.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(z @ weight.T + bias, labels) + 0.5 * l2 * (weight**2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    dtype = features.dtype
    return LinearProbe(weight.detach().to(dtype), bias.detach().to(dtype), mean.to(dtype), std.to(dtype))
