"""Check MEFT's custom backward against plain autograd on the same model, batch and dropout masks.

Derived in notebooks/part4_meft/31_reversible_layers.ipynb.

The reference is the *same* model run with `model.reversible = False`: its couplings then go
through plain autograd (every activation stored), so any difference comes from the custom
backward alone (reconstruction by the inverse, recomputation, dropout replay).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["gradient_errors", "reversible_and_plain_gradients"]


def reversible_and_plain_gradients(
    model: nn.Module,
    batch: Mapping[str, Any],
    *,
    seed: int = 0,
    loss_fn: Callable[[nn.Module, Mapping[str, Any]], torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Parameter gradients of one `model(**batch).loss.backward()` through the custom backward and
    through plain autograd: (reversible, plain), each {name: grad} over the trainable parameters.

    `model` has a `reversible` switch (`meft_from_hf`, `meft_from_point_mae`); the generator is
    seeded with `seed` before each pass, so both see the same dropout masks. The switch is
    restored afterwards. `loss_fn(model, batch)` replaces `model(**batch).loss` (a model that
    returns logits, as the point classifier does).

    Derived in notebooks/part4_meft/31_reversible_layers.ipynb.
    """
    if not hasattr(model, "reversible"):
        raise TypeError(f"{type(model).__name__} has no `reversible` switch: build it with course_lib.meft.meft_from_hf")
    was_reversible = model.reversible
    gradients: dict[bool, dict[str, torch.Tensor]] = {}
    try:
        for reversible in (True, False):
            model.reversible = reversible
            model.zero_grad(set_to_none=True)
            torch.manual_seed(seed)
            loss = model(**batch).loss if loss_fn is None else loss_fn(model, batch)
            loss.backward()
            gradients[reversible] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    finally:
        model.reversible = was_reversible
    return gradients[True], gradients[False]


def gradient_errors(ours: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Three relative errors of `ours` against `reference` (same names):

    - max_rel_err: max over tensors of max|g - g_ref| / max|g_ref| (the strictest);
    - max_norm_rel_err: max over tensors of ||g - g_ref|| / ||g_ref||;
    - global_norm_rel_err: ||all g - all g_ref|| / ||all g_ref||, every tensor flattened together.

    Derived in notebooks/part4_meft/31_reversible_layers.ipynb.
    """
    if set(ours) != set(reference) or not ours:
        raise ValueError("ours and reference must hold gradients of the same, non-empty set of parameters")
    max_rel = max(((ours[n] - reference[n]).abs().max() / reference[n].abs().max()).item() for n in ours)
    norm_rel = max(((ours[n] - reference[n]).norm() / reference[n].norm()).item() for n in ours)
    difference = torch.cat([(ours[n] - reference[n]).flatten() for n in ours]).norm()
    every = difference / torch.cat([reference[n].flatten() for n in ours]).norm()
    return {"max_rel_err": max_rel, "max_norm_rel_err": norm_rel, "global_norm_rel_err": every.item()}
