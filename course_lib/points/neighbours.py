"""Neighbourhoods of points: kNN, ball query and the Point-MAE grouping into local patches.

Derived in notebooks/part2_point_peft/10_point_clouds.ipynb.

Point-MAE turns a cloud into tokens the way a ViT cuts an image into patches: farthest point
sampling places G centres, each centre takes its k nearest points, and every patch is written
relative to its centre, so that the patch encoder sees local shape and the centre (embedded on
its own) carries the position. Everything here is batched over clouds: (B, N, 3) in.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from course_lib.points.sampling import (
    _check_count,
    _farthest_point_loop,
    _start_indices,
    check_point_batch,
)

# how many FPS steps `sample_and_group` collects before one batched kNN top-k (see there)
GROUPING_CHUNK_STEPS = 32

__all__ = [
    "Groups",
    "ball_query",
    "gather_points",
    "group_points",
    "knn",
    "pairwise_squared_distances",
    "sample_and_group",
    "smallest_k",
]


def smallest_k(values: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k smallest entries along the last dimension, ascending: values (..., k) and indices (..., k).

    Gives the same values as `values.topk(k, largest=False)`, faster when k is much smaller than
    N, by block pruning. Deal the N entries into M interleaved blocks (entry j into block j % M)
    and take each block's minimum. A block holding one of the k smallest entries has a minimum no
    larger than the k-th smallest entry, and at most k blocks can have that, so the k blocks with
    the smallest minima hold all k smallest entries: the answer is the k smallest of their
    k * N / M entries. Two top-k's over M and k * N / M entries replace one over N; M = sqrt(k N)
    balances them (N = 2048, k = 32: 256 and 256 instead of 2048). On exact ties it may pick
    other, equally small, entries than topk does.
    """
    num_entries = values.shape[-1]
    _check_count(k, num_entries, "k")
    num_blocks = max(k, math.isqrt(k * num_entries))  # M
    block_size = num_entries // num_blocks  # entries per block
    if block_size < 2:  # pruning would not shrink anything
        return values.topk(k, dim=-1, largest=False, sorted=True)
    covered = num_blocks * block_size  # the last N - covered (< M) entries are always candidates
    blocks = values[..., :covered].reshape(*values.shape[:-1], block_size, num_blocks)  # entry j -> [j // M, j % M]
    block_min = blocks.amin(dim=-2)  # (..., M)
    best_blocks = block_min.topk(k, dim=-1, largest=False, sorted=False).indices  # (..., k)
    offsets = torch.arange(0, covered, num_blocks, device=values.device)  # block m holds m + M * [0, 1, ...]
    candidates = (best_blocks.unsqueeze(-1) + offsets).flatten(-2)  # (..., k * block_size)
    if covered < num_entries:
        tail = torch.arange(covered, num_entries, device=values.device).expand(*values.shape[:-1], -1)
        candidates = torch.cat([candidates, tail], dim=-1)
    smallest, chosen = values.gather(-1, candidates).topk(k, dim=-1, largest=False, sorted=True)  # (..., k)
    return smallest, candidates.gather(-1, chosen)


def gather_points(points: Tensor, indices: Tensor) -> Tensor:
    """Pick points by index, cloud by cloud: (B, N, C) and (B, *S) -> (B, *S, C).

    `out[b, s] = points[b, indices[b, s]]` for any index shape S, e.g. (B, G) -> (B, G, C)
    centres or (B, G, k) -> (B, G, k, C) neighbourhoods. C can be 3 (xyz) or any feature width.
    """
    if not isinstance(points, Tensor) or points.dim() != 3:
        shape = tuple(points.shape) if isinstance(points, Tensor) else type(points).__name__
        raise ValueError(f"points must have shape (B, N, C), got {shape}")
    if not isinstance(indices, Tensor) or indices.dtype not in (torch.int64, torch.int32) or indices.dim() < 1:
        raise TypeError("indices must be an integer tensor of shape (B, ...)")
    if indices.shape[0] != points.shape[0]:
        raise ValueError(f"batch sizes differ: points has B = {points.shape[0]}, indices has B = {indices.shape[0]}")
    batch_size, _, channels = points.shape
    flat = indices.reshape(batch_size, -1, 1).long().expand(-1, -1, channels)  # (B, L, C), L = prod(S)
    picked = torch.gather(points, 1, flat)  # (B, L, C)
    return picked.reshape(*indices.shape, channels)  # (B, *S, C)


