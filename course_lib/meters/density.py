"""Activation density: how many MLP activations are non-zero, per layer.

DEFT's quantity. In a transformer MLP, h = act(x W1 + b1) (B x T x 4C) feeds the second
projection h W2; every exact zero in h is a row of W2 that a sparsity-aware kernel could
skip. The density of one layer is

    density = #{ |h| > tau } / #h          (tau = 0: the exact non-zero fraction, DEFT's metric)

taken with forward hooks on the activation modules (for Hugging Face BERT-style models:
`encoder.layer.<i>.intermediate.intermediate_act_fn`, an nn.Module). The official DEFT code
counts padding tokens too; pass an attention mask to count only real tokens.

Derived in notebooks/part3_deft/20_activation_sparsity.ipynb.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from course_lib.batches import move_to_device
from course_lib.peft.matching import ModulePattern, describe_pattern, name_matches

__all__ = [
    "DEFAULT_ACTIVATION_PATTERNS",
    "ActivationCollector",
    "DensityCounter",
    "activation_density",
    "check_mask_values",
    "count_active",
    "density_over_batches",
    "find_activation_modules",
]

#: Names of MLP activation modules in common architectures, tried in order (regexes that must
#: match the whole dotted name, as every pattern in course_lib and Hugging Face peft).
DEFAULT_ACTIVATION_PATTERNS: tuple[str, ...] = (
    r".*intermediate\.intermediate_act_fn",  # BERT, RoBERTa, MiniLM (Hugging Face)
    r".*DenseReluDense\.act",  # T5
    r".*mlp\.act",  # GPT-2, ViT/timm-style blocks
    r".*mlp\.act_fn",  # LLaMA, Mistral (the gate's activation)
)


def find_activation_modules(model: nn.Module, module_pattern: ModulePattern | None = None) -> dict[str, nn.Module]:
    """Modules of `model` whose name matches `module_pattern`, with the convention of
    `course_lib.peft.matching` (and Hugging Face peft's `target_modules`): a regex that must match
    the **whole** dotted name (`r".*mlp\.activation"`), or a list of name endings (`["mlp.activation"]`).

    Without a pattern, the first of `DEFAULT_ACTIVATION_PATTERNS` that matches anything is used.
    Raises ValueError when nothing matches, listing a few module names to choose from (and, for a
    regex that matches only inside names, the whole-name form to write instead).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    named = [(name, module) for name, module in model.named_modules() if name]
    patterns = (module_pattern,) if module_pattern is not None else DEFAULT_ACTIVATION_PATTERNS
    for pattern in patterns:
        if isinstance(pattern, str):
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"module_pattern {pattern!r} is not a valid regular expression: {error}") from None
        elif not (isinstance(pattern, (list, tuple, set, frozenset)) and pattern and all(isinstance(p, str) for p in pattern)):
            raise TypeError(f"module_pattern must be a regex string or a non-empty list of name endings, got {pattern!r}")
        found = {name: module for name, module in named if name_matches(name, pattern)}
        if found:
            return found
    examples = [name for name, _ in named if re.search(r"act|gelu|relu|mlp|intermediate", name, re.IGNORECASE)][:8]
    examples = examples or [name for name, _ in named][:8]
    tried = describe_pattern(module_pattern) if module_pattern is not None else " | ".join(DEFAULT_ACTIVATION_PATTERNS)
    hint = ""
    if isinstance(module_pattern, str):
        inside = [name for name, _ in named if re.search(module_pattern, name)]
        if inside:  # the re.search convention of earlier versions
            hint = (f" It matches inside {len(inside)} name(s), e.g. {inside[0]!r}, but patterns must match whole "
                    f"names (as in Hugging Face peft): write {'.*' + module_pattern.removesuffix('$')!r} or a list of "
                    f"name endings.")  # fmt: skip
    raise ValueError(
        f"no module of {type(model).__name__} matches {tried}.{hint} Pass module_pattern= a regex that matches the "
        f"whole names of the activation modules (which must be nn.Modules, not functions), or a list of name "
        f"endings; some module names: {examples}"
    )


def check_mask_values(attention_mask: torch.Tensor) -> None:
    """Raise a ValueError unless `attention_mask` holds only 0 (padding) and 1 (real token)."""
    if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ValueError(
            "attention_mask must hold only 0 (padding) and 1 (real token), got values "
            f"{torch.unique(attention_mask.detach().float()).tolist()[:6]} (NaN, inf or a soft mask?): pass the "
            "tokenizer's attention_mask"
        )


def count_active(
    activation: torch.Tensor, threshold: float = 0.0, attention_mask: torch.Tensor | None = None
) -> tuple[int, int]:
    """(number of entries with |a| > threshold, number of entries counted) of one activation.

    `activation` is (B, T, ...) when a (B, T) `attention_mask` is given; positions where the
    mask is 0 (padding) are left out of both counts.
    """
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    if not bool(torch.isfinite(activation).all()):  # |NaN| > t is False: NaN would count as a zero
        raise ValueError(
            f"the activation holds {int((~torch.isfinite(activation)).sum())} NaN or inf value(s): the model "
            "diverged or its input is broken; a density of such an activation means nothing"
        )
    active = activation.detach().abs() > threshold  # threshold 0: exact non-zeros
    if attention_mask is None:
        return int(active.sum()), active.numel()
    if attention_mask.dim() != 2 or tuple(activation.shape[:2]) != tuple(attention_mask.shape):
        raise ValueError(
            f"attention_mask of shape {tuple(attention_mask.shape)} does not match the activation's "
            f"(batch, tokens) = {tuple(activation.shape[:2])}"
        )
    check_mask_values(attention_mask)
    keep = attention_mask.to(device=active.device, dtype=torch.bool)  # (B, T)
    keep = keep.reshape(*keep.shape, *([1] * (active.dim() - 2)))  # (B, T, 1, ...)
    per_token = active[0, 0].numel() if active.dim() > 2 else 1  # hidden units per token
    return int((active & keep).sum()), int(keep.sum()) * per_token


class _Hooks:
    """Forward hooks on the matched activation modules, removed on exit (a context manager)."""

    def __init__(self, model: nn.Module, module_pattern: str | None) -> None:
        self.modules = find_activation_modules(model, module_pattern)
        self._handles: list[Any] = []

    def _on_output(self, name: str, output: torch.Tensor) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def attach(self) -> None:
        if self._handles:
            return
        for name, module in self.modules.items():
            # default argument binds this module's name into its hook
            def hook(module: nn.Module, inputs: Any, output: Any, name: str = name) -> None:
                if not isinstance(output, torch.Tensor):
                    raise TypeError(f"module {name!r} returned {type(output).__name__}, expected a tensor")
                self._on_output(name, output)

            self._handles.append(module.register_forward_hook(hook))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self):
        self.attach()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()


class ActivationCollector(_Hooks):
    """Keeps the latest output of each matched activation module, by module name.

    A module called several times in one forward pass keeps its last call.

    `detach=False` keeps the tensors in the autograd graph, so a loss can be computed from them
    (DEFT's density loss). Holding them costs nothing extra (the next Linear layer saves the
    same tensor for its backward anyway), but a loss computed from them saves what its own
    backward needs: DEFT's surrogate written with plain autograd keeps two more (B, T, H)
    tensors per layer (notebook 21 measures it; `DEFTLoss(memory_efficient=True)` avoids it).

    ```
    with ActivationCollector(model, detach=False) as collector:
        out = model(**batch)
        density_loss = sum(surrogate(a) for a in collector.activations.values())
    ```

    Derived in notebooks/part3_deft/20_activation_sparsity.ipynb (hooks) and
    notebooks/part3_deft/21_density_loss.ipynb (keeping the graph).
    """

    def __init__(self, model: nn.Module, module_pattern: str | None = None, *, detach: bool = True) -> None:
        super().__init__(model, module_pattern)
        self.detach = detach
        self.activations: dict[str, torch.Tensor] = {}

    def _on_output(self, name: str, output: torch.Tensor) -> None:
        self.activations[name] = output.detach() if self.detach else output

    def clear(self) -> None:
        """Forget the stored activations (call between steps to free them)."""
        self.activations.clear()


