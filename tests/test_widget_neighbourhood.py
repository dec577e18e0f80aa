"""The point-neighbourhood explorer: its plain functions, and the widget driven by setting `.value`."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch

o3d = pytest.importorskip("open3d")
pytest.importorskip("ipywidgets")

from course_lib.points import normalize_to_unit_sphere, sample_mesh  # noqa: E402
from course_lib.widgets.neighbourhood import (  # noqa: E402
    make_neighbourhood_widget,
    neighbourhood_figure,
    neighbourhood_groups,
)


@pytest.fixture(scope="module")
def shapes():
    """Three small shapes made from open3d primitives."""
    return {
        "sphere": sample_mesh(o3d.geometry.TriangleMesh.create_sphere(radius=1.0), 400, seed=0),
        "box": sample_mesh(o3d.geometry.TriangleMesh.create_box(2.0, 1.0, 0.5), 300, seed=1),
        "torus": sample_mesh(o3d.geometry.TriangleMesh.create_torus(), 200, seed=2),
    }


def brute_force_knn(points: np.ndarray, centre: int, k: int) -> set[int]:
    sq_dist = ((points - points[centre]) ** 2).sum(1)
    return set(np.argsort(sq_dist)[:k].tolist())


def brute_force_fps(points: np.ndarray, num_samples: int) -> list[int]:
    chosen, nearest = [0], np.full(len(points), np.inf)
    for _ in range(num_samples - 1):
        nearest = np.minimum(nearest, ((points - points[chosen[-1]]) ** 2).sum(1))
        chosen.append(int(np.argmax(nearest)))
    return chosen


def test_neighbourhood_groups_knn_and_ball(shapes):
    points = shapes["sphere"]
    groups = neighbourhood_groups(points, centre_index=7, k=12, num_centres=5)
    assert groups.mode == "knn" and groups.neighbour_count == 12
    assert set(groups.neighbour_indices.tolist()) == brute_force_knn(points, 7, 12)
    assert groups.fps_centre_indices.tolist() == brute_force_fps(points.astype(np.float32), 5)
    assert groups.fps_group_indices.shape == (5, 12)
    for centre, members in zip(groups.fps_centre_indices, groups.fps_group_indices):
        assert set(members.tolist()) == brute_force_knn(points, centre, 12)
    ball = neighbourhood_groups(points, centre_index=7, k=64, radius=0.3, num_centres=5)
    inside = np.flatnonzero(((points - points[7]) ** 2).sum(1) < 0.3**2)
    assert ball.mode == "ball" and ball.neighbour_count == min(len(inside), 64)
    assert set(ball.neighbour_indices.tolist()) == set(inside[:64].tolist())
    with pytest.raises(ValueError, match=r"centre_index must lie in \[0, N\) = \[0, 400\)"):
        neighbourhood_groups(points, centre_index=400)
    with pytest.raises(ValueError, match="k = 500"):
        neighbourhood_groups(points, k=500)


def test_neighbourhood_figure_is_a_static_figure(shapes):
    from matplotlib.figure import Figure

    figure = neighbourhood_figure(shapes["box"], centre_index=3, k=16, num_centres=8)
    assert isinstance(figure, Figure) and len(figure.axes) == 2
    assert "16 nearest" in figure.axes[0].get_title() and "8 FPS centres" in figure.axes[1].get_title()
    ball_figure = neighbourhood_figure(shapes["box"], centre_index=3, k=16, radius=0.25)
    assert "r = 0.25" in ball_figure.axes[0].get_title()


def test_widget_updates_when_controls_change(shapes):
    widget = make_neighbourhood_widget(shapes, k=8, num_centres=4)
    explorer = widget.explorer
    controls = explorer.controls
    assert explorer.update_count == 1 and explorer.last_groups.fps_group_indices.shape == (4, 8)
    normalised = {name: normalize_to_unit_sphere(torch.as_tensor(p)).numpy() for name, p in shapes.items()}

    controls["k"].value = 20
    assert explorer.update_count == 2 and explorer.last_groups.fps_group_indices.shape == (4, 20)
    controls["centre"].value = 150
    assert explorer.last_groups.centre_index == 150
    assert set(explorer.last_groups.neighbour_indices.tolist()) == brute_force_knn(normalised["sphere"], 150, 20)
    controls["num_centres"].value = 10
    assert explorer.last_groups.fps_centre_indices.tolist() == brute_force_fps(normalised["sphere"], 10)

    # a smaller shape: the centre slider shrinks to fit, one redraw only
    count = explorer.update_count
    controls["shape"].value = "torus"
    assert explorer.update_count == count + 1
    assert controls["centre"].max == 199 and controls["centre"].value == 150
    assert set(explorer.last_groups.neighbour_indices.tolist()) == brute_force_knn(normalised["torus"], 150, 20)
    controls["shape"].value = "box"
    controls["centre"].value = 299
    controls["shape"].value = "torus"
    assert controls["centre"].value == 199  # clamped into the torus' range

    # ball query
    assert controls["radius"].disabled
    controls["use_radius"].value = True
    assert not controls["radius"].disabled and explorer.last_groups.mode == "ball"
    controls["radius"].value = 0.15
    groups = explorer.last_groups
    assert groups.radius == pytest.approx(0.15)
    inside = np.flatnonzero(((normalised["torus"] - normalised["torus"][199]) ** 2).sum(1) < 0.15**2)
    assert groups.neighbour_count == min(len(inside), 20)
    assert len(explorer.last_figure.axes) == 2
    assert len(explorer.output.outputs) == 1  # one picture, the previous one cleared
    assert explorer.output.outputs[0]["data"]["image/png"]  # a PNG, whatever the backend


def test_widget_needs_shapes():
    with pytest.raises(ValueError, match="shapes is empty"):
        make_neighbourhood_widget({})
