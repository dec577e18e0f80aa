"""Point-cloud data sets: the embedded procedural shapes, ModelNet40 and ScanObjectNN.

Derived in notebooks/part2_point_peft/11_shape_data.ipynb.

Every loader returns a `PointCloudDataset`, a torch Dataset of (points (N, 3) float32 tensor,
label int) pairs, y up, each cloud in the unit sphere.

Embedded default (no download): `load_shapes(variant, split)`, the procedural shapes of
`course_lib.points.shapes` with ScanObjectNN's 15 classes, in four variants: "clean" (whole
surfaces, for pretraining, 1024 points like Point-MAE's ShapeNet pretraining) and the scan-like
"obj_only", "obj_bg", "pb_t50_rs" (2048 points like ScanObjectNN; see
`course_lib.points.scans`). They live in `config.DATA_DIR / "shapes" / <variant>.npz`, written by
`make data` (`python -m data_scripts.make_shapes`); `load_shapes` generates a missing file
itself (about a minute; deterministic, offline).

Real data, once downloaded with data_scripts/download_modelnet40.py and
download_scanobjectnn.py: `load_modelnet40(root, split)` reads the resampled ModelNet40
(`modelnet40_normal_resampled`, one `x,y,z,nx,ny,nz` text file per shape);
`load_scanobjectnn(root, variant, split)` reads ScanObjectNN's h5 files.
"""

from __future__ import annotations

import functools
import hashlib
import json
import multiprocessing
import os
import tempfile
import zipfile
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from course_lib import config

__all__ = [
    "FAST_MAX_PER_CLASS",
    "MODELNET40_FOLDER",
    "SCANOBJECTNN_CLASS_NAMES",
    "SCANOBJECTNN_FILES",
    "SHAPES_VERSION",
    "SHAPE_VARIANTS",
    "PointCloudDataset",
    "ShapeSetConfig",
    "generate_shape_sets",
    "load_modelnet40",
    "load_scanobjectnn",
    "load_shapes",
    "shape_set_is_current",
    "shapes_path",
    "write_shape_sets",
]

Transform = Callable[[torch.Tensor], torch.Tensor]


class PointCloudDataset(Dataset):
    """Point clouds with class labels: item i is (points (N, 3) float32 tensor, label int).

    `points` (S, N, 3), `labels` (S,), `class_names` (label -> name); `transform`, if given, is
    applied to each cloud as it is read (an augmentation from `course_lib.points.transforms`).
    `masks` (S, N) bool, when the source has one, marks the points of the object itself
    (True) against background (False).
    """

    def __init__(self, points, labels, class_names, transform: Transform | None = None, masks=None) -> None:
        points = torch.as_tensor(np.asarray(points, dtype=np.float32))
        labels = torch.as_tensor(np.asarray(labels).reshape(-1).astype(np.int64))
        if points.dim() != 3 or points.shape[-1] != 3:
            raise ValueError(f"points must have shape (S, N, 3), got {tuple(points.shape)}")
        if len(labels) != len(points):
            raise ValueError(f"{len(points)} clouds but {len(labels)} labels")
        finite = torch.isfinite(points).all(dim=-1)  # (S, N): a NaN/inf point would pass FPS and kNN silently
        if not bool(finite.all()):
            clouds = (~finite).any(dim=1).nonzero().squeeze(1).tolist()
            raise ValueError(
                f"{int((~finite).sum())} point(s) with NaN or inf coordinates in {len(clouds)} cloud(s) (first: cloud "
                f"{clouds[0]}): drop those points or clouds, or re-export the data, before building the dataset"
            )
        if len(labels) and not (0 <= int(labels.min()) and int(labels.max()) < len(class_names)):
            raise ValueError(f"labels must lie in [0, {len(class_names) - 1}], got [{int(labels.min())}, {int(labels.max())}]")
        if masks is not None:
            masks = torch.as_tensor(np.asarray(masks, dtype=bool))
            if tuple(masks.shape) != tuple(points.shape[:2]):
                raise ValueError(f"masks must have shape {tuple(points.shape[:2])}, got {tuple(masks.shape)}")
        self.points, self.labels, self.masks = points, labels, masks
        self.class_names = [str(name) for name in class_names]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        points = self.points[index]
        if self.transform is not None:
            points = self.transform(points)
        return points, int(self.labels[index])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_points(self) -> int:
        return self.points.shape[1]

    def __repr__(self) -> str:
        return f"PointCloudDataset({len(self)} clouds of {self.num_points} points, {self.num_classes} classes)"


