"""The training index: the usable training utterances, each one row per ``segment_seconds``.

Built from the audio headers only (no samples are read), in parallel processes, streaming: the
lists are read twice (checked first, then indexed) and rows are written as the headers come in,
so memory holds the utterance-to-speaker table and a few chunks of paths, never the corpus.
Files that cannot be used (unreadable, truncated, empty, not 16 kHz, not mono) are reported by
name, listed in ``<index>.bad`` and left out; if more than ``max_bad_fraction`` of the files are
bad the build stops without touching the index or its ``.bad`` list, since that points at a
broken corpus rather than a few damaged files.

The index is rebuilt exactly when what it was built from changed: its first line records the
SHA-256 of ``wav.scp`` and ``utt2spk`` and the build parameters, and a build whose line would
differ rebuilds (saying why) while an equal one reuses the file. The audio files are not part
of that record (reading every one would cost as much as the build): after replacing audio under
the same paths, delete the index. Two processes building the same index take turns (a lock), and
the second then reuses the first one's result.

File format (tab separated; the header line, then one line per usable utterance, in the order of
``wav.scp``)::

    # speakerlab-train-index v2 segment_seconds=4.0 max_bad_fraction=0.1 wav.scp=<sha256> ...
    utt <TAB> path <TAB> num_samples <TAB> speaker

An utterance of ``n`` samples makes ``max(1, int(n / (segment_seconds * 16000)))`` consecutive
rows. In memory (:class:`TrainIndex`) strings are packed in byte buffers and speakers are
integers, so that DataLoader workers forked from the training process share the index instead
of copying it (reading an item of a Python list of strings writes the string's reference count,
which copies its memory page into the reading worker).
"""

from __future__ import annotations

import logging
import multiprocessing
import sys
from array import array
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from itertools import islice
from pathlib import Path

import numpy as np
from tqdm import tqdm

from speakerlab.audio import SAMPLE_RATE, complete_audio_info
from speakerlab.data.kaldi_dir import iter_table
from speakerlab.errors import AudioError, DataError
from speakerlab.fileio import atomic_path, exclusive_lock, file_digest, write_text_atomic

logger = logging.getLogger(__name__)

INDEX_MAGIC = "# speakerlab-train-index v2"
LOCK_WAIT_SECONDS = 3600.0  # how long a second build waits for the one in progress
_CHUNK = 256  # files per header-scan task
_MAX_REPORTED = 20  # bad files printed one by one (all are listed in the .bad file)


# ------------------------------------------------------------------------------ in memory


class PackedStrings(Sequence[str]):
    """Strings stored as one UTF-8 byte buffer and the end offset of each.

    Reading a string builds a new ``str`` and writes nothing that is shared, so the buffer's
    memory pages stay shared between a process and the workers forked from it.
    """

    def __init__(self, data: bytes, ends: np.ndarray) -> None:
        self.data = data
        self.ends = ends

    @classmethod
    def from_strings(cls, strings: Iterable[str]) -> PackedStrings:
        builder = StringsBuilder()
        for string in strings:
            builder.append(string.encode("utf-8"))
        return builder.build()

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, i: int) -> str:  # type: ignore[override]  # no slices
        n = len(self.ends)
        if not -n <= i < n:
            raise IndexError(f"string {i} of {n}")
        i %= n
        start = int(self.ends[i - 1]) if i else 0
        return self.data[start : int(self.ends[i])].decode("utf-8")


class StringsBuilder:
    """Appends encoded strings to a growing buffer; :meth:`build` packs them."""

    def __init__(self) -> None:
        self._data = bytearray()
        self._ends = array("q")

    def append(self, encoded: bytes) -> None:
        self._data += encoded
        self._ends.append(len(self._data))

    def build(self) -> PackedStrings:
        return PackedStrings(bytes(self._data), np.frombuffer(self._ends, dtype=np.int64))


class RowStrings(Sequence[str]):
    """The string of each row's utterance: ``view[row] = strings[row_utt[row]]``."""

    def __init__(self, strings: PackedStrings, row_utt: np.ndarray) -> None:
        self.strings = strings
        self.row_utt = row_utt

    def __len__(self) -> int:
        return len(self.row_utt)

    def __getitem__(self, row: int) -> str:  # type: ignore[override]  # no slices
        return self.strings[int(self.row_utt[row])]


