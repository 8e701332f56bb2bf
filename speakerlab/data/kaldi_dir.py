"""Kaldi-style tables: ``wav.scp`` (utt path), ``utt2spk`` (utt spk), ``spk2utt`` (spk utt...).

Reading checks every line and names the file and line number of the first bad one, so a broken
data directory fails at once instead of deep inside training or extraction.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from speakerlab.errors import DataError
from speakerlab.fileio import atomic_write


def iter_table(path: str | Path, num_fields: int = 2) -> Iterator[tuple[int, str, str]]:
    """``(line number, key, value)`` of each non-empty ``key value`` line, read as a stream.

    With ``num_fields=2`` the value is the rest of the line after the first whitespace (paths
    may contain spaces). A short line or a line that is not UTF-8 is an error naming the line;
    repeated keys are not checked here (see :func:`read_table`).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as err:
                raise DataError(
                    f"{path}:{lineno}: not UTF-8 text (byte {raw[err.start]:#04x} at column "
                    f"{err.start + 1}); save the list as UTF-8"
                ) from None
            if not line:
                continue
            fields = line.split(maxsplit=1 if num_fields == 2 else -1)
            if len(fields) != num_fields:
                raise DataError(
                    f"{path}:{lineno}: expected {num_fields} fields, got {len(fields)}: {line!r}"
                )
            yield lineno, fields[0], fields[1] if num_fields == 2 else " ".join(fields[1:])


def read_table(path: str | Path, num_fields: int = 2) -> dict[str, str]:
    """Read ``key value`` lines (see :func:`iter_table`) into an ordered dict; a repeated key is
    an error naming its line."""
    table: dict[str, str] = {}
    for lineno, key, value in iter_table(path, num_fields):
        if key in table:
            raise DataError(f"{path}:{lineno}: duplicate key {key!r}")
        table[key] = value
    return table


def read_wav_scp(path: str | Path) -> dict[str, str]:
    """``utt -> audio path``; relative paths are resolved against the current directory."""
    return read_table(path)


def read_utt2spk(path: str | Path) -> dict[str, str]:
    """``utt -> speaker``."""
    return read_table(path)


def spk2utt_from_utt2spk(utt2spk: Mapping[str, str]) -> dict[str, list[str]]:
    """Group utterances by speaker, speakers and utterances in sorted order."""
    groups: dict[str, list[str]] = defaultdict(list)
    for utt, spk in utt2spk.items():
        groups[spk].append(utt)
    return {spk: sorted(groups[spk]) for spk in sorted(groups)}


def write_table(path: str | Path, rows: Iterable[tuple[str, ...]]) -> None:
    """Write whitespace-separated rows atomically (a temp file renamed into place)."""
    with atomic_write(path) as f:
        for row in rows:
            f.write(" ".join(row) + "\n")
