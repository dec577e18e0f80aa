"""Procedural meshes for ScanObjectNN's 15 classes, and uniform sampling of points on them.

Derived in notebooks/part2_point_peft/11_shape_data.ipynb.

Each class has a builder that composes open3d primitives (boxes, cylinders, spheres, tori) with
randomised part sizes, proportions and counts drawn from a numpy Generator, so that every call
gives a new instance of the class: a chair with or without armrests, a four-legged or an office
chair, a tall or a low cabinet with one or two doors or drawers... Classes are meant to be
distinguishable but not trivially: table and desk, cabinet and box, sofa and bed, bag and pillow
overlap the way real objects do.

Conventions, shared by the whole embedded data set:
- **y is up** (as in Point-MAE's ScanObjectNN and ModelNet40 pipelines, whose rotation
  augmentation turns about the y axis);
- the object stands on the floor y = 0, its footprint centred on x = z = 0;
- its front (seat opening, screen, doors, bowl) faces +z;
- units are metres, with realistic sizes; normalisation to the unit sphere comes after sampling
  (`course_lib.points.transforms.normalize_to_unit_sphere`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import open3d as o3d

from course_lib.points.transforms import UP_AXIS, axis_index

__all__ = [
    "BUILDERS",
    "CLASS_NAMES",
    "build_mesh",
    "rotation_about_axis",
    "sample_surface",
]

#: ScanObjectNN's 15 classes, in ScanObjectNN's label order.
CLASS_NAMES: tuple[str, ...] = (
    "bag", "bin", "box", "cabinet", "chair", "desk", "display", "door",
    "shelf", "table", "bed", "pillow", "sink", "sofa", "toilet",
)
_UP = axis_index(UP_AXIS)  # y, the course's up axis

Mesh = o3d.geometry.TriangleMesh


# ----------------------------------------------------------------------------------------------
# Primitives: each returns a TriangleMesh placed in the object's frame (y up, metres).
# ----------------------------------------------------------------------------------------------

def rotation_about_axis(axis: int, angle: float) -> np.ndarray:
    """3x3 rotation matrix turning by `angle` radians about coordinate axis 0 (x), 1 (y) or 2 (z)."""
    c, s = np.cos(angle), np.sin(angle)
    i, j = [(1, 2), (2, 0), (0, 1)][axis]  # the plane that turns, right-handed
    rotation = np.eye(3)
    rotation[i, i], rotation[i, j], rotation[j, i], rotation[j, j] = c, -s, s, c
    return rotation


def _place(mesh: Mesh, scale=(1.0, 1.0, 1.0), rotation: np.ndarray | None = None, centre=(0.0, 0.0, 0.0)) -> Mesh:
    vertices = np.asarray(mesh.vertices) * np.asarray(scale, dtype=float)  # (V, 3)
    if rotation is not None:
        vertices = vertices @ rotation.T
    mesh.vertices = o3d.utility.Vector3dVector(vertices + np.asarray(centre, dtype=float))
    return mesh


def _box(size, centre, rotation: np.ndarray | None = None) -> Mesh:
    """Box of edge lengths `size` = (x, y, z) centred on `centre`."""
    mesh = o3d.geometry.TriangleMesh.create_box(1.0, 1.0, 1.0).translate((-0.5, -0.5, -0.5))
    return _place(mesh, size, rotation, centre)


# open3d's cylinder, cone and torus are built along / around z: these turn z onto x or y
_Z_TO_AXIS = {0: rotation_about_axis(1, np.pi / 2), 1: rotation_about_axis(0, -np.pi / 2), 2: None}


def _cylinder(radius: float, height: float, centre, axis: int = 1, scale=(1.0, 1.0, 1.0), resolution: int = 16) -> Mesh:
    """Closed cylinder along coordinate `axis`, centred on `centre`; `scale` makes it elliptic."""
    mesh = o3d.geometry.TriangleMesh.create_cylinder(radius, height, resolution=resolution, split=1)
    _place(mesh, rotation=_Z_TO_AXIS[axis])
    return _place(mesh, scale, None, centre)


def _ellipsoid(radii, centre, squareness: float = 1.0, rotation: np.ndarray | None = None, resolution: int = 12) -> Mesh:
    """Ellipsoid with semi-axes `radii`; squareness < 1 pushes it towards a box (a cushion, a bag)."""
    mesh = o3d.geometry.TriangleMesh.create_sphere(1.0, resolution=resolution)
    unit = np.asarray(mesh.vertices)
    mesh.vertices = o3d.utility.Vector3dVector(np.sign(unit) * np.abs(unit) ** squareness)  # superellipsoid
    return _place(mesh, radii, rotation, centre)


def _torus(ring_radius: float, tube_radius: float, centre, normal_axis: int = 2, scale=(1.0, 1.0, 1.0)) -> Mesh:
    """Ring in the plane perpendicular to `normal_axis` (a handle: normal z; a toilet seat: normal y)."""
    mesh = o3d.geometry.TriangleMesh.create_torus(ring_radius, tube_radius, radial_resolution=20, tubular_resolution=8)
    _place(mesh, rotation=_Z_TO_AXIS[normal_axis])
    return _place(mesh, scale, None, centre)


def _grid_mesh(grid: np.ndarray) -> Mesh:
    """Triangulate a (U, V, 3) grid of points whose first index wraps around (a surface of revolution)."""
    u_count, v_count = grid.shape[:2]
    index = np.arange(u_count * v_count).reshape(u_count, v_count)
    after = np.roll(index, -1, axis=0)                                       # next column, wrapping
    a, b, c, d = index[:, :-1], after[:, :-1], after[:, 1:], index[:, 1:]    # one quad = 2 triangles
    triangles = np.concatenate([np.stack([a, b, c], -1), np.stack([a, c, d], -1)]).reshape(-1, 3)
    return o3d.geometry.TriangleMesh(o3d.utility.Vector3dVector(grid.reshape(-1, 3)), o3d.utility.Vector3iVector(triangles))


def _open_tube(
    radius_bottom: float, radius_top: float, height: float, centre_bottom, scale=(1.0, 1.0, 1.0), resolution: int = 20
) -> Mesh:
    """Wall and bottom of a (possibly tapered) tube, open at the top: a bin, a pedestal."""
    angle = np.linspace(0, 2 * np.pi, resolution, endpoint=False)[:, None]   # (U, 1)
    t = np.linspace(0, 1, 4)[None, :]                                        # (1, V)
    radius = radius_bottom + (radius_top - radius_bottom) * t
    wall = np.stack(np.broadcast_arrays(radius * np.cos(angle), height * t, radius * np.sin(angle)), -1)
    r = radius_bottom * np.linspace(0, 1, 3)[None, :]                        # bottom disk as rings
    bottom = np.stack(np.broadcast_arrays(r * np.cos(angle), 0 * r, r * np.sin(angle)), -1)
    return _place(_grid_mesh(wall) + _grid_mesh(bottom), scale, None, centre_bottom)


def _bowl(radii, centre_rim, resolution: int = 20) -> Mesh:
    """Lower half of an ellipsoid, open at the top, its rim centred on `centre_rim`: a basin."""
    angle = np.linspace(0, 2 * np.pi, resolution, endpoint=False)[:, None]
    polar = np.linspace(0, np.pi / 2, 6)[None, :]                            # 0 = bottom pole, pi/2 = rim
    grid = np.stack(np.broadcast_arrays(np.sin(polar) * np.cos(angle), -np.cos(polar), np.sin(polar) * np.sin(angle)), -1)
    return _place(_grid_mesh(grid), radii, None, centre_rim)


def _open_box(size, wall: float, centre_bottom) -> Mesh:
    """Box without a lid (bottom and four walls of thickness `wall`): a square bin, a sink basin."""
    w, h, d = size
    x, y, z = centre_bottom
    parts = _box((w, wall, d), (x, y + wall / 2, z))
    for sign in (-1, 1):
        parts += _box((wall, h, d), (x + sign * (w - wall) / 2, y + h / 2, z))
        parts += _box((w - 2 * wall, h, wall), (x, y + h / 2, z + sign * (d - wall) / 2))
    return parts


def _legs(rng: np.random.Generator, xs, zs, height: float, thickness: float, round_legs: bool | None = None) -> Mesh:
    """Vertical legs from the floor to `height` at every (x, z) of the grid xs x zs."""
    round_legs = rng.random() < 0.4 if round_legs is None else round_legs
    legs = o3d.geometry.TriangleMesh()
    for x in xs:
        for z in zs:
            if round_legs:
                legs += _cylinder(thickness / 2, height, (x, height / 2, z), resolution=10)
            else:
                legs += _box((thickness, height, thickness), (x, height / 2, z))
    return legs


def _handle(rng: np.random.Generator, centre, vertical: bool) -> Mesh:
    """A small bar or knob on a front face (+z) at `centre`."""
    x, y, z = centre
    if rng.random() < 0.3:
        return _ellipsoid((0.018, 0.018, 0.018), (x, y, z + 0.018))
    length = rng.uniform(0.08, 0.16)
    size = (0.015, length, 0.02) if vertical else (length, 0.015, 0.02)
    return _box(size, (x, y, z + 0.01))


# ----------------------------------------------------------------------------------------------
# One builder per class. Each takes a Generator and returns a mesh in the conventions above.
# ----------------------------------------------------------------------------------------------

def build_bag(rng: np.random.Generator) -> Mesh:
    """Backpack (rounded body, front pocket, straps) or hand bag (boxy body, one or two handles)."""
    if rng.random() < 0.4:  # backpack
        w, h, d = rng.uniform(0.26, 0.36), rng.uniform(0.38, 0.52), rng.uniform(0.14, 0.22)
        bag = _ellipsoid((w / 2, h / 2, d / 2), (0, h / 2, 0), squareness=rng.uniform(0.5, 0.8))
        bag += _ellipsoid((w * 0.35, h * 0.22, d * 0.25), (0, h * 0.3, d * 0.45), squareness=0.6)
        bag += _torus(0.05, 0.012, (0, h + 0.03, 0))
        for side in (-1, 1):
            bag += _box((0.05, h * 0.7, 0.02), (side * w * 0.25, h * 0.5, -d / 2 - 0.01))
        return bag
    w, h, d = rng.uniform(0.28, 0.5), rng.uniform(0.22, 0.4), rng.uniform(0.1, 0.2)
    bag = _ellipsoid((w / 2, h / 2, d / 2), (0, h / 2, 0), squareness=rng.uniform(0.2, 0.5))
    ring, tube = rng.uniform(0.08, 0.16), rng.uniform(0.008, 0.018)
    offsets = [0.0] if rng.random() < 0.5 else [-d * 0.3, d * 0.3]
    for z in offsets:
        bag += _torus(ring, tube, (0, h, z), scale=(1.0, rng.uniform(0.7, 1.2), 1.0))
    return bag


def build_bin(rng: np.random.Generator) -> Mesh:
    """Round (possibly tapered) or square waste bin, open at the top, sometimes with a rim."""
    h = rng.uniform(0.3, 0.8)
    if rng.random() < 0.6:
        r = rng.uniform(0.12, 0.25)
        r_top = r * rng.uniform(1.0, 1.25)
        bin_mesh = _open_tube(r, r_top, h, (0, 0, 0))
        if rng.random() < 0.5:
            bin_mesh += _torus(r_top, 0.012, (0, h, 0), normal_axis=1)
        return bin_mesh
    w, d = rng.uniform(0.25, 0.45), rng.uniform(0.2, 0.4)
    return _open_box((w, h, d), rng.uniform(0.01, 0.025), (0, 0, 0))


def build_box(rng: np.random.Generator) -> Mesh:
    """Cardboard / storage box of random proportions, sometimes with a lid or open flaps."""
    w, h, d = rng.uniform(0.2, 0.8, size=3)
    style = rng.choice(["plain", "lid", "flaps"], p=[0.5, 0.25, 0.25])
    if style == "flaps":  # open box: walls only, flaps folded out
        box = _open_box((w, h, d), 0.01, (0, 0, 0))
        for sign in (-1, 1):
            flap = rng.uniform(0.3, 0.5) * d
            tilt = rotation_about_axis(0, sign * rng.uniform(0.3, 1.2))
            box += _box((w, 0.01, flap), (0, h, sign * (d / 2 + flap / 2 * 0.8)), rotation=tilt)
        return box
    box = _box((w, h, d), (0, h / 2, 0))
    if style == "lid":
        lid_h = rng.uniform(0.03, 0.08)
        box += _box((w + 0.02, lid_h, d + 0.02), (0, h - lid_h / 2 + 0.005, 0))
    return box


def build_cabinet(rng: np.random.Generator) -> Mesh:
    """Cabinet or chest of drawers: a body on a plinth or legs, doors or drawers with handles."""
    w, h, d = rng.uniform(0.4, 1.2), rng.uniform(0.5, 2.0), rng.uniform(0.35, 0.6)
    base = rng.uniform(0.0, 0.12)
    cabinet = _box((w, h - base, d), (0, base + (h - base) / 2, 0))
    if base > 0.03:
        if rng.random() < 0.5:
            cabinet += _box((w - 0.06, base, d - 0.06), (0, base / 2, 0))
        else:
            cabinet += _legs(rng, (-w / 2 + 0.04, w / 2 - 0.04), (-d / 2 + 0.04, d / 2 - 0.04), base, 0.04)
    front = d / 2
    if rng.random() < 0.5:  # doors
        count = 1 if w < 0.6 else 2
        door_w = (w - 0.02) / count
        for i in range(count):
            x = -w / 2 + 0.01 + door_w * (i + 0.5)
            cabinet += _box((door_w - 0.01, h - base - 0.04, 0.02), (x, base + (h - base) / 2, front + 0.01))
            side = 1 if (count == 2 and i == 0) or (count == 1) else -1
            cabinet += _handle(rng, (x + side * door_w * 0.35, base + (h - base) * 0.55, front + 0.02), vertical=True)
    else:  # drawers
        count = int(rng.integers(2, 6))
        drawer_h = (h - base - 0.02) / count
        for i in range(count):
            y = base + 0.01 + drawer_h * (i + 0.5)
            cabinet += _box((w - 0.03, drawer_h - 0.015, 0.02), (0, y, front + 0.01))
            cabinet += _handle(rng, (0, y, front + 0.02), vertical=False)
    if rng.random() < 0.4:  # top overhang
        cabinet += _box((w + 0.04, 0.025, d + 0.03), (0, h + 0.0125, 0.015))
    return cabinet


def build_chair(rng: np.random.Generator) -> Mesh:
    """Chair: seat, four legs or an office pedestal, a back (solid or slats), sometimes armrests."""
    w, d = rng.uniform(0.4, 0.55), rng.uniform(0.4, 0.52)
    seat_h, seat_t = rng.uniform(0.4, 0.5), rng.uniform(0.03, 0.08)
    chair = _box((w, seat_t, d), (0, seat_h - seat_t / 2, 0))
    if rng.random() < 0.7:
        inset, leg = rng.uniform(0.02, 0.05), rng.uniform(0.025, 0.05)
        xs, zs = (-w / 2 + inset, w / 2 - inset), (-d / 2 + inset, d / 2 - inset)
        chair += _legs(rng, xs, zs, seat_h - seat_t, leg)
    else:  # office chair: column and a five-spoke base
        column = seat_h - seat_t - 0.06
        chair += _cylinder(0.025, column, (0, 0.06 + column / 2, 0))
        for k in range(5):
            spoke = rotation_about_axis(1, 2 * np.pi * k / 5)
            chair += _box((0.3, 0.04, 0.04), spoke @ np.array([0.15, 0.04, 0.0]), rotation=spoke)
    back_h, back_t = rng.uniform(0.3, 0.6), rng.uniform(0.025, 0.07)
    tilt = rotation_about_axis(0, -rng.uniform(0.0, 0.25))  # leaning backwards
    pivot = np.array([0, seat_h, -d / 2 + back_t / 2])
    if rng.random() < 0.7:
        chair += _box((w, back_h, back_t), pivot + tilt @ np.array([0, back_h / 2, 0]), rotation=tilt)
    else:  # slats and a top rail
        for x in np.linspace(-w / 2 + 0.03, w / 2 - 0.03, int(rng.integers(2, 5))):
            chair += _box((0.03, back_h, back_t), pivot + tilt @ np.array([x, back_h / 2, 0]), rotation=tilt)
        chair += _box((w, 0.06, back_t), pivot + tilt @ np.array([0, back_h - 0.03, 0]), rotation=tilt)
    if rng.random() < 0.3:  # armrests on posts
        arm_y = seat_h + rng.uniform(0.17, 0.25)
        for side in (-1, 1):
            chair += _box((0.05, 0.03, d * 0.8), (side * (w / 2 - 0.025), arm_y, 0))
            chair += _box((0.03, arm_y - seat_h, 0.03), (side * (w / 2 - 0.025), (arm_y + seat_h) / 2, d * 0.3))
    return chair


def build_desk(rng: np.random.Generator) -> Mesh:
    """Desk: a top on one or two drawer pedestals or panel legs, usually with a back (modesty) panel."""
    w, d, h = rng.uniform(1.0, 1.6), rng.uniform(0.55, 0.8), rng.uniform(0.72, 0.78)
    top_t = rng.uniform(0.025, 0.05)
    leg_h = h - top_t
    desk = _box((w, top_t, d), (0, h - top_t / 2, 0))
    sides = rng.choice(["left", "both", "none"], p=[0.5, 0.3, 0.2])
    for side in (-1, 1):
        has_pedestal = sides == "both" or (sides == "left" and side == -1)
        if has_pedestal:
            ped_w = rng.uniform(0.35, 0.45)
            x = side * (w / 2 - ped_w / 2)
            desk += _box((ped_w, leg_h, d - 0.04), (x, leg_h / 2, -0.02))
            count = int(rng.integers(2, 5))
            drawer_h = (leg_h - 0.06) / count
            for i in range(count):
                y = 0.05 + drawer_h * (i + 0.5)
                desk += _box((ped_w - 0.03, drawer_h - 0.015, 0.02), (x, y, d / 2 - 0.03))
                desk += _handle(rng, (x, y, d / 2 - 0.02), vertical=False)
        else:  # panel leg
            desk += _box((0.03, leg_h, d - 0.04), (side * (w / 2 - 0.02), leg_h / 2, 0))
    if sides == "none":  # drawer hanging under the top
        desk += _box((w * 0.4, 0.12, d * 0.8), (0, leg_h - 0.06, 0))
        desk += _handle(rng, (0, leg_h - 0.06, d * 0.4), vertical=False)
    if rng.random() < 0.6:
        panel_h = rng.uniform(0.25, 0.45)
        desk += _box((w - 0.08, panel_h, 0.02), (0, leg_h - panel_h / 2, -d / 2 + 0.05))
    return desk


def build_display(rng: np.random.Generator) -> Mesh:
    """Monitor or TV: a thin screen on a neck and a base plate, or on two feet."""
    w = rng.uniform(0.45, 1.0)
    h, t = w * rng.uniform(0.5, 0.65), rng.uniform(0.02, 0.06)
    bottom = rng.uniform(0.06, 0.2)
    display = _box((w, h, t), (0, bottom + h / 2, 0))
    if rng.random() < 0.35:  # older screens: a bulge at the back
        display += _box((w * 0.6, h * 0.6, t * 2), (0, bottom + h / 2, -t * 1.5))
    if rng.random() < 0.65:  # neck and base plate
        base_w, base_d = rng.uniform(0.15, 0.3), rng.uniform(0.12, 0.22)
        display += _box((base_w, 0.015, base_d), (0, 0.0075, 0))
        display += _box((0.05, bottom + h * 0.3, 0.03), (0, (bottom + h * 0.3) / 2, -t / 2 - 0.015))
    else:  # two feet
        for side in (-1, 1):
            x = side * w * rng.uniform(0.3, 0.42)
            display += _box((0.04, bottom, 0.03), (x, bottom / 2, 0))
            display += _box((0.05, 0.015, rng.uniform(0.15, 0.25)), (x, 0.0075, 0))
    return display


def build_door(rng: np.random.Generator) -> Mesh:
    """Door: a tall thin slab with a lever or knob, sometimes raised panels and a frame."""
    w, h, t = rng.uniform(0.7, 1.0), rng.uniform(1.9, 2.2), rng.uniform(0.035, 0.05)
    door = _box((w, h, t), (0, h / 2, 0))
    handle_x, handle_y = w / 2 - rng.uniform(0.06, 0.1), rng.uniform(0.95, 1.1)
    for face in (-1, 1):
        z = face * t / 2
        door += _cylinder(0.03, 0.01, (handle_x, handle_y, z + face * 0.005), axis=2)
        if rng.random() < 0.6:  # lever
            door += _box((0.12, 0.018, 0.02), (handle_x - 0.05, handle_y, z + face * 0.05))
            door += _cylinder(0.01, 0.05, (handle_x, handle_y, z + face * 0.03), axis=2)
        else:  # knob
            door += _ellipsoid((0.03, 0.03, 0.025), (handle_x, handle_y, z + face * 0.05))
    if rng.random() < 0.5:  # raised panels on the front face
        rows, cols = int(rng.integers(1, 4)), int(rng.integers(1, 3))
        panel_w, panel_h = (w - 0.2) / cols, (h - 0.3) / rows
        for i in range(rows):
            for j in range(cols):
                centre = (-w / 2 + 0.1 + panel_w * (j + 0.5), 0.15 + panel_h * (i + 0.5), t / 2 + 0.005)
                door += _box((panel_w - 0.08, panel_h - 0.08, 0.01), centre)
    if rng.random() < 0.6:  # frame around it
        frame_w, frame_d = rng.uniform(0.05, 0.1), t + rng.uniform(0.04, 0.1)
        for side in (-1, 1):
            door += _box((frame_w, h + frame_w, frame_d), (side * (w / 2 + frame_w / 2), (h + frame_w) / 2, 0))
        door += _box((w + 2 * frame_w, frame_w, frame_d), (0, h + frame_w / 2, 0))
    return door


def build_shelf(rng: np.random.Generator) -> Mesh:
    """Shelf: side panels or four posts holding several boards, sometimes a back panel."""
    w, h, d = rng.uniform(0.6, 1.2), rng.uniform(0.8, 2.0), rng.uniform(0.25, 0.4)
    board_t = rng.uniform(0.015, 0.03)
    count = int(rng.integers(3, 7))
    shelf = o3d.geometry.TriangleMesh()
    for y in np.linspace(0.05, h - board_t / 2, count):
        shelf += _box((w, board_t, d), (0, y, 0))
    if rng.random() < 0.7:
        for side in (-1, 1):
            shelf += _box((0.02, h, d), (side * (w / 2 + 0.01), h / 2, 0))
    else:
        shelf += _legs(rng, (-w / 2, w / 2), (-d / 2, d / 2), h, 0.03)
    if rng.random() < 0.5:
        shelf += _box((w, h, 0.01), (0, h / 2, -d / 2 - 0.005))
    return shelf


def build_table(rng: np.random.Generator) -> Mesh:
    """Table: a rectangular or round top on four legs (sometimes an apron) or a central pedestal."""
    h = rng.uniform(0.4, 0.8)  # coffee table to dining table
    top_t = rng.uniform(0.02, 0.06)
    leg_h = h - top_t
    if rng.random() < 0.3:  # round top
        r = rng.uniform(0.35, 0.6)
        table = _cylinder(r, top_t, (0, h - top_t / 2, 0), resolution=24)
        if rng.random() < 0.5:
            table += _cylinder(0.04, leg_h, (0, leg_h / 2, 0))
            table += _cylinder(r * 0.5, 0.03, (0, 0.015, 0))
        else:
            for k in range(4):
                x, z = 0.6 * r * np.cos(np.pi / 4 + k * np.pi / 2), 0.6 * r * np.sin(np.pi / 4 + k * np.pi / 2)
                table += _legs(rng, (x,), (z,), leg_h, 0.04, round_legs=True)
        return table
    w, d = rng.uniform(0.8, 1.8), rng.uniform(0.5, 1.0)
    table = _box((w, top_t, d), (0, h - top_t / 2, 0))
    inset, leg = rng.uniform(0.03, 0.1), rng.uniform(0.04, 0.08)
    table += _legs(rng, (-w / 2 + inset, w / 2 - inset), (-d / 2 + inset, d / 2 - inset), leg_h, leg)
    if rng.random() < 0.5:  # apron rails under the top
        apron = rng.uniform(0.06, 0.12)
        for side in (-1, 1):
            table += _box((w - 2 * inset, apron, 0.02), (0, leg_h - apron / 2, side * (d / 2 - inset)))
            table += _box((0.02, apron, d - 2 * inset), (side * (w / 2 - inset), leg_h - apron / 2, 0))
    return table


def build_bed(rng: np.random.Generator) -> Mesh:
    """Bed (long side along z): a frame, a mattress, a headboard, sometimes a footboard and pillows."""
    w, length = rng.uniform(0.9, 1.8), rng.uniform(1.9, 2.1)
    frame_h, mattress_t = rng.uniform(0.15, 0.35), rng.uniform(0.15, 0.3)
    bed = _box((w, frame_h, length), (0, frame_h / 2, 0))
    top = frame_h + mattress_t
    bed += _ellipsoid((w / 2 - 0.01, mattress_t / 2, length / 2 - 0.01), (0, frame_h + mattress_t / 2, 0), squareness=0.25)
    head_h = top + rng.uniform(0.3, 0.7)
    bed += _box((w + 0.04, head_h, rng.uniform(0.04, 0.1)), (0, head_h / 2, -length / 2 - 0.03))
    if rng.random() < 0.4:
        foot_h = top + rng.uniform(0.0, 0.2)
        bed += _box((w + 0.04, foot_h, 0.05), (0, foot_h / 2, length / 2 + 0.025))
    for x in ([0.0] if w < 1.2 else [-w / 4, w / 4])[: int(rng.integers(0, 3))]:
        bed += _ellipsoid((min(0.3, w / 2 - 0.05), 0.07, 0.2), (x, top + 0.05, -length / 2 + 0.3), squareness=0.6)
    return bed


def build_pillow(rng: np.random.Generator) -> Mesh:
    """Pillow or cushion: a flattened, slightly boxy ellipsoid, lying down or leaning upright."""
    radii = np.array([rng.uniform(0.2, 0.35), rng.uniform(0.05, 0.1), rng.uniform(0.15, 0.28)])
    squareness = rng.uniform(0.35, 0.8)
    if rng.random() < 0.6:  # lying flat
        return _ellipsoid(radii, (0, radii[1], 0), squareness=squareness)
    lean = rotation_about_axis(0, rng.uniform(1.1, 1.45))  # stood up on its long edge, leaning back
    pillow = _ellipsoid(radii, (0, 0, 0), squareness=squareness, rotation=lean)
    lowest = np.asarray(pillow.vertices)[:, 1].min()
    return pillow.translate((0, -lowest, 0))


def build_sink(rng: np.random.Generator) -> Mesh:
    """Sink: a basin (open box or bowl) on a vanity cabinet, a pedestal or a wall, with a tap."""
    w, d = rng.uniform(0.45, 0.9), rng.uniform(0.4, 0.55)
    top = rng.uniform(0.78, 0.9)
    style = rng.choice(["vanity", "pedestal", "wall"], p=[0.5, 0.3, 0.2])
    basin_w, basin_d, depth = w * rng.uniform(0.6, 0.85), d * rng.uniform(0.6, 0.8), rng.uniform(0.12, 0.2)
    if style == "vanity":
        sink = _box((w, top - 0.03, d), (0, (top - 0.03) / 2, 0))
        sink += _handle(rng, (0, top * 0.7, d / 2), vertical=False)
        rim_w, rim_d = (w - basin_w) / 2, (d - basin_d) / 2  # counter as a frame round the basin
        for side in (-1, 1):
            sink += _box((rim_w, 0.03, d), (side * (w - rim_w) / 2, top - 0.015, 0))
            sink += _box((basin_w, 0.03, rim_d), (0, top - 0.015, side * (d - rim_d) / 2))
    else:
        sink = _open_box((basin_w + 0.06, depth + 0.02, basin_d + 0.06), 0.03, (0, top - depth - 0.02, 0))
        if style == "pedestal":
            sink += _open_tube(0.12, 0.07, top - depth - 0.02, (0, 0, 0), scale=(1.0, 1.0, 0.8))
    if rng.random() < 0.5:
        sink += _bowl((basin_w / 2, depth, basin_d / 2), (0, top, 0))
    else:
        sink += _open_box((basin_w, depth, basin_d), 0.01, (0, top - depth, 0))
    tap_z = -d / 2 + 0.06 if style == "vanity" else -basin_d / 2 - 0.01
    tap_h = rng.uniform(0.12, 0.25)
    sink += _cylinder(0.015, tap_h, (0, top + tap_h / 2, tap_z))
    sink += _cylinder(0.012, 0.12, (0, top + tap_h - 0.01, tap_z + 0.06), axis=2)
    if rng.random() < 0.5:
        for side in (-1, 1):
            sink += _cylinder(0.02, 0.05, (side * 0.09, top + 0.025, tap_z))
    return sink


def build_sofa(rng: np.random.Generator) -> Mesh:
    """Sofa or armchair: a base, seat cushions, a back, usually two arms, sometimes short legs."""
    w = rng.uniform(0.8, 1.0) if rng.random() < 0.2 else rng.uniform(1.4, 2.4)
    d, seat_h = rng.uniform(0.8, 1.0), rng.uniform(0.38, 0.48)
    leg_h = rng.uniform(0.05, 0.15) if rng.random() < 0.5 else 0.0
    cushion_t, back_t = rng.uniform(0.1, 0.18), rng.uniform(0.15, 0.25)
    base_top = seat_h - cushion_t
    sofa = _box((w, base_top - leg_h, d), (0, leg_h + (base_top - leg_h) / 2, 0))
    if leg_h > 0:
        sofa += _legs(rng, (-w / 2 + 0.05, w / 2 - 0.05), (-d / 2 + 0.05, d / 2 - 0.05), leg_h, 0.04)
    arm_w = rng.uniform(0.1, 0.25) if rng.random() < 0.85 else 0.0
    inner_w = w - 2 * arm_w
    count = int(rng.integers(1, 4)) if inner_w > 1.0 else 1
    for i in range(count):
        x = -inner_w / 2 + inner_w * (i + 0.5) / count
        sofa += _ellipsoid((inner_w / count / 2 - 0.01, cushion_t / 2, (d - back_t) / 2 - 0.01),
                           (x, base_top + cushion_t / 2, back_t / 2), squareness=0.3)
    back_h = seat_h + rng.uniform(0.3, 0.5)
    tilt = rotation_about_axis(0, -rng.uniform(0.0, 0.2))
    back_bottom = np.array([0, leg_h, -d / 2 + back_t / 2])
    sofa += _box((w, back_h - leg_h, back_t), back_bottom + tilt @ np.array([0, (back_h - leg_h) / 2, 0]), rotation=tilt)
    if arm_w > 0:
        arm_h = seat_h + rng.uniform(0.1, 0.25)
        for side in (-1, 1):
            sofa += _box((arm_w, arm_h - leg_h, d), (side * (w - arm_w) / 2, leg_h + (arm_h - leg_h) / 2, 0))
    return sofa


def build_toilet(rng: np.random.Generator) -> Mesh:
    """Toilet: a pedestal, an oval bowl with a seat ring, a lid (down or up), usually a tank."""
    bowl_y = rng.uniform(0.38, 0.43)
    bowl_w, bowl_d = rng.uniform(0.17, 0.2), rng.uniform(0.22, 0.27)  # half widths of the oval
    stretch = bowl_d / bowl_w
    toilet = _open_tube(0.13, 0.1, bowl_y - 0.12, (0, 0, 0.02), scale=(1.0, 1.0, 1.3))
    toilet += _bowl((bowl_w, rng.uniform(0.15, 0.2), bowl_d), (0, bowl_y, 0.04))
    ring = bowl_w - 0.03
    toilet += _torus(ring, 0.025, (0, bowl_y + 0.02, 0.04), normal_axis=1, scale=(1.0, 0.6, stretch))
    lid = rng.choice(["none", "down", "up"], p=[0.3, 0.35, 0.35])
    if lid == "down":
        toilet += _cylinder(bowl_w, 0.02, (0, bowl_y + 0.05, 0.04), scale=(1.0, 1.0, stretch))
    elif lid == "up":
        toilet += _cylinder(bowl_w, 0.02, (0, bowl_y + 0.04 + bowl_d, -bowl_d + 0.03), axis=2, scale=(1.0, stretch, 1.0))
    if rng.random() < 0.85:
        tank_w, tank_h, tank_d = rng.uniform(0.35, 0.5), rng.uniform(0.3, 0.45), rng.uniform(0.15, 0.22)
        tank_z = 0.04 - bowl_d - tank_d / 2 + 0.02
        toilet += _box((tank_w, tank_h, tank_d), (0, bowl_y + tank_h / 2 - 0.05, tank_z))
        toilet += _box((tank_w + 0.02, 0.03, tank_d + 0.02), (0, bowl_y + tank_h - 0.035, tank_z))
    return toilet


#: The builder of each class, by name (ScanObjectNN order).
BUILDERS: dict[str, Callable[[np.random.Generator], Mesh]] = {
    "bag": build_bag, "bin": build_bin, "box": build_box, "cabinet": build_cabinet,
    "chair": build_chair, "desk": build_desk, "display": build_display, "door": build_door,
    "shelf": build_shelf, "table": build_table, "bed": build_bed, "pillow": build_pillow,
    "sink": build_sink, "sofa": build_sofa, "toilet": build_toilet,
}


def build_mesh(class_name: str, rng: np.random.Generator) -> Mesh:
    """A random instance of `class_name` (one of CLASS_NAMES): y up, standing on y = 0, in metres.

    The same Generator state gives the same mesh. Derived in
    notebooks/part2_point_peft/11_shape_data.ipynb.
    """
    if class_name not in BUILDERS:
        raise ValueError(f"unknown class {class_name!r}; expected one of {', '.join(CLASS_NAMES)}")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy Generator (np.random.default_rng(seed)), got {type(rng).__name__}")
    mesh = BUILDERS[class_name](rng)
    lowest = np.asarray(mesh.vertices)[:, _UP].min()
    return mesh.translate((0.0, -lowest, 0.0))  # stand exactly on the floor


# ----------------------------------------------------------------------------------------------
# From mesh to points
# ----------------------------------------------------------------------------------------------

def sample_surface(mesh: Mesh, num_points: int, rng: np.random.Generator) -> np.ndarray:
    """`num_points` points uniform on the surface of `mesh`, as a (num_points, 3) float64 array.

    Area-weighted: pick triangle t with probability area_t / total area, then a uniform point
    in it, p = (1 - sqrt(r1)) a + sqrt(r1) (1 - r2) b + sqrt(r1) r2 c with r1, r2 ~ U(0, 1).
    Seeded by `rng` (open3d's own sampler takes no seed). Overlapping parts are sampled inside
    each other too, as a surface-sampled CAD model would be.
    """
    if num_points < 1:
        raise ValueError(f"num_points must be >= 1, got {num_points}")
    vertices, triangles = np.asarray(mesh.vertices), np.asarray(mesh.triangles)
    if len(triangles) == 0:
        raise ValueError("the mesh has no triangles to sample from")
    a, b, c = (vertices[triangles[:, i]] for i in range(3))  # (F, 3) each
    area = 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1)  # (F,)
    if not area.sum() > 0:
        raise ValueError("the mesh has zero surface area")
    chosen = rng.choice(len(area), size=num_points, p=area / area.sum())
    r1, r2 = rng.random((2, num_points, 1))
    s = np.sqrt(r1)  # sqrt makes the density uniform over the triangle
    return (1 - s) * a[chosen] + s * (1 - r2) * b[chosen] + s * r2 * c[chosen]

