"""Downloading real data sets safely: resumable, checksummed, never half-written.

Used by the scripts in data_scripts/ (GLUE, ModelNet40, ScanObjectNN). The course itself runs
offline on embedded data; these helpers only matter when someone fetches the real sets.

- `download_file` streams into `<dest>.part` (resuming it with an HTTP Range request after an
  interruption), checks the SHA-256 (or, for a file that only has a published one, the MD5),
  and only then renames it to `dest`. A file with the wrong hash is deleted and reported;
  `dest` either does not exist or is complete and verified.
- `extract_archive` unpacks a zip or tar into a temporary folder next to the destination and
  renames it into place, refusing members that would land outside it.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import socket
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

from tqdm.auto import tqdm

__all__ = [
    "DownloadError", "ChecksumError", "HASH_ALGORITHMS", "file_digest", "sha256_of", "download_file", "extract_archive",
]

_CHUNK = 1 << 20  # 1 MiB

#: The checksums `download_file` verifies: algorithm -> (length of the hex digest, name in messages).
HASH_ALGORITHMS: dict[str, tuple[int, str]] = {"sha256": (64, "SHA-256"), "md5": (32, "MD5")}


class DownloadError(OSError):
    """The file could not be fetched (network unreachable, HTTP error, ...)."""


class ChecksumError(ValueError):
    """The downloaded file does not have the expected SHA-256 (or MD5)."""


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file with `algorithm` ("sha256" or "md5", see HASH_ALGORITHMS), read in 1 MiB chunks."""
    if algorithm not in HASH_ALGORITHMS:
        raise ValueError(f"algorithm must be one of {sorted(HASH_ALGORITHMS)}, got {algorithm!r}")
    digest = hashlib.new(algorithm, usedforsecurity=False)  # MD5 only detects corruption, it proves nothing
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_of(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks (what `sha256sum` prints)."""
    return file_digest(path, "sha256")


def _expected_digest(sha256: str | None, md5: str | None) -> tuple[str, str]:
    """(algorithm, lower-case hex digest) from download_file's two checksum arguments."""
    given = {name: value for name, value in (("sha256", sha256), ("md5", md5)) if value is not None}
    if len(given) != 1:
        raise ValueError(
            f"give exactly one checksum, sha256=... or md5=..., got {' and '.join(given) or 'neither'}: "
            "a download is only accepted once verified (prefer the SHA-256 when both are published)"
        )
    [(algorithm, value)] = given.items()
    length = HASH_ALGORITHMS[algorithm][0]
    if not isinstance(value, str) or not re.fullmatch(rf"[0-9a-fA-F]{{{length}}}", value):
        raise ValueError(f"{algorithm} must be {length} hexadecimal characters, got {value!r}")
    return algorithm, value.lower()


def _unreachable(url: str, reason: object, offline_hint: str | None) -> DownloadError:
    host = urllib.parse.urlparse(url).netloc or url
    message = f"could not download {url}: the network is not reachable from here ({host}: {reason})."
    if offline_hint:
        message += f" {offline_hint}"
    else:
        message += " The course runs offline on its embedded default data; real data sets are optional."
    return DownloadError(message)


def download_file(
    url: str,
    dest: str | os.PathLike,
    sha256: str | None = None,
    *,
    md5: str | None = None,
    resume: bool = True,
    progress: bool = True,
    timeout: float = 10.0,
    offline_hint: str | None = None,
) -> Path:
    """Download `url` to `dest`, verified against `sha256` or `md5` (exactly one); returns `dest`.

    Give `md5` only for files whose publishers list no SHA-256 (ScanObjectNN's archive); giving
    neither or both raises ValueError, as does a digest of the wrong length.

    If `dest` already exists with the right hash nothing is fetched. Bytes arrive in
    `<dest>.part`; with `resume=True` an existing .part is continued with an HTTP Range request
    (a server that ignores Range sends the whole file, which then replaces the .part). Only a
    file whose hash matches is renamed to `dest`; a mismatch deletes the .part and raises
    ChecksumError. Network failures raise DownloadError saying the network is unreachable and
    pointing to `offline_hint` (what to use instead). `timeout` (seconds) bounds each
    connection attempt and read, so offline machines fail fast. file:// URLs work too.
    """
    algorithm, expected = _expected_digest(sha256, md5)
    dest = Path(dest)
    if dest.is_dir():
        raise IsADirectoryError(f"dest {dest} is a folder: give the path of the file to write")
    if dest.exists():
        if file_digest(dest, algorithm) == expected:
            return dest
        dest.unlink()  # stale or corrupt: fetch again
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    if part.exists() and not resume:
        part.unlink()
    offset = part.stat().st_size if part.exists() else 0

    request = urllib.request.Request(url, headers={"User-Agent": "course_lib-download"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:  # range not satisfiable: the .part is already complete
            response = None
        else:
            raise DownloadError(f"could not download {url}: HTTP {error.code} {error.reason}") from error
    except (urllib.error.URLError, socket.timeout, ConnectionError, OSError) as error:
        if isinstance(error, FileNotFoundError) or (
            isinstance(error, urllib.error.URLError) and isinstance(error.reason, FileNotFoundError)
        ):
            raise DownloadError(f"could not download {url}: no such file") from error
        raise _unreachable(url, getattr(error, "reason", error), offline_hint) from error

    if response is not None:
        with response:
            is_file_url = urllib.parse.urlparse(url).scheme == "file"
            length = response.headers.get("Content-Length")
            length = int(length) if length and length.isdigit() else None
            if offset and getattr(response, "status", None) == 206:
                mode, total = "ab", None if length is None else offset + length  # the server continues
            elif offset and is_file_url:
                _skip(response, offset)  # a local file: drop the bytes the .part already holds
                mode, total = "ab", length
            else:
                mode, offset, total = "wb", 0, length  # fresh start (or the server ignored Range)
            try:
                with open(part, mode) as handle, tqdm(
                    total=total, initial=offset, unit="B", unit_scale=True, desc=dest.name, disable=not progress, leave=False
                ) as bar:
                    for chunk in iter(lambda: response.read(_CHUNK), b""):
                        handle.write(chunk)
                        bar.update(len(chunk))
            except (socket.timeout, ConnectionError, urllib.error.URLError, http.client.HTTPException) as error:
                # keep the .part: the next call resumes from here
                raise _unreachable(url, error, offline_hint) from error

    actual = file_digest(part, algorithm)
    if actual != expected:
        part.unlink()
        name = HASH_ALGORITHMS[algorithm][1]
        raise ChecksumError(
            f"{url} downloaded with {name} {actual}, expected {expected}: the file is corrupt or has changed "
            "upstream. It was deleted; run again to retry, or check the URL and checksum."
        )
    os.replace(part, dest)
    return dest


def _skip(response, count: int) -> None:
    # read and drop `count` bytes (file:// responses cannot seek)
    while count > 0:
        chunk = response.read(min(_CHUNK, count))
        if not chunk:
            break
        count -= len(chunk)


def _safe_members_check(names: list[str], root: Path) -> None:
    root = root.resolve()
    for name in names:
        target = (root / name).resolve()
        if target != root and root not in target.parents:
            raise ValueError(f"archive member {name!r} would be written outside {root}; refusing to extract")


def extract_archive(
    path: str | os.PathLike, dest: str | os.PathLike, *, strip_top_level: bool = False, overwrite: bool = False
) -> Path:
    """Unpack a .zip or .tar(.gz/.bz2/.xz) archive into the folder `dest`, atomically.

    Members are extracted into a temporary folder beside `dest`, which is renamed to `dest` at
    the end: `dest` never holds a partial extraction. With `strip_top_level=True` and an
    archive whose members all sit in one top folder (SST-2.zip holds SST-2/...), that folder's
    contents become `dest`. An existing `dest` is returned untouched unless `overwrite=True`.
    """
    path, dest = Path(path), Path(dest)
    if not path.is_file():
        raise FileNotFoundError(f"no archive at {path}")
    if dest.exists() and not overwrite:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.extracting-"))
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                _safe_members_check(archive.namelist(), staging)
                archive.extractall(staging)
        elif tarfile.is_tarfile(path):
            with tarfile.open(path) as archive:
                members = archive.getmembers()
                _safe_members_check([m.name for m in members], staging)
                for member in members:
                    if member.issym() or member.islnk():
                        raise ValueError(f"archive member {member.name!r} is a link; refusing to extract")
                if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4: also strips odd permissions
                    archive.extractall(staging, filter="data")
                else:
                    archive.extractall(staging)
        else:
            raise ValueError(f"{path} is neither a zip nor a tar archive")
        root = staging
        if strip_top_level:
            entries = [entry for entry in staging.iterdir() if entry.name != "__MACOSX"]
            if len(entries) == 1 and entries[0].is_dir():
                root = entries[0]
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(root, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest
