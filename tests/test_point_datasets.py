"""Point-cloud data sets: the embedded shape files, the real-format loaders and the download scripts.

The real formats (ModelNet40 resampled text files, ScanObjectNN h5 files, their zip archives)
are generated here in miniature; downloads go to a local HTTP server on 127.0.0.1 only.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import re
import threading
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from course_lib.download import ChecksumError, DownloadError
from course_lib.points import datasets

from data_scripts import download_modelnet40, download_scanobjectnn, make_shapes  # repository root is on pytest's path

TINY = datasets.ShapeSetConfig(seed=1, clean_train_per_class=2, clean_test_per_class=1, scan_train_per_class=2,
                               scan_test_per_class=1, clean_points=64, scan_points=96)


@pytest.fixture(scope="module")
def shape_dir(tmp_path_factory) -> Path:
    data_dir = tmp_path_factory.mktemp("data")
    written = datasets.write_shape_sets(TINY, data_dir, progress=False)
    assert sorted(p.name for p in written) == ["clean.npz", "obj_bg.npz", "obj_only.npz", "pb_t50_rs.npz"]
    return data_dir


# ---------------------------------------------------------------------------------------------
# The embedded shapes
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", datasets.SHAPE_VARIANTS)
def test_load_shapes_reads_every_variant_and_split(shape_dir, variant, monkeypatch):
    monkeypatch.delenv("COURSE_FAST", raising=False)
    points_per_cloud = 64 if variant == "clean" else 96
    for split, per_class in (("train", 2), ("test", 1)):
        dataset = datasets.load_shapes(variant, split, data_dir=shape_dir, generate_missing=False)
        assert len(dataset) == 15 * per_class and dataset.num_classes == 15
        assert dataset.class_names[0] == "bag" and dataset.class_names[-1] == "toilet"
        points, label = dataset[0]
        assert points.shape == (points_per_cloud, 3) and points.dtype == torch.float32 and isinstance(label, int)
        assert torch.bincount(dataset.labels, minlength=15).tolist() == [per_class] * 15
        assert dataset.points.norm(dim=-1).max() <= 1 + 1e-5
        assert dataset.masks.shape == dataset.points.shape[:2]


def test_load_shapes_matches_the_stored_arrays(shape_dir, monkeypatch):
    monkeypatch.delenv("COURSE_FAST", raising=False)
    with np.load(datasets.shapes_path("obj_bg", shape_dir)) as data:
        test = data["split"] == "test"
        expected_points, expected_labels = data["points"][test], data["labels"][test]
        assert int(data["version"]) == datasets.SHAPES_VERSION and int(data["seed"]) == 1 and str(data["up_axis"]) == "y"
    dataset = datasets.load_shapes("obj_bg", "test", data_dir=shape_dir)
    np.testing.assert_array_equal(dataset.points.numpy(), expected_points)
    np.testing.assert_array_equal(dataset.labels.numpy(), expected_labels)


def test_load_shapes_options(shape_dir, monkeypatch):
    monkeypatch.delenv("COURSE_FAST", raising=False)
    full = datasets.load_shapes("clean", "train", data_dir=shape_dir)
    fewer_points = datasets.load_shapes("clean", "train", num_points=16, data_dir=shape_dir)
    torch.testing.assert_close(fewer_points.points, full.points[:, :16])
    one_each = datasets.load_shapes("clean", "train", max_per_class=1, data_dir=shape_dir)
    assert len(one_each) == 15 and torch.bincount(one_each.labels).tolist() == [1] * 15
    shifted = datasets.load_shapes("clean", "train", transform=lambda p: p + 10.0, data_dir=shape_dir)
    torch.testing.assert_close(shifted[3][0], full[3][0] + 10.0)
    with pytest.raises(ValueError, match="num_points"):
        datasets.load_shapes("clean", "train", num_points=65, data_dir=shape_dir)
    with pytest.raises(ValueError, match="max_per_class"):
        datasets.load_shapes("clean", "train", max_per_class=0, data_dir=shape_dir)
    with pytest.raises(ValueError, match="variant"):
        datasets.load_shapes("obj_bg_hard", data_dir=shape_dir)
    with pytest.raises(ValueError, match="split"):
        datasets.load_shapes("clean", "val", data_dir=shape_dir)


def test_fast_mode_keeps_a_few_shapes_per_class(shape_dir, monkeypatch):
    monkeypatch.setenv("COURSE_FAST", "1")
    monkeypatch.setattr(datasets, "FAST_MAX_PER_CLASS", 1)
    assert len(datasets.load_shapes("pb_t50_rs", "train", data_dir=shape_dir)) == 15
    assert len(datasets.load_shapes("pb_t50_rs", "train", max_per_class=2, data_dir=shape_dir)) == 30  # explicit wins


def test_dataset_works_with_a_dataloader(shape_dir):
    loader = torch.utils.data.DataLoader(datasets.load_shapes("obj_only", "train", data_dir=shape_dir, max_per_class=2), batch_size=8)
    points, labels = next(iter(loader))
    assert points.shape == (8, 96, 3) and labels.dtype == torch.int64


def test_write_shape_sets_is_idempotent_and_atomic(shape_dir):
    before = {v: datasets.shapes_path(v, shape_dir).stat().st_mtime_ns for v in datasets.SHAPE_VARIANTS}
    assert datasets.write_shape_sets(TINY, shape_dir, progress=False) == []  # up to date: nothing written
    assert {v: datasets.shapes_path(v, shape_dir).stat().st_mtime_ns for v in datasets.SHAPE_VARIANTS} == before
    assert not list((shape_dir / "shapes").glob("*.tmp"))
    assert datasets.shape_set_is_current(datasets.shapes_path("clean", shape_dir), TINY)
    assert not datasets.shape_set_is_current(datasets.shapes_path("clean", shape_dir), datasets.ShapeSetConfig())


def test_write_shape_sets_refuses_a_bad_worker_count_even_with_nothing_to_write(shape_dir):
    with pytest.raises(ValueError, match="workers must be an int >= 1, got 0"):
        datasets.write_shape_sets(TINY, shape_dir, progress=False, workers=0)


def test_make_shapes_refuses_a_worker_count_below_one(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        make_shapes.main(["--workers", "0", "--data-dir", str(tmp_path), "--no-progress"])
    assert stopped.value.code == 2
    assert "--workers must be at least 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "shapes").exists()  # nothing written


def test_force_rewrites_the_same_arrays(tmp_path):
    config = datasets.ShapeSetConfig(seed=2, clean_train_per_class=1, clean_test_per_class=1, clean_points=32)
    datasets.write_shape_sets(config, tmp_path, variants=("clean",), progress=False)
    first = dict(np.load(datasets.shapes_path("clean", tmp_path)))
    assert datasets.write_shape_sets(config, tmp_path, variants=("clean",), force=True, progress=False)
    second = dict(np.load(datasets.shapes_path("clean", tmp_path)))
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])
    assert not (tmp_path / "shapes" / "obj_only.npz").exists()


def test_missing_stale_or_corrupt_shape_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="make data"):
        datasets.load_shapes("clean", data_dir=tmp_path, generate_missing=False)
    path = datasets.shapes_path("clean", tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a zip file")
    with pytest.raises(FileNotFoundError, match="unreadable"):
        datasets.load_shapes("clean", data_dir=tmp_path, generate_missing=False)
    np.savez(path, version=np.asarray(datasets.SHAPES_VERSION - 1), config=np.asarray("{}"))
    assert not datasets.shape_set_is_current(path)
    np.savez(path, version=np.asarray(datasets.SHAPES_VERSION), config=np.asarray("{}"))  # current, but no arrays
    with pytest.raises(ValueError, match="not a readable shape set"):
        datasets.load_shapes("clean", data_dir=tmp_path, generate_missing=False)


def test_point_cloud_dataset_checks_its_input():
    points = np.zeros((4, 10, 3), np.float32)
    with pytest.raises(ValueError, match=r"\(S, N, 3\)"):
        datasets.PointCloudDataset(np.zeros((4, 10, 2)), [0, 1, 2, 0], ["a", "b", "c"])
    with pytest.raises(ValueError, match="labels"):
        datasets.PointCloudDataset(points, [0, 1, 2], ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        datasets.PointCloudDataset(points, [0, 1, 3, 0], ["a", "b", "c"])
    with pytest.raises(ValueError, match="masks"):
        datasets.PointCloudDataset(points, [0, 1, 2, 0], ["a", "b", "c"], masks=np.ones((4, 9), bool))


# ---------------------------------------------------------------------------------------------
# ModelNet40, resampled text format
# ---------------------------------------------------------------------------------------------

MODELNET_CLASSES = ["airplane", "night_stand", "vase"]


def _write_modelnet(root: Path, rows: int = 20, seed: int = 0) -> dict[str, np.ndarray]:
    """A miniature modelnet40_normal_resampled folder; returns each shape's full (rows, 6) array."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    (root / "modelnet40_shape_names.txt").write_text("\n".join(MODELNET_CLASSES) + "\n")
    shapes = {}
    for split, count in (("train", 2), ("test", 1)):
        ids = [f"{name}_{i + 1 + (10 if split == 'test' else 0):04d}" for name in MODELNET_CLASSES for i in range(count)]
        (root / f"modelnet40_{split}.txt").write_text("\n".join(ids) + "\n")
        for shape_id in ids:
            values = rng.normal(size=(rows, 6)) * [3, 1, 2, 1, 1, 1] + [5, 0, 0, 0, 0, 0]
            folder = root / shape_id.rsplit("_", 1)[0]
            folder.mkdir(exist_ok=True)
            (folder / f"{shape_id}.txt").write_text("\n".join(",".join(f"{v:.6f}" for v in row) for row in values) + "\n")
            shapes[shape_id] = np.round(values, 6)
    return shapes