class TrainIndex:
    """The usable utterances (ids, paths, sample counts, speakers) and the rows made of them.

    Utterance ``u`` is ``utt_ids[u]`` at ``utt_paths[u]`` with ``utt_samples[u]`` samples, spoken
    by ``speakers[utt_speakers[u]]`` (speakers sorted: the label of a speaker is its position);
    row ``r`` is a segment of utterance ``row_utt[r]``. Per row, :attr:`utts`, :attr:`paths`,
    :attr:`num_samples` and :attr:`speaker_ids` give the same as lists would. The per-row arrays
    are made here, before DataLoader workers are forked, so that the workers share them.
    """

    def __init__(
        self,
        utt_ids: PackedStrings,
        utt_paths: PackedStrings,
        utt_samples: np.ndarray,
        utt_speakers: np.ndarray,
        speakers: list[str],
        row_utt: np.ndarray,
    ) -> None:
        self.utt_ids, self.utt_paths = utt_ids, utt_paths
        self.utt_samples, self.utt_speakers = utt_samples, utt_speakers
        self.speakers, self.row_utt = speakers, row_utt
        self.utts = RowStrings(utt_ids, row_utt)
        self.paths = RowStrings(utt_paths, row_utt)
        self.num_samples: np.ndarray = utt_samples[row_utt]  # int64
        self.speaker_ids: np.ndarray = utt_speakers[row_utt]  # int64, position in ``speakers``

    def __len__(self) -> int:
        return len(self.row_utt)

    @property
    def num_speakers(self) -> int:
        return len(self.speakers)

    @property
    def num_utterances(self) -> int:
        return len(self.utt_ids)


def rows_per_utterance(num_samples: np.ndarray | int, segment_seconds: float) -> np.ndarray:
    """``max(1, int(n / segment_samples))`` for each utterance of ``n`` samples."""
    segments = (np.asarray(num_samples) / (segment_seconds * SAMPLE_RATE)).astype(np.int64)
    return np.maximum(1, segments)


# ------------------------------------------------------------------------------ header line


def index_header(data_dir: Path, segment_seconds: float, max_bad_fraction: float) -> str:
    """The first line of the index built from ``data_dir`` with these parameters."""
    fields = {
        "segment_seconds": float(segment_seconds),
        "max_bad_fraction": float(max_bad_fraction),
        "wav.scp": list_digest(data_dir / "wav.scp"),
        "utt2spk": list_digest(data_dir / "utt2spk"),
    }
    return " ".join([INDEX_MAGIC, *(f"{key}={value}" for key, value in fields.items())])


def list_digest(path: Path) -> str:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    return file_digest(path)


def header_fields(line: str) -> dict[str, str]:
    """``key -> value`` of an index header line (empty if it is not a current-format header)."""
    if not line.startswith(INDEX_MAGIC + " "):
        return {}
    return dict(field.split("=", 1) for field in line[len(INDEX_MAGIC) :].split() if "=" in field)


def read_header(path: Path) -> str:
    with open(path, "rb") as f:
        return f.readline().decode("utf-8", errors="replace").rstrip("\n")


def stale_reason(out_path: Path, header: str) -> str | None:
    """Why the index at ``out_path`` cannot be reused for ``header`` (None: it can)."""
    if not out_path.is_file():
        return "no index yet"
    old_header = read_header(out_path)
    if old_header == header:
        return None
    old, new = header_fields(old_header), header_fields(header)
    if not old:
        return "it is not an index of this speakerlab version"
    changed = [
        f"{key} changed" if key in ("wav.scp", "utt2spk") else f"{key} {old.get(key)} -> {value}"
        for key, value in new.items()
        if old.get(key) != value
    ]
    return ", ".join(changed) or "its header differs"


# ------------------------------------------------------------------------------ building


def check_audio_header(path: str) -> tuple[int, str | None]:
    """``(num_samples, None)`` for a usable training file, ``(0, reason)`` otherwise (a file cut
    short of what its header promises is unusable: libsndfile would read it short silently)."""
    try:
        info = complete_audio_info(path)
    except AudioError as err:
        return 0, str(err).removeprefix(f"{path}: ")
    if info.frames <= 0:
        return 0, "audio is empty"
    if info.samplerate != SAMPLE_RATE:
        return 0, f"sample rate is {info.samplerate} Hz, expected {SAMPLE_RATE} Hz"
    if info.channels != 1:
        return 0, f"has {info.channels} channels, expected mono"
    return int(info.frames), None


def _check_all(paths: list[str]) -> list[tuple[int, str | None]]:
    return [check_audio_header(path) for path in paths]


def scan_audio_headers(
    entries: Iterable[tuple[str, str]], num_workers: int = 8
) -> Iterator[tuple[str, str, int, str | None]]:
    """``(key, path, num_samples, reason)`` of each ``(key, path)`` entry, in order (see
    :func:`check_audio_header`), from ``num_workers`` processes, which overlap file-system
    latency and use every core. Only a few chunks of entries are in flight at a time, so memory
    does not grow with the number of files."""
    entries = iter(entries)
    chunks = iter(lambda: list(islice(entries, _CHUNK)), [])
    if num_workers <= 1:
        for chunk in chunks:
            yield from _joined(chunk, _check_all([path for _, path in chunk]))
        return
    fork = multiprocessing.get_context("fork")  # the workers need nothing imported again
    with ProcessPoolExecutor(num_workers, mp_context=fork) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append((chunk, pool.submit(_check_all, [path for _, path in chunk])))
            if len(pending) >= 4 * num_workers:
                chunk, future = pending.popleft()
                yield from _joined(chunk, future.result())
        for chunk, future in pending:
            yield from _joined(chunk, future.result())


