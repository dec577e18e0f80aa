"""The point-neighbourhood explorer: pick a shape, a centre, k or a radius, a number of FPS centres.

Derived in notebooks/part2_point_peft/10_point_clouds.ipynb.

`neighbourhood_groups` computes what the widget shows and `neighbourhood_figure` draws it
(the notebook shows a static figure of it first, so the book has a picture without a kernel);
`make_neighbourhood_widget` wires ipywidgets controls to them. Tests set `.value` on the
controls and read `widget.last_groups`.
"""

from __future__ import annotations

import io
from typing import Any, Mapping, NamedTuple

import numpy as np
import torch
from matplotlib.figure import Figure

from course_lib.points.neighbours import ball_query, knn
from course_lib.points.plotting import plot_groups
from course_lib.points.sampling import farthest_point_sample
from course_lib.points.transforms import UP_AXIS, normalize_to_unit_sphere

__all__ = [
    "NeighbourhoodGroups",
    "neighbourhood_groups",
    "neighbourhood_figure",
    "figure_png",
    "NeighbourhoodExplorer",
    "make_neighbourhood_widget",
]


class NeighbourhoodGroups(NamedTuple):
    """What the explorer shows for one cloud (all indices into that cloud)."""

    centre_index: int  # the centre picked by hand
    neighbour_indices: np.ndarray  # (k,) its neighbours: nearest first (kNN) or first found, padded (ball)
    neighbour_count: int  # distinct neighbours found (k for kNN; <= k inside the ball)
    fps_centre_indices: np.ndarray  # (G,) farthest point sampling centres, in the order chosen
    fps_group_indices: np.ndarray  # (G, k) each FPS centre's group
    mode: str  # "knn" or "ball"
    k: int
    radius: float | None


def _one_cloud(points: Any) -> torch.Tensor:
    """(N, 3) array or tensor -> (1, N, 3) float32 tensor."""
    if isinstance(points, torch.Tensor):
        points = points.detach().cpu()
    cloud = torch.as_tensor(np.asarray(points), dtype=torch.float32)
    if cloud.dim() != 2 or cloud.shape[1] != 3:
        raise ValueError(f"points must be one cloud of shape (N, 3), got {tuple(cloud.shape)}")
    return cloud.unsqueeze(0)


def neighbourhood_groups(
    points: Any,
    centre_index: int = 0,
    k: int = 32,
    radius: float | None = None,
    num_centres: int = 16,
    start_index: int = 0,
) -> NeighbourhoodGroups:
    """The neighbourhood of one chosen point and the groups around `num_centres` FPS centres.

    With `radius=None` the neighbourhoods are the k nearest points (Point-MAE); with a radius
    they are a ball query (PointNet++): up to k points inside the ball, padded to k.
    """
    cloud = _one_cloud(points)  # (1, N, 3)
    num_points = cloud.shape[1]
    if not 0 <= centre_index < num_points:
        raise ValueError(f"centre_index must lie in [0, N) = [0, {num_points}), got {centre_index}")
    fps_centres = farthest_point_sample(cloud, num_centres, start_index=start_index)  # (1, G)
    queries = torch.cat([cloud[:, [centre_index]], cloud[0, fps_centres[0]].unsqueeze(0)], dim=1)  # (1, 1 + G, 3)
    if radius is None:
        _, indices = knn(queries, cloud, k)  # (1, 1 + G, k)
        counts = torch.full(indices.shape[:2], k)
    else:
        indices, counts = ball_query(queries, cloud, radius, k)  # (1, 1 + G, k), (1, 1 + G)
    return NeighbourhoodGroups(
        centre_index=int(centre_index),
        neighbour_indices=indices[0, 0].numpy(),
        neighbour_count=int(counts[0, 0]),
        fps_centre_indices=fps_centres[0].numpy(),
        fps_group_indices=indices[0, 1:].numpy(),
        mode="knn" if radius is None else "ball",
        k=k,
        radius=radius,
    )


def neighbourhood_figure(
    points: Any,
    centre_index: int = 0,
    k: int = 32,
    radius: float | None = None,
    num_centres: int = 16,
    up_axis: str = UP_AXIS,
    groups: NeighbourhoodGroups | None = None,
) -> Figure:
    """Two panels: left, the chosen centre and its neighbourhood; right, FPS centres and their groups.

    Pass `groups` (from `neighbourhood_groups`) to draw without recomputing.
    """
    if groups is None:
        groups = neighbourhood_groups(points, centre_index, k, radius, num_centres)
    xyz = _one_cloud(points)[0].numpy()
    figure = Figure(figsize=(9.5, 4.6))
    left = figure.add_subplot(1, 2, 1, projection="3d")
    right = figure.add_subplot(1, 2, 2, projection="3d")
    if groups.mode == "knn":
        left_title = f"point {groups.centre_index}: its {groups.k} nearest points"
        right_title = f"{len(groups.fps_centre_indices)} FPS centres, {groups.k} nearest points each"
    else:
        found = f"{groups.neighbour_count} points within r = {groups.radius:.2f}"
        left_title = f"point {groups.centre_index}: {found} (max {groups.k})"
        right_title = f"{len(groups.fps_centre_indices)} FPS centres, ball r = {groups.radius:.2f}"
    plot_groups(xyz, [groups.centre_index], groups.neighbour_indices[None], ax=left, title=left_title, up_axis=up_axis)
    plot_groups(xyz, groups.fps_centre_indices, groups.fps_group_indices, ax=right, title=right_title, up_axis=up_axis)
    figure.tight_layout()
    return figure


