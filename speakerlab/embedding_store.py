"""A folder of embeddings in Kaldi ark/scp, written safely and read with checks.

Layout: ``embedding.scp`` ("key <absolute path of the ark>:<offset>" per line) refers to one
*set*: ``embedding.<id>.ark`` (Kaldi binary float vectors) and ``embedding.<id>.jsonl``, its
record (a first line ``{"run": key}`` saying what made the set, then one JSON line per key: what
it was made from, and its ark entry or why it was skipped).

Commit: :func:`embedding_set` writes a new set under a fresh id (the ark is in place before its
record, so a record always refers to a complete ark), then replaces ``embedding.scp`` atomically,
then removes older sets. The scp is the one commit point: after a kill at any moment it refers to
a complete set (the old one or the new one), or it is absent.

Offsets are taken from the position of the file being written, and :func:`read_entry` checks that
each offset follows its own key. The ark's path is written as it is (spaces and any other
characters included; readers split a line at its first whitespace, as kaldiio does); only a line
break cannot be held. Keys never hold whitespace.

One writer at a time: :func:`output_lock` holds an exclusive lock on the folder (``.lock``); another
process waits up to a limit and then stops with a message naming the holder. Under torchrun rank 0
holds it and every rank learns of a refusal.
"""

from __future__ import annotations

import contextlib
import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
from kaldiio.matio import read_kaldi, write_array

from speakerlab.errors import ConfigError, DataError
from speakerlab.fileio import atomic_path, exclusive_lock, temporary_files, write_text_atomic

if TYPE_CHECKING:
    from speakerlab.distributed import DistContext

SCP_NAME = "embedding.scp"
LOCK_NAME = ".lock"
SET_PREFIX = "embedding."


class ArkWriter:
    """Writes embeddings to an ark handle and one JSON line per utterance to its record handle.

    Offsets are read from the ark handle itself; :meth:`flush` flushes the ark before the record
    lines are written, so a complete record line always refers to a complete ark entry.
    """

    def __init__(self, ark: IO[bytes], record: IO[str]) -> None:
        self._ark, self._record = ark, record
        self._pending: list[str] = []
        self.written: list[tuple[str, int]] = []  # (utt, offset) of every embedding, in order

    def add(self, key: str, vector: np.ndarray, **fields: Any) -> None:
        """Write ``key``'s embedding; ``fields`` (its path, digest) go into its record line."""
        if not key or any(c.isspace() for c in key):
            raise DataError(f"{key!r}: an embedding key must be non-empty without whitespace")
        self._ark.write(key.encode("utf-8") + b" ")
        start = self._ark.tell()
        write_array(self._ark, np.asarray(vector, dtype=np.float32))
        self.written.append((key, start))
        self._note(key, fields, start=start, end=self._ark.tell())

    def add_skipped(self, key: str, reason: str, **fields: Any) -> None:
        """Record that ``key`` was not embedded, and why."""
        self._note(key, fields, skipped=reason)

    def _note(self, key: str, fields: dict[str, Any], **where: Any) -> None:
        self._pending.append(_json_line({"utt": key, **fields, **where}))

    def flush(self) -> None:
        self._ark.flush()
        self._record.write("".join(self._pending))
        self._record.flush()
        self._pending.clear()


def _json_line(value: dict[str, Any]) -> str:
    return json.dumps(value, ensure_ascii=False) + "\n"


def write_record(path: Path, run_key: str | None, entries: list[dict[str, Any]]) -> None:
    """Replace the record ``path`` with a header of ``run_key`` and ``entries``."""
    lines = [{"run": run_key}, *entries]
    write_text_atomic(path, "".join(_json_line(line) for line in lines))


def read_record(path: Path) -> tuple[str | None, list[dict[str, Any]]]:
    """(run key, entries) of a record: its complete lines up to the first unreadable one (a
    torn or damaged record only loses what follows; a damaged header discards it all)."""
    lines = path.read_bytes().split(b"\n")[:-1]  # the piece after the last newline is unfinished
    decoded = []
    for line in lines:
        try:
            decoded.append(json.loads(line))
        except ValueError:  # also UnicodeDecodeError
            break
    if not decoded or not isinstance(decoded[0], dict) or "run" not in decoded[0]:
        return None, []
    return decoded[0]["run"], decoded[1:]


def read_entry(handle: IO[bytes], key: str, offset: int) -> np.ndarray:
    """The vector at ``offset`` of an open ark, checking that the entry there is ``key``'s."""
    token = key.encode("utf-8") + b" "
    handle.seek(offset - len(token))
    if handle.read(len(token)) != token:
        raise DataError(f"{handle.name}: the entry at offset {offset} does not belong to {key!r}")
    return np.asarray(read_kaldi(handle))


def _split_scp_line(line: str) -> tuple[str, Path, int]:
    key, location = line.split(maxsplit=1)  # the path may hold spaces
    ark, offset = location.rstrip("\r\n").rsplit(":", 1)
    return key, Path(ark), int(offset)


