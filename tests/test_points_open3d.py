"""course_lib.points against open3d: FPS vs farthest_point_down_sample, kNN vs KDTreeFlann,
and the open3d interop (conversions, mesh sampling, normals, hidden point removal)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

o3d = pytest.importorskip("open3d")

from course_lib.points import (  # noqa: E402
    estimate_normals,
    farthest_point_sample,
    farthest_point_sample_open3d,
    from_open3d,
    hidden_point_removal,
    knn,
    knn_open3d,
    sample_and_group,
    sample_mesh,
    to_open3d,
)


def random_clouds(batch_size=4, num_points=1024, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch_size, num_points, 3, generator=generator, dtype=dtype) * 2 - 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("start", [0, 123])
def test_fps_selects_what_open3d_selects(dtype, start):
    points = random_clouds(dtype=dtype)
    chosen = farthest_point_sample(points, 64, start_index=start)  # (B, G), in the order chosen
    for b in range(len(points)):
        reference = farthest_point_sample_open3d(points[b], 64, start_index=start)  # index order
        assert sorted(chosen[b].tolist()) == sorted(reference.tolist())
    # raw open3d, no helper in between: same centre coordinates
    kept = np.asarray(to_open3d(points[0]).farthest_point_down_sample(64, start_index=start).points)
    ours = points[0, chosen[0]].double().numpy()
    assert {tuple(p) for p in kept} == {tuple(p) for p in ours}


def test_knn_finds_the_sets_kdtreeflann_finds():
    points = random_clouds()
    query = random_clouds(num_points=50, seed=1)
    sq_dist, indices = knn(query, points, 16)
    for b in range(len(points)):
        ref_sq_dist, ref_indices = knn_open3d(points[b], query[b], 16)
        for m in range(50):
            assert set(indices[b, m].tolist()) == set(ref_indices[m].tolist())
        np.testing.assert_allclose(sq_dist[b].numpy(), ref_sq_dist, atol=1e-5)


def test_grouping_matches_open3d_fps_then_kdtree():
    points = random_clouds(batch_size=2, num_points=2048)
    groups = sample_and_group(points, 32, 32)
    for b in range(2):
        cloud = to_open3d(points[b])
        tree = o3d.geometry.KDTreeFlann(cloud)
        centres = np.asarray(cloud.farthest_point_down_sample(32).points)  # (G, 3), index order
        ours = {tuple(c): g for g, c in enumerate(groups.centres[b].double().numpy())}
        for centre in centres:
            _, found, _ = tree.search_knn_vector_3d(centre, 32)
            assert set(found) == set(groups.neighbour_indices[b, ours[tuple(centre)]].tolist())


def test_to_and_from_open3d_round_trip():
    points = np.random.default_rng(0).random((100, 3)).astype(np.float32)
    normals = np.tile([0.0, 0.0, 1.0], (100, 1))
    colours = np.random.default_rng(1).random((100, 3))
    cloud = to_open3d(torch.from_numpy(points), normals=normals, colors=colours)
    assert isinstance(cloud, o3d.geometry.PointCloud) and cloud.has_normals() and cloud.has_colors()
    back = from_open3d(cloud)
    assert back.dtype == np.float32 and np.array_equal(back, points)
    assert torch.equal(from_open3d(cloud, as_tensor=True), torch.from_numpy(points))
    np.testing.assert_allclose(from_open3d(cloud, "normals"), normals)
    np.testing.assert_allclose(from_open3d(cloud, "colors"), colours, atol=1e-6)
    with pytest.raises(ValueError, match=r"\(N, 3\).*one cloud at a time"):
        to_open3d(np.zeros((2, 10, 3)))
    with pytest.raises(ValueError, match="normals has 5 rows"):
        to_open3d(points, normals=normals[:5])
    with pytest.raises(ValueError, match="no normals"):
        from_open3d(to_open3d(points), "normals")


def test_sample_mesh_uniform_and_poisson():
    sphere = o3d.geometry.TriangleMesh.create_sphere(radius=1.0, resolution=20)
    points = sample_mesh(sphere, 500, seed=0)
    assert points.shape == (500, 3) and points.dtype == np.float32
    radii = np.linalg.norm(points, axis=1)
    assert radii.max() <= 1.0 + 1e-5 and radii.min() > 0.98  # on the (triangulated) sphere's surface
    assert np.array_equal(points, sample_mesh(sphere, 500, seed=0))  # seeded
    assert not np.array_equal(points, sample_mesh(sphere, 500, seed=1))
    blue_noise, normals = sample_mesh(sphere, 200, method="poisson", seed=0, with_normals=True)
    assert blue_noise.shape == normals.shape == (200, 3)
    np.testing.assert_allclose(np.linalg.norm(normals, axis=1), 1.0, atol=1e-4)
    assert (np.sum(normals * blue_noise, axis=1) > 0.9).all()  # outward, along the radius
    # blue noise is more evenly spread than independent samples: larger nearest-neighbour gaps
    uniform = sample_mesh(sphere, 200, seed=0)
    def smallest_gap(points):
        return np.sqrt(knn_open3d(points, points, 2)[0][:, 1]).min()

    gaps = {"poisson": smallest_gap(blue_noise), "uniform": smallest_gap(uniform)}
    assert gaps["poisson"] > 2 * gaps["uniform"]
    with pytest.raises(ValueError, match="method must be"):
        sample_mesh(sphere, 10, method="grid")
    with pytest.raises(TypeError, match="TriangleMesh"):
        sample_mesh(points, 10)


def test_estimate_normals_of_a_plane():
    rng = np.random.default_rng(0)
    plane = np.c_[rng.random((300, 2)), np.zeros(300)]  # the z = 0 plane
    normals = estimate_normals(plane, k=10)
    np.testing.assert_allclose(np.abs(normals[:, 2]), 1.0, atol=1e-5)
    towards_camera = estimate_normals(plane, k=10, orient_towards=[0.5, 0.5, -3.0])
    np.testing.assert_allclose(towards_camera[:, 2], -1.0, atol=1e-5)
    with pytest.raises(ValueError, match=r"k must be an int in \[3, N\]"):
        estimate_normals(plane, k=2)


def test_hidden_point_removal_keeps_the_side_facing_the_camera():
    sphere = o3d.geometry.TriangleMesh.create_sphere(radius=1.0, resolution=20)
    points = sample_mesh(sphere, 2000, seed=0)
    visible = hidden_point_removal(points, camera_location=[0.0, 0.0, 4.0])
    assert visible.dtype == np.int64 and np.all(np.diff(visible) > 0)
    assert 0.2 * len(points) < len(visible) < 0.6 * len(points)
    assert points[visible, 2].min() > 0.0  # the camera at z = 4 sees only the z > 0 cap
    hidden = np.setdiff1d(np.arange(len(points)), visible)
    assert points[hidden, 2].mean() < 0.0
    with pytest.raises(ValueError, match="camera_location must be 3 numbers"):
        hidden_point_removal(points, camera_location=[0.0, 4.0])
