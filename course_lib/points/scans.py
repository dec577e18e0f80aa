"""Simulated scans of a shape: a partial view, background clutter and a perturbed bounding box.

Derived in notebooks/part2_point_peft/11_shape_data.ipynb.

ScanObjectNN cut its objects out of real RGB-D reconstructions of rooms. Its variants differ in
what the cut contains; this module mirrors them on the procedural meshes of
`course_lib.points.shapes`, one scene per object, three views of the same scan:

- OBJ_ONLY: the object's points seen from one viewpoint. The scene (object, floor, wall,
  clutter) is sampled densely, a camera is placed on the upper hemisphere (elevation 15-60
  degrees, 2.5-4 object radii away, in front of the wall if there is one) and hidden point
  removal (Katz et al. 2007, open3d's `hidden_point_removal`) keeps the points it can see; the
  object's visible points get sensor noise and are resampled to N.
- OBJ_BG: every visible point inside the object's bounding box, enlarged by 10% on each side
  and reaching just below the floor: the object plus the floor under and around it, bits of
  the wall behind it and of clutter standing next to or on it.
- PB_T50_RS: the same scan cut by a *perturbed* box: the object's box translated by up to 50%
  of its size along each axis, rotated by a random angle about the up axis and scaled by
  0.8-1.2 per axis. Parts of the object fall outside and more background falls inside; the
  points are expressed in the perturbed box's frame (so the object is off-centre and turned)
  and tilted by up to 5 degrees. A box is kept only if it holds at least 15% of the object's
  dense surface and 15% of its *visible* points (checked after hidden point removal: a box
  around the object's hidden back would cut a cloud with no object in it); if 20 boxes fail,
  the object's own box, unperturbed (not shifted, turned or scaled), is used instead.

Every view is centred on the centre of its box (annotated or perturbed, never the object's
own centroid) and scaled so that its farthest point lies on the unit sphere. Objects stand on
the floor y = 0 and are turned about the up axis by a multiple of 90 degrees plus up to 10
degrees, like furniture along the walls of a room; y stays up in every view.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import open3d as o3d

from course_lib.points.open3d_interop import hidden_point_removal
from course_lib.points.shapes import rotation_about_axis, sample_surface
from course_lib.points.transforms import UP_AXIS, axis_index

_UP = axis_index(UP_AXIS)  # y

__all__ = ["SCAN_VARIANTS", "Scene", "build_scene", "resample_indices", "scan_views"]

#: The three scan-like variants, named as in ScanObjectNN (lower case).
SCAN_VARIANTS: tuple[str, ...] = ("obj_only", "obj_bg", "pb_t50_rs")
#: PB_T50_RS keeps a perturbed box only if it holds this share of the object's dense surface
#: and of its visible points...
_MIN_OBJECT_IN_BOX: float = 0.15
#: ...drawing at most this many boxes per test before it falls back on the object's own box.
_MAX_BOX_DRAWS: int = 20


@dataclass
class Scene:
    """Dense surface samples of an object in a corner of a room (metres, y up)."""

    points: np.ndarray        # (M, 3) object and background points
    is_object: np.ndarray     # (M,) True for the object's points
    box_min: np.ndarray       # (3,) the object's axis-aligned bounding box
    box_max: np.ndarray       # (3,)
    wall_behind: bool         # a wall stands behind the object (on its -z side)


def _plane_points(rng: np.random.Generator, corner, edge_u, edge_v, density: float) -> np.ndarray:
    """Uniform points on the parallelogram corner + a edge_u + b edge_v, a, b in [0, 1]."""
    area = np.linalg.norm(np.cross(edge_u, edge_v))
    count = max(1, int(round(area * density)))
    a, b = rng.random((2, count, 1))
    return np.asarray(corner) + a * np.asarray(edge_u) + b * np.asarray(edge_v)


def _clutter_mesh(rng: np.random.Generator, size: float, centre_xz) -> o3d.geometry.TriangleMesh:
    """A small box, cylinder or ball standing on the floor at `centre_xz`."""
    x, z = centre_xz
    kind = rng.integers(3)
    if kind == 0:
        w, h, d = size * rng.uniform(0.5, 1.0, size=3)
        mesh = o3d.geometry.TriangleMesh.create_box(w, h, d).translate((x - w / 2, 0, z - d / 2))
    elif kind == 1:
        r, h = size * rng.uniform(0.2, 0.5), size * rng.uniform(0.5, 1.5)
        mesh = o3d.geometry.TriangleMesh.create_cylinder(r, h, resolution=12)
        mesh.rotate(rotation_about_axis(0, -np.pi / 2), center=(0, 0, 0)).translate((x, h / 2, z))
    else:
        r = size * rng.uniform(0.25, 0.5)
        mesh = o3d.geometry.TriangleMesh.create_sphere(r, resolution=8).translate((x, r, z))
    return mesh


def build_scene(mesh: o3d.geometry.TriangleMesh, rng: np.random.Generator, object_points: int = 6000) -> Scene:
    """Place `mesh` (from `shapes.build_mesh`) in a room and sample object and background densely.

    The object turns about y by k * 90 degrees + U(-10, 10) degrees. Background, sampled with the
    object's point density (half of it on the floor, which a scanner sees at grazing angles):
    a floor patch wide enough for any perturbed box, a wall behind the object (probability 0.5),
    0-3 boxes, cylinders or balls beside it and, with probability 0.3, one on top of it.
    """
    yaw = rotation_about_axis(_UP, rng.integers(4) * np.pi / 2 + rng.uniform(-1, 1) * np.pi / 18)
    vertices = np.asarray(mesh.vertices) @ yaw.T
    placed = o3d.geometry.TriangleMesh(o3d.utility.Vector3dVector(vertices), mesh.triangles)
    obj = sample_surface(placed, object_points, rng)                         # (P, 3)
    box_min, box_max = vertices.min(axis=0), vertices.max(axis=0)
    size = box_max - box_min
    centre = (box_min + box_max) / 2
    density = object_points / placed.get_surface_area()                      # points per m^2

    # floor patch reaching any perturbed box: 50% shift + 1.2 x the rotated half diagonal
    reach = 0.5 * size[[0, 2]] + 0.6 * np.linalg.norm(size) + 0.05
    lo, hi = centre[[0, 2]] - reach, centre[[0, 2]] + reach
    parts = []
    wall_behind = bool(rng.random() < 0.5)
    if wall_behind:
        lo[1] = box_min[2] - rng.uniform(0.02, 0.3) * size[2]  # nothing lies behind the wall
        parts.append(_plane_points(rng, (lo[0], 0, lo[1]), (hi[0] - lo[0], 0, 0), (0, 1.6 * size[1] + 0.1, 0), density))
    parts.append(_plane_points(rng, (lo[0], 0, lo[1]), (hi[0] - lo[0], 0, 0), (0, 0, hi[1] - lo[1]), density / 2))

    clutter = o3d.geometry.TriangleMesh()
    footprint = 0.5 * np.linalg.norm(size[[0, 2]])
    for _ in range(int(rng.integers(0, 4))):
        item = rng.uniform(0.15, 0.5) * footprint
        angle = rng.uniform(0, 2 * np.pi)
        distance = footprint + item * rng.uniform(0.2, 1.0)
        xz = np.clip(centre[[0, 2]] + distance * np.array([np.cos(angle), np.sin(angle)]), lo + item, hi - item)
        clutter += _clutter_mesh(rng, item, xz)
    if rng.random() < 0.3:  # something standing on the object
        item = rng.uniform(0.1, 0.25) * footprint
        xz = centre[[0, 2]] + rng.uniform(-0.3, 0.3, size=2) * size[[0, 2]]
        clutter += _clutter_mesh(rng, item, xz).translate((0, box_max[1], 0))
    if len(clutter.triangles):
        count = max(1, int(clutter.get_surface_area() * density))
        parts.append(sample_surface(clutter, count, rng))

    background = np.concatenate(parts)
    points = np.concatenate([obj, background])
    is_object = np.concatenate([np.ones(len(obj), bool), np.zeros(len(background), bool)])
    return Scene(points, is_object, box_min, box_max, wall_behind)


def resample_indices(count: int, num_points: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of `num_points` of `count` points: without repeats when there are enough,
    otherwise all of them plus random repeats; in random order."""
    if count < 1:
        raise ValueError("cannot resample an empty set of points")
    if count >= num_points:
        return rng.choice(count, size=num_points, replace=False)
    extra = rng.choice(count, size=num_points - count, replace=True)
    return rng.permutation(np.concatenate([np.arange(count), extra]))


