"""Farthest point sampling (FPS): pick G well-spread centres out of N points.

Derived in notebooks/part2_point_peft/10_point_clouds.ipynb.

FPS is greedy: start from one point, then repeatedly add the point that is farthest from
everything chosen so far. It keeps one running vector, the squared distance of every point to
its nearest chosen centre, and updates it with one new centre per step:

    min_sq_dist[j] <- min(min_sq_dist[j], ||p_j - c_i||^2),   c_{i+1} = p_argmax_j min_sq_dist[j]

so G steps cost O(G * N) per cloud. Point-MAE's tokenizer uses it to place its patch centres.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["check_finite", "check_point_batch", "farthest_point_sample"]


def check_point_batch(points: Tensor, name: str = "points") -> None:
    """Raise a clear error unless `points` is a floating-point tensor of shape (B, N, 3).

    All batched point operations of `course_lib.points` call this first.
    """
    if not isinstance(points, Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor of shape (B, N, 3), got {type(points).__name__}; "
            "convert with torch.as_tensor(...)"
        )
    if points.dim() != 3 or points.shape[-1] != 3:
        hint = " (one cloud? add a batch dimension with .unsqueeze(0))" if points.dim() == 2 else ""
        raise ValueError(f"{name} must have shape (B, N, 3), got {tuple(points.shape)}{hint}")
    if not points.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {points.dtype}")
    if points.shape[1] == 0:
        raise ValueError(f"{name} has no points: shape {tuple(points.shape)}")
    check_finite(points, name)


def check_finite(values: Tensor, name: str) -> None:
    """Raise a ValueError naming the first NaN/inf of `values` (B, ...) unless all are finite.

    FPS, kNN and ball query would otherwise run on: NaN compares false with everything, so a
    NaN point is never picked and never anyone's neighbour, and the result looks plausible.
    """
    finite = torch.isfinite(values)
    if not bool(finite.all()):
        bad = (~finite).nonzero()[0].tolist()
        count = int((~finite).sum())
        raise ValueError(
            f"{name} contains {count} NaN or inf value(s), the first at index {tuple(bad)}: remove or repair "
            "those entries (e.g. drop the points with `x[torch.isfinite(x).all(-1)]`) before passing them in"
        )


def _check_count(count: int, num_points: int, what: str) -> None:
    """`count` must be an int in [1, num_points]; used for G (FPS) and k (kNN, ball query)."""
    if isinstance(count, bool) or not isinstance(count, int):
        raise TypeError(f"{what} must be an int, got {type(count).__name__}")
    if count < 1:
        raise ValueError(f"{what} must be at least 1, got {count}")
    if count > num_points:
        raise ValueError(
            f"{what} = {count} is larger than the number of points N = {num_points}; the most allowed is {num_points}"
        )


def _start_indices(
    start_index: int | Tensor | None,
    batch_size: int,
    num_points: int,
    device: torch.device,
    generator: torch.Generator | None,
) -> Tensor:
    """Resolve `start_index` to a (B,) long tensor; None draws one start per cloud from `generator`."""
    if start_index is None:
        # the generator lives on the CPU unless the caller made one on the points' device
        gen_device = generator.device if generator is not None else torch.device("cpu")
        start = torch.randint(num_points, (batch_size,), generator=generator, device=gen_device)
        return start.to(device)
    start = torch.as_tensor(start_index, dtype=torch.long, device=device)
    if start.dim() == 0:
        start = start.expand(batch_size)
    if start.shape != (batch_size,):
        raise ValueError(
            f"start_index must be an int or a tensor of shape (B,) = ({batch_size},), got shape {tuple(start.shape)}"
        )
    if bool((start < 0).any()) or bool((start >= num_points).any()):
        raise ValueError(f"start_index must lie in [0, N) = [0, {num_points}), got {start.tolist()}")
    return start


@torch.no_grad()
def _farthest_point_loop(
    points: Tensor,
    num_samples: int,
    start: Tensor,
    distance_rows: Tensor | None = None,
    on_rows: Callable[[int, int, Tensor], None] | None = None,
) -> Tensor:
    """The FPS loop; returns the chosen indices (B, G).

    Every step computes its new centre's squared distances to all points, a (B, N) row. kNN
    grouping reuses them: if `distance_rows` (B, S, N) is given, step i writes its row into slot
    i % S, and every S steps (and after the last) `on_rows(first, stop, rows)` sees the rows
    (B, stop - first, N) of centres first..stop-1. Handing rows over in chunks lets the caller
    run one batched top-k per S centres instead of one per centre.
    """
    batch_size, num_points, _ = points.shape
    coordinates = points.transpose(1, 2).contiguous()  # (B, 3, N): one contiguous row per axis
    batch = torch.arange(batch_size, device=points.device)  # (B,)
    selected = torch.empty(batch_size, num_samples, dtype=torch.long, device=points.device)  # (B, G)
    min_sq_dist = torch.full((batch_size, num_points), float("inf"), dtype=points.dtype, device=points.device)  # (B, N)
    difference = torch.empty_like(coordinates)  # (B, 3, N), reused every step
    chunk = distance_rows.shape[1] if distance_rows is not None else 1
    scratch = torch.empty_like(min_sq_dist)  # (B, N), used when nobody wants the rows
    farthest = start  # (B,)
    for i in range(num_samples):
        selected[:, i] = farthest
        centre = points[batch, farthest]  # (B, 3)
        sq_dist = distance_rows[:, i % chunk] if distance_rows is not None else scratch  # (B, N) view
        torch.sub(coordinates, centre[:, :, None], out=difference).square_()  # (p - c)^2 per axis   (B, 3, N)
        torch.add(difference[:, 0], difference[:, 1], out=sq_dist).add_(difference[:, 2])  # ||p_j - c_i||^2  (B, N)
        torch.minimum(min_sq_dist, sq_dist, out=min_sq_dist)  # distance to the nearest centre so far
        farthest = min_sq_dist.max(dim=1).indices  # next centre: the worst-covered point (first one on ties)
        if on_rows is not None and (i % chunk == chunk - 1 or i == num_samples - 1):
            first = i - i % chunk
            on_rows(first, i + 1, distance_rows[:, : i + 1 - first])
    return selected


def farthest_point_sample(
    points: Tensor,
    num_samples: int,
    start_index: int | Tensor | None = 0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Indices (B, G) of G points chosen by farthest point sampling, in the order chosen.

    Args:
        points: (B, N, 3) point clouds.
        num_samples: G, the number of centres; 1 <= G <= N.
        start_index: the first centre: an int for every cloud, a (B,) tensor (one per cloud),
            or None to draw a random start per cloud from `generator`. The default 0 is what
            Point-MAE's CUDA kernel does, and makes the result deterministic.
        generator: only used when `start_index` is None.

    Ties (two points equally far) go to the lower index, as in open3d's
    `PointCloud.farthest_point_down_sample`, which picks the same set from the same start
    (it returns the points in index order, not in the order chosen).

    Derived in notebooks/part2_point_peft/10_point_clouds.ipynb.
    """
    check_point_batch(points)
    batch_size, num_points, _ = points.shape
    _check_count(num_samples, num_points, "num_samples (G)")
    start = _start_indices(start_index, batch_size, num_points, points.device, generator)
    return _farthest_point_loop(points, num_samples, start)
