#!/usr/bin/env python3
"""Download and unpack the 3D-Speaker corpus and the MUSAN / RIRS_NOISES augmentation sets.

Downloads resume where they stopped (HTTP range requests into ``<name>.part``), every archive with
a known md5 sum is verified, the six training parts are joined into ``train.tar.gz``, and
unpacking is skipped for archives already unpacked. Layout produced under ``--raw_dir``::

    3dspeaker/{train,test,files}   (the corpus root for local/prepare_3dspeaker.py)
    musan/                         (musan.tar.gz; noise/free-sound is what training uses)
    RIRS_NOISES/                   (rirs_noises.zip; real_rirs_isotropic_noises is used)
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from speakerlab.errors import DataError, SpeakerlabError
from speakerlab.fileio import atomic_write, write_text_atomic

CORPUS_URL = "https://speech-lab-share-data.oss-cn-shanghai.aliyuncs.com/3D-Speaker/"
OPENSLR_URL = "https://www.openslr.org/resources/"
CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class Remote:
    """A file to download and its md5 sum (None: no published sum, not verified)."""

    name: str
    url: str
    md5: str | None


@dataclass(frozen=True)
class Archive:
    """An archive, downloaded whole or joined from ``parts``, and where it unpacks.

    ``unpack_to`` is relative to the raw-data folder; ``flatten_to`` names a file whose folder,
    wherever the archive puts it, becomes ``unpack_to`` itself (the metadata archive).
    """

    name: str
    remote: Remote | None
    parts: tuple[Remote, ...]
    md5: str | None
    unpack_to: str
    flatten_to: str | None = None


def manifest(corpus_url: str = CORPUS_URL, openslr_url: str = OPENSLR_URL) -> dict[str, Archive]:
    """The archives by short name: ``musan``, ``rirs``, ``train``, ``test``, ``files``.

    md5 sums are those the 3D-Speaker recipe publishes; ``3dspeaker_files.tar.gz`` has none.
    """

    def corpus(name: str, md5: str | None) -> Remote:
        return Remote(name, urllib.parse.urljoin(corpus_url, name), md5)

    train_parts = tuple(
        corpus(f"train.tar.gz-part-{letter}", md5)
        for letter, md5 in (
            ("a", "4109addde41d88760947263f18117ac3"),
            ("b", "5a17ef2fa28b1b9e340277edffb8b51c"),
            ("c", "bd2ce08f5b51005b66afe484b01a4a59"),
            ("d", "5cd31d961d2d5211aea38b8b95f7239a"),
            ("e", "58f3fb7d28ae7f4b65ee35a1ed7ab106"),
            ("f", "be64551c030e8087562a10df2c74ccb1"),
        )
    )
    musan = Remote(
        "musan.tar.gz",
        urllib.parse.urljoin(openslr_url, "17/musan.tar.gz"),
        "0c472d4fc0c5141eca47ad1ffeb2a7df",
    )
    rirs = Remote(
        "rirs_noises.zip",
        urllib.parse.urljoin(openslr_url, "28/rirs_noises.zip"),
        "e6f48e257286e05de56413b4779d8ffb",
    )
    test = corpus("test.tar.gz", "45972606dd10d3f7c1c31f27acdfbed7")
    files = corpus("3dspeaker_files.tar.gz", None)
    return {
        "musan": Archive("musan.tar.gz", musan, (), musan.md5, "."),
        "rirs": Archive("rirs_noises.zip", rirs, (), rirs.md5, "."),
        "train": Archive(
            "train.tar.gz", None, train_parts, "c2cea55fd22a2b867d295fb35a2d3340", "3dspeaker"
        ),
        "test": Archive("test.tar.gz", test, (), test.md5, "3dspeaker"),
        "files": Archive(
            "3dspeaker_files.tar.gz", files, (), None, "3dspeaker/files", flatten_to="train_wav.scp"
        ),
    }


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def check_md5(path: Path, expected: str | None) -> None:
    """Raise (and delete ``path``) if its md5 differs from ``expected``.

    A ``<file>.md5ok`` marker records a passed check with the file's size, inode and change
    time (which the kernel sets on every write and no one can set back), so reruns do not hash
    tens of gigabytes again, while a file written since is hashed again.
    """
    if expected is None:
        return
    marker = path.with_name(path.name + ".md5ok")
    if marker.is_file() and marker.read_text().strip() == _checked_line(path, expected):
        return
    actual = md5sum(path)
    if actual != expected:
        path.unlink()
        raise DataError(
            f"{path}: md5 {actual} differs from the published {expected}; the file "
            f"was deleted, run again to download it anew"
        )
    write_text_atomic(marker, _checked_line(path, expected) + "\n")


def _checked_line(path: Path, md5: str) -> str:
    stat = path.stat()
    return f"{md5} size={stat.st_size} inode={stat.st_ino} ctime_ns={stat.st_ctime_ns}"


def _open_from(url: str, offset: int, timeout: float):
    """``(stream, resumed, total_bytes)`` for ``url`` from byte ``offset`` (if the server can)."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        path = Path(urllib.request.url2pathname(parsed.path))
        if not path.is_file():
            raise DataError(f"{url}: no such file")
        stream = open(path, "rb")
        stream.seek(offset)
        return stream, True, path.stat().st_size
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:  # nothing after offset: the partial file is complete
            return None, True, offset
        raise DataError(f"{url}: HTTP error {err.code} {err.reason}") from None
    except (urllib.error.URLError, OSError) as err:
        raise DataError(f"{url}: cannot connect ({err})") from None
    resumed = response.status == 206
    length = response.headers.get("Content-Length")
    total = (offset if resumed else 0) + int(length) if length is not None else None
    return response, resumed, total