def figure_png(figure: Figure, dpi: int = 90) -> bytes:
    """The figure rendered as PNG bytes (what the widget shows)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def _widgets():
    import ipywidgets

    return ipywidgets


class NeighbourhoodExplorer:
    """The explorer's state and controls; `.widget` is the ipywidgets box to display.

    Attributes the tests read: `controls` (name -> ipywidget), `last_groups`
    (NeighbourhoodGroups of the last update), `last_figure`, `update_count`.
    """

    def __init__(
        self, shapes: Mapping[str, Any], k: int = 32, num_centres: int = 16, radius: float = 0.2, up_axis: str = UP_AXIS
    ):
        widgets = _widgets()
        if not shapes:
            raise ValueError("shapes is empty: pass a dict of name -> (N, 3) points")
        # every shape on the unit sphere, so one radius slider fits all of them
        self.shapes = {name: normalize_to_unit_sphere(_one_cloud(points))[0] for name, points in shapes.items()}
        self.up_axis = up_axis
        first = self.shapes[next(iter(self.shapes))]
        most_centres = min(64, len(first))
        self.controls = {
            "shape": widgets.Dropdown(options=list(self.shapes), description="shape"),
            "centre": widgets.IntSlider(value=0, min=0, max=len(first) - 1, description="centre"),
            "k": widgets.IntSlider(value=min(k, len(first)), min=1, max=min(128, len(first)), description="k"),
            "use_radius": widgets.Checkbox(value=False, description="ball query (radius)"),
            "radius": widgets.FloatSlider(
                value=radius, min=0.02, max=1.0, step=0.01, description="radius", disabled=True
            ),
            "num_centres": widgets.IntSlider(
                value=min(num_centres, most_centres), min=1, max=most_centres, description="FPS centres"
            ),
        }
        self.output = widgets.Output()
        controls = list(self.controls.values())
        self.widget = widgets.VBox([widgets.HBox(controls[:3]), widgets.HBox(controls[3:]), self.output])
        self.widget.explorer = self  # reachable from the displayed widget, too
        self.last_groups: NeighbourhoodGroups | None = None
        self.last_figure: Figure | None = None
        self.update_count = 0
        self._adjusting = False
        for name, control in self.controls.items():
            control.observe(self._on_shape if name == "shape" else self._on_change, names="value")
        self.update()

    def _on_shape(self, change: dict) -> None:
        # new shape: fit the sliders to its size without one redraw per slider, then redraw once
        num_points = len(self.shapes[change["new"]])
        self._adjusting = True
        try:
            limits = {"centre": num_points - 1, "k": min(128, num_points), "num_centres": min(64, num_points)}
            for name, largest in limits.items():
                control = self.controls[name]
                control.value = min(control.value, largest)
                control.max = largest
        finally:
            self._adjusting = False
        self.update()

    def _on_change(self, change: dict) -> None:
        self.controls["radius"].disabled = not self.controls["use_radius"].value
        if not self._adjusting:
            self.update()

    def update(self) -> NeighbourhoodGroups:
        """Recompute the groups from the controls' values and redraw."""
        values = {name: control.value for name, control in self.controls.items()}
        points = self.shapes[values["shape"]]
        radius = values["radius"] if values["use_radius"] else None
        groups = neighbourhood_groups(points, values["centre"], values["k"], radius, values["num_centres"])
        figure = neighbourhood_figure(points, groups=groups, up_axis=self.up_axis)
        self.last_groups, self.last_figure = groups, figure
        self.update_count += 1
        from IPython.display import Image

        # replace the picture (a PNG: it shows whatever matplotlib backend the kernel has)
        self.output.outputs = ()
        self.output.append_display_data(Image(figure_png(figure)))
        return groups


def make_neighbourhood_widget(
    shapes: Mapping[str, Any], k: int = 32, num_centres: int = 16, radius: float = 0.2, up_axis: str = UP_AXIS
) -> Any:
    """The explorer widget (an ipywidgets VBox) for a dict of name -> (N, 3) points.

    Shapes are normalised to the unit sphere, so radii are in units of the shape's size. The
    controller is `widget.explorer` (a NeighbourhoodExplorer: controls, last_groups, update).
    """
    return NeighbourhoodExplorer(shapes, k=k, num_centres=num_centres, radius=radius, up_axis=up_axis).widget