def _unit_sphere(xyz: np.ndarray) -> np.ndarray:
    centred = xyz - xyz.mean(axis=0)
    return centred / np.sqrt((centred ** 2).sum(axis=1)).max()


def test_load_modelnet40_reads_the_resampled_format(tmp_path):
    shapes = _write_modelnet(tmp_path / "modelnet40" / "modelnet40_normal_resampled")
    dataset = datasets.load_modelnet40(tmp_path / "modelnet40", "train", num_points=8, cache_dir=tmp_path / "cache")
    assert dataset.class_names == MODELNET_CLASSES and len(dataset) == 6
    assert dataset.labels.tolist() == [0, 0, 1, 1, 2, 2]  # night_stand_0001 -> "night_stand"
    expected = _unit_sphere(shapes["night_stand_0002"][:8, :3])
    np.testing.assert_allclose(dataset[3][0].numpy(), expected, atol=1e-5)
    inner = tmp_path / "modelnet40" / "modelnet40_normal_resampled"  # the folder itself works as well as its parent
    test = datasets.load_modelnet40(inner, "test", num_points=20, cache_dir=tmp_path / "cache")
    np.testing.assert_allclose(test[2][0].numpy(), _unit_sphere(shapes["vase_0011"][:, :3]), atol=1e-5)


