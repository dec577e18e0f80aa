"""course_lib.points: batched FPS, kNN, ball query, grouping, transforms and plots.

References are brute-force numpy versions written here (the open3d comparisons live in
test_points_open3d.py). Data are random floats, so distance ties do not happen.
"""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch

from course_lib.points import (
    ball_query,
    farthest_point_sample,
    gather_points,
    group_colours,
    group_point_colours,
    group_points,
    jitter,
    knn,
    normalize_to_unit_sphere,
    pairwise_squared_distances,
    plot_groups,
    plot_point_cloud,
    plotly_groups,
    random_scale_translate,
    rotate_about_up_axis,
    sample_and_group,
    smallest_k,
)


def random_clouds(batch_size=3, num_points=300, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch_size, num_points, 3, generator=generator, dtype=dtype) * 2 - 1


# ---------- brute-force references ----------


def fps_reference(cloud: np.ndarray, num_samples: int, start: int) -> list[int]:
    chosen = [start]
    nearest = np.full(len(cloud), np.inf)
    for _ in range(num_samples - 1):
        nearest = np.minimum(nearest, ((cloud - cloud[chosen[-1]]) ** 2).sum(1))
        chosen.append(int(np.argmax(nearest)))
    return chosen


def sq_dist_reference(query: np.ndarray, cloud: np.ndarray) -> np.ndarray:
    return ((query[:, None, :] - cloud[None, :, :]) ** 2).sum(-1)  # (M, N)


def ball_query_reference(query: np.ndarray, cloud: np.ndarray, radius: float, k: int) -> tuple[np.ndarray, np.ndarray]:
    """PointNet++'s kernel, written as its loop: first k points inside, pad with the first."""
    indices = np.zeros((len(query), k), dtype=np.int64)
    counts = np.zeros(len(query), dtype=np.int64)
    for m, q in enumerate(query):
        count = 0
        for j, p in enumerate(cloud):
            if ((q - p) ** 2).sum() < radius**2:
                if count == 0:
                    indices[m, :] = j
                indices[m, count] = j
                count += 1
                if count == k:
                    break
        counts[m] = count
    return indices, counts


# ---------- farthest point sampling ----------


@pytest.mark.parametrize("start", [0, 17])
def test_fps_matches_brute_force(start):
    points = random_clouds()
    chosen = farthest_point_sample(points, 20, start_index=start)
    assert chosen.shape == (3, 20) and chosen.dtype == torch.long
    for b in range(3):
        assert chosen[b].tolist() == fps_reference(points[b].numpy(), 20, start)


def test_fps_per_cloud_start_and_random_start():
    points = random_clouds()
    starts = torch.tensor([5, 0, 299])
    chosen = farthest_point_sample(points, 10, start_index=starts)
    assert chosen[:, 0].tolist() == [5, 0, 299]
    for b in range(3):
        assert chosen[b].tolist() == fps_reference(points[b].numpy(), 10, int(starts[b]))
    first = farthest_point_sample(points, 10, start_index=None, generator=torch.Generator().manual_seed(3))
    again = farthest_point_sample(points, 10, start_index=None, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, again)
    for b in range(3):
        assert first[b].tolist() == fps_reference(points[b].numpy(), 10, int(first[b, 0]))


def test_fps_all_points_are_distinct():
    points = random_clouds(num_points=50, dtype=torch.float32)
    chosen = farthest_point_sample(points, 50)
    assert all(len(set(row.tolist())) == 50 for row in chosen)


# ---------- kNN, ball query, grouping ----------


@pytest.mark.parametrize("num_entries, k", [(2048, 32), (1000, 7), (300, 10), (50, 20), (64, 64), (5, 1)])
def test_smallest_k_matches_topk(num_entries, k):
    values = torch.rand(6, 4, num_entries, generator=torch.Generator().manual_seed(num_entries))
    smallest, indices = smallest_k(values, k)
    expected, expected_indices = values.topk(k, dim=-1, largest=False, sorted=True)
    assert torch.equal(smallest, expected) and torch.equal(indices, expected_indices)
    # ties: the same values, and indices that hold them
    tied = torch.randint(0, 20, (6, num_entries), generator=torch.Generator().manual_seed(1)).float()
    smallest, indices = smallest_k(tied, k)
    assert torch.equal(smallest, tied.topk(k, dim=-1, largest=False).values)
    assert torch.equal(tied.gather(-1, indices), smallest) and all(len(set(row.tolist())) == k for row in indices)