def download(remote: Remote, dest_dir: Path, timeout: float = 60.0) -> Path:
    """Download ``remote`` into ``dest_dir`` (resuming ``<name>.part``), verify, and return it.

    A finished file is only verified again, not downloaded.
    """
    dest = dest_dir / remote.name
    if dest.is_file():
        check_md5(dest, remote.md5)
        return dest
    dest_dir.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".part")
    offset = partial.stat().st_size if partial.is_file() else 0
    stream, resumed, total = _open_from(remote.url, offset, timeout)
    if not resumed:
        offset = 0  # the server ignored the range request: start again
    if stream is not None:
        with (
            stream,
            open(partial, "ab" if resumed else "wb") as out,
            tqdm(
                total=total,
                initial=offset,
                unit="B",
                unit_scale=True,
                desc=remote.name,
                disable=None,
            ) as progress,
        ):
            try:
                for block in iter(lambda: stream.read(CHUNK_BYTES), b""):
                    out.write(block)
                    progress.update(len(block))
            except (OSError, http.client.HTTPException) as err:
                raise DataError(
                    f"{remote.url}: download interrupted after "
                    f"{out.tell()} bytes ({err}); run again to resume"
                ) from None
    if total is not None and partial.stat().st_size != total:
        raise DataError(
            f"{remote.url}: got {partial.stat().st_size} of {total} bytes; run again to resume"
        )
    partial.replace(dest)
    check_md5(dest, remote.md5)
    return dest


def fetch(archive: Archive, download_dir: Path, keep_parts: bool = True) -> Path:
    """The archive file, downloaded (or joined from its downloaded parts) and verified."""
    dest = download_dir / archive.name
    if archive.remote is not None:
        return download(archive.remote, download_dir)
    if dest.is_file():
        check_md5(dest, archive.md5)
        return dest
    parts = [download(part, download_dir) for part in archive.parts]
    with atomic_write(dest, "wb") as out:
        for part in parts:
            with open(part, "rb") as f:
                shutil.copyfileobj(f, out, CHUNK_BYTES)
    check_md5(dest, archive.md5)
    if not keep_parts:
        for part in parts:
            part.unlink()
    return dest