def test_load_modelnet40_caches_the_parsed_files(tmp_path):
    root = tmp_path / "modelnet40_normal_resampled"
    _write_modelnet(root)
    first = datasets.load_modelnet40(root, "train", num_points=8, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("train_8_*.npz"))) == 1
    for text_file in (root / "airplane").glob("*.txt"):
        text_file.unlink()  # the cache no longer needs them
    again = datasets.load_modelnet40(root, "train", num_points=8, cache_dir=tmp_path / "cache")
    torch.testing.assert_close(first.points, again.points)


def test_load_modelnet40_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="download_modelnet40.*load_shapes"):
        datasets.load_modelnet40(tmp_path / "nowhere", cache_dir=tmp_path / "cache")
    root = tmp_path / "modelnet40_normal_resampled"
    _write_modelnet(root)
    with pytest.raises(ValueError, match="too short"):
        datasets.load_modelnet40(root, num_points=21, cache_dir=tmp_path / "cache")
    (root / "vase" / "vase_0002.txt").write_text("1.0,2.0,abc,0,0,1\n" * 20)
    with pytest.raises(ValueError, match="vase_0002.txt is corrupt"):
        datasets.load_modelnet40(root, num_points=8, cache_dir=tmp_path / "cache")
    (root / "vase" / "vase_0002.txt").unlink()
    with pytest.raises(FileNotFoundError, match="vase_0002.txt is missing"):
        datasets.load_modelnet40(root, num_points=8, cache_dir=tmp_path / "cache")


# ---------------------------------------------------------------------------------------------
# ScanObjectNN, h5 files
# ---------------------------------------------------------------------------------------------

