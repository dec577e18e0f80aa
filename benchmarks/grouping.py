"""Point-MAE grouping (FPS + kNN) on CPU: course_lib's batched torch ops vs an open3d loop.

Writes results/bench/grouping.json. Goal: `fps_knn_ratio_vs_open3d` <= 1.0 (course_lib at
least as fast as open3d) and `fps_matches_open3d` true (same FPS centres from the same start).

Workload: B=32 clouds of N=2048 points, G=128 centres, k=32 neighbours (ScanObjectNN sizes).
- course_lib: `sample_and_group` on the (32, 2048, 3) float32 batch: FPS, one top-k over the
  centre-to-point distances FPS already computed, gather, subtract the centres.
- open3d: per cloud, `farthest_point_down_sample(G)`, a `KDTreeFlann`, one
  `search_knn_vector_3d(centre, k)` per centre, gather, subtract the centres. The open3d
  PointClouds are built before timing (in open3d's favour).

The goal figure uses torch's default number of threads (recorded); the same comparison with
torch on one thread is recorded next to it. On a shared machine the multi-threaded figure
suffers most from other load, so the load average before the run is recorded too.

Run: `.venv/bin/python -m benchmarks.grouping`.
"""

from __future__ import annotations

import os
import platform

import numpy as np
import torch

from benchmarks.common import interleaved_median_seconds, write_bench
from course_lib.points import normalize_to_unit_sphere, sample_and_group

BATCH_SIZE, NUM_POINTS, NUM_GROUPS, GROUP_SIZE = 32, 2048, 128, 32
REPEATS, WARMUP = 15, 2


def make_clouds(seed: int = 0) -> torch.Tensor:
    """(B, N, 3) float32 clouds: random points in the unit cube, normalised to the unit sphere."""
    generator = torch.Generator().manual_seed(seed)
    return normalize_to_unit_sphere(torch.rand(BATCH_SIZE, NUM_POINTS, 3, generator=generator))


def open3d_grouping(clouds: list, num_groups: int, group_size: int) -> list[np.ndarray]:
    """FPS + kNN grouping with open3d, one cloud at a time: a list of (G, k, 3) neighbourhoods."""
    import open3d as o3d

    neighbourhoods = []
    for cloud in clouds:
        centres = np.asarray(cloud.farthest_point_down_sample(num_groups).points)  # (G, 3)
        tree = o3d.geometry.KDTreeFlann(cloud)
        indices = np.empty((num_groups, group_size), dtype=np.int64)
        for g, centre in enumerate(centres):
            _, found, _ = tree.search_knn_vector_3d(centre, group_size)
            indices[g] = found
        neighbourhoods.append(np.asarray(cloud.points)[indices] - centres[:, None, :])  # (G, k, 3)
    return neighbourhoods


def main() -> None:
    import open3d as o3d

    clouds = make_clouds()  # (B, N, 3) float32
    as_open3d = [o3d.geometry.PointCloud(o3d.utility.Vector3dVector(c.double().numpy())) for c in clouds]

    # correctness on the same data: FPS sets (open3d keeps index order) and kNN sets
    groups = sample_and_group(clouds, NUM_GROUPS, GROUP_SIZE, start_index=0)
    fps_matches = knn_matches = True
    for b, cloud in enumerate(as_open3d):
        kept = np.asarray(cloud.farthest_point_down_sample(NUM_GROUPS, start_index=0).points)  # (G, 3)
        ours = groups.centres[b].double().numpy()  # (G, 3), float32 coordinates stored exactly in float64
        fps_matches &= set(map(tuple, kept)) == set(map(tuple, ours))
        tree = o3d.geometry.KDTreeFlann(cloud)
        for g in range(NUM_GROUPS):
            _, found, _ = tree.search_knn_vector_3d(ours[g], GROUP_SIZE)
            knn_matches &= set(found) == set(groups.neighbour_indices[b, g].tolist())

    contenders = {
        "course_lib": lambda: sample_and_group(clouds, NUM_GROUPS, GROUP_SIZE),
        "open3d": lambda: open3d_grouping(as_open3d, NUM_GROUPS, GROUP_SIZE),
    }
    load_before = os.getloadavg()
    # the goal figure: torch with its default threads (open3d's FPS and kd-tree run on one)
    medians = interleaved_median_seconds(contenders, repeats=REPEATS, warmup=WARMUP)
    # for comparison, torch on one thread as well
    default_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = interleaved_median_seconds(contenders, repeats=REPEATS, warmup=WARMUP)
    finally:
        torch.set_num_threads(default_threads)
    payload = {
        "name": "grouping",
        "goal": "fps_knn_ratio_vs_open3d <= 1.0 and fps_matches_open3d",
        "fps_knn_ratio_vs_open3d": medians["course_lib"] / medians["open3d"],
        "fps_matches_open3d": bool(fps_matches),
        "knn_matches_open3d": bool(knn_matches),
        "course_lib_seconds": medians["course_lib"],
        "open3d_seconds": medians["open3d"],
        "workload": {
            "batch_size": BATCH_SIZE,
            "num_points": NUM_POINTS,
            "num_groups": NUM_GROUPS,
            "group_size": GROUP_SIZE,
            "dtype": "float32",
        },
        "timing": {"method": "interleaved medians, one run", "repeats": REPEATS, "warmup": WARMUP},
        "torch_threads": default_threads,
        "single_thread": {
            "fps_knn_ratio_vs_open3d": single["course_lib"] / single["open3d"],
            "course_lib_seconds": single["course_lib"],
            "open3d_seconds": single["open3d"],
        },
        "load_average_1_5_15min_before": [round(value, 2) for value in load_before],
        "machine": {
            "cpu_count": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "open3d": o3d.__version__,
        },
    }
    payload["goal_met"] = payload["fps_knn_ratio_vs_open3d"] <= 1.0 and payload["fps_matches_open3d"]
    write_bench("grouping", payload)


if __name__ == "__main__":
    main()
