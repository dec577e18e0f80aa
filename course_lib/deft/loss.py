"""DEFT's density loss: a differentiable stand-in for the number of non-zero MLP activations.

The count of non-zeros (the L0 "norm") has zero gradient almost everywhere. DEFT replaces each
indicator 1[a != 0] by a smooth surrogate that is 0 at a = 0 and close to 1 as soon as |a| is
well above sqrt(eps):

    s(a) = a^2 / (a^2 + eps)                 eps = 1e-7 (official code), no temperature
    ds/da = 2 a eps / (a^2 + eps)^2          largest at |a| = sqrt(eps / 3), tiny for |a| >> sqrt(eps)

For each layer l, s is averaged over the tokens and hidden units of each example, then over the
batch, then over the layers:

    L_density = mean_l mean_b [ sum_{t real} sum_h s(a_{b,t,h}^l) / (T_b H) ]
    L = L_task + w * L_density               w = 1 in the official GLUE script

`mask_padding=True` (the default here) counts only real tokens (T_b of them in example b);
`mask_padding=False` reproduces the official code, which averages over every position,
padding included (T_b = T).

Derived in notebooks/part3_deft/21_density_loss.ipynb.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from course_lib.meters.density import ActivationCollector, check_mask_values
from course_lib.train import default_loss, split_batch

__all__ = ["DEFAULT_EPS", "DEFTConfig", "DEFTLoss", "DensitySurrogate", "deft_compute_loss", "deft_training_step", "density_loss", "density_surrogate"]

#: eps of the official DEFT code.
DEFAULT_EPS: float = 1e-7

LossFn = Callable[[nn.Module, Any], tuple[torch.Tensor, torch.Tensor | None]]


class DensitySurrogate(torch.autograd.Function):
    """s(a) = a^2 / (a^2 + eps) that saves only `a` for backward (memory-efficient DEFT).

    Written with plain autograd, a^2 / (a^2 + eps) keeps a, a^2 and a^2 + eps: three (B, T, H)
    tensors per layer that a LoRA step on query and value does not otherwise keep (a frozen W2
    needs only its weight for backward, and GELU keeps its input z, not a). This Function keeps
    `a` only (shared with W2 when W2 itself trains and saves its input), and recomputes in backward

        ds/da = 2 a eps / (a^2 + eps)^2.

    Derived in notebooks/part3_deft/21_density_loss.ipynb.
    """

    @staticmethod
    def forward(ctx: Any, activation: torch.Tensor, eps: float) -> torch.Tensor:
        ctx.save_for_backward(activation)
        ctx.eps = eps
        squared = activation.square()
        return squared / (squared + eps)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        (activation,) = ctx.saved_tensors
        denominator = activation.square() + ctx.eps
        return grad_output * (2 * ctx.eps) * activation / denominator.square(), None


def density_surrogate(activation: torch.Tensor, eps: float = DEFAULT_EPS, *, memory_efficient: bool = False) -> torch.Tensor:
    """Element-wise a^2 / (a^2 + eps): 0 at a = 0, about 1 for |a| >> sqrt(eps). Same shape as `activation`.

    `memory_efficient=True` uses `DensitySurrogate`, which saves only `activation` for backward
    (same values; the gradient formula written out instead of autograd's chain).

    Derived in notebooks/part3_deft/21_density_loss.ipynb.
    """
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if memory_efficient:
        return DensitySurrogate.apply(activation, float(eps))
    squared = activation.square()
    return squared / (squared + eps)


def _layer_density(
    activation: torch.Tensor, attention_mask: torch.Tensor | None, eps: float, memory_efficient: bool = False
) -> torch.Tensor:
    """One layer's surrogate density, averaged per example then over the batch: a scalar."""
    if activation.dim() < 2:
        raise ValueError(f"an activation must be (B, ..., H), got shape {tuple(activation.shape)}")
    surrogate = density_surrogate(activation, eps, memory_efficient=memory_efficient)  # (B, T, H)
    if attention_mask is None:
        return surrogate.flatten(1).mean(dim=1).mean()  # every position counts (official DEFT)
    if activation.dim() != 3 or tuple(activation.shape[:2]) != tuple(attention_mask.shape):
        raise ValueError(
            f"attention_mask of shape {tuple(attention_mask.shape)} does not match the activation's (batch, tokens) = "
            f"{tuple(activation.shape[:2])}; a method that adds tokens (prompt tuning) needs mask_padding=False"
        )
    check_mask_values(attention_mask)
    keep = attention_mask.to(device=activation.device, dtype=activation.dtype)  # (B, T), 1 = real token
    real_tokens = keep.sum(dim=1).clamp(min=1)  # (B,)
    per_example = (surrogate * keep[:, :, None]).sum(dim=(1, 2)) / (real_tokens * activation.shape[-1])  # (B,)
    return per_example.mean()


def density_loss(
    activations: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
    attention_mask: torch.Tensor | None = None,
    *,
    eps: float = DEFAULT_EPS,
    memory_efficient: bool = False,
) -> torch.Tensor:
    """DEFT's density loss: the surrogate averaged per example and layer, then over batch and layers.

    `activations`: the post-activation MLP outputs, (B, T, H) each (a dict from
    `ActivationCollector(model, detach=False)` or a list). `attention_mask` (B, T): padding
    positions (0) are left out; None counts every position, as the official DEFT code.
    `memory_efficient`: the surrogate as `DensitySurrogate` (saves only the activations).

    Derived in notebooks/part3_deft/21_density_loss.ipynb.
    """
    values = list(activations.values()) if isinstance(activations, Mapping) else list(activations)
    if not values:
        raise ValueError("no activations: run the forward pass inside an ActivationCollector whose pattern matches the MLP activations")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    for value in values:
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"activations must be tensors, got {type(value).__name__}")
    return torch.stack([_layer_density(value, attention_mask, eps, memory_efficient) for value in values]).mean()


