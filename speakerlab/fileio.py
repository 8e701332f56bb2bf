"""Output files that are never seen half-written, locks on outputs, and content digests.

Atomic writes: :func:`atomic_write` writes to a uniquely named temporary file next to the target,
flushes it to disk, renames it over the target and flushes the directory, so that after a kill
or a crash at any moment the target holds either its old content or the new one, never a torn
file. Every output of speakerlab goes through it (or through :func:`atomic_path` for libraries that
write to a path themselves).

Locks: :func:`exclusive_lock` takes an advisory lock (``flock``) on a lock file, so that two
processes never write the same outputs at the same time; the second one waits up to a limit and
then stops with a message naming the holder.

Digests: skipping work on a rerun is decided from content (:func:`file_digest`,
:func:`tensors_digest`, :func:`json_digest`), never from paths or timestamps.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from speakerlab.errors import ConfigError

if TYPE_CHECKING:  # torch is imported where tensors are hashed: scoring never needs it
    import torch

_CHUNK = 1 << 20


def fsync_directory(directory: str | Path) -> None:
    """Make renames inside ``directory`` durable (POSIX); a no-op where it cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temporary_files(directory: str | Path) -> list[Path]:
    """Temporary files of :func:`atomic_path` in ``directory``: those of writes in progress, or
    left by a killed process (remove them only where no other process writes)."""
    return sorted(Path(directory).glob(".*.tmp"))


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path to write ``path``'s new content to; renamed over ``path`` when the block
    ends without an exception (after an fsync), removed when it raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_directory(path.parent)


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w", encoding: str = "utf-8") -> Iterator[IO[Any]]:
    """Open a temporary file for writing (``mode`` "w" or "wb") that replaces ``path`` atomically
    when the block ends without an exception."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write writes whole files: mode 'w' or 'wb', not {mode!r}")
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as handle:
            yield handle
            handle.flush()


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Replace ``path`` with ``text`` (UTF-8) atomically."""
    with atomic_write(path) as handle:
        handle.write(text)
    return Path(path)


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Replace ``path`` with ``data`` atomically."""
    with atomic_write(path, "wb") as handle:
        handle.write(data)
    return Path(path)


def write_json_atomic(path: str | Path, value: Any) -> Path:
    """Replace ``path`` with ``value`` as indented JSON atomically."""
    return write_text_atomic(path, json.dumps(value, indent=1) + "\n")


# --------------------------------------------------------------------------- locks


class LockedError(ConfigError):
    """Another process holds the lock on an output."""


@contextlib.contextmanager
def exclusive_lock(
    lock_file: str | Path, *, what: str, wait_seconds: float = 0.0, poll_seconds: float = 0.5
) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_file`` (created if needed) for the block.

    If another process holds it, wait up to ``wait_seconds`` (0: do not wait), then raise
    :class:`LockedError` saying that ``what`` is in use and by which process. The lock goes with
    the process: a killed holder releases it at once.
    """
    lock_file = Path(lock_file)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    handle = open(lock_file, "a+", encoding="utf-8")
    try:
        deadline = time.monotonic() + wait_seconds
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    handle.seek(0)
                    holder = handle.read().strip() or "another process"
                    raise LockedError(
                        f"{what} is in use by {holder} (lock {lock_file}); wait for it to "
                        "finish or use another output folder"
                    ) from None
                time.sleep(poll_seconds)
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} on {socket.gethostname()} since {time.ctime()}\n")
        handle.flush()
        yield
    finally:
        handle.close()  # releases the lock


# --------------------------------------------------------------------------- digests


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and values of a state dict (hex): equal for equal
    weights whichever file or container they came in."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def json_digest(value: Any) -> str:
    """SHA-256 of a JSON-serialisable value in canonical form (sorted keys)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()