def _check_query_and_points(query: Tensor, points: Tensor) -> None:
    check_point_batch(query, "query")
    check_point_batch(points, "points")
    if query.shape[0] != points.shape[0]:
        raise ValueError(f"batch sizes differ: query has B = {query.shape[0]}, points has B = {points.shape[0]}")


def pairwise_squared_distances(query: Tensor, points: Tensor) -> Tensor:
    """Squared distances (B, M, N) between every query point (B, M, 3) and every point (B, N, 3).

    Uses ||q - p||^2 = ||q||^2 - 2 q.p + ||p||^2, one batched matrix product instead of a
    (B, M, N, 3) difference tensor. Rounding can push a true 0 slightly below zero, hence
    the clamp; in float32 expect errors around 1e-7 x ||p||^2 (use float64 for exact ties).
    """
    _check_query_and_points(query, points)
    query_sq = query.square().sum(dim=-1, keepdim=True)  # ||q||^2                    (B, M, 1)
    points_sq = points.square().sum(dim=-1).unsqueeze(1)  # ||p||^2                   (B, 1, N)
    sq_dist = torch.baddbmm(query_sq + points_sq, query, points.transpose(1, 2), alpha=-2.0)  # (B, M, N)
    return sq_dist.clamp_min_(0.0)


def knn(query: Tensor, points: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k nearest points to each query point, nearest first.

    Args:
        query: (B, M, 3) query points (e.g. FPS centres).
        points: (B, N, 3) points to search; 1 <= k <= N.

    Returns:
        squared_distances (B, M, k), ascending, and indices (B, M, k) into `points`.
        (Squared, like open3d's KDTreeFlann.search_knn_vector_3d, which returns the same sets.)

    Derived in notebooks/part2_point_peft/10_point_clouds.ipynb.
    """
    _check_query_and_points(query, points)
    _check_count(k, points.shape[1], "k")
    with torch.no_grad():  # indices only; gather the points afterwards to keep gradients
        sq_dist = pairwise_squared_distances(query, points)  # (B, M, N)
        return smallest_k(sq_dist, k)  # (B, M, k) each: sq_dist.topk(k, largest=False), faster


def ball_query(query: Tensor, points: Tensor, radius: float, k: int) -> tuple[Tensor, Tensor]:
    """Up to k points strictly within `radius` of each query point, padded to exactly k.

    Follows PointNet++'s standard `ball_query` kernel: it scans the points in index order and
    keeps the *first* k found inside the ball (not the k nearest), then pads the remaining slots
    by repeating the first index found. A query with no point inside keeps index 0 in every slot
    (the kernel's zero-initialised output); `counts` tells real entries from padding.

    Returns:
        indices (B, M, k) into `points` and counts (B, M): how many slots hold distinct points
        found inside the ball (min(found, k)).

    Derived in notebooks/part2_point_peft/10_point_clouds.ipynb.
    """
    _check_query_and_points(query, points)
    num_points = points.shape[1]
    _check_count(k, num_points, "k")
    if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not math.isfinite(radius) or radius <= 0:
        raise ValueError(f"radius must be a positive finite number, got {radius!r}")
    with torch.no_grad():
        inside = pairwise_squared_distances(query, points) < radius * radius  # (B, M, N)
        point_index = torch.arange(num_points, device=points.device)  # (N,)
        candidates = torch.where(inside, point_index, num_points)  # outside -> N, sorts last (B, M, N)
        first_found = candidates.topk(k, dim=-1, largest=False, sorted=True).values  # lowest indices first (B, M, k)
        counts = inside.sum(dim=-1).clamp_max(k)  # (B, M)
        pad_with = first_found[..., :1]  # (B, M, 1)
        pad_with = torch.where(pad_with == num_points, 0, pad_with)  # empty ball -> index 0
        indices = torch.where(first_found == num_points, pad_with, first_found)  # (B, M, k)
    return indices, counts


class Groups(NamedTuple):
    """Local patches of a batch of clouds, as Point-MAE's tokenizer makes them."""

    neighbourhoods: Tensor  # (B, G, k, 3) neighbours minus their centre
    centres: Tensor  # (B, G, 3) centre coordinates
    centre_indices: Tensor | None  # (B, G) indices of the centres in the cloud (None if given as xyz)
    neighbour_indices: Tensor  # (B, G, k) indices of the neighbours, nearest first


def group_points(points: Tensor, centres: Tensor, k: int) -> Groups:
    """Group the k nearest points around each centre, relative to that centre.

    Args:
        points: (B, N, 3) clouds.
        centres: either (B, G) integer indices into `points` (e.g. from farthest_point_sample)
            or (B, G, 3) centre coordinates.
        k: group size, 1 <= k <= N.

    Returns:
        Groups(neighbourhoods (B, G, k, 3) = p - centre, centres (B, G, 3),
        centre_indices (B, G) or None, neighbour_indices (B, G, k)).

    Derived in notebooks/part2_point_peft/10_point_clouds.ipynb.
    """
    check_point_batch(points)
    if not isinstance(centres, Tensor):
        raise TypeError(
            f"centres must be a tensor of indices (B, G) or coordinates (B, G, 3), got {type(centres).__name__}"
        )
    if centres.is_floating_point():
        check_point_batch(centres, "centres")
        if centres.shape[0] != points.shape[0]:
            raise ValueError(
                f"batch sizes differ: centres has B = {centres.shape[0]}, points has B = {points.shape[0]}"
            )
        centre_indices, centre_xyz = None, centres  # (B, G, 3)
    else:
        if centres.dim() != 2:
            raise ValueError(f"centre indices must have shape (B, G), got {tuple(centres.shape)}")
        centre_indices, centre_xyz = centres, gather_points(points, centres)  # (B, G), (B, G, 3)
    _, neighbour_indices = knn(centre_xyz, points, k)  # (B, G, k)
    neighbourhoods = gather_points(points, neighbour_indices) - centre_xyz.unsqueeze(2)  # (B, G, k, 3)
    return Groups(neighbourhoods, centre_xyz, centre_indices, neighbour_indices)


def sample_and_group(
    points: Tensor,
    num_groups: int,
    group_size: int,
    start_index: int | Tensor | None = 0,
    generator: torch.Generator | None = None,
) -> Groups:
    """Point-MAE's tokenizer grouping: FPS picks G centres, each takes its k nearest points.

    The same result as `group_points(points, farthest_point_sample(points, G, start_index), k)`,
    but faster: each FPS step computes its new centre's squared distance to every point
    anyway, so the centre's k nearest points are taken right there, from that (B, N) row.

    Derived in notebooks/part2_point_peft/10_point_clouds.ipynb.
    """
    check_point_batch(points)
    batch_size, num_points, _ = points.shape
    _check_count(num_groups, num_points, "num_groups (G)")
    _check_count(group_size, num_points, "group_size (k)")
    start = _start_indices(start_index, batch_size, num_points, points.device, generator)
    neighbour_indices = points.new_empty(batch_size, num_groups, group_size, dtype=torch.long)  # (B, G, k)
    # FPS hands over its distance rows CHUNK_STEPS centres at a time: one top-k over
    # B * CHUNK_STEPS rows costs the same per row as B rows, but far fewer calls, and it is
    # large enough for torch to spread over threads. The chunk (B, S, N) stays cache-sized.
    chunk = min(num_groups, GROUPING_CHUNK_STEPS)
    distance_rows = points.new_empty(batch_size, chunk, num_points)  # (B, S, N)

    def take_nearest(first: int, stop: int, rows: Tensor) -> None:  # rows (B, stop - first, N)
        neighbour_indices[:, first:stop] = smallest_k(rows, group_size)[1]

    centre_indices = _farthest_point_loop(points, num_groups, start, distance_rows, take_nearest)  # (B, G)
    centres = gather_points(points, centre_indices)  # (B, G, 3)
    neighbourhoods = gather_points(points, neighbour_indices) - centres.unsqueeze(2)  # (B, G, k, 3)
    return Groups(neighbourhoods, centres, centre_indices, neighbour_indices)