@dataclass(frozen=True)
class DEFTConfig:
    """DEFT's settings, the config form of `DEFTLoss`'s keywords (`DEFTLoss.from_config`).

    weight: w in L = L_task + w * L_density (1 in the official GLUE script); eps: the surrogate's
    eps (1e-7 official); module_pattern: the activation modules (regex searched in the module
    names; None: the known architectures); mask_padding: count real tokens only (the course's
    recipe; False: every position, as the official code); memory_efficient: the surrogate as
    `DensitySurrogate`, which saves only the activations.

    Derived in notebooks/part3_deft/21_density_loss.ipynb.
    """

    weight: float = 1.0
    eps: float = DEFAULT_EPS
    module_pattern: str | None = None
    mask_padding: bool = True
    memory_efficient: bool = False

    method = "deft"

    def __post_init__(self) -> None:
        if not self.weight >= 0:
            raise ValueError(f"weight must be >= 0, got {self.weight}")
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class DEFTLoss:
    """`loss_fn(model, batch) -> (loss, logits)` for `course_lib.train.train`: task loss + w * density loss.

        history = train(model, loader, num_epochs=2, lr=1e-2, loss_fn=DEFTLoss(weight=1.0))

    Each call runs the task loss (default: cross-entropy, `course_lib.train.default_loss`) inside
    an `ActivationCollector(detach=False)` on the modules matching `module_pattern`, so the
    activations stay in the autograd graph; the hooks are removed after the call. With
    `mask_padding` the batch's "attention_mask" (when it has one; point clouds have no padding)
    leaves padding out. Plain autograd keeps three extra (B, T, H) tensors per layer for the
    surrogate's backward (with LoRA on query and value); `memory_efficient=True` keeps one, the
    activation itself (`DensitySurrogate`; notebook 21 measures both). The components of the last
    call are kept in `last_task_loss` and `last_density_loss`; `density_losses` lists the density
    loss of every call in training mode.

    Works with any model whose activation modules can be named and any course_lib.peft method
    that keeps the token count (LoRA, adapters, prefix tuning; prompt tuning adds tokens:
    use `mask_padding=False` there).

    Derived in notebooks/part3_deft/21_density_loss.ipynb.
    """

    def __init__(
        self,
        weight: float = 1.0,
        *,
        eps: float = DEFAULT_EPS,
        module_pattern: str | None = None,
        mask_padding: bool = True,
        memory_efficient: bool = False,
        task_loss: LossFn = default_loss,
    ) -> None:
        if not weight >= 0:
            raise ValueError(f"weight must be >= 0, got {weight}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.weight = float(weight)
        self.eps = float(eps)
        self.module_pattern = module_pattern
        self.mask_padding = mask_padding
        self.memory_efficient = memory_efficient
        self.task_loss = task_loss
        self.last_task_loss = float("nan")
        self.last_density_loss = float("nan")
        self.density_losses: list[float] = []

    @classmethod
    def from_config(cls, config: DEFTConfig, *, task_loss: LossFn = default_loss) -> DEFTLoss:
        """The loss that `config` describes."""
        return cls(config.weight, eps=config.eps, module_pattern=config.module_pattern, mask_padding=config.mask_padding,
                   memory_efficient=config.memory_efficient, task_loss=task_loss)  # fmt: skip

    @property
    def config(self) -> DEFTConfig:
        """This loss's settings as a `DEFTConfig`."""
        return DEFTConfig(self.weight, self.eps, self.module_pattern, self.mask_padding, self.memory_efficient)

    def _attention_mask(self, batch: Any) -> torch.Tensor | None:
        if not self.mask_padding:
            return None
        inputs, _ = split_batch(batch)
        if isinstance(inputs, Mapping):
            return inputs.get("attention_mask")
        return None

    def __call__(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        with ActivationCollector(model, self.module_pattern, detach=False) as collector:
            task, logits = self.task_loss(model, batch)
            density = density_loss(
                collector.activations, self._attention_mask(batch), eps=self.eps, memory_efficient=self.memory_efficient
            )
        self.last_task_loss = task.detach().item()
        self.last_density_loss = density.detach().item()
        if model.training:
            self.density_losses.append(self.last_density_loss)
        return task + self.weight * density, logits

    def __repr__(self) -> str:
        return (
            f"DEFTLoss(weight={self.weight:g}, eps={self.eps:g}, mask_padding={self.mask_padding}, "
            f"memory_efficient={self.memory_efficient})"
        )


def deft_compute_loss(
    model: nn.Module,
    inputs: Mapping[str, Any],
    *,
    weight: float = 1.0,
    eps: float = DEFAULT_EPS,
    module_pattern: str | None = None,
    mask_padding: bool = True,
    memory_efficient: bool = False,
) -> tuple[torch.Tensor, Any]:
    """(task loss + w * density loss, the model's outputs) for a Hugging Face style call:
    `model(**inputs)` must return outputs with `.loss` (give `labels` in `inputs`).

    For any training loop that calls the model with keyword inputs, and for
    `transformers.Trainer`: override `compute_loss` with it (examples/deft_with_trainer.py).
    `mask_padding` uses `inputs["attention_mask"]` when there is one.
    Derived in notebooks/part3_deft/21_density_loss.ipynb.
    """
    with ActivationCollector(model, module_pattern, detach=False) as collector:
        outputs = model(**inputs)
        if getattr(outputs, "loss", None) is None:
            raise ValueError("deft_compute_loss: the model returned no .loss; pass the labels in the inputs")
        mask = inputs.get("attention_mask") if mask_padding else None
        density = density_loss(collector.activations, mask, eps=eps, memory_efficient=memory_efficient)
    return outputs.loss + weight * density, outputs


def deft_training_step(
    model: nn.Module, batch: Any, optimizer: torch.optim.Optimizer, loss_fn: DEFTLoss | None = None
) -> dict[str, float]:
    """One optimizer step on task + w * density loss; returns {"loss", "task_loss", "density_loss"}.

    For a hand-written loop; `course_lib.train.train(..., loss_fn=DEFTLoss(w))` does the same
    inside the course's loop.

    Derived in notebooks/part3_deft/21_density_loss.ipynb.
    """
    loss_fn = loss_fn if loss_fn is not None else DEFTLoss()
    model.train()
    loss, _ = loss_fn(model, batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"loss": loss.detach().item(), "task_loss": loss_fn.last_task_loss, "density_loss": loss_fn.last_density_loss}
