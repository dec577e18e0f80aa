"""Chamfer distance (course_lib.points.chamfer) against a brute-force loop and against open3d."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from course_lib.points.chamfer import chamfer_distance, nearest_squared_distances


def brute_force_chamfer(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Point-MAE's ChamferDistanceL2 per pair, one point at a time in plain Python."""
    values = []
    for cloud_a, cloud_b in zip(a.tolist(), b.tolist()):
        def nearest(p, cloud):
            return min(sum((pi - qi) ** 2 for pi, qi in zip(p, q)) for q in cloud)

        a_to_b = sum(nearest(p, cloud_b) for p in cloud_a) / len(cloud_a)
        b_to_a = sum(nearest(q, cloud_a) for q in cloud_b) / len(cloud_b)
        values.append(a_to_b + b_to_a)
    return torch.tensor(values, dtype=torch.float64)


def test_matches_brute_force_with_different_sizes():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(3, 7, 3, generator=generator, dtype=torch.float64)
    b = torch.randn(3, 5, 3, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(chamfer_distance(a, b), brute_force_chamfer(a, b), rtol=1e-12, atol=1e-12)


def test_float32_patches_match_brute_force():
    generator = torch.Generator().manual_seed(1)
    a = 0.1 * torch.randn(4, 32, 3, generator=generator)  # Point-MAE-sized patches
    b = 0.1 * torch.randn(4, 32, 3, generator=generator)
    torch.testing.assert_close(chamfer_distance(a, b).double(), brute_force_chamfer(a, b), rtol=1e-5, atol=1e-8)


def test_hand_computed_example():
    a = torch.tensor([[[0.0, 0.0, 0.0]]])
    b = torch.tensor([[[1.0, 0.0, 0.0], [3.0, 0.0, 0.0]]])
    # a -> b: the nearest is at distance 1 (squared 1); b -> a: squared 1 and 9, mean 5
    assert chamfer_distance(a, b).item() == pytest.approx(6.0)
    a_to_b, b_to_a = nearest_squared_distances(a, b)
    assert a_to_b.tolist() == [[1.0]] and b_to_a.tolist() == [[1.0, 9.0]]


def test_nearest_distances_match_open3d():
    o3d = pytest.importorskip("open3d")
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(50, 3)), rng.normal(size=(40, 3))
    cloud_a = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(a))
    cloud_b = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(b))
    expected_a_to_b = np.asarray(cloud_a.compute_point_cloud_distance(cloud_b)) ** 2  # unsquared in open3d
    expected_b_to_a = np.asarray(cloud_b.compute_point_cloud_distance(cloud_a)) ** 2
    a_to_b, b_to_a = nearest_squared_distances(torch.from_numpy(a)[None], torch.from_numpy(b)[None])
    np.testing.assert_allclose(a_to_b[0].numpy(), expected_a_to_b, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(b_to_a[0].numpy(), expected_b_to_a, rtol=1e-10, atol=1e-12)


def test_symmetric_zero_on_itself_and_order_free():
    generator = torch.Generator().manual_seed(3)
    a = torch.randn(2, 16, 3, generator=generator, dtype=torch.float64)
    b = torch.randn(2, 12, 3, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(chamfer_distance(a, b), chamfer_distance(b, a))
    assert torch.all(chamfer_distance(a, a) == 0)
    shuffled = a[:, torch.randperm(16, generator=generator)]
    torch.testing.assert_close(chamfer_distance(shuffled, b), chamfer_distance(a, b))


def test_gradient_is_finite_when_points_coincide():
    a = torch.randn(2, 8, 3, requires_grad=True)
    b = torch.cat([a.detach()[:, :4], torch.randn(2, 4, 3)], dim=1)  # half the points shared exactly
    chamfer_distance(a, b).sum().backward()
    assert torch.isfinite(a.grad).all()


def test_gradient_matches_finite_differences():
    generator = torch.Generator().manual_seed(4)
    a = torch.randn(1, 6, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    b = torch.randn(1, 5, 3, generator=generator, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: chamfer_distance(x, b), (a,))


@pytest.mark.parametrize(
    "a, b, error, match",
    [
        (torch.zeros(5, 3), torch.zeros(1, 5, 3), ValueError, "unsqueeze"),
        (torch.zeros(2, 5, 3), torch.zeros(3, 5, 3), ValueError, "share B and D"),
        (torch.zeros(2, 5, 3), torch.zeros(2, 5, 2), ValueError, "share B and D"),
        (torch.zeros(2, 5, 3, dtype=torch.long), torch.zeros(2, 5, 3), TypeError, "floating-point"),
        (torch.zeros(2, 0, 3), torch.zeros(2, 5, 3), ValueError, "no points"),
        (np.zeros((2, 5, 3)), torch.zeros(2, 5, 3), TypeError, "torch.Tensor"),
    ],
)
def test_bad_input_is_refused(a, b, error, match):
    with pytest.raises(error, match=match):
        chamfer_distance(a, b)