def _to_unit_sphere(points: np.ndarray) -> np.ndarray:
    radius = np.linalg.norm(points, axis=1).max()
    return points / radius if radius > 0 else points


def scan_views(
    scene: Scene, num_points: int, rng: np.random.Generator, noise: float = 0.005, max_shift: float = 0.5
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Scan `scene` once and cut the three ScanObjectNN-like views from it (see module docstring).

    Returns {"obj_only": (points, is_object), "obj_bg": ..., "pb_t50_rs": ...}, each points a
    (num_points, 3) float32 array in the unit sphere and is_object a (num_points,) bool mask
    (like the "mask" array of ScanObjectNN's h5 files). `noise` is the standard deviation of the
    sensor noise, as a fraction of the object's radius; `max_shift` the largest shift of the
    perturbed box, as a fraction of its size along each axis (0.5: "T50"; 0.25 gives ScanObjectNN's
    milder "T25").
    """
    centre = (scene.box_min + scene.box_max) / 2
    size = scene.box_max - scene.box_min
    radius = 0.5 * np.linalg.norm(size)
    slack = 3 * noise * radius  # boxes reach a little further, for the noise

    # OBJ_BG's box: the object's, 10% larger on each side, from just below the floor
    margin = 0.1 * size
    low = scene.box_min - np.array([margin[0], 0.02 * size[1] + slack, margin[2]])
    high = scene.box_max + margin

    def in_bg_box(points: np.ndarray) -> np.ndarray:
        return np.all((points >= low) & (points <= high), axis=1)

    def in_box(points: np.ndarray, box: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
        box_centre, turn, half = box
        return np.all(np.abs((points - box_centre) @ turn) <= half, axis=1)  # turn^T (p - c), box frame

    # PB_T50_RS's box: shifted by up to 50% of the size, turned about y, scaled by 0.8-1.2
    object_points = scene.points[scene.is_object]

    def draw_box() -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """A perturbed box (centre, turn, half size) holding >= 15% of the object's dense surface,
        a cheap first test before the scan; None if 20 draws miss."""
        for _ in range(_MAX_BOX_DRAWS):
            box = (
                centre + rng.uniform(-max_shift, max_shift, size=3) * size,
                rotation_about_axis(_UP, rng.uniform(0, 2 * np.pi)),
                0.5 * size * rng.uniform(0.8, 1.2, size=3) + slack,
            )
            if in_box(object_points, box).mean() >= _MIN_OBJECT_IN_BOX:
                return box
        return None

    box = draw_box()
    # scan: camera on the upper hemisphere, in front of the wall if there is one
    azimuth = rng.uniform(-0.45, 0.45) * np.pi if scene.wall_behind else rng.uniform(-1, 1) * np.pi
    elevation = rng.uniform(15, 60) * np.pi / 180
    direction = np.array([np.sin(azimuth) * np.cos(elevation), np.sin(elevation), np.cos(azimuth) * np.cos(elevation)])
    camera = centre + rng.uniform(2.5, 4.0) * radius * direction
    in_obj_views = scene.is_object | in_bg_box(scene.points)

    def scan(box: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Visible points (V, 3) with sensor noise and their object mask (V,). Only the points that
        some view can keep take part (hidden point removal costs O(M log M))."""
        candidates = np.flatnonzero(in_obj_views | in_box(scene.points, box))
        seen = candidates[hidden_point_removal(scene.points[candidates], camera, radius_factor=1000.0)]  # near-exact
        return scene.points[seen] + rng.normal(0, noise * radius, size=(len(seen), 3)), scene.is_object[seen]

    # The box must also hold >= 15% of the object's *visible* points: one around the object's
    # hidden back would cut a cloud without object. Redrawn, with a new scan (the box decides
    # which points take part), at most 20 times; then the object's own box, unperturbed.
    for _ in range(_MAX_BOX_DRAWS):
        if box is not None:
            points, is_object = scan(box)
            visible_object = points[is_object]  # (V_obj, 3)
            if len(visible_object) and in_box(visible_object, box).mean() >= _MIN_OBJECT_IN_BOX:
                break
        box = draw_box()
    else:  # not shifted, turned or scaled: the object's box plus the noise slack
        box = (centre, np.eye(3), 0.5 * size + slack)
        points, is_object = scan(box)

    views = {}
    obj = points[is_object]
    chosen = resample_indices(len(obj), num_points, rng)
    views["obj_only"] = (_to_unit_sphere(obj[chosen] - centre), np.ones(num_points, bool))

    inside = in_bg_box(points)
    chosen = resample_indices(int(inside.sum()), num_points, rng)
    views["obj_bg"] = (_to_unit_sphere(points[inside][chosen] - (low + high) / 2), is_object[inside][chosen])

    inside = in_box(points, box)
    box_centre, turn, _ = box
    local = (points[inside] - box_centre) @ turn
    tilt = rotation_about_axis(0, rng.uniform(-1, 1) * np.pi / 36) @ rotation_about_axis(2, rng.uniform(-1, 1) * np.pi / 36)
    chosen = resample_indices(len(local), num_points, rng)
    views["pb_t50_rs"] = (_to_unit_sphere(local[chosen] @ tilt.T), is_object[inside][chosen])
    return {name: (view.astype(np.float32), mask) for name, (view, mask) in views.items()}