def test_pairwise_squared_distances_match_and_are_not_negative():
    points = random_clouds(dtype=torch.float32)
    sq_dist = pairwise_squared_distances(points, points)
    assert sq_dist.shape == (3, 300, 300)
    assert (sq_dist >= 0).all()
    for b in range(3):
        reference = sq_dist_reference(points[b].double().numpy(), points[b].double().numpy())
        np.testing.assert_allclose(sq_dist[b].numpy(), reference, atol=1e-5)


def test_knn_matches_brute_force():
    points = random_clouds()
    query = random_clouds(num_points=40, seed=1)
    sq_dist, indices = knn(query, points, 12)
    assert sq_dist.shape == indices.shape == (3, 40, 12)
    assert (sq_dist[..., 1:] >= sq_dist[..., :-1]).all()  # nearest first
    for b in range(3):
        reference = sq_dist_reference(query[b].numpy(), points[b].numpy())
        order = np.argsort(reference, axis=1)[:, :12]
        np.testing.assert_array_equal(indices[b].numpy(), order)
        np.testing.assert_allclose(sq_dist[b].numpy(), np.take_along_axis(reference, order, 1), atol=1e-12)


def test_knn_of_a_point_in_the_cloud_finds_itself_first():
    points = random_clouds(dtype=torch.float32)
    sq_dist, indices = knn(points[:, :25], points, 4)
    assert indices[:, :, 0].tolist() == [list(range(25))] * 3
    assert (sq_dist[:, :, 0] < 1e-5).all()


def test_ball_query_matches_pointnet2_loop():
    points = random_clouds(num_points=200)
    query = random_clouds(num_points=30, seed=2) * 2  # some queries outside the cloud: empty balls
    indices, counts = ball_query(query, points, radius=0.5, k=8)
    assert indices.shape == (3, 30, 8) and counts.shape == (3, 30)
    for b in range(3):
        ref_indices, ref_counts = ball_query_reference(query[b].numpy(), points[b].numpy(), 0.5, 8)
        np.testing.assert_array_equal(indices[b].numpy(), ref_indices)
        np.testing.assert_array_equal(counts[b].numpy(), ref_counts)
    assert (counts == 0).any() and (counts == 8).any() and ((counts > 0) & (counts < 8)).any()  # all cases met


def test_gather_points_any_index_shape():
    points = random_clouds()
    indices = torch.randint(300, (3, 5, 7), generator=torch.Generator().manual_seed(0))
    picked = gather_points(points, indices)
    assert picked.shape == (3, 5, 7, 3)
    assert torch.equal(picked[1, 2, 3], points[1, indices[1, 2, 3]])
    features = torch.randn(3, 300, 16)
    assert gather_points(features, indices[:, 0]).shape == (3, 7, 16)


def test_group_points_relative_to_centres():
    points = random_clouds()
    centre_indices = farthest_point_sample(points, 16)
    groups = group_points(points, centre_indices, 10)
    assert groups.neighbourhoods.shape == (3, 16, 10, 3) and groups.centres.shape == (3, 16, 3)
    for b in range(3):
        cloud = points[b].numpy()
        centres = cloud[centre_indices[b].numpy()]
        order = np.argsort(sq_dist_reference(centres, cloud), axis=1)[:, :10]
        np.testing.assert_array_equal(groups.neighbour_indices[b].numpy(), order)
        np.testing.assert_allclose(groups.neighbourhoods[b].numpy(), cloud[order] - centres[:, None])
    # each centre is its own nearest point: the first neighbour sits at the origin
    assert groups.neighbourhoods[:, :, 0].abs().max() == 0
    by_coordinates = group_points(points, groups.centres, 10)
    assert by_coordinates.centre_indices is None
    assert torch.equal(by_coordinates.neighbour_indices, groups.neighbour_indices)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("num_groups", [16, 45, 70])  # within one chunk of FPS rows, and 32 + 13, 2 * 32 + 6
def test_sample_and_group_equals_fps_then_group(dtype, num_groups):
    points = random_clouds(dtype=dtype)
    fused = sample_and_group(points, num_groups, 10, start_index=4)
    separate = group_points(points, farthest_point_sample(points, num_groups, start_index=4), 10)
    assert torch.equal(fused.centre_indices, separate.centre_indices)
    assert torch.equal(fused.neighbour_indices, separate.neighbour_indices)
    torch.testing.assert_close(fused.neighbourhoods, separate.neighbourhoods)