def _write_scanobjectnn(h5_root: Path, num_points: int = 32, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The six main-split h5 files in ScanObjectNN's layout; returns (data, label) per relative path."""
    rng = np.random.default_rng(seed)
    written = {}
    for pattern in datasets.SCANOBJECTNN_FILES.values():
        for split, count in (("training", 6), ("test", 3)):
            relative = pattern.format(split=split)
            data = rng.normal(size=(count, num_points, 3)).astype(np.float32)
            label = rng.integers(0, 15, size=count).astype(np.int64)
            path = h5_root / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            with h5py.File(path, "w") as h5:
                h5.create_dataset("data", data=data)
                h5.create_dataset("label", data=label)
                h5.create_dataset("mask", data=(rng.random((count, num_points)) < 0.7).astype(np.int32))
            written[relative] = (data, label)
    return written


@pytest.mark.parametrize("variant", ["obj_only", "obj_bg", "pb_t50_rs"])
def test_load_scanobjectnn_reads_the_h5_files(tmp_path, variant):
    written = _write_scanobjectnn(tmp_path / "scanobjectnn" / "h5_files")
    for split, file_split in (("train", "training"), ("test", "test")):
        dataset = datasets.load_scanobjectnn(tmp_path / "scanobjectnn", variant, split)
        data, label = written[datasets.SCANOBJECTNN_FILES[variant].format(split=file_split)]
        np.testing.assert_array_equal(dataset.points.numpy(), data)
        np.testing.assert_array_equal(dataset.labels.numpy(), label)
        assert dataset.class_names == list(datasets.SCANOBJECTNN_CLASS_NAMES) and dataset.masks.dtype == torch.bool


def test_load_scanobjectnn_subsets_points_per_cloud(tmp_path):
    written = _write_scanobjectnn(tmp_path / "h5_files")
    data, _ = written["main_split/training_objectdataset_augmentedrot_scale75.h5"]
    dataset = datasets.load_scanobjectnn(tmp_path / "h5_files", "pb_t50_rs", "train", num_points=10)
    assert dataset.points.shape == (6, 10, 3)
    for cloud, original in zip(dataset.points.numpy(), data):
        rows = {tuple(row) for row in original}
        assert all(tuple(point) in rows for point in cloud) and len({tuple(p) for p in cloud}) == 10
    with pytest.raises(ValueError, match="num_points"):
        datasets.load_scanobjectnn(tmp_path / "h5_files", "pb_t50_rs", num_points=33)


def test_load_scanobjectnn_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="download_scanobjectnn.*load_shapes"):
        datasets.load_scanobjectnn(tmp_path / "nowhere")
    root = tmp_path / "h5_files"
    _write_scanobjectnn(root)
    (root / "main_split_nobg" / "test_objectdataset.h5").unlink()
    with pytest.raises(FileNotFoundError, match="test_objectdataset.h5 is missing"):
        datasets.load_scanobjectnn(root, "obj_only", "test")
    (root / "main_split" / "test_objectdataset.h5").write_bytes(b"\x89HDF\r\n" + os.urandom(200))
    with pytest.raises(ValueError, match="download it again"):
        datasets.load_scanobjectnn(root, "obj_bg", "test")
    with h5py.File(root / "main_split" / "training_objectdataset.h5", "w") as h5:
        h5.create_dataset("points", data=np.zeros((2, 4, 3)))
    with pytest.raises(ValueError, match="'data' and 'label'"):
        datasets.load_scanobjectnn(root, "obj_bg", "train")
    with pytest.raises(ValueError, match="variant"):
        datasets.load_scanobjectnn(root, "pb_t25")


# ---------------------------------------------------------------------------------------------
# Download scripts, against a local server (never a remote host)
# ---------------------------------------------------------------------------------------------

class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder and honours `Range: bytes=N-` (resumed downloads); records the requests."""

    ranges: list = []

    def log_message(self, *args):  # keep the test output quiet
        pass

    def do_GET(self):
        path = Path(self.translate_path(self.path))
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        type(self).ranges.append(self.headers.get("Range"))
        if not match or not path.is_file():
            return super().do_GET()
        body = path.read_bytes()[int(match.group(1)):]
        self.send_response(206)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture()
def server(tmp_path):
    """(folder served, base URL) of an HTTP server on 127.0.0.1."""
    served = tmp_path / "served"
    served.mkdir()
    handler = lambda *args, **kwargs: _RangeHandler(*args, directory=str(served), **kwargs)  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    _RangeHandler.ranges = []
    yield served, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _zip_folder(folder: Path, archive: Path, arcname_root: str) -> None:
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in sorted(folder.rglob("*")):
            zipped.write(path, f"{arcname_root}/{path.relative_to(folder).as_posix()}")


def _closed_port_url(name: str) -> str:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/{name}"  # nothing listens there any more: like being offline


def test_download_modelnet40_fetches_verifies_and_unpacks(server, tmp_path):
    served, base = server
    shapes = _write_modelnet(tmp_path / "src")
    _zip_folder(tmp_path / "src", served / "modelnet40_normal_resampled.zip", "modelnet40_normal_resampled")
    digest = hashlib.sha256((served / "modelnet40_normal_resampled.zip").read_bytes()).hexdigest()
    dest = tmp_path / "data" / "modelnet40"
    url = f"{base}/modelnet40_normal_resampled.zip"
    download_modelnet40.main(["--dest", str(dest), "--url", url, "--sha256", digest, "--no-progress"])
    assert sorted(p.name for p in dest.iterdir()) == ["modelnet40_normal_resampled"]  # archive removed
    dataset = datasets.load_modelnet40(dest, "test", num_points=20, cache_dir=tmp_path / "cache")
    np.testing.assert_allclose(dataset[0][0].numpy(), _unit_sphere(shapes["airplane_0011"][:, :3]), atol=1e-5)


def test_download_modelnet40_refuses_a_wrong_checksum_and_leaves_nothing(server, tmp_path):
    served, base = server
    (served / "modelnet40_normal_resampled.zip").write_bytes(b"not the real archive")
    dest = tmp_path / "modelnet40"
    with pytest.raises(ChecksumError):
        download_modelnet40.download_modelnet40(dest, f"{base}/modelnet40_normal_resampled.zip", "0" * 64, progress=False)
    assert not dest.exists() or not any(dest.iterdir())


def test_download_offline_points_to_the_embedded_default(tmp_path, capsys):
    with pytest.raises(DownloadError, match="load_shapes"):
        download_modelnet40.download_modelnet40(tmp_path, _closed_port_url("m.zip"), "0" * 64, progress=False)
    with pytest.raises(SystemExit) as exit_info:
        offline_url = _closed_port_url("h5_files.zip")
        download_scanobjectnn.main(["--accept-terms", "--dest", str(tmp_path), "--url", offline_url, "--no-progress"])
    assert exit_info.value.code == 1
    assert "load_shapes" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.zip"))


def _scanobjectnn_zip(tmp_path: Path, served: Path) -> tuple[dict, str]:
    written = _write_scanobjectnn(tmp_path / "src" / "h5_files")
    extra = tmp_path / "src" / "h5_files" / "split1" / "training_objectdataset.h5"
    extra.parent.mkdir()
    extra.write_bytes(b"another split")
    _zip_folder(tmp_path / "src" / "h5_files", served / "h5_files.zip", "h5_files")
    return written, hashlib.md5((served / "h5_files.zip").read_bytes()).hexdigest()


def test_download_scanobjectnn_checks_md5_and_unpacks_the_main_split(server, tmp_path):
    served, base = server
    written, md5 = _scanobjectnn_zip(tmp_path, served)
    dest = tmp_path / "scanobjectnn"
    folder = download_scanobjectnn.download_scanobjectnn(dest, f"{base}/h5_files.zip", md5, progress=False)
    assert folder == dest / "h5_files" and not (dest / "h5_files.zip").exists()
    assert not (folder / "split1").exists()  # only the main split's six files
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*.h5")) == download_scanobjectnn.main_split_members()
    dataset = datasets.load_scanobjectnn(dest, "pb_t50_rs", "test")
    np.testing.assert_array_equal(dataset.points.numpy(), written["main_split/test_objectdataset_augmentedrot_scale75.h5"][0])


def test_download_scanobjectnn_resumes_a_partial_download(server, tmp_path):
    served, base = server
    _, md5 = _scanobjectnn_zip(tmp_path, served)
    dest = tmp_path / "scanobjectnn"
    dest.mkdir()
    whole = (served / "h5_files.zip").read_bytes()
    (dest / "h5_files.zip.part").write_bytes(whole[: len(whole) // 2])  # an interrupted earlier run
    download_scanobjectnn.download_scanobjectnn(dest, f"{base}/h5_files.zip", md5, keep_archive=True, progress=False)
    assert _RangeHandler.ranges == [f"bytes={len(whole) // 2}-"]
    assert (dest / "h5_files.zip").read_bytes() == whole and not (dest / "h5_files.zip.part").exists()
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*.h5")) == download_scanobjectnn.main_split_members()


def test_download_scanobjectnn_refuses_a_wrong_md5_and_needs_the_terms(server, tmp_path, capsys):
    served, base = server
    _scanobjectnn_zip(tmp_path, served)
    dest = tmp_path / "scanobjectnn"
    with pytest.raises(ChecksumError, match="MD5"):
        download_scanobjectnn.download_scanobjectnn(dest, f"{base}/h5_files.zip", "0" * 32, progress=False)
    assert not list(dest.iterdir())
    with pytest.raises(ValueError, match="give a checksum"):
        download_scanobjectnn.download_scanobjectnn(dest, f"{base}/h5_files.zip", md5=None, progress=False)
    with pytest.raises(SystemExit) as exit_info:
        download_scanobjectnn.main(["--dest", str(dest), "--url", f"{base}/h5_files.zip"])
    assert exit_info.value.code == 2 and "terms of use" in capsys.readouterr().err
    assert _RangeHandler.ranges == [None]  # the run without --accept-terms fetched nothing
