"""Point clouds: sampling, neighbourhoods, transforms, open3d interop and plots.

Derived in notebooks/part2_point_peft/10_point_clouds.ipynb; the shape data sets come in
notebooks/part2_point_peft/11_shape_data.ipynb (`course_lib.points.datasets`, imported on its own).

Batched torch operations take (B, N, 3) clouds:

- `farthest_point_sample`            FPS centres (B, G)
- `knn`, `ball_query`                neighbours of query points
- `group_points`, `sample_and_group` Point-MAE's patches: (B, G, k, 3) relative to their centres
- `normalize_to_unit_sphere`, `random_scale_translate`, `rotate_about_up_axis`, `jitter`
  (also accept one (N, 3) cloud; the course's up axis is y)

open3d (`open3d_interop`, imported lazily) and plotting (`plotting`) work on one (N, 3) cloud.
The plotting names are imported on first use, so that `import course_lib.points` (and
`course_lib.point_peft`) does not import matplotlib: it is the `[widgets]` extra.
"""

import importlib
from typing import Any

from course_lib.points.neighbours import (
    Groups,
    ball_query,
    gather_points,
    group_points,
    knn,
    pairwise_squared_distances,
    sample_and_group,
    smallest_k,
)
from course_lib.points.open3d_interop import (
    estimate_normals,
    farthest_point_sample_open3d,
    from_open3d,
    hidden_point_removal,
    knn_open3d,
    sample_mesh,
    to_open3d,
)
from course_lib.points.sampling import check_point_batch, farthest_point_sample
from course_lib.points.transforms import (
    UP_AXIS,
    jitter,
    normalize_to_unit_sphere,
    random_scale_translate,
    rotate_about_up_axis,
)

__all__ = [
    "UP_AXIS",
    "Groups",
    "ball_query",
    "check_point_batch",
    "estimate_normals",
    "farthest_point_sample",
    "farthest_point_sample_open3d",
    "from_open3d",
    "gather_points",
    "group_colours",
    "group_point_colours",
    "group_points",
    "hidden_point_removal",
    "jitter",
    "knn",
    "knn_open3d",
    "normalize_to_unit_sphere",
    "pairwise_squared_distances",
    "plot_groups",
    "plot_point_cloud",
    "plotly_groups",
    "random_scale_translate",
    "rotate_about_up_axis",
    "sample_and_group",
    "sample_mesh",
    "smallest_k",
    "to_open3d",
]

#: Names of `course_lib.points.plotting`, imported when first read (matplotlib is an extra).
_PLOTTING = ("group_colours", "group_point_colours", "plot_groups", "plot_point_cloud", "plotly_groups")


def __getattr__(name: str) -> Any:
    if name in _PLOTTING:
        value = getattr(importlib.import_module("course_lib.points.plotting"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'course_lib.points' has no attribute {name!r}")