def _joined(
    chunk: list[tuple[str, str]], headers: list[tuple[int, str | None]]
) -> Iterator[tuple[str, str, int, str | None]]:
    for (key, path), (num_samples, reason) in zip(chunk, headers):
        yield key, path, num_samples, reason


def read_labels(data_dir: Path) -> tuple[dict[str, str], int]:
    """``utt -> speaker`` of ``utt2spk``, after checking ``wav.scp`` against it (duplicates,
    unlabelled utterances, tabs); also returns the number of ``wav.scp`` entries."""
    wav_scp, utt2spk_path = data_dir / "wav.scp", data_dir / "utt2spk"
    names: dict[str, str] = {}  # one str object per speaker
    utt2spk: dict[str, str] = {}
    for lineno, utt, spk in iter_table(utt2spk_path):
        if utt in utt2spk:
            raise DataError(f"{utt2spk_path}:{lineno}: duplicate key {utt!r}")
        if "\t" in spk:
            raise DataError(f"{utt2spk_path}:{lineno}: speaker {spk!r} contains a tab")
        utt2spk[utt] = names.setdefault(spk, spk)
    unseen = dict.fromkeys(utt2spk)  # shares utt2spk's id strings; emptied as wav.scp is read
    unlabelled: list[str] = []  # the first few, for the message
    num_entries = num_unlabelled = 0
    for lineno, utt, path in iter_table(wav_scp):
        if "\t" in path:
            raise DataError(f"{wav_scp}:{lineno}: audio path {path!r} contains a tab")
        num_entries += 1
        if utt in unseen:
            del unseen[utt]
        elif utt in utt2spk:
            raise DataError(f"{wav_scp}:{lineno}: duplicate key {utt!r}")
        else:  # a repeated unlabelled id is reported as unlabelled
            num_unlabelled += 1
            if len(unlabelled) < 5:
                unlabelled.append(utt)
    if num_unlabelled:
        raise DataError(
            f"{utt2spk_path}: no speaker for {num_unlabelled} utterances of {wav_scp}, "
            f"e.g. {', '.join(unlabelled)}"
        )
    if not num_entries:
        raise DataError(f"{wav_scp}: no utterances")
    return utt2spk, num_entries


def report_bad(bad: list[tuple[str, str, str]], bad_path: Path) -> None:
    """Name the first bad files on stderr and say where all of them are listed."""
    for utt, path, reason in bad[:_MAX_REPORTED]:
        print(f"skipping {utt}: {path}: {reason}", file=sys.stderr)
    if len(bad) > _MAX_REPORTED:
        print(f"... and {len(bad) - _MAX_REPORTED} more, all listed in {bad_path}", file=sys.stderr)


def too_many_bad_error(
    bad: list[tuple[str, str, str]], total: int, wav_scp: Path, max_bad_fraction: float
) -> DataError:
    kinds = Counter(reason.split(" (", 1)[0] for _, _, reason in bad).most_common(3)
    utt, path, _ = bad[0]
    return DataError(
        f"{len(bad)} of {total} audio files of {wav_scp} are unusable "
        f"({100 * len(bad) / total:.1f}% > {100 * max_bad_fraction:g}% allowed); most common: "
        + "; ".join(f"{count} x {kind}" for kind, count in kinds)
        + f"; first: {utt} ({path}); the index was not written"
    )


def build_train_index(
    data_dir: str | Path,
    out_path: str | Path,
    segment_seconds: float = 4.0,
    max_bad_fraction: float = 0.1,
    num_workers: int = 8,
    lock_wait_seconds: float = LOCK_WAIT_SECONDS,
) -> Path:
    """Write the index of the Kaldi directory ``data_dir`` (``wav.scp`` + ``utt2spk``), or reuse
    the one at ``out_path`` if it was built from the same lists with the same parameters.

    Each usable utterance gets ``max(1, int(duration / segment_seconds))`` rows.
    """
    data_dir, out_path = Path(data_dir), Path(out_path)
    if not segment_seconds > 0:
        raise DataError(f"segment_seconds must be positive, got {segment_seconds}")
    if not 0 <= max_bad_fraction <= 1:
        raise DataError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
    header = index_header(data_dir, segment_seconds, max_bad_fraction)
    lock = out_path.with_name(out_path.name + ".lock")
    with exclusive_lock(lock, what=f"training index {out_path}", wait_seconds=lock_wait_seconds):
        reason = stale_reason(out_path, header)
        if reason is None:
            logger.info(
                "reusing up-to-date training index %s (same lists, same parameters)", out_path
            )
            return out_path
        logger.info("building training index %s: %s", out_path, reason)
        utt2spk, total = read_labels(data_dir)
        _write_index(data_dir, out_path, header, utt2spk, total, num_workers)
    return out_path