# ----------------------------------------------------------------------------------------------
# The embedded shape sets
# ----------------------------------------------------------------------------------------------

#: Bumped whenever the generator changes what it writes (stale files are regenerated).
SHAPES_VERSION: int = 2
#: "clean" plus the three scan-like variants of `course_lib.points.scans`.
SHAPE_VARIANTS: tuple[str, ...] = ("clean", "obj_only", "obj_bg", "pb_t50_rs")
#: Shapes per class and split that `load_shapes` keeps under COURSE_FAST=1.
FAST_MAX_PER_CLASS: int = 8
_SPLITS = ("train", "test")


@dataclass(frozen=True)
class ShapeSetConfig:
    """Sizes and seed of the embedded shape sets (the defaults are what `make data` writes)."""

    seed: int = 0
    clean_train_per_class: int = 120
    clean_test_per_class: int = 20
    scan_train_per_class: int = 80
    scan_test_per_class: int = 20
    clean_points: int = 1024
    scan_points: int = 2048


def shapes_path(variant: str, data_dir: str | os.PathLike | None = None) -> Path:
    """`<data_dir or config.DATA_DIR>/shapes/<variant>.npz`."""
    _check_choice("variant", variant, SHAPE_VARIANTS)
    return Path(data_dir if data_dir is not None else config.DATA_DIR) / "shapes" / f"{variant}.npz"


def _instance_rng(seed: int, group: int, split: int, label: int, index: int) -> np.random.Generator:
    # one independent stream per shape: a subset (fewer per class) is a prefix of the full set
    return np.random.default_rng([seed, group, split, label, index])


def _shape_views(shape_config: ShapeSetConfig, clean: bool, job: tuple[str, int, int]) -> dict[str, tuple]:
    """One shape of the set: {variant: (points (N, 3) float32, mask (N,) bool)}, from its own seed."""
    from course_lib.points import scans
    from course_lib.points.shapes import CLASS_NAMES, build_mesh, sample_surface
    from course_lib.points.transforms import normalize_to_unit_sphere

    split, label, index = job
    rng = _instance_rng(shape_config.seed, 0 if clean else 1, _SPLITS.index(split), label, index)
    mesh = build_mesh(CLASS_NAMES[label], rng)
    if clean:
        num_points = shape_config.clean_points
        surface = torch.from_numpy(sample_surface(mesh, num_points, rng))
        return {"clean": (normalize_to_unit_sphere(surface).numpy().astype(np.float32), np.ones(num_points, bool))}
    return scans.scan_views(scans.build_scene(mesh, rng), shape_config.scan_points, rng)


def _check_workers(workers: object) -> None:
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")