def test_grouping_keeps_gradients_to_the_points():
    points = random_clouds().requires_grad_()
    sample_and_group(points, 8, 5).neighbourhoods.sum().backward()
    assert points.grad is not None and points.grad.abs().sum() > 0


# ---------- clear errors ----------


def test_errors_name_the_problem():
    points = random_clouds(num_points=50)
    with pytest.raises(ValueError, match=r"\(B, N, 3\), got \(50, 3\).*unsqueeze"):
        farthest_point_sample(points[0], 4)
    with pytest.raises(ValueError, match=r"got \(3, 50, 2\)"):
        knn(points[..., :2], points[..., :2], 3)
    with pytest.raises(TypeError, match="torch.Tensor"):
        farthest_point_sample(points.numpy(), 4)
    with pytest.raises(ValueError, match=r"num_samples \(G\) = 51 .* most allowed is 50"):
        farthest_point_sample(points, 51)
    with pytest.raises(ValueError, match=r"k = 60 .* most allowed is 50"):
        knn(points, points, 60)
    with pytest.raises(ValueError, match=r"group_size \(k\) = 51"):
        sample_and_group(points, 4, 51)
    with pytest.raises(ValueError, match=r"num_groups \(G\) = 99"):
        sample_and_group(points, 99, 4)
    with pytest.raises(ValueError, match="at least 1"):
        knn(points, points, 0)
    with pytest.raises(ValueError, match="radius must be a positive"):
        ball_query(points, points, 0.0, 4)
    with pytest.raises(ValueError, match="radius must be a positive"):
        ball_query(points, points, -1.0, 4)
    with pytest.raises(ValueError, match="batch sizes differ"):
        knn(points[:2], points, 3)
    with pytest.raises(ValueError, match="batch sizes differ"):
        group_points(points, torch.zeros(2, 4, dtype=torch.long), 3)
    with pytest.raises(ValueError, match=r"start_index must lie in \[0, N\) = \[0, 50\)"):
        farthest_point_sample(points, 4, start_index=50)


# ---------- transforms ----------


def rotation_matrix(angle: float, up_axis: str) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return {
        "x": np.array([[1, 0, 0], [0, c, -s], [0, s, c]]),
        "y": np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]),
        "z": np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]),
    }[up_axis]


