"""3-D scatter plots of point clouds, FPS centres and their groups.

Derived in notebooks/part2_point_peft/10_point_clouds.ipynb.

Static figures use matplotlib and return a `matplotlib.figure.Figure` built without pyplot (no
global state, no plt.show; works under the Agg backend and displays in Jupyter). Interactive
figures use plotly. All functions take one cloud: (N, 3) numpy array or torch tensor.

The figure's vertical axis is the data's up axis (y by default, see `course_lib.points.transforms`);
the axes are labelled with the data's axis names.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure

from course_lib.points.transforms import UP_AXIS, axis_index

__all__ = ["group_colours", "group_point_colours", "plot_groups", "plot_point_cloud", "plotly_groups"]

_BACKGROUND = (0.75, 0.75, 0.75, 0.5)  # grey, see-through: points in no group


def _numpy(array: Any) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def _cloud(points: Any) -> np.ndarray:
    xyz = _numpy(points).astype(np.float64)
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise ValueError(f"points must have shape (N, 3) (one cloud), got {xyz.shape}")
    return xyz


def _display_order(up_axis: str) -> list[int]:
    """Data axes shown as the figure's (horizontal, depth, vertical): a cyclic shift, so the view stays right-handed."""
    up = axis_index(up_axis)
    return [(up + 1) % 3, (up + 2) % 3, up]


def group_colours(num_groups: int) -> np.ndarray:
    """(G, 4) RGBA colours, one per group (tab20, repeated when G > 20)."""
    table = colormaps["tab20"].colors
    return np.array([(*table[i % len(table)], 1.0) for i in range(num_groups)])


def group_point_colours(num_points: int, group_indices: Any) -> np.ndarray:
    """(N, 4) RGBA per point: grey for points in no group, else the colour of the last group holding it."""
    groups = _numpy(group_indices).astype(np.int64)  # (G, k)
    if groups.ndim != 2:
        raise ValueError(f"group_indices must have shape (G, k), got {groups.shape}")
    colours = group_colours(len(groups))  # (G, 4)
    point_colours = np.tile(_BACKGROUND, (num_points, 1))  # (N, 4)
    for colour, members in zip(colours, groups):
        point_colours[members] = colour
    return point_colours


def _new_axes(ax: Any, figsize: tuple[float, float]) -> Any:
    if ax is not None:
        if getattr(ax, "name", None) != "3d":
            raise ValueError("ax must be a 3-D axes: fig.add_subplot(projection='3d')")
        return ax
    figure = Figure(figsize=figsize)
    return figure.add_subplot(projection="3d")


def _finish_axes(ax: Any, xyz: np.ndarray, up_axis: str, title: str | None, elev: float, azim: float) -> None:
    order = _display_order(up_axis)
    names = "xyz"
    ax.set_xlabel(names[order[0]])
    ax.set_ylabel(names[order[1]])
    ax.set_zlabel(names[order[2]])
    # equal scale on all axes: a cube around the cloud, so shapes are not stretched
    centre = (xyz.max(axis=0) + xyz.min(axis=0)) / 2
    half = max(float((xyz.max(axis=0) - xyz.min(axis=0)).max()) / 2, 1e-9)
    for set_limits, axis in zip((ax.set_xlim, ax.set_ylim, ax.set_zlim), order):
        set_limits(centre[axis] - half, centre[axis] + half)
    ax.set_box_aspect((1, 1, 1))
    ax.view_init(elev=elev, azim=azim)
    if title:
        ax.set_title(title)


def plot_point_cloud(
    points: Any,
    colors: Any = None,
    ax: Any = None,
    point_size: float = 2.0,
    title: str | None = None,
    up_axis: str = UP_AXIS,
    elev: float = 20.0,
    azim: float = -60.0,
    figsize: tuple[float, float] = (4.5, 4.5),
) -> Figure:
    """A 3-D scatter of one cloud (N, 3).

    `colors`: one colour, (N, 3) / (N, 4) RGB(A) rows, or (N,) values for a colour map.
    """
    xyz = _cloud(points)
    ax = _new_axes(ax, figsize)
    order = _display_order(up_axis)
    if colors is None or isinstance(colors, (str, tuple)):
        # one matplotlib colour for every point ("tab:red", (1, 0, 0))
        colour: dict[str, Any] = {"color": "tab:blue" if colors is None else colors}
    else:
        colour = {"c": _numpy(colors)}  # per-point RGB(A) rows or values for a colour map
    ax.scatter(*(xyz[:, axis] for axis in order), s=point_size, depthshade=False, linewidths=0, **colour)
    _finish_axes(ax, xyz, up_axis, title, elev, azim)
    return ax.figure


