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
"""

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
from course_lib.points.plotting import group_colours, group_point_colours, plot_groups, plot_point_cloud, plotly_groups
from course_lib.points.sampling import check_point_batch, farthest_point_sample
from course_lib.points.transforms import (
    UP_AXIS,
    jitter,
    normalize_to_unit_sphere,
    random_scale_translate,
    rotate_about_up_axis,
)

__all__ = [
    "check_point_batch",
    "farthest_point_sample",
    "smallest_k",
    "gather_points",
    "pairwise_squared_distances",
    "knn",
    "ball_query",
    "Groups",
    "group_points",
    "sample_and_group",
    "UP_AXIS",
    "normalize_to_unit_sphere",
    "random_scale_translate",
    "rotate_about_up_axis",
    "jitter",
    "to_open3d",
    "from_open3d",
    "sample_mesh",
    "estimate_normals",
    "hidden_point_removal",
    "farthest_point_sample_open3d",
    "knn_open3d",
    "group_colours",
    "group_point_colours",
    "plot_point_cloud",
    "plot_groups",
    "plotly_groups",
]