def read_embeddings(scp: str | Path) -> dict[str, np.ndarray]:
    """All embeddings of an scp, in file order; any characters in the ark paths but line breaks.
    Each offset is checked to follow its own key."""
    result: dict[str, np.ndarray] = {}
    with contextlib.ExitStack() as stack:
        handles: dict[Path, IO[bytes]] = {}
        for number, line in enumerate(Path(scp).read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                key, ark, offset = _split_scp_line(line)
            except ValueError:
                raise DataError(f"{scp}:{number}: expected 'key ark-path:offset'") from None
            if key in result:
                raise DataError(f"{scp}:{number}: {key!r} is listed twice")
            try:
                if ark not in handles:
                    handles[ark] = stack.enter_context(open(ark, "rb"))
                result[key] = read_entry(handles[ark], key, offset)
            except DataError:
                raise
            except Exception as err:  # a missing ark, or a torn or foreign entry
                raise DataError(
                    f"{scp}:{number}: cannot read the embedding of {key!r} from {ark} "
                    f"({type(err).__name__}: {err})"
                ) from None
    return result


@contextlib.contextmanager
def embedding_set(out_dir: Path, run_key: str | None) -> Iterator[ArkWriter]:
    """Write a new set of embeddings; when the block ends without an exception it becomes
    ``<out_dir>/embedding.scp`` (see "Commit" in the module docstring); otherwise nothing
    changes."""
    set_id = secrets.token_hex(6)
    ark_path = out_dir / f"{SET_PREFIX}{set_id}.ark"
    record_path = out_dir / f"{SET_PREFIX}{set_id}.jsonl"
    # Nested so that the ark is in place before its record: a record implies a complete ark.
    with atomic_path(record_path) as record_tmp, atomic_path(ark_path) as ark_tmp:
        with open(ark_tmp, "wb") as ark, open(record_tmp, "w", encoding="utf-8") as record:
            record.write(_json_line({"run": run_key}))
            writer = ArkWriter(ark, record)
            yield writer
            writer.flush()
    location = str(ark_path.resolve())
    lines = "".join(f"{utt} {location}:{offset}\n" for utt, offset in writer.written)
    write_text_atomic(out_dir / SCP_NAME, lines)
    remove_other_sets(out_dir, keep=set_id)


def committed_set(out_dir: Path) -> str | None:
    """The id of the set that ``embedding.scp`` refers to, if it is one of this folder's."""
    scp = out_dir / SCP_NAME
    if not scp.is_file():
        return None
    with open(scp, encoding="utf-8") as handle:
        first = handle.readline()
    try:
        _, ark, _ = _split_scp_line(first)
    except ValueError:
        return None
    if ark.parent != out_dir.resolve() or not ark.name.startswith(SET_PREFIX):
        return None  # an older layout, or a folder that was moved: written anew
    return ark.name.removeprefix(SET_PREFIX).removesuffix(".ark")


def remove_other_sets(out_dir: Path, keep: str | None) -> None:
    """Remove every set but ``keep`` (records first: a record must never outlive its ark), an
    ``embedding.ark`` of the older layout, and temporary files left by killed writers. Only
    under the folder's lock."""
    kept = {f"{SET_PREFIX}{keep}.jsonl", f"{SET_PREFIX}{keep}.ark"}
    for pattern in ("embedding.*.jsonl", "embedding.*.ark", "embedding.ark"):
        for path in out_dir.glob(pattern):
            if path.name not in kept:
                path.unlink()
    for path in temporary_files(out_dir):
        path.unlink(missing_ok=True)


_HELD: set[Path] = set()


@contextlib.contextmanager
def output_lock(
    out_dir: str | Path, ranks: DistContext | None = None, wait_seconds: float = 0.0
) -> Iterator[None]:
    """Hold ``out_dir`` for this run (see the module docstring); taken again in the same
    process it is a no-op, so a caller may hold it around :func:`extract_embeddings`."""
    # Imported here: reading embeddings (speakerlab score) must not pay for importing torch.
    from speakerlab.distributed import run_on_every_rank, single_process

    ranks = ranks or single_process()
    folder = Path(out_dir).resolve()
    if "\n" in str(folder) or "\r" in str(folder):
        raise ConfigError(f"{str(folder)!r}: an scp file cannot name a path with a line break")
    if folder in _HELD:
        yield
        return
    with contextlib.ExitStack() as stack:

        def take() -> None:
            if ranks.is_main:
                lock = exclusive_lock(
                    folder / LOCK_NAME, what=f"output folder {folder}", wait_seconds=wait_seconds
                )
                stack.enter_context(lock)

        run_on_every_rank(ranks, take)
        _HELD.add(folder)
        try:
            yield
        finally:
            _HELD.discard(folder)