def _check_groups(num_points: int, centre_indices: Any, group_indices: Any) -> tuple[np.ndarray, np.ndarray]:
    centres = _numpy(centre_indices).astype(np.int64).reshape(-1)
    groups = _numpy(group_indices).astype(np.int64)
    if groups.ndim != 2 or len(groups) != len(centres):
        raise ValueError(f"group_indices must have shape (G, k) with G = {len(centres)} centres, got {groups.shape}")
    for name, values in (("centre_indices", centres), ("group_indices", groups)):
        if values.size and (values.min() < 0 or values.max() >= num_points):
            raise ValueError(f"{name} must lie in [0, N) = [0, {num_points})")
    return centres, groups


def plot_groups(
    points: Any,
    centre_indices: Any,
    group_indices: Any,
    ax: Any = None,
    point_size: float = 3.0,
    centre_size: float = 40.0,
    title: str | None = None,
    up_axis: str = UP_AXIS,
    elev: float = 20.0,
    azim: float = -60.0,
    figsize: tuple[float, float] = (4.5, 4.5),
) -> Figure:
    """One cloud (N, 3) in grey, each group (G, k) in its own colour, its centre (G,) as a large dot.

    Indices are into `points` (e.g. one cloud of `sample_and_group`'s centre_indices[b] and
    neighbour_indices[b]). A point in several groups takes the colour of the last one.
    """
    xyz = _cloud(points)
    centres, groups = _check_groups(len(xyz), centre_indices, group_indices)
    ax = _new_axes(ax, figsize)
    order = _display_order(up_axis)
    colours = group_colours(len(centres))  # (G, 4)
    point_colours = group_point_colours(len(xyz), groups)  # (N, 4)
    shown = lambda rows: (xyz[rows][:, axis] for axis in order)
    ax.scatter(*shown(slice(None)), c=point_colours, s=point_size, depthshade=False, linewidths=0)
    ax.scatter(*shown(centres), c=colours, s=centre_size, edgecolors="black", linewidths=0.8, depthshade=False)
    _finish_axes(ax, xyz, up_axis, title, elev, azim)
    return ax.figure


def plotly_groups(
    points: Any,
    centre_indices: Any,
    group_indices: Any,
    title: str | None = None,
    up_axis: str = UP_AXIS,
    point_size: float = 2.0,
    centre_size: float = 6.0,
) -> Any:
    """Interactive version of `plot_groups`: a plotly Figure (rotate and zoom in the notebook)."""
    import plotly.graph_objects as go

    xyz = _cloud(points)
    centres, groups = _check_groups(len(xyz), centre_indices, group_indices)
    up = axis_index(up_axis)
    in_group = np.zeros(len(xyz), dtype=bool)
    in_group[groups.reshape(-1)] = True
    traces = [
        go.Scatter3d(
            x=xyz[~in_group, 0], y=xyz[~in_group, 1], z=xyz[~in_group, 2], mode="markers", name="other points",
            marker=dict(size=point_size, color="rgba(160,160,160,0.35)"),
        )
    ]
    for g, (colour, members) in enumerate(zip(group_colours(len(centres)), groups)):
        rgb = f"rgb({int(colour[0] * 255)},{int(colour[1] * 255)},{int(colour[2] * 255)})"
        traces.append(
            go.Scatter3d(
                x=xyz[members, 0], y=xyz[members, 1], z=xyz[members, 2], mode="markers", name=f"group {g}",
                legendgroup=f"group {g}", marker=dict(size=point_size + 1, color=rgb),
            )
        )
        centre = xyz[centres[g]]
        traces.append(
            go.Scatter3d(
                x=[centre[0]], y=[centre[1]], z=[centre[2]], mode="markers", legendgroup=f"group {g}", showlegend=False,
                marker=dict(size=centre_size, color=rgb, line=dict(color="black", width=2)),
            )
        )
    figure = go.Figure(traces)
    camera_up = dict(zip("xyz", [1 if axis == up else 0 for axis in range(3)]))
    figure.update_layout(
        title=title,
        scene=dict(aspectmode="data", camera=dict(up=camera_up)),
        margin=dict(l=0, r=0, t=30 if title else 0, b=0),
    )
    return figure
