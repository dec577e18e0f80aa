"""open3d interop: conversions, mesh sampling, normals, hidden point removal, reference ops.

Derived in notebooks/part2_point_peft/10_point_clouds.ipynb.

open3d is the right tool for meshes and kd-trees; course_lib's own batched torch operations
(`sampling`, `neighbours`) are checked against it. Functions here work on one cloud at a time:
(N, 3) numpy arrays or torch tensors in, float32 numpy arrays out (open3d itself stores float64).
open3d is imported on first use, so `course_lib.points` imports without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:  # pragma: no cover
    import open3d as o3d

__all__ = [
    "estimate_normals",
    "farthest_point_sample_open3d",
    "from_open3d",
    "hidden_point_removal",
    "knn_open3d",
    "sample_mesh",
    "to_open3d",
]


def _open3d():
    try:
        import open3d
    except ImportError as error:  # pragma: no cover - depends on the install
        raise ImportError("open3d is needed here: pip install 'course_lib[points]' (or pip install open3d)") from error
    return open3d


def _as_xyz(array: Any, name: str) -> np.ndarray:
    """One cloud as a float64 (N, 3) numpy array (what open3d's Vector3dVector wants)."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    array = np.asarray(array, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != 3:
        hint = " (one cloud at a time: index the batch, e.g. points[0])" if array.ndim == 3 else ""
        raise ValueError(f"{name} must have shape (N, 3), got {array.shape}{hint}")
    return np.ascontiguousarray(array)


def to_open3d(points: Any, normals: Any = None, colors: Any = None) -> o3d.geometry.PointCloud:
    """An `open3d.geometry.PointCloud` from (N, 3) points, optional (N, 3) normals and (N, 3) RGB colours in [0, 1]."""
    o3d = _open3d()
    xyz = _as_xyz(points, "points")
    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(xyz))
    for name, values in (("normals", normals), ("colors", colors)):
        if values is None:
            continue
        values = _as_xyz(values, name)
        if len(values) != len(xyz):
            raise ValueError(f"{name} has {len(values)} rows but points has {len(xyz)}")
        setattr(cloud, name, o3d.utility.Vector3dVector(values))
    return cloud


def from_open3d(
    cloud: o3d.geometry.PointCloud, attribute: str = "points", as_tensor: bool = False
) -> np.ndarray | torch.Tensor:
    """The (N, 3) points (or "normals" / "colors") of an open3d PointCloud as float32 numpy (or torch)."""
    if attribute not in ("points", "normals", "colors"):
        raise ValueError(f"attribute must be 'points', 'normals' or 'colors', got {attribute!r}")
    if not hasattr(cloud, attribute):
        raise TypeError(f"expected an open3d.geometry.PointCloud, got {type(cloud).__name__}")
    values = np.asarray(getattr(cloud, attribute), dtype=np.float32).reshape(-1, 3)
    if attribute != "points" and len(values) == 0 and len(cloud.points) > 0:
        raise ValueError(f"this point cloud has no {attribute}")
    return torch.from_numpy(values) if as_tensor else values