def generate_shape_sets(
    shape_config: ShapeSetConfig = ShapeSetConfig(), group: str = "clean", progress: bool = True, workers: int = 1
) -> dict[str, dict[str, np.ndarray]]:
    """Generate the "clean" set (group "clean") or the three scan-like sets (group "scan").

    Returns {variant: arrays} with points (S, N, 3) float32, labels (S,) int64, split (S,)
    "train"/"test", instance (S,) index of the shape within its class and split, masks (S, N)
    bool (True = object point) and metadata. Deterministic: shape i of class c in a split is
    drawn from its own Generator seeded with (seed, group, split, c, i), so `workers` processes
    (`make data` uses one per core) write exactly what one process writes.
    """
    from course_lib.points import scans
    from course_lib.points.shapes import CLASS_NAMES

    _check_choice("group", group, ("clean", "scan"))
    _check_workers(workers)
    clean = group == "clean"
    per_split = {
        "train": shape_config.clean_train_per_class if clean else shape_config.scan_train_per_class,
        "test": shape_config.clean_test_per_class if clean else shape_config.scan_test_per_class,
    }
    variants = ("clean",) if clean else scans.SCAN_VARIANTS
    jobs = [(s, c, i) for s in _SPLITS for c in range(len(CLASS_NAMES)) for i in range(per_split[s])]
    one_shape = functools.partial(_shape_views, shape_config, clean)
    bar = functools.partial(tqdm, total=len(jobs), desc=f"{group} shapes", disable=not progress, leave=False)
    if workers == 1 or len(jobs) < 2:
        shapes = [one_shape(job) for job in bar(jobs)]
    else:  # fresh interpreters (spawn): safe whatever the caller has imported or started
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            shapes = list(bar(pool.map(one_shape, jobs, chunksize=max(1, len(jobs) // (8 * workers)))))
    return {
        variant: {
            "points": np.stack([shape[variant][0] for shape in shapes]).astype(np.float32),
            "masks": np.stack([shape[variant][1] for shape in shapes]),
            "labels": np.asarray([label for _, label, _ in jobs], dtype=np.int64),
            "split": np.asarray([split for split, _, _ in jobs]),
            "instance": np.asarray([index for _, _, index in jobs], dtype=np.int64),
            "class_names": np.asarray(CLASS_NAMES),
            "version": np.asarray(SHAPES_VERSION),
            "seed": np.asarray(shape_config.seed),
            "config": np.asarray(json.dumps(asdict(shape_config), sort_keys=True)),
            "up_axis": np.asarray("y"),
        }
        for variant in variants
    }


def _write_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    """Compressed .npz written to a temporary file and renamed: never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez_compressed(handle, **arrays)
        os.chmod(tmp_name, 0o644)  # mkstemp makes it private; a data file is readable by all
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def shape_set_is_current(path: str | os.PathLike, shape_config: ShapeSetConfig | None = None) -> bool:
    """True if `path` holds a readable shape set of this generator version (and, if given, of
    exactly `shape_config`: seed and sizes)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if int(data["version"]) != SHAPES_VERSION:
                return False
            return shape_config is None or json.loads(str(data["config"])) == asdict(shape_config)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return False


def write_shape_sets(
    shape_config: ShapeSetConfig = ShapeSetConfig(),
    data_dir: str | os.PathLike | None = None,
    variants: tuple[str, ...] = SHAPE_VARIANTS,
    force: bool = False,
    progress: bool = True,
    workers: int = 1,
) -> list[Path]:
    """Generate and write the shape sets `variants` that are missing or stale; returns the paths written.

    Files already holding this version and `shape_config` are kept unless `force`. The three
    scan-like variants come from the same scans, so asking for one writes all three. `workers`
    processes share the generation (the files are the same for any number).
    """
    for variant in variants:
        _check_choice("variant", variant, SHAPE_VARIANTS)
    _check_workers(workers)  # also when every file is up to date
    written = []
    for group, members in (("clean", ("clean",)), ("scan", SHAPE_VARIANTS[1:])):
        if not any(v in variants for v in members):
            continue
        if not force and all(shape_set_is_current(shapes_path(v, data_dir), shape_config) for v in members):
            continue
        for variant, arrays in generate_shape_sets(shape_config, group, progress, workers).items():
            written.append(_write_npz_atomic(shapes_path(variant, data_dir), arrays))
    return written


def load_shapes(
    variant: str = "clean",
    split: str = "train",
    *,
    num_points: int | None = None,
    max_per_class: int | None = None,
    transform: Transform | None = None,
    data_dir: str | os.PathLike | None = None,
    generate_missing: bool = True,
) -> PointCloudDataset:
    """The embedded shape set `variant` ("clean", "obj_only", "obj_bg", "pb_t50_rs"), split "train"/"test".

    - `num_points`: keep the first `num_points` points of each cloud (stored in random order,
      so this is a uniform subset); default: all (1024 clean, 2048 scan-like).
    - `max_per_class`: keep the first shapes of each class; default: all, or
      FAST_MAX_PER_CLASS under COURSE_FAST=1.
    - A missing or stale file is generated first (about a minute, offline, deterministic),
      unless `generate_missing=False`, which raises FileNotFoundError instead.
    The clouds come with `masks` (True = object point, False = background).
    """
    _check_choice("variant", variant, SHAPE_VARIANTS)
    _check_choice("split", split, _SPLITS)
    path = shapes_path(variant, data_dir)
    if not shape_set_is_current(path):
        if not generate_missing:
            reason = "is missing" if not path.exists() else "is unreadable or from another generator version"
            raise FileNotFoundError(
                f"the embedded shape set {path} {reason}: run `make data` (or `python -m data_scripts.make_shapes`)"
            )
        write_shape_sets(data_dir=data_dir, variants=(variant,))
    try:
        with np.load(path, allow_pickle=False) as data:
            keep = data["split"] == split
            if max_per_class is None and config.is_fast():
                max_per_class = FAST_MAX_PER_CLASS
            if max_per_class is not None:
                if max_per_class < 1:
                    raise ValueError(f"max_per_class must be >= 1, got {max_per_class}")
                keep &= data["instance"] < max_per_class
            points, masks = data["points"][keep], data["masks"][keep]
            labels, class_names = data["labels"][keep], data["class_names"]
    except (KeyError, zipfile.BadZipFile, OSError) as error:
        raise ValueError(f"{path} is not a readable shape set ({error}); delete it and run `make data`") from error
    points, masks = _first_points(points, num_points, path), _first_points(masks, num_points, path)
    return PointCloudDataset(points, labels, class_names, transform, masks)


def _first_points(array: np.ndarray, num_points: int | None, source) -> np.ndarray:
    if num_points is None:
        return array
    if not 1 <= num_points <= array.shape[1]:
        raise ValueError(f"num_points must be in [1, {array.shape[1]}] for {source}, got {num_points}")
    return array[:, :num_points]


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


# ----------------------------------------------------------------------------------------------
# ModelNet40 (resampled: modelnet40_normal_resampled)
# ----------------------------------------------------------------------------------------------

#: The folder of the resampled ModelNet40 (inside the zip and under the download destination).
MODELNET40_FOLDER = "modelnet40_normal_resampled"
_NOT_DOWNLOADED = (
    "Download it with `python -m data_scripts.{script}`, "
    "or use the embedded default `load_shapes()` (`make data`), which needs no download."
)


def _find_root(root, default: Path, marker: str, inner: str, name: str, script: str) -> Path:
    """The folder holding `marker`: `root` itself or `root/inner`."""
    root = Path(root) if root is not None else default
    for candidate in (root, root / inner):
        if (candidate / marker).exists():
            return candidate
    message = f"{name} not found: neither {root} nor {root / inner} contains {marker}. "
    raise FileNotFoundError(message + _NOT_DOWNLOADED.format(script=script))


def _normalize(points: np.ndarray) -> np.ndarray:
    # (S, N, 3): centroid to the origin, farthest point on the unit sphere (Point-MAE's pc_norm)
    centred = points - points.mean(axis=1, keepdims=True)
    radius = np.linalg.norm(centred, axis=2).max(axis=1)[:, None, None]
    return centred / np.where(radius > 0, radius, 1.0)


def load_modelnet40(
    root: str | os.PathLike | None = None,
    split: str = "train",
    num_points: int = 1024,
    *,
    transform: Transform | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> PointCloudDataset:
    """ModelNet40, resampled format: 40 classes, 9843 train / 2468 test shapes of 10,000 points.

    `root` (default `config.DATA_DIR / "modelnet40"`) is the folder `modelnet40_normal_resampled`
    or its parent. It holds modelnet40_shape_names.txt (class names, label order),
    modelnet40_{train,test}.txt (one shape id per line, e.g. airplane_0001) and
    <class>/<shape id>.txt, rows `x,y,z,nx,ny,nz`. The first `num_points` rows of each file are
    kept (the rows are already a uniform sample of the surface), normals are dropped, and each
    cloud is normalised into the unit sphere. Parsing ~12k text files is slow, so the result is
    cached as .npz under `cache_dir` (default `config.CACHE_DIR / "modelnet40"`); delete the
    cache after changing the files.
    """
    _check_choice("split", split, _SPLITS)
    if num_points < 1:
        raise ValueError(f"num_points must be >= 1, got {num_points}")
    marker = "modelnet40_shape_names.txt"
    root = _find_root(root, config.DATA_DIR / "modelnet40", marker, MODELNET40_FOLDER, "ModelNet40", "download_modelnet40")
    class_names = [line.strip() for line in (root / marker).read_text().splitlines() if line.strip()]
    list_file = root / f"modelnet40_{split}.txt"
    if not list_file.exists():
        message = f"{list_file} is missing: the ModelNet40 folder {root} is incomplete. "
        raise FileNotFoundError(message + _NOT_DOWNLOADED.format(script="download_modelnet40"))
    shape_ids = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]

    key = hashlib.sha1(f"{root.resolve()}|{split}|{num_points}|{len(shape_ids)}".encode()).hexdigest()[:12]
    cache = Path(cache_dir if cache_dir is not None else config.CACHE_DIR / "modelnet40") / f"{split}_{num_points}_{key}.npz"
    if cache.exists():
        with np.load(cache, allow_pickle=False) as data:
            return PointCloudDataset(data["points"], data["labels"], class_names, transform)

    index_of = {name: i for i, name in enumerate(class_names)}
    points = np.empty((len(shape_ids), num_points, 3), dtype=np.float32)
    labels = np.empty(len(shape_ids), dtype=np.int64)
    for i, shape_id in enumerate(tqdm(shape_ids, desc=f"ModelNet40 {split}", leave=False)):
        class_name = shape_id.rsplit("_", 1)[0]  # "night_stand_0001" -> "night_stand"
        if class_name not in index_of:
            raise ValueError(f"{list_file}: shape {shape_id!r} belongs to no class of modelnet40_shape_names.txt")
        labels[i] = index_of[class_name]
        points[i] = _read_modelnet_file(root / class_name / f"{shape_id}.txt", num_points)
    points = _normalize(points).astype(np.float32)
    _write_npz_atomic(cache, {"points": points, "labels": labels})
    return PointCloudDataset(points, labels, class_names, transform)


def _read_modelnet_file(path: Path, num_points: int) -> np.ndarray:
    """The first `num_points` xyz rows of one `x,y,z,nx,ny,nz` file, (num_points, 3)."""
    if not path.exists():
        message = f"{path} is missing: the ModelNet40 download is incomplete. "
        raise FileNotFoundError(message + _NOT_DOWNLOADED.format(script="download_modelnet40"))
    try:
        rows = np.loadtxt(path, delimiter=",", max_rows=num_points, ndmin=2, dtype=np.float32)
    except ValueError as error:
        raise ValueError(f"{path} is corrupt: expected comma-separated rows x,y,z,nx,ny,nz ({error})") from error
    if rows.shape[1] < 3 or len(rows) < num_points:
        raise ValueError(f"{path} is corrupt or too short: need {num_points} rows of >= 3 numbers, got shape {rows.shape}")
    return rows[:, :3]


# ----------------------------------------------------------------------------------------------
# ScanObjectNN (h5 files)
# ----------------------------------------------------------------------------------------------

#: ScanObjectNN's classes in label order (the embedded shapes use the same).
SCANOBJECTNN_CLASS_NAMES: tuple[str, ...] = (
    "bag", "bin", "box", "cabinet", "chair", "desk", "display", "door",
    "shelf", "table", "bed", "pillow", "sink", "sofa", "toilet",
)
#: The h5 file of each variant inside the `h5_files` folder ({split}: "training" or "test").
SCANOBJECTNN_FILES: dict[str, str] = {
    "obj_only": "main_split_nobg/{split}_objectdataset.h5",
    "obj_bg": "main_split/{split}_objectdataset.h5",
    "pb_t50_rs": "main_split/{split}_objectdataset_augmentedrot_scale75.h5",
}


def load_scanobjectnn(
    root: str | os.PathLike | None = None,
    variant: str = "pb_t50_rs",
    split: str = "train",
    *,
    num_points: int | None = None,
    transform: Transform | None = None,
) -> PointCloudDataset:
    """ScanObjectNN's main split, variant "obj_only", "obj_bg" or "pb_t50_rs" (see SCANOBJECTNN_FILES).

    `root` (default `config.DATA_DIR / "scanobjectnn"`) is the extracted `h5_files` folder or
    its parent. Each file holds "data" (S, 2048, 3) float32 and "label" (S,), and usually
    "mask" (S, 2048), kept as the dataset's `masks`. The clouds are used as stored (already
    centred and scaled by the dataset's authors). `num_points` keeps a random (seeded, per
    cloud) subset of the 2048 points.
    """
    import h5py

    _check_choice("variant", variant, tuple(SCANOBJECTNN_FILES))
    _check_choice("split", split, _SPLITS)
    root = _find_root(root, config.DATA_DIR / "scanobjectnn", "main_split", "h5_files", "ScanObjectNN", "download_scanobjectnn")
    path = root / SCANOBJECTNN_FILES[variant].format(split="training" if split == "train" else "test")
    if not path.exists():
        message = f"{path} is missing: the ScanObjectNN folder {root} is incomplete. "
        raise FileNotFoundError(message + _NOT_DOWNLOADED.format(script="download_scanobjectnn"))
    try:
        with h5py.File(path, "r") as h5:
            if "data" not in h5 or "label" not in h5:
                raise ValueError(f"{path} has no 'data' and 'label' datasets (found {sorted(h5.keys())})")
            points = np.asarray(h5["data"][...], dtype=np.float32)[..., :3]
            labels = np.asarray(h5["label"][...]).reshape(-1)
            masks = np.asarray(h5["mask"][...]) > 0 if "mask" in h5 else None
    except OSError as error:
        raise ValueError(f"{path} is not a readable HDF5 file ({error}); it is corrupt or truncated: download it again") from error
    if points.ndim != 3 or len(points) != len(labels):
        raise ValueError(f"{path}: expected data (S, N, 3) and label (S,), got {points.shape} and {labels.shape}")
    if masks is not None and masks.shape != points.shape[:2]:
        masks = None  # some derived files store no per-point mask
    if num_points is not None:
        if not 1 <= num_points <= points.shape[1]:
            raise ValueError(f"num_points must be in [1, {points.shape[1]}], got {num_points}")
        order = np.argsort(np.random.default_rng(0).random(points.shape[:2]), axis=1)[:, :num_points]  # (S, k)
        points = np.take_along_axis(points, order[..., None], axis=1)
        masks = None if masks is None else np.take_along_axis(masks, order, axis=1)
    return PointCloudDataset(points, labels, SCANOBJECTNN_CLASS_NAMES, transform, masks)