def unpacked_marker(archive: Archive, raw_dir: Path) -> Path:
    """The file whose presence says that ``archive`` was fully unpacked into ``raw_dir``."""
    return raw_dir / f".{archive.name}.unpacked"


def unpack(archive: Archive, archive_path: Path, raw_dir: Path) -> Path:
    """Unpack into ``raw_dir / archive.unpack_to`` (an interrupted unpack is simply redone)."""
    target = raw_dir / archive.unpack_to
    target.mkdir(parents=True, exist_ok=True)
    extract_into = Path(tempfile.mkdtemp(dir=target)) if archive.flatten_to else target
    try:
        if archive.name.endswith(".zip"):
            with zipfile.ZipFile(archive_path) as zf:
                zf.extractall(extract_into)
        else:
            with tarfile.open(archive_path) as tf:
                tf.extractall(extract_into, filter="data")
        if archive.flatten_to:
            found = sorted(extract_into.rglob(archive.flatten_to))
            if not found:
                raise DataError(f"{archive_path}: has no {archive.flatten_to}")
            for item in found[0].parent.iterdir():
                shutil.move(str(item), target / item.name)
    except (tarfile.TarError, zipfile.BadZipFile, OSError) as err:
        raise DataError(f"{archive_path}: cannot unpack ({err}); delete it and run again") from None
    finally:
        if archive.flatten_to:
            shutil.rmtree(extract_into, ignore_errors=True)
    unpacked_marker(archive, raw_dir).touch()
    return target


def download_3dspeaker(
    download_dir: str | Path,
    raw_dir: str | Path,
    names: tuple[str, ...] = ("musan", "rirs", "train", "test", "files"),
    corpus_url: str = CORPUS_URL,
    openslr_url: str = OPENSLR_URL,
    keep_parts: bool = True,
    archives: dict[str, Archive] | None = None,
) -> dict[str, Path]:
    """Fetch and unpack the chosen archives (of :func:`manifest` unless ``archives`` is given);
    returns where each was unpacked."""
    archives = manifest(corpus_url, openslr_url) if archives is None else archives
    unknown = [n for n in names if n not in archives]
    if unknown:
        raise DataError(f"unknown archive(s) {unknown}; choose from {sorted(archives)}")
    download_dir, raw_dir = Path(download_dir), Path(raw_dir)
    done = {}
    for name in names:
        archive = archives[name]
        if unpacked_marker(archive, raw_dir).is_file():  # nothing to fetch: already unpacked
            done[name] = raw_dir / archive.unpack_to
        else:
            done[name] = unpack(archive, fetch(archive, download_dir, keep_parts), raw_dir)
    return done


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--download_dir",
        default="data/download",
        help="where archives are stored (default: data/download)",
    )
    parser.add_argument(
        "--raw_dir", default="data/raw", help="where archives are unpacked (default: data/raw)"
    )
    parser.add_argument(
        "--archives",
        nargs="+",
        default=["musan", "rirs", "train", "test", "files"],
        help="which archives: musan rirs train test files (default: all)",
    )
    parser.add_argument("--corpus_url", default=CORPUS_URL, help="base URL of the 3D-Speaker files")
    parser.add_argument(
        "--openslr_url",
        default=OPENSLR_URL,
        help="base URL of OpenSLR resources (a mirror may be faster)",
    )
    parser.add_argument(
        "--remove_parts",
        action="store_true",
        help="delete the train.tar.gz parts once joined and verified",
    )
    args = parser.parse_args(argv)
    try:
        done = download_3dspeaker(
            args.download_dir,
            args.raw_dir,
            tuple(args.archives),
            args.corpus_url,
            args.openslr_url,
            not args.remove_parts,
        )
    except SpeakerlabError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    for name, path in done.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