def sample_mesh(
    mesh: o3d.geometry.TriangleMesh,
    num_points: int,
    method: str = "uniform",
    seed: int | None = 0,
    with_normals: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Sample `num_points` points on a triangle mesh's surface, (N, 3) float32.

    method "uniform": independent samples, triangles chosen in proportion to their area.
    method "poisson": blue noise, roughly even spacing (slower; Yuksel's sample elimination).
    `seed` sets open3d's global random seed first, so the same seed gives the same points
    (None leaves open3d's state alone). With `with_normals`, also the (N, 3) unit surface normals.
    """
    o3d = _open3d()
    if not isinstance(mesh, o3d.geometry.TriangleMesh):
        raise TypeError(f"mesh must be an open3d.geometry.TriangleMesh, got {type(mesh).__name__}")
    if len(mesh.triangles) == 0:
        raise ValueError("mesh has no triangles to sample from")
    if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 1:
        raise ValueError(f"num_points must be a positive int, got {num_points!r}")
    if with_normals and not mesh.has_vertex_normals():
        mesh = o3d.geometry.TriangleMesh(mesh)  # a copy: leave the caller's mesh as it was
        mesh.compute_vertex_normals()  # sampling interpolates vertex normals
    if seed is not None:
        o3d.utility.random.seed(int(seed))
    if method == "uniform":
        cloud = mesh.sample_points_uniformly(number_of_points=num_points)
    elif method == "poisson":
        cloud = mesh.sample_points_poisson_disk(number_of_points=num_points)
    else:
        raise ValueError(f"method must be 'uniform' or 'poisson', got {method!r}")
    points = from_open3d(cloud)
    if not with_normals:
        return points
    normals = from_open3d(cloud, "normals")  # interpolated vertex normals: not quite unit length
    return points, normals / np.linalg.norm(normals, axis=1, keepdims=True).clip(min=1e-12)


def estimate_normals(points: Any, k: int = 30, orient_towards: Any = None) -> np.ndarray:
    """Unit normals (N, 3) float32 by PCA of each point's k nearest neighbours (open3d).

    A PCA normal has no sign; `orient_towards` (a 3-vector, e.g. a camera position) flips
    each normal to point towards it. Without it the signs are arbitrary.
    """
    o3d = _open3d()
    cloud = to_open3d(points)
    if isinstance(k, bool) or not isinstance(k, int) or not 3 <= k <= len(cloud.points):
        raise ValueError(f"k must be an int in [3, N] = [3, {len(cloud.points)}] (a plane needs 3 points), got {k!r}")
    cloud.estimate_normals(o3d.geometry.KDTreeSearchParamKNN(knn=k))
    if orient_towards is not None:
        cloud.orient_normals_towards_camera_location(np.asarray(orient_towards, dtype=np.float64).reshape(3))
    return from_open3d(cloud, "normals")


def hidden_point_removal(points: Any, camera_location: Any, radius_factor: float = 100.0) -> np.ndarray:
    """Sorted indices of the points visible from `camera_location` (Katz et al. 2007, open3d).

    The projection radius is `radius_factor` times the cloud's bounding-box diagonal (a large
    factor keeps more of the points that face the camera). This is how a scan sees only one
    side of an object; the course's scan-like shapes are made with it.
    """
    o3d = _open3d()
    if radius_factor <= 0:
        raise ValueError(f"radius_factor must be positive, got {radius_factor}")
    cloud = to_open3d(points)
    camera = np.asarray(camera_location, dtype=np.float64).reshape(-1)
    if camera.shape != (3,):
        raise ValueError(f"camera_location must be 3 numbers, got shape {camera.shape}")
    diameter = float(np.linalg.norm(cloud.get_max_bound() - cloud.get_min_bound()))
    _, visible = cloud.hidden_point_removal(camera, diameter * radius_factor)
    return np.sort(np.asarray(visible, dtype=np.int64))


def farthest_point_sample_open3d(points: Any, num_samples: int, start_index: int = 0) -> np.ndarray:
    """Reference FPS: indices (G,) of the points open3d's `farthest_point_down_sample` keeps.

    open3d returns points, not indices, and in index order, not in the order chosen; the
    points are mapped back to their indices by an exact nearest-neighbour lookup (distance 0).
    """
    o3d = _open3d()
    cloud = to_open3d(points)
    if not 1 <= num_samples <= len(cloud.points):
        raise ValueError(f"num_samples must be in [1, N] = [1, {len(cloud.points)}], got {num_samples}")
    kept = np.asarray(cloud.farthest_point_down_sample(num_samples, start_index=start_index).points)  # (G, 3)
    tree = o3d.geometry.KDTreeFlann(cloud)
    indices = np.empty(len(kept), dtype=np.int64)
    for i, point in enumerate(kept):
        _, found, sq_dist = tree.search_knn_vector_3d(point, 1)
        if sq_dist[0] != 0.0:  # pragma: no cover - open3d returns input points
            raise RuntimeError("open3d returned a point that is not in the input cloud")
        indices[i] = found[0]
    return indices


def knn_open3d(points: Any, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference kNN with open3d's KDTreeFlann: squared distances (M, k) and indices (M, k), nearest first."""
    o3d = _open3d()
    cloud = to_open3d(points)
    query_xyz = _as_xyz(queries, "queries")
    if not 1 <= k <= len(cloud.points):
        raise ValueError(f"k must be in [1, N] = [1, {len(cloud.points)}], got {k}")
    tree = o3d.geometry.KDTreeFlann(cloud)
    sq_distances = np.empty((len(query_xyz), k))
    indices = np.empty((len(query_xyz), k), dtype=np.int64)
    for i, query in enumerate(query_xyz):
        _, found, sq_dist = tree.search_knn_vector_3d(query, k)
        indices[i], sq_distances[i] = found, sq_dist
    return sq_distances, indices
