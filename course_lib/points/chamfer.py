"""The Chamfer distance between two point sets: Point-MAE's reconstruction loss.

Derived in notebooks/part2_point_peft/12_point_mae.ipynb.

A reconstructed patch is a *set* of k points: its order means nothing, so it cannot be compared
to the true patch point by point. The Chamfer distance matches every point to its nearest
neighbour in the other set, in both directions:

    CD_L2(A, B) = 1/|A| sum_{a in A} min_{b in B} ||a - b||^2  +  1/|B| sum_{b in B} min_{a in A} ||a - b||^2

This is Point-MAE's `ChamferDistanceL2` (the loss "cdl2" of its pretraining config): the CUDA
kernel returns the *squared* nearest-neighbour distances of both directions, and the loss is
`mean(dist1) + mean(dist2)`, with the means taken over every point of every patch in the batch.
All patches have k points, so that equals the mean over patches of `chamfer_distance` here.
(`ChamferDistanceL1` is the same with square roots of the distances, halved.)

Written in plain torch: `torch.cdist` gives all pairwise distances (B, N, M) at once, which is
cheap for Point-MAE's patches (k = 32 points each).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["chamfer_distance", "nearest_squared_distances"]


def _check_pair(a: Tensor, b: Tensor) -> None:
    for name, cloud in (("a", a), ("b", b)):
        if not isinstance(cloud, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape (B, N, D), got {type(cloud).__name__}")
        if cloud.dim() != 3:
            hint = " (one set? add a batch dimension with .unsqueeze(0))" if cloud.dim() == 2 else ""
            raise ValueError(f"{name} must have shape (B, N, D), got {tuple(cloud.shape)}{hint}")
        if not cloud.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {cloud.dtype}")
        if cloud.shape[1] == 0:
            raise ValueError(f"{name} has no points: shape {tuple(cloud.shape)}")
    if a.shape[0] != b.shape[0] or a.shape[2] != b.shape[2]:
        raise ValueError(
            f"a (B, N, D) and b (B, M, D) must share B and D, got a {tuple(a.shape)} and b {tuple(b.shape)}"
        )


def nearest_squared_distances(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Squared distance from each point to its nearest neighbour in the other set.

    Args:
        a: (B, N, D) point sets (D = 3 for points).
        b: (B, M, D) point sets.

    Returns:
        a_to_b (B, N): min_j ||a_i - b_j||^2, and b_to_a (B, M): min_i ||a_i - b_j||^2.

    Derived in notebooks/part2_point_peft/12_point_mae.ipynb.
    """
    _check_pair(a, b)
    # direct differences, not the ||a||^2 - 2ab + ||b||^2 shortcut: exact, and the gradient of
    # cdist at a zero distance is 0 (no NaN), which matters when a prediction hits a point
    distances = torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")  # ||a_i - b_j||   (B, N, M)
    squared = distances.square()  # (B, N, M)
    return squared.amin(dim=2), squared.amin(dim=1)  # (B, N), (B, M)


def chamfer_distance(a: Tensor, b: Tensor) -> Tensor:
    """L2 Chamfer distance of each pair of sets: (B, N, D) and (B, M, D) -> (B,).

    CD(a, b) = mean_i min_j ||a_i - b_j||^2 + mean_j min_i ||a_i - b_j||^2 (squared distances, as
    Point-MAE's `ChamferDistanceL2`). Symmetric, zero when the sets coincide, differentiable in
    both arguments. Take `.mean()` for Point-MAE's loss over a batch of patches.

    Derived in notebooks/part2_point_peft/12_point_mae.ipynb.
    """
    a_to_b, b_to_a = nearest_squared_distances(a, b)  # (B, N), (B, M)
    return a_to_b.mean(dim=1) + b_to_a.mean(dim=1)  # (B,)
