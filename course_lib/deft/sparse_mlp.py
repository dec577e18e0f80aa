"""Sparse MLP inference: the second projection h W2 that skips the hidden units that are zero.

A transformer MLP computes y = h W2 + b2 with h = GELU(x W1 + b1) of shape (N tokens, H) and
W2 of shape (H, C) (nn.Linear stores its transpose, (C, H)). Row j of W2 is only needed where
h[:, j] != 0. Three ways to use that on a CPU:

- Row skipping over a token batch (`sparse_second_projection`): keep the hidden units that are
  active for *any* token of the batch, J = {j : exists t, |h[t, j]| > tau}, and compute
  y = h[:, J] W2[J, :] + b2, a dense matmul of (N, |J|) x (|J|, C). It saves |J| / H of the
  work, but only when whole units are silent for the batch: with per-token sparsity at density
  d spread at random, |J| / H = 1 - (1 - d)^N, which is about 1 for any real batch.
- Per-token sparsity (`csr_second_projection`): store h as a sparse CSR matrix and let
  `torch.sparse.mm` add only the rows each token needs. It uses every zero, but pays for
  indexing; it only wins at low density.
- Per-token gather-sum (`gather_second_projection`): for token t, y_t = b2 + sum over its
  active units j of h[t, j] W2[j, :], i.e. gather the rows of the (H, C) weight that the token
  needs and add them, weighted. `F.embedding_bag(..., mode="sum", per_sample_weights=...)` is
  exactly that kernel (the CSR column indices are the bag contents, the row pointers its
  offsets); it does not go through a sparse-times-dense matmul and is the cheapest of the three
  at batch 1 (one sentence, or one token as in a decoding step).

`benchmarks/sparse_mlp.py` measures the first two against the dense matmul at MiniLM's sizes;
`benchmarks/sparse_inference.py` measures all three inside a whole sparsified MiniLM forward.

Derived in notebooks/part3_deft/22_deft_in_practice.ipynb (the gather kernel in
notebooks/part3_deft/23_sparse_inference.ipynb).
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from course_lib.deft.sparsify import SparseActivation, second_projection_name

__all__ = [
    "SPARSE_PROJECTION_MODES",
    "SparseSecondProjection",
    "active_hidden_units",
    "csr_second_projection",
    "gather_second_projection",
    "second_projection_names",
    "sparse_second_projection",
    "union_density",
    "with_sparse_second_projections",
]


def _check_hidden(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """hidden (N, H), weight nn.Linear's (C, H), bias (C,) or None; else ValueError."""
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2:
        shape = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise ValueError(f"hidden must be (tokens, H), got {shape}; flatten (B, T, H) with .reshape(-1, H)")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"weight must be nn.Linear's (C, H) with H = {hidden.shape[1]} (the hidden width), got {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be (C,) = ({weight.shape[0]},), got {tuple(bias.shape)}")


def _kernel_inputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    threshold: float,
    weight_by_unit: torch.Tensor | None,
    *,
    contiguous: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What every W2 kernel starts from: (h with |h| <= threshold set to exact 0, W2 as (H, C)).

    Checks the shapes, the threshold and the dtypes; `weight_by_unit`, when given, must be the
    (H, C) transpose of `weight` (else it is taken here: contiguous when `contiguous`, a view if not).
    """
    _check_hidden(hidden, weight, bias)
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden and weight must have the same dtype, got {hidden.dtype} and {weight.dtype}")
    if weight_by_unit is None:
        weight_by_unit = weight.t().contiguous() if contiguous else weight.t()  # W2 (H, C)
    elif tuple(weight_by_unit.shape) != (weight.shape[1], weight.shape[0]):
        raise ValueError(
            f"weight_by_unit must be the (H, C) = {(weight.shape[1], weight.shape[0])} transpose of weight, "
            f"got {tuple(weight_by_unit.shape)}"
        )
    if threshold > 0:
        hidden = hidden * (hidden.abs() > threshold)  # small entries -> exact zeros
    return hidden, weight_by_unit


def active_hidden_units(hidden: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """Indices of the hidden units with |h| > threshold for at least one token: (tokens, H) -> (|J|,).

    Derived in notebooks/part3_deft/22_deft_in_practice.ipynb.
    """
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be (tokens, H), got {tuple(hidden.shape)}")
    if threshold > 0:
        return (hidden.abs().amax(dim=0) > threshold).nonzero().squeeze(1)  # (|J|,)
    # exact: a unit is silent iff its largest and smallest value over the tokens are both 0
    # (two reductions without a (tokens, H) temporary: cheaper than (hidden != 0).any(0))
    return ((hidden.amax(dim=0) != 0) | (hidden.amin(dim=0) != 0)).nonzero().squeeze(1)  # (|J|,)


def union_density(hidden: torch.Tensor, threshold: float = 0.0) -> float:
    """|J| / H: the fraction of W2's rows a token batch needs (what row skipping can save).

    Derived in notebooks/part3_deft/22_deft_in_practice.ipynb.
    """
    return active_hidden_units(hidden, threshold).numel() / hidden.shape[1]


def sparse_second_projection(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    threshold: float = 0.0,
    weight_by_unit: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = h W2 + b2 computed on the hidden units active for the batch only: (N, H) -> (N, C).

    `weight` is nn.Linear's (C, H). Entries with |h| <= threshold count as zero (threshold = 0:
    exact, the result equals the dense one up to float rounding). `weight_by_unit` (H, C), the
    contiguous transpose of `weight`, makes gathering rows cheap; pass it when calling often
    (`SparseSecondProjection` keeps one).

    Derived in notebooks/part3_deft/22_deft_in_practice.ipynb.
    """
    hidden, by_unit = _kernel_inputs(hidden, weight, bias, threshold, weight_by_unit, contiguous=False)
    units = active_hidden_units(hidden)  # J, (|J|,)
    if units.numel() == hidden.shape[1]:  # no unit is silent for the whole batch: nothing to skip
        return F.linear(hidden, weight, bias)
    rows = by_unit.index_select(0, units)  # W2[J, :]  (|J|, C)
    output = hidden.index_select(1, units) @ rows  # (N, |J|) x (|J|, C) -> (N, C)
    return output + bias if bias is not None else output


