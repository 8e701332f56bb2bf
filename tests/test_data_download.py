"""Corpus download: range-resume, md5 checks, joined parts and unpacking, all on loopback."""

from __future__ import annotations

import hashlib
import http.server
import io
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest

from local.download_3dspeaker import Archive, Remote, download, download_3dspeaker, manifest
from speakerlab.errors import DataError


class RangeServer:
    """A loopback HTTP server for ``root`` that honours ``Range: bytes=N-`` (unless told not to)
    and records the requests it gets."""

    def __init__(self, root: Path, honour_range: bool = True):
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                server.requests.append((self.path, self.headers.get("Range")))
                path = root / self.path.lstrip("/")
                if not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                start = 0
                header = self.headers.get("Range")
                if honour_range and header:
                    start = int(header.split("=")[1].rstrip("-"))
                    if start >= len(data):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                self.wfile.write(data[start:])

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> RangeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def make_tar(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_download_resumes_a_partial_file_with_a_range_request(tmp_path):
    served, dest = tmp_path / "served", tmp_path / "download"
    served.mkdir()
    dest.mkdir()
    payload = bytes(range(256)) * 2000  # 512000 bytes
    (served / "test.tar.gz").write_bytes(payload)
    (dest / "test.tar.gz.part").write_bytes(payload[:100_000])  # an interrupted earlier run
    with RangeServer(served) as server:
        path = download(Remote("test.tar.gz", server.url + "test.tar.gz", md5(payload)), dest)
    assert path.read_bytes() == payload
    assert server.requests == [("/test.tar.gz", "bytes=100000-")]
    assert not (dest / "test.tar.gz.part").exists()
    assert (dest / "test.tar.gz.md5ok").read_text().split()[0] == md5(payload)


def test_download_restarts_when_the_server_ignores_ranges(tmp_path):
    served, dest = tmp_path / "served", tmp_path / "download"
    served.mkdir()
    dest.mkdir()
    payload = b"0123456789" * 5000
    (served / "a.bin").write_bytes(payload)
    (dest / "a.bin.part").write_bytes(payload[:1234])
    with RangeServer(served, honour_range=False) as server:
        path = download(Remote("a.bin", server.url + "a.bin", md5(payload)), dest)
    assert path.read_bytes() == payload  # not the partial head followed by the whole file


def test_wrong_md5_is_an_error_and_the_file_is_removed(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    (served / "musan.tar.gz").write_bytes(b"not what was published")
    with RangeServer(served) as server:
        with pytest.raises(DataError, match=r"musan\.tar\.gz: md5 .* differs from the published"):
            download(
                Remote("musan.tar.gz", server.url + "musan.tar.gz", "0" * 32), tmp_path / "download"
            )
    assert not (tmp_path / "download" / "musan.tar.gz").exists()


def test_missing_remote_file_is_a_clear_error(tmp_path):
    (tmp_path / "served").mkdir()
    with RangeServer(tmp_path / "served") as server:
        with pytest.raises(DataError, match="HTTP error 404"):
            download(Remote("x.tar.gz", server.url + "x.tar.gz", None), tmp_path / "download")


def test_file_urls_work_offline(tmp_path):
    source = tmp_path / "mirror" / "rirs_noises.zip"
    source.parent.mkdir()
    source.write_bytes(b"zip bytes" * 100)
    path = download(
        Remote("rirs_noises.zip", source.as_uri(), md5(source.read_bytes())), tmp_path / "download"
    )
    assert path.read_bytes() == source.read_bytes()


def test_parts_are_joined_verified_and_everything_unpacked_once(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    train = make_tar(
        {"train/3D_SPK_00001/3D_SPK_00001_001_Device01_Distance00_Dialect00.wav": b"RIFF fake"}
    )
    for letter, start in zip("abc", range(0, len(train), -(-len(train) // 3))):
        (served / f"train.tar.gz-part-{letter}").write_bytes(
            train[start : start + -(-len(train) // 3)]
        )
    # The metadata archive nests its files one folder deeper than the corpus wants them.
    files = make_tar(
        {
            "3dspeaker_files/train_wav.scp": b"u train/x.wav\n",
            "3dspeaker_files/trials_cross_device": b"a b target\n",
        }
    )
    (served / "3dspeaker_files.tar.gz").write_bytes(files)
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as zf:
        zf.writestr("RIRS_NOISES/real_rirs_isotropic_noises/rir_list", "--rir-id a\n")
    (served / "rirs_noises.zip").write_bytes(zipped.getvalue())
    with RangeServer(served) as server:

        def remote(name: str, data: bytes | None) -> Remote:
            return Remote(name, server.url + name, None if data is None else md5(data))

        parts = tuple(
            remote(
                f"train.tar.gz-part-{letter}", (served / f"train.tar.gz-part-{letter}").read_bytes()
            )
            for letter in "abc"
        )
        archives = {
            "train": Archive("train.tar.gz", None, parts, md5(train), "3dspeaker"),
            "files": Archive(
                "3dspeaker_files.tar.gz",
                remote("3dspeaker_files.tar.gz", None),
                (),
                None,
                "3dspeaker/files",
                flatten_to="train_wav.scp",
            ),
            "rirs": Archive(
                "rirs_noises.zip",
                remote("rirs_noises.zip", zipped.getvalue()),
                (),
                md5(zipped.getvalue()),
                ".",
            ),
        }
        raw = tmp_path / "raw"
        done = download_3dspeaker(
            tmp_path / "download", raw, ("train", "files", "rirs"), archives=archives
        )
        first_run = len(server.requests)
        download_3dspeaker(
            tmp_path / "download", raw, ("train", "files", "rirs"), archives=archives
        )
        assert len(server.requests) == first_run == 5  # the rerun fetched nothing
    assert (tmp_path / "download" / "train.tar.gz").read_bytes() == train
    assert (raw / "3dspeaker" / "train" / "3D_SPK_00001").is_dir()
    assert (raw / "3dspeaker" / "files" / "train_wav.scp").read_bytes() == b"u train/x.wav\n"
    assert (raw / "3dspeaker" / "files" / "trials_cross_device").is_file()
    assert (raw / "RIRS_NOISES" / "real_rirs_isotropic_noises" / "rir_list").is_file()
    assert done["files"] == raw / "3dspeaker" / "files"


def test_the_real_manifest_names_every_archive_and_its_published_md5():
    archives = manifest("http://corpus.example/3D-Speaker/", "http://openslr.example/resources/")
    assert sorted(archives) == ["files", "musan", "rirs", "test", "train"]
    assert [p.name for p in archives["train"].parts] == [
        f"train.tar.gz-part-{letter}" for letter in "abcdef"
    ]
    assert all(p.md5 and len(p.md5) == 32 for p in archives["train"].parts)
    assert archives["test"].remote.url == "http://corpus.example/3D-Speaker/test.tar.gz"
    assert archives["musan"].remote.url == "http://openslr.example/resources/17/musan.tar.gz"
    assert archives["rirs"].remote.url == "http://openslr.example/resources/28/rirs_noises.zip"
    assert archives["files"].md5 is None  # no published sum for the metadata archive
    assert all(archives[n].md5 for n in ("musan", "rirs", "train", "test"))
