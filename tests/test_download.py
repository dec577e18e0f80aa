"""Tests of course_lib.download and data_scripts/download_glue.py.

All traffic stays on this machine: a small HTTP server on 127.0.0.1 (with Range support) or
file:// URLs. No remote host is ever contacted.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import socket
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import pytest

from course_lib.download import ChecksumError, DownloadError, download_file, extract_archive, file_digest, sha256_of
from course_lib.text import load_glue_tsv
from data_scripts import download_glue  # importable from the repository root (pytest pythonpath)

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()
PAYLOAD_MD5 = hashlib.md5(PAYLOAD).hexdigest()


class _Server:
    """Serves `files` (path -> bytes) on 127.0.0.1; records the Range headers it receives."""

    def __init__(self, files: dict[str, bytes], honour_range: bool = True) -> None:
        self.files = files
        self.honour_range = honour_range
        self.requests: list[tuple[str, str | None]] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server naming)
                owner.requests.append((self.path, self.headers.get("Range")))
                body = owner.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start = 0
                header = self.headers.get("Range")
                if header and owner.honour_range:
                    start = int(header.removeprefix("bytes=").split("-")[0])
                    if start >= len(body):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                self.wfile.write(body[start:])

            def log_message(self, *args):  # keep pytest output clean
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def __enter__(self) -> "_Server":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _closed_port_url() -> str:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/file.zip"


def test_sha256_of_known_digest(tmp_path):
    path = tmp_path / "abc"
    path.write_bytes(b"abc")
    assert sha256_of(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_file_digest_known_digests(tmp_path):
    path = tmp_path / "abc"
    path.write_bytes(b"abc")  # RFC 1321 and FIPS 180-2 test vectors
    assert file_digest(path, "md5") == "900150983cd24fb0d6963f7d28e17f72"
    assert file_digest(path) == file_digest(path, "sha256") == sha256_of(path)
    with pytest.raises(ValueError, match="algorithm must be one of"):
        file_digest(path, "sha1")


def test_md5_download_verifies_resumes_and_rejects_corruption(tmp_path):
    dest = tmp_path / "data.bin"
    (tmp_path / "data.bin.part").write_bytes(PAYLOAD[:300_000])  # an interrupted earlier run
    with _Server({"/data.bin": PAYLOAD, "/bad.bin": PAYLOAD[:-1] + b"X"}) as server:
        download_file(server.url("/data.bin"), dest, md5=PAYLOAD_MD5.upper(), progress=False)
        assert dest.read_bytes() == PAYLOAD and not (tmp_path / "data.bin.part").exists()
        download_file(server.url("/data.bin"), dest, md5=PAYLOAD_MD5, progress=False)  # verified: not fetched again
        with pytest.raises(ChecksumError, match="MD5 .*expected " + PAYLOAD_MD5):
            download_file(server.url("/bad.bin"), tmp_path / "bad.bin", md5=PAYLOAD_MD5, progress=False)
    assert server.requests == [("/data.bin", "bytes=300000-"), ("/bad.bin", None)]
    assert not (tmp_path / "bad.bin").exists() and not (tmp_path / "bad.bin.part").exists()


def test_download_needs_exactly_one_checksum(tmp_path):
    with pytest.raises(ValueError, match="exactly one checksum.*neither"):
        download_file("file:///dev/null", tmp_path / "n")
    with pytest.raises(ValueError, match="exactly one checksum.*sha256 and md5"):
        download_file("file:///dev/null", tmp_path / "n", PAYLOAD_SHA, md5=PAYLOAD_MD5)
    with pytest.raises(ValueError, match="md5 must be 32 hexadecimal"):
        download_file("file:///dev/null", tmp_path / "n", md5=PAYLOAD_SHA)  # a SHA-256 passed as MD5
    assert not list(tmp_path.iterdir())


def test_download_verifies_and_leaves_no_part_file(tmp_path):
    with _Server({"/data.bin": PAYLOAD}) as server:
        dest = download_file(server.url("/data.bin"), tmp_path / "sub" / "data.bin", PAYLOAD_SHA.upper(), progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert not (tmp_path / "sub" / "data.bin.part").exists()


def test_download_resumes_with_a_range_request(tmp_path):
    dest = tmp_path / "data.bin"
    (tmp_path / "data.bin.part").write_bytes(PAYLOAD[:300_000])  # an interrupted earlier run
    with _Server({"/data.bin": PAYLOAD}) as server:
        download_file(server.url("/data.bin"), dest, PAYLOAD_SHA, progress=False)
    assert server.requests == [("/data.bin", "bytes=300000-")]
    assert dest.read_bytes() == PAYLOAD


def test_server_ignoring_range_restarts_from_zero(tmp_path):
    dest = tmp_path / "data.bin"
    (tmp_path / "data.bin.part").write_bytes(b"garbage that must not stay in front")
    with _Server({"/data.bin": PAYLOAD}, honour_range=False) as server:
        download_file(server.url("/data.bin"), dest, PAYLOAD_SHA, progress=False)
    assert dest.read_bytes() == PAYLOAD


def test_complete_part_file_gets_416_and_is_accepted(tmp_path):
    dest = tmp_path / "data.bin"
    (tmp_path / "data.bin.part").write_bytes(PAYLOAD)
    with _Server({"/data.bin": PAYLOAD}) as server:
        download_file(server.url("/data.bin"), dest, PAYLOAD_SHA, progress=False)
    assert dest.read_bytes() == PAYLOAD


def test_existing_verified_file_is_not_fetched_again(tmp_path):
    dest = tmp_path / "data.bin"
    dest.write_bytes(PAYLOAD)
    with _Server({"/data.bin": PAYLOAD}) as server:
        download_file(server.url("/data.bin"), dest, PAYLOAD_SHA, progress=False)
    assert server.requests == []


def test_corrupt_download_is_deleted_with_a_clear_error(tmp_path):
    dest = tmp_path / "data.bin"
    with _Server({"/data.bin": PAYLOAD[:-1] + b"X"}) as server:
        with pytest.raises(ChecksumError, match="expected " + PAYLOAD_SHA):
            download_file(server.url("/data.bin"), dest, PAYLOAD_SHA, progress=False)
    assert not dest.exists() and not (tmp_path / "data.bin.part").exists()


def test_offline_fails_fast_with_a_clear_message(tmp_path):
    start = time.perf_counter()
    with pytest.raises(DownloadError, match="network is not reachable.*embedded"):
        download_file(_closed_port_url(), tmp_path / "x.zip", PAYLOAD_SHA, progress=False, timeout=2)
    assert time.perf_counter() - start < 5
    assert not (tmp_path / "x.zip").exists()


def test_http_errors_and_bad_checksums(tmp_path):
    with _Server({}) as server:
        with pytest.raises(DownloadError, match="HTTP 404"):
            download_file(server.url("/missing"), tmp_path / "m", PAYLOAD_SHA, progress=False)
    with pytest.raises(ValueError, match="64 hexadecimal"):
        download_file("file:///dev/null", tmp_path / "n", "abc")
    with pytest.raises(DownloadError, match="no such file"):
        download_file((tmp_path / "absent").as_uri(), tmp_path / "n", PAYLOAD_SHA, progress=False)


def test_file_urls_download_and_resume(tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(PAYLOAD)
    dest = tmp_path / "out" / "copy.bin"
    dest.parent.mkdir()
    (dest.parent / "copy.bin.part").write_bytes(PAYLOAD[:1000])
    download_file(source.as_uri(), dest, PAYLOAD_SHA, progress=False)
    assert dest.read_bytes() == PAYLOAD


# ----------------------------------------------------------------------------- archives


def _zip_bytes(members: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, text in members.items():
            archive.writestr(name, text)
    return buffer.getvalue()


def test_extract_zip_and_tar(tmp_path):
    archive = tmp_path / "task.zip"
    archive.write_bytes(_zip_bytes({"TASK/train.tsv": "a\t1\n", "TASK/dev.tsv": "b\t0\n"}))
    out = extract_archive(archive, tmp_path / "plain")
    assert (out / "TASK" / "train.tsv").read_text() == "a\t1\n"
    out = extract_archive(archive, tmp_path / "stripped", strip_top_level=True)
    assert sorted(p.name for p in out.iterdir()) == ["dev.tsv", "train.tsv"]

    tar_path = tmp_path / "shapes.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        data = b"points"
        info = tarfile.TarInfo("shapes/a.bin")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    out = extract_archive(tar_path, tmp_path / "shapes", strip_top_level=True)
    assert (out / "a.bin").read_bytes() == b"points"
    # an existing destination is kept as it is
    (out / "marker").write_text("keep")
    assert (extract_archive(tar_path, out) / "marker").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folders left


def test_extract_refuses_members_outside_and_leaves_nothing(tmp_path):
    archive = tmp_path / "evil.zip"
    archive.write_bytes(_zip_bytes({"../evil.txt": "x"}))
    with pytest.raises(ValueError, match="outside"):
        extract_archive(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path.parent / "evil.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    not_archive = tmp_path / "plain.txt"
    not_archive.write_text("hello")
    with pytest.raises(ValueError, match="neither a zip nor a tar"):
        extract_archive(not_archive, tmp_path / "out")
    with pytest.raises(FileNotFoundError):
        extract_archive(tmp_path / "none.zip", tmp_path / "out")


# ----------------------------------------------------------------------------- data_scripts/download_glue.py


def test_glue_table_has_real_looking_checksums():
    for task, sources in download_glue.TASKS.items():
        for source in sources:
            assert len(source.sha256) == 64 and int(source.sha256, 16) >= 0, task
            assert source.url.startswith("https://dl.fbaipublicfiles.com/"), task
    assert {"SST-2", "CoLA", "MRPC", "RTE"} <= set(download_glue.TASKS)


def test_download_glue_end_to_end_on_a_local_server(tmp_path, monkeypatch, capsys):
    sst2_zip = _zip_bytes({"SST-2/train.tsv": "sentence\tlabel\nfine film \t1\nbad film \t0\n", "SST-2/dev.tsv": "sentence\tlabel\nok \t1\n"})
    with _Server({"/SST-2.zip": sst2_zip}) as server:
        source = download_glue.Source(server.url("/SST-2.zip"), hashlib.sha256(sst2_zip).hexdigest(), len(sst2_zip))
        monkeypatch.setitem(download_glue.TASKS, "SST-2", (source,))
        assert download_glue.main(["--tasks", "sst2", "--data-dir", str(tmp_path), "--no-progress"]) == 0
    split = load_glue_tsv(tmp_path / "glue" / "SST-2" / "train.tsv", "SST-2")
    assert split.labels == [1, 0]
    assert "SST-2 ready" in capsys.readouterr().out


def test_download_glue_offline_exits_with_a_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(download_glue.TASKS, "RTE", (download_glue.Source(_closed_port_url(), "0" * 64, 1),))
    assert download_glue.main(["--tasks", "RTE", "--data-dir", str(tmp_path), "--timeout", "2"]) == 1
    message = capsys.readouterr().err
    assert "network is not reachable" in message and "make_sentiment_task" in message
    assert not (tmp_path / "glue" / "RTE").exists()
    with pytest.raises(SystemExit):
        download_glue.main(["--tasks", "SQuAD"])


def test_build_mrpc_splits_by_dev_ids(tmp_path):
    header = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"
    train_file = tmp_path / "msr_paraphrase_train.txt"
    train_file.write_text("\ufeff" + "\n".join([header, "1\t1\t2\tA.\tB.", "0\t3\t4\tC.\tD.", "1\t5\t6\tE.\tF."]) + "\n", encoding="utf-8")
    test_file = tmp_path / "msr_paraphrase_test.txt"
    test_file.write_text("\n".join([header, "0\t7\t8\tG.\tH."]) + "\n", encoding="utf-8")
    dev_ids = tmp_path / "mrpc_dev_ids.tsv"
    dev_ids.write_text("3\t4\n", encoding="utf-8")
    out = download_glue.build_mrpc(train_file, test_file, dev_ids, tmp_path / "MRPC")
    train = load_glue_tsv(out / "train.tsv", "MRPC")
    dev = load_glue_tsv(out / "dev.tsv", "MRPC")
    test = load_glue_tsv(out / "test.tsv", "MRPC")
    assert train.texts == ["A.", "E."] and dev.texts == ["C."] and dev.labels == [0]
    assert test.text_pairs == ["H."]