def csr_second_projection(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    threshold: float = 0.0,
    weight_by_unit: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = h W2 + b2 with h as a sparse CSR matrix: each token adds only its own active rows of W2.

    Same arguments, checks and result as `sparse_second_projection`; uses per-token sparsity.

    Derived in notebooks/part3_deft/22_deft_in_practice.ipynb.
    """
    hidden, by_unit = _kernel_inputs(hidden, weight, bias, threshold, weight_by_unit, contiguous=True)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": known, and checked by the tests
        warnings.simplefilter("ignore", UserWarning)
        output = torch.sparse.mm(hidden.to_sparse_csr(), by_unit)  # sum_{j: h[t,j] != 0} h[t, j] W2[j, :]
    return output + bias if bias is not None else output


def gather_second_projection(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    threshold: float = 0.0,
    weight_by_unit: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = h W2 + b2 as a per-token gather-sum of the rows of W2 its active units need: (N, H) -> (N, C).

    y[t] = b2 + sum_{j : h[t, j] != 0} h[t, j] W2[j, :], computed by `F.embedding_bag` in "sum"
    mode: the non-zero column indices of each token are its bag, their values the per-sample
    weights, W2 (H, C) the embedding table. Same arguments and result as
    `sparse_second_projection`; uses per-token sparsity without a sparse matmul. A token with
    no active unit gets b2.

    Derived in notebooks/part3_deft/23_sparse_inference.ipynb.
    """
    hidden, by_unit = _kernel_inputs(hidden, weight, bias, threshold, weight_by_unit, contiguous=True)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": only its index arrays are used
        warnings.simplefilter("ignore", UserWarning)
        sparse = hidden.to_sparse_csr()
    # bags: token t owns columns col_indices[crow[t]:crow[t + 1]]; include_last_offset takes crow as is (N + 1,)
    output = F.embedding_bag(
        sparse.col_indices(),
        by_unit,
        sparse.crow_indices(),
        mode="sum",
        per_sample_weights=sparse.values(),
        include_last_offset=True,
    )  # (N, C)
    return output + bias if bias is not None else output


#: The kernels `SparseSecondProjection` can use, by mode.
SPARSE_PROJECTION_MODES = {
    "rows": sparse_second_projection,
    "csr": csr_second_projection,
    "gather": gather_second_projection,
}


class SparseSecondProjection(nn.Module):
    """A drop-in for an MLP's second nn.Linear (H -> C) that skips the rows of W2 unused by the batch.

    `mode="rows"` (row skipping over the token batch), `"csr"` (per-token sparse matmul) or
    `"gather"` (per-token gather-sum of W2's rows, `gather_second_projection`).
    Inputs of any shape (..., H); the weights are the Linear's (shared, not copied), plus a
    contiguous (H, C) transpose for gathering rows, taken when it is built: for inference with
    frozen (or merged) weights.

    Derived in notebooks/part3_deft/22_deft_in_practice.ipynb.
    """

    def __init__(self, linear: nn.Linear, *, threshold: float = 0.0, mode: str = "rows") -> None:
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"SparseSecondProjection wraps an nn.Linear, got {type(linear).__name__}")
        if mode not in SPARSE_PROJECTION_MODES:
            raise ValueError(f"mode must be one of {tuple(SPARSE_PROJECTION_MODES)}, got {mode!r}")
        if threshold < 0:
            raise ValueError(f"threshold must be >= 0, got {threshold}")
        self.linear = linear
        self.threshold = threshold
        self.mode = mode
        self.register_buffer("weight_by_unit", linear.weight.detach().t().contiguous(), persistent=False)  # (H, C)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., H) -> (..., C)."""
        flat = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
        project = SPARSE_PROJECTION_MODES[self.mode]
        output = project(
            flat, self.linear.weight, self.linear.bias, threshold=self.threshold, weight_by_unit=self.weight_by_unit
        )
        return output.reshape(*hidden.shape[:-1], output.shape[-1])


def second_projection_names(model: nn.Module) -> list[str]:
    """The names of the W2 that follow each `SparseActivation` of `model`, in layer order.

    Derived in notebooks/part3_deft/23_sparse_inference.ipynb.
    """
    return [second_projection_name(name) for name, module in model.named_modules() if isinstance(module, SparseActivation)]


def with_sparse_second_projections(model: nn.Module, mode: str = "gather") -> nn.Module:
    """A copy of a sparsified `model` (in eval mode) whose W2 after each `SparseActivation` is a
    `SparseSecondProjection(mode=mode)`; the original is left as it is.

    For inference on frozen or merged weights (merge LoRA first: `merge_and_unload`). Raises
    ValueError when `model` has no `SparseActivation` (run `sparsify_activations` first) or a W2
    is not a plain nn.Linear.

    Derived in notebooks/part3_deft/23_sparse_inference.ipynb.
    """
    if mode not in SPARSE_PROJECTION_MODES:
        raise ValueError(f"mode must be one of {tuple(SPARSE_PROJECTION_MODES)}, got {mode!r}")
    names = second_projection_names(model)
    if not names:
        raise ValueError(
            f"{type(model).__name__} has no SparseActivation: sparsify it first "
            "(course_lib.deft.sparsify_activations), then merge its LoRA (merge_and_unload)"
        )
    sparse = copy.deepcopy(model)
    for name in names:
        linear = sparse.get_submodule(name)
        if type(linear) is not nn.Linear:
            raise ValueError(f"{name} is a {type(linear).__name__}, not a plain nn.Linear: merge LoRA first (merge_and_unload)")
        parent_name, _, attribute = name.rpartition(".")
        setattr(sparse.get_submodule(parent_name), attribute, SparseSecondProjection(linear, mode=mode))
    return sparse.eval()