class DensityCounter(_Hooks):
    """Accumulates active / counted entries per module over any number of forward passes.

    Set `counter.attention_mask` before a forward pass to leave padding out (None counts every
    token, like the official DEFT code). Nothing is stored but two integers per module.
    """

    def __init__(self, model: nn.Module, module_pattern: str | None = None, *, threshold: float = 0.0) -> None:
        super().__init__(model, module_pattern)
        if threshold < 0:
            raise ValueError(f"threshold must be >= 0, got {threshold}")
        self.threshold = threshold
        self.attention_mask: torch.Tensor | None = None
        self.active = {name: 0 for name in self.modules}
        self.counted = {name: 0 for name in self.modules}

    def _on_output(self, name: str, output: torch.Tensor) -> None:
        active, counted = count_active(output, self.threshold, self.attention_mask)
        self.active[name] += active
        self.counted[name] += counted

    def densities(self) -> dict[str, float]:
        """Fraction of active entries per module (0..1; x100 for DEFT's percentages)."""
        if not any(self.counted.values()):
            raise ValueError("no activations were counted: run a forward pass inside the counter first")
        return {name: self.active[name] / self.counted[name] if self.counted[name] else float("nan") for name in self.modules}


def _forward(model: nn.Module, batch: Any) -> Any:
    # HF-style dict (labels dropped: they are not needed to see activations), tensor, or (inputs, labels)
    if isinstance(batch, Mapping):
        return model(**{key: value for key, value in batch.items() if key != "labels"})
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, (tuple, list)) and batch:
        return _forward(model, batch[0])
    raise TypeError(f"batch must be a dict of tensors, a tensor or an (inputs, labels) pair, got {type(batch).__name__}")


def _model_device(model: nn.Module) -> torch.device | None:
    first = next(model.parameters(), None)
    return first.device if first is not None else None


def density_over_batches(
    model: nn.Module,
    batches: Iterable[Any],
    module_pattern: str | None = None,
    *,
    threshold: float = 0.0,
    mask_padding: bool = True,
) -> dict[str, float]:
    """Per-layer activation density over many batches (e.g. a validation DataLoader).

    Runs in eval mode without gradients (the model's mode is restored afterwards), as DEFT
    evaluates. `mask_padding=True` (the default, as in `course_lib.deft`) leaves out padding
    tokens, using each dict batch's "attention_mask" when it has one (a batch without a mask,
    or a tensor batch, has no padding to leave out); False counts every position, as the
    official DEFT code does.
    """
    was_training = model.training
    device = _model_device(model)
    model.eval()
    try:
        with torch.no_grad(), DensityCounter(model, module_pattern, threshold=threshold) as counter:
            for batch in batches:
                inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
                has_mask = isinstance(inputs, Mapping) and inputs.get("attention_mask") is not None
                counter.attention_mask = inputs["attention_mask"] if mask_padding and has_mask else None
                _forward(model, move_to_device(batch, device))
            return counter.densities()
    finally:
        model.train(was_training)


def activation_density(
    model: nn.Module,
    batch: Any,
    module_pattern: str | None = None,
    threshold: float = 0.0,
    attention_mask: torch.Tensor | None = None,
) -> dict[str, float]:
    """Fraction of MLP activations with |a| > threshold, per activation module, on one batch.

    `threshold=0` gives DEFT's exact non-zero fraction. `attention_mask` (B, T) leaves padding
    tokens out; None counts every token (as the official DEFT code does). Runs in eval mode
    without gradients and restores the model's mode.

    ```
    activation_density(model, batch)                                   # {'...layer.0...': 0.998, ...}
    activation_density(model, batch, attention_mask=batch["attention_mask"])
    ```

    Derived in notebooks/part3_deft/20_activation_sparsity.ipynb.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), DensityCounter(model, module_pattern, threshold=threshold) as counter:
            counter.attention_mask = attention_mask
            _forward(model, move_to_device(batch, _model_device(model)))
            return counter.densities()
    finally:
        model.train(was_training)