def test_normalize_to_unit_sphere():
    points = random_clouds(dtype=torch.float32) * 5 + 3
    normalised = normalize_to_unit_sphere(points)
    torch.testing.assert_close(normalised.mean(dim=1), torch.zeros(3, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(normalised.norm(dim=-1).amax(dim=1), torch.ones(3))
    assert normalize_to_unit_sphere(points[0]).shape == (300, 3)  # one cloud works too
    assert torch.isfinite(normalize_to_unit_sphere(torch.ones(1, 5, 3))).all()  # degenerate cloud


@pytest.mark.parametrize("up_axis", ["x", "y", "z"])
def test_rotation_about_up_axis_matches_rotation_matrix(up_axis):
    points = random_clouds()
    angles = torch.tensor([0.3, -1.2, 2.5], dtype=torch.float64)
    rotated = rotate_about_up_axis(points, angles, up_axis=up_axis)
    for b in range(3):
        expected = points[b].numpy() @ rotation_matrix(float(angles[b]), up_axis).T
        np.testing.assert_allclose(rotated[b].numpy(), expected, atol=1e-12)


def test_rotation_default_up_is_y_and_random_angles_are_seeded():
    points = random_clouds(dtype=torch.float32)
    quarter = rotate_about_up_axis(torch.tensor([[1.0, 0.0, 0.0]]), math.pi / 2)  # y up: x -> -z
    torch.testing.assert_close(quarter, torch.tensor([[0.0, 0.0, -1.0]]), atol=1e-6, rtol=0)
    first = rotate_about_up_axis(points, generator=torch.Generator().manual_seed(1))
    again = rotate_about_up_axis(points, generator=torch.Generator().manual_seed(1))
    assert torch.equal(first, again) and not torch.allclose(first, points)
    assert torch.equal(first[..., 1], points[..., 1])
    torch.testing.assert_close(first.norm(dim=-1), points.norm(dim=-1))
    with pytest.raises(ValueError, match="axis must be one of"):
        rotate_about_up_axis(points, 0.1, up_axis="w")


def test_random_scale_translate_ranges_and_seed():
    points = torch.ones(64, 2, 3)  # every cloud: two copies of (1, 1, 1)
    origin = torch.zeros(64, 1, 3)
    clouds = torch.cat([points, origin], 1)
    moved = random_scale_translate(clouds, (0.9, 1.1), 0.2, generator=torch.Generator().manual_seed(0))
    shift = moved[:, 2]  # where the origin went: the translation
    scale = moved[:, 0] - shift
    assert (shift.abs() <= 0.2).all() and shift.std() > 0.05
    assert ((scale >= 0.9) & (scale <= 1.1)).all() and scale.std() > 0.02
    assert torch.equal(moved[:, 0], moved[:, 1])  # one scale and shift per cloud
    again = random_scale_translate(clouds, (0.9, 1.1), 0.2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(moved, again)
    isotropic = random_scale_translate(clouds, anisotropic=False, translate_range=0.0)
    assert torch.allclose(isotropic[:, 0, 0], isotropic[:, 0, 2])
    with pytest.raises(ValueError, match="scale_range"):
        random_scale_translate(points, (1.2, 0.8))


def test_jitter_is_clipped_seeded_and_leaves_input_alone():
    points = random_clouds(dtype=torch.float32)
    original = points.clone()
    shaken = jitter(points, sigma=0.05, clip=0.02, generator=torch.Generator().manual_seed(0))
    assert torch.equal(points, original)
    assert (shaken - points).abs().max() <= 0.02 + 1e-6
    assert (shaken - points).abs().max() > 0.015
    assert torch.equal(shaken, jitter(points, sigma=0.05, clip=0.02, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match=r"\(N, 3\) or \(B, N, 3\)"):
        jitter(points[..., :2])


# ---------- plots ----------


def test_plot_groups_colours_each_group_and_its_centre():
    from matplotlib.figure import Figure

    cloud = random_clouds(batch_size=1, num_points=200)
    groups = sample_and_group(cloud, 5, 12)
    figure = plot_groups(cloud[0], groups.centre_indices[0], groups.neighbour_indices[0], title="groups")
    assert isinstance(figure, Figure)
    points_scatter, centres_scatter = figure.axes[0].collections
    assert len(points_scatter.get_offsets()) == 200 and len(centres_scatter.get_offsets()) == 5
    colours = group_colours(5)
    face = group_point_colours(200, groups.neighbour_indices[0])  # (N, 4), what plot_groups draws
    for g in range(5):  # groups do not overlap much here; the last group drawn wins
        members = groups.neighbour_indices[0, g].numpy()
        later = groups.neighbour_indices[0, g + 1 :].numpy().ravel()
        only_here = np.setdiff1d(members, later)
        np.testing.assert_allclose(face[only_here], np.tile(colours[g], (len(only_here), 1)))
    outside = np.setdiff1d(np.arange(200), groups.neighbour_indices[0].numpy().ravel())
    assert np.allclose(face[outside, :3], 0.75)  # grey
    figure.savefig(__import__("io").BytesIO(), format="png")  # renders under Agg


def test_plot_point_cloud_and_plotly():
    cloud = random_clouds(batch_size=1, num_points=100)[0]
    figure = plot_point_cloud(cloud, colors=cloud[:, 1].numpy(), up_axis="z")
    assert figure.axes[0].get_zlabel() == "z"
    assert plot_point_cloud(cloud).axes[0].get_zlabel() == "y"  # y is up by default
    for one_colour in ("tab:red", (1.0, 0.0, 0.0)):  # a single colour for every point
        single = plot_point_cloud(cloud, colors=one_colour)
        single.savefig(__import__("io").BytesIO(), format="png")
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        plot_point_cloud(cloud[None])
    centres = [0, 50]
    members = [[0, 1, 2], [50, 51, 52]]
    interactive = plotly_groups(cloud, centres, members)
    assert len(interactive.data) == 1 + 2 * 2  # background, then (group, centre) per group
    np.testing.assert_allclose(interactive.data[3].x, cloud[[50, 51, 52], 0].numpy())
    with pytest.raises(ValueError, match="group_indices must have shape"):
        plot_groups(cloud, centres, [[0, 1, 2]])