def _write_index(
    data_dir: Path,
    out_path: Path,
    header: str,
    utt2spk: dict[str, str],
    total: int,
    num_workers: int,
) -> None:
    """Stream the rows into a temporary file; put it (and the ``.bad`` list) in place only if
    few enough files are bad and the lists did not change meanwhile."""
    fields = header_fields(header)
    segment_seconds, max_bad_fraction = (
        float(fields["segment_seconds"]),
        float(fields["max_bad_fraction"]),
    )
    wav_scp = data_dir / "wav.scp"
    bad_path = out_path.with_name(out_path.name + ".bad")
    bad: list[tuple[str, str, str]] = []
    rows = 0
    entries = ((utt, path) for _, utt, path in iter_table(wav_scp))
    headers = scan_audio_headers(entries, num_workers)
    with atomic_path(out_path) as tmp:
        with open(tmp, "w", encoding="utf-8") as out:
            out.write(header + "\n")
            for utt, path, num_samples, reason in tqdm(
                headers,
                total=total,
                desc="reading audio headers",
                unit="file",
                disable=total < 10000,
            ):
                if reason is None:
                    out.write(f"{utt}\t{path}\t{num_samples}\t{utt2spk[utt]}\n")
                    rows += int(rows_per_utterance(num_samples, segment_seconds))
                else:
                    bad.append((utt, path, reason))
        if len(bad) > max_bad_fraction * total:
            raise too_many_bad_error(bad, total, wav_scp, max_bad_fraction)
        if index_header(data_dir, segment_seconds, max_bad_fraction) != header:
            raise DataError(
                f"{wav_scp} or {data_dir / 'utt2spk'} changed while indexing; run again"
            )
        if bad:
            report_bad(bad, bad_path)
            write_text_atomic(bad_path, "".join(f"{u}\t{p}: {r}\n" for u, p, r in bad))
        else:
            bad_path.unlink(missing_ok=True)
    logger.info(
        "training index %s: %d rows from %d files (%d skipped)",
        out_path,
        rows,
        total - len(bad),
        len(bad),
    )


# ------------------------------------------------------------------------------ loading


def load_train_index(path: str | Path) -> TrainIndex:
    """Read an index written by :func:`build_train_index`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: training index not found (build it with `speakerlab make-index`)")
    header = header_fields(read_header(path))
    if "segment_seconds" not in header:
        raise DataError(
            f"{path}:1: not a training index of this speakerlab version (no '{INDEX_MAGIC}' "
            "line); build it again with `speakerlab make-index`"
        )
    utt_ids, utt_paths = StringsBuilder(), StringsBuilder()
    samples, speaker_of = array("q"), array("q")
    speaker_numbers: dict[bytes, int] = {}
    with open(path, "rb") as f:
        f.readline()
        for lineno, line in enumerate(f, 2):
            fields = line.rstrip(b"\n").split(b"\t")
            if len(fields) != 4 or not fields[2].isdigit():
                raise DataError(
                    f"{path}:{lineno}: expected 'utt<TAB>path<TAB>num_samples<TAB>speaker', "
                    f"got {line.decode('utf-8', errors='replace').rstrip()!r}"
                )
            utt_ids.append(fields[0])
            utt_paths.append(fields[1])
            samples.append(int(fields[2]))
            speaker_of.append(speaker_numbers.setdefault(fields[3], len(speaker_numbers)))
    if not samples:
        raise DataError(f"{path}: the training index has no rows")
    names = sorted(speaker_numbers)  # byte order of UTF-8 is code-point order, as str sorts
    label = np.empty(len(names), dtype=np.int64)
    label[[speaker_numbers[name] for name in names]] = np.arange(len(names))
    utt_samples = np.frombuffer(samples, dtype=np.int64)
    counts = rows_per_utterance(utt_samples, float(header["segment_seconds"]))
    return TrainIndex(
        utt_ids=utt_ids.build(),
        utt_paths=utt_paths.build(),
        utt_samples=utt_samples,
        utt_speakers=label[np.frombuffer(speaker_of, dtype=np.int64)],
        speakers=[name.decode("utf-8") for name in names],
        row_utt=np.repeat(np.arange(len(utt_samples)), counts),
    )
