"""Embedding extraction of a ``wav.scp`` into Kaldi ark/scp: sharded, resumable, one run at a time.

Batching rule: a batch only holds utterances with exactly the same number of fbank frames, so
nothing is padded or cropped and every embedding equals the one computed for the utterance alone.
Utterances are sorted by (frames, id) and each run of equal frame counts is cut into batches of at
most ``batch_size`` utterances and ``max_batch_frames`` frames. A recording longer than the window
(``window_seconds``) is embedded in windows (see :mod:`speakerlab.embedder`), in a batch of its own.

Output folder::

    embedding.scp          "utt <absolute path of the ark>:<offset>" in wav.scp order
    embedding.<id>.ark     the embeddings (Kaldi binary float vectors)
    embedding.<id>.jsonl   the record of the set: the run key, then per utterance its audio file,
                           the SHA-256 of the file's bytes, and its ark entry or why it was skipped
    skipped.txt            utterances that could not be embedded and why (only when there are some)
    parts/                 work in progress, one ark and record per rank; removed when merged
    .lock                  taken by the run that writes the folder

One run at a time: a run holds an exclusive lock on the folder; another waits up to
``lock_wait_seconds`` (default 0) and then stops with a message naming the holder. Under torchrun
rank 0 holds it and every rank learns of a refusal.

Resume, keyed on content: the run key is a digest of the embedder's identity (its weights, or the
bytes of its ONNX file) and the window length; an utterance counts as done only when a record of
the same run key holds it with the same path and the same audio digest. Anything else is discarded
or embedded again, with one log line saying how many and why. Parts are written batch by batch, the
ark before its record lines, so a complete record line always points at a complete embedding; a
killed run goes on where it stopped.

Commit: the set of a finished run is written under a fresh id (the ark, then its record), then
``embedding.scp`` is replaced atomically, then older sets and the parts are removed. The scp is the
one commit point: after a kill at any moment it refers to a complete set, or it is absent while a
run that changes the set is in progress. Offsets come from the position of the file written to, and
reading checks that each offset follows its own key.

Skips: an utterance found unusable while it is embedded (audio that cannot be read or holds NaN or
infinite samples, a file changed since the list was read, an embedding that is not finite) is left
out by name, never written with a bad value; the skips are logged at the end and listed in
``skipped.txt``. Problems visible in the headers (missing files, unreadable headers, other sample
rates, too-short audio) stop the run before any work, all listed at once.

Paths: scp lines hold the ark's absolute path as it is, spaces and any other characters included
(readers split a line at its first whitespace, as kaldiio does); only a line break cannot be held.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

import numpy as np
import torch
from kaldiio.matio import read_kaldi, write_array
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from speakerlab.audio import SAMPLE_RATE, audio_info
from speakerlab.data.kaldi_dir import read_wav_scp
from speakerlab.distributed import (
    DistContext,
    EveryRankError,
    all_gather,
    barrier,
    run_on_every_rank,
    single_process,
)
from speakerlab.embedder import (
    DEFAULT_MAX_BATCH_FRAMES,
    DEFAULT_WINDOW_SECONDS,
    Embedder,
    check_window,
    embed_windowed,
    load_embedder,
    nonfinite_rows,
    window_frames_for,
    window_shape,
    windowed_fbank,
)
from speakerlab.errors import AudioError, ConfigError, DataError
from speakerlab.features import num_frames
from speakerlab.fileio import (
    atomic_path,
    exclusive_lock,
    file_digest,
    json_digest,
    temporary_files,
    write_text_atomic,
)
from speakerlab.inference import SpeakerVerifier, prepare_waveform, require_file

SCP_NAME = "embedding.scp"
SKIPPED_NAME = "skipped.txt"
PARTS_DIR = "parts"
LOCK_NAME = ".lock"
ONNX_NAME = "model.onnx"
_SET_PREFIX = "embedding."
_MAX_LISTED = 10
_SCAN_THREADS = 4  # reading headers and hashing files waits on the disk more than on the CPU

log = logging.getLogger(__name__)
T = TypeVar("T")


# --------------------------------------------------------------------------- utterances


@dataclass(frozen=True)
class Utterance:
    """One ``wav.scp`` entry: its audio file's length (from the header) and content digest, and
    how it is embedded (``windows`` windows of ``frames`` fbank frames; 1 for a whole one)."""

    utt: str
    path: str
    num_samples: int
    digest: str
    windows: int
    frames: int

    @property
    def source(self) -> dict[str, str]:
        """What its record line says it was made from."""
        return {"path": self.path, "digest": self.digest}

    def same_input(self, entry: dict[str, Any]) -> bool:
        """Whether a record entry was made from this very file content at this path."""
        return entry.get("path") == self.path and entry.get("digest") == self.digest


def _scan_one(utt: str, path: str, min_frames: int, window_frames: int) -> Utterance | str:
    """The utterance, or the one-line problem that makes it unusable."""
    try:
        require_file(path)
        info = audio_info(path)
        digest = file_digest(path)
    except AudioError as err:
        return f"{utt}: {err}"
    except OSError as err:
        return f"{utt}: {path}: cannot read the file ({err.strerror})"
    frames = num_frames(info.frames)
    if info.samplerate != SAMPLE_RATE:
        return f"{utt}: {path}: sample rate is {info.samplerate} Hz, expected {SAMPLE_RATE} Hz"
    if info.frames == 0:
        return f"{utt}: {path}: audio is empty"
    if frames < min_frames:
        return (
            f"{utt}: {path}: {info.frames / SAMPLE_RATE:.3f} s gives {frames} frames, "
            f"the model needs at least {min_frames}"
        )
    windows, window_length = window_shape(info.frames, window_frames)
    return Utterance(utt, path, info.frames, digest, windows, window_length)


def scan_wav_scp(
    wav_scp: str | Path,
    min_frames: int = 1,
    window_frames: int = 10**9,
    ranks: DistContext | None = None,
) -> list[Utterance]:
    """Read ``wav.scp``, every file's header and the digest of every file's bytes (shared out over
    the ranks); fail before any work if some file is missing, unreadable, not 16 kHz or shorter
    than ``min_frames`` frames, listing all such files. Every rank gets the same list."""
    ranks = ranks or single_process()
    table = run_on_every_rank(ranks, lambda: read_wav_scp(wav_scp))
    if not table:
        _fail_alike(ranks, DataError(f"{wav_scp}: no utterances"))
    entries = list(table.items())
    mine = entries[ranks.rank :: ranks.world_size]
    with ThreadPoolExecutor(_SCAN_THREADS) as pool:
        scanned = list(pool.map(lambda e: _scan_one(*e, min_frames, window_frames), mine))
    results: list[Utterance | str] = [""] * len(entries)
    for rank, share in enumerate(all_gather(ranks, scanned)):
        results[rank :: ranks.world_size] = share
    problems = [r for r in results if isinstance(r, str)]
    if problems:
        _fail_alike(
            ranks,
            AudioError(
                f"{wav_scp}: {len(problems)} unusable recording(s):\n  " + _listing(problems)
            ),
        )
    return results  # type: ignore[return-value]


def _listing(lines: Sequence[str]) -> str:
    more = f"\n  ... and {len(lines) - _MAX_LISTED} more" if len(lines) > _MAX_LISTED else ""
    return "\n  ".join(lines[:_MAX_LISTED]) + more


def _fail_alike(ranks: DistContext, error: Exception) -> None:
    """Raise ``error`` that every rank meets alike (printed once per node under torchrun)."""
    if ranks.distributed:
        raise EveryRankError(str(error)) from None
    raise error


def make_batches(
    utterances: Sequence[Utterance], batch_size: int, max_batch_frames: int
) -> list[list[Utterance]]:
    """Batches of whole utterances with identical frame counts; an utterance embedded in windows
    makes a batch of its own (see the module docstring)."""
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    if max_batch_frames < 1:
        raise ConfigError(f"the batch frame limit must be at least 1, got {max_batch_frames}")
    ordered = sorted(utterances, key=lambda u: (u.frames, u.windows, u.utt))
    batches: list[list[Utterance]] = []
    for utt in ordered:
        current = batches[-1] if batches else None
        fits = (
            current is not None
            and utt.windows == 1
            and current[0].windows == 1
            and current[0].frames == utt.frames
            and len(current) < batch_size
            and (len(current) + 1) * utt.frames <= max_batch_frames
        )
        if fits:
            current.append(utt)
        else:
            batches.append([utt])
    return batches


class BatchFeatures(Dataset):
    """Dataset of whole batches: item ``i`` is ([(utt, window fbank)], [(utt, why skipped)])."""

    def __init__(
        self, batches: Sequence[Sequence[Utterance]], feat_dim: int, window_frames: int
    ) -> None:
        self.batches = batches
        self.feat_dim = feat_dim
        self.window_frames = window_frames

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(
        self, index: int
    ) -> tuple[list[tuple[str, torch.Tensor]], list[tuple[str, str]]]:
        loaded, skipped = [], []
        for utt in self.batches[index]:
            try:
                wav = prepare_waveform(utt.path)
                if wav.numel() != utt.num_samples:
                    raise AudioError(
                        f"{utt.path}: the file changed while the run went on (it had "
                        f"{utt.num_samples} samples when the list was read, now {wav.numel()})"
                    )
                loaded.append((utt.utt, windowed_fbank(wav, self.window_frames, self.feat_dim)))
            except AudioError as err:
                skipped.append((utt.utt, str(err)))
        return loaded, skipped


# --------------------------------------------------------------------------- ark and record


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
            if ark not in handles:
                handles[ark] = stack.enter_context(open(ark, "rb"))
            result[key] = read_entry(handles[ark], key, offset)
    return result


@contextlib.contextmanager
def embedding_set(out_dir: Path, run_key: str | None) -> Iterator[ArkWriter]:
    """Write a new set of embeddings; when the block ends without an exception it becomes
    ``<out_dir>/embedding.scp`` (see "Commit" in the module docstring); otherwise nothing
    changes."""
    set_id = secrets.token_hex(6)
    ark_path = out_dir / f"{_SET_PREFIX}{set_id}.ark"
    record_path = out_dir / f"{_SET_PREFIX}{set_id}.jsonl"
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
    _remove_sets(out_dir, keep=set_id)


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
    if ark.parent != out_dir.resolve() or not ark.name.startswith(_SET_PREFIX):
        return None  # an older layout, or a folder that was moved: written anew
    return ark.name.removeprefix(_SET_PREFIX).removesuffix(".ark")


def _remove_sets(out_dir: Path, keep: str | None) -> None:
    """Remove every set but ``keep`` (records first: a record must never outlive its ark), the
    parts and temporary files left by killed runs. Only under the folder's lock."""
    kept = {f"{_SET_PREFIX}{keep}.jsonl", f"{_SET_PREFIX}{keep}.ark"}
    for pattern in ("embedding.*.jsonl", "embedding.*.ark", "embedding.ark"):
        for path in out_dir.glob(pattern):
            if path.name not in kept:
                path.unlink()
    parts = out_dir / PARTS_DIR
    if parts.is_dir():
        for path in sorted(parts.glob("*.jsonl")) + sorted(parts.iterdir()):
            path.unlink(missing_ok=True)
        parts.rmdir()
    for path in temporary_files(out_dir):
        path.unlink(missing_ok=True)
    (out_dir / SKIPPED_NAME).unlink(missing_ok=True)  # it describes the set just replaced


# --------------------------------------------------------------------------- the folder's state


def _records(out_dir: Path) -> list[Path]:
    return sorted(out_dir.glob("embedding.*.jsonl")) + sorted(
        (out_dir / PARTS_DIR).glob("part-*.jsonl")
    )


def _stored(
    out_dir: Path, utterances: Sequence[Utterance], run_key: str
) -> tuple[dict[str, tuple[Path, dict]], int, set[str]]:
    """(utt -> (ark, entry) of every valid stored result, embeddings of other run keys,
    utterances whose stored result was made from another path or content)."""
    current = {u.utt: u for u in utterances}
    valid: dict[str, tuple[Path, dict]] = {}
    other_runs, changed = 0, set()
    for record in _records(out_dir):
        run, entries = read_record(record)
        if run != run_key:
            other_runs += sum("start" in e for e in entries)
            continue
        for entry in entries:
            utt = current.get(entry["utt"])
            if utt is None:
                continue
            if utt.same_input(entry):
                valid[utt.utt] = (record.with_suffix(".ark"), entry)
            else:
                changed.add(utt.utt)
    return valid, other_runs, changed - valid.keys()


def _up_to_date(out_dir: Path, utterances: Sequence[Utterance], run_key: str) -> bool:
    """Whether ``embedding.scp`` already is the result for exactly these utterances."""
    set_id = committed_set(out_dir)
    if set_id is None or (out_dir / PARTS_DIR).exists():
        return False
    run, entries = read_record(out_dir / f"{_SET_PREFIX}{set_id}.jsonl")
    return (
        run == run_key
        and len(entries) == len(utterances)
        and all(u.utt == e["utt"] and u.same_input(e) for u, e in zip(utterances, entries))
    )


def prepare(out_dir: Path, utterances: Sequence[Utterance], run_key: str) -> list[Utterance]:
    """What is left to embed. Withdraws ``embedding.scp`` if it is not the final result for
    these utterances, and removes the records and arks of other run keys (rank 0, locked)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if _up_to_date(out_dir, utterances, run_key):
        log.info(
            "nothing to do: all %d utterances are done in %s", len(utterances), out_dir / SCP_NAME
        )
        return []
    (out_dir / SCP_NAME).unlink(missing_ok=True)
    valid, other_runs, changed = _stored(out_dir, utterances, run_key)
    if other_runs:
        log.info("model changed: discarding %d embeddings made with another model", other_runs)
    for record in _records(out_dir):
        if read_record(record)[0] != run_key:
            record.unlink()
            record.with_suffix(".ark").unlink(missing_ok=True)
    if changed:
        log.info("%d entries changed path/content: re-embedding them", len(changed))
    todo = [u for u in utterances if u.utt not in valid]
    if valid:
        log.info("resuming: %d of %d utterances already done", len(valid), len(utterances))
    return todo


def merge(out_dir: Path, utterances: Sequence[Utterance], run_key: str) -> list[str]:
    """Write the final set (wav.scp order) from the stored results and commit it; returns the
    skipped utterances as ``"utt: reason"`` lines."""
    valid, _, _ = _stored(out_dir, utterances, run_key)
    missing = [u.utt for u in utterances if u.utt not in valid]
    if missing:
        raise DataError(
            f"{out_dir}: {len(missing)} utterance(s) have no embedding after extraction, "
            f"e.g. {missing[:_MAX_LISTED]}"
        )
    skipped = [
        f"{u.utt}: {valid[u.utt][1]['skipped']}" for u in utterances if "skipped" in valid[u.utt][1]
    ]
    if len(skipped) == len(utterances):
        _write_skipped(out_dir, skipped)
        raise AudioError(f"no utterance could be embedded (see {out_dir / SKIPPED_NAME})")
    with contextlib.ExitStack() as stack, embedding_set(out_dir, run_key) as writer:
        handles: dict[Path, IO[bytes]] = {}
        for utt in utterances:
            ark, entry = valid[utt.utt]
            if "skipped" in entry:
                writer.add_skipped(utt.utt, entry["skipped"], **utt.source)
                continue
            if ark not in handles:
                handles[ark] = stack.enter_context(open(ark, "rb"))
            writer.add(utt.utt, read_entry(handles[ark], utt.utt, entry["start"]), **utt.source)
    return skipped


def skipped_in_committed(out_dir: Path) -> list[str]:
    """The ``"utt: reason"`` lines of the committed set's skipped utterances."""
    set_id = committed_set(out_dir)
    if set_id is None:
        return []
    _, entries = read_record(out_dir / f"{_SET_PREFIX}{set_id}.jsonl")
    return [f"{e['utt']}: {e['skipped']}" for e in entries if "skipped" in e]


def _write_skipped(out_dir: Path, skipped: Sequence[str]) -> None:
    path = out_dir / SKIPPED_NAME
    if skipped:
        write_text_atomic(path, "".join(f"{line}\n" for line in skipped))
        log.warning(
            "skipped %d utterance(s), listed in %s:\n  %s", len(skipped), path, _listing(skipped)
        )
    else:
        path.unlink(missing_ok=True)


# --------------------------------------------------------------------------- extraction


_HELD: set[Path] = set()


@contextlib.contextmanager
def output_lock(
    out_dir: str | Path, ranks: DistContext | None = None, wait_seconds: float = 0.0
) -> Iterator[None]:
    """Hold ``out_dir`` for this run (see the module docstring); taken again in the same
    process it is a no-op, so a caller may hold it around :func:`extract_embeddings`."""
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


def _on_main(ranks: DistContext, step: Callable[[], T]) -> T:
    """Run ``step`` on rank 0 only; every rank gets its result, or raises its error."""
    result = run_on_every_rank(ranks, lambda: step() if ranks.is_main else None)
    return all_gather(ranks, result)[0]


def iterate_batches(
    batches: Sequence[Sequence[Utterance]], feat_dim: int, window_frames: int, num_workers: int
) -> Iterator[tuple[list[tuple[str, torch.Tensor]], list[tuple[str, str]]]]:
    """The loaded batches in order; audio reading and fbank run in ``num_workers`` processes."""
    loader = DataLoader(
        BatchFeatures(batches, feat_dim, window_frames),
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        prefetch_factor=2 if num_workers > 0 else None,
    )
    yield from loader


@contextlib.contextmanager
def part_writer(out_dir: Path, ranks: DistContext, run_key: str) -> Iterator[ArkWriter]:
    """This rank's part, continued after its last complete record line (a torn ark tail that
    no record line refers to is cut off)."""
    parts = out_dir / PARTS_DIR
    parts.mkdir(parents=True, exist_ok=True)
    stem = parts / f"part-{ranks.rank:03d}-of-{ranks.world_size:03d}"
    ark_path, record_path = stem.with_suffix(".ark"), stem.with_suffix(".jsonl")
    end, entries = 0, []
    if record_path.is_file():  # left by a killed run (those of other run keys are removed)
        run, entries = read_record(record_path)
        if run == run_key:
            end = max((e["end"] for e in entries if "end" in e), default=0)
        else:
            entries = []
    # Rewritten with its readable lines only, so that the lines appended next can be read.
    lines = [{"run": run_key}, *entries]
    write_text_atomic(record_path, "".join(_json_line(line) for line in lines))
    with open(ark_path, "r+b" if ark_path.is_file() else "wb") as ark:
        ark.seek(end)
        ark.truncate()
        with open(record_path, "a", encoding="utf-8") as record:
            yield ArkWriter(ark, record)


def _embed_share(
    batches: Sequence[Sequence[Utterance]],
    embedder: Embedder,
    writer: ArkWriter,
    window_frames: int,
    max_batch_frames: int,
    num_workers: int,
    bar: tqdm,
) -> None:
    """Embed this rank's batches into its part, skipping unusable utterances by name."""
    by_id = {u.utt: u for batch in batches for u in batch}
    for loaded, skipped in iterate_batches(batches, embedder.feat_dim, window_frames, num_workers):
        for utt, reason in skipped:
            writer.add_skipped(utt, reason, **by_id[utt].source)
        if loaded:
            matrix = embed_windowed(embedder, [w for _, w in loaded], max_batch_frames)
            bad = set(nonfinite_rows(matrix))
            for row, (utt, _) in enumerate(loaded):
                if row in bad:
                    reason = f"{by_id[utt].path}: the model gave a non-finite embedding"
                    writer.add_skipped(utt, reason, **by_id[utt].source)
                else:
                    writer.add(utt, matrix[row], **by_id[utt].source)
        writer.flush()
        bar.update(len(loaded) + len(skipped))


def extract_embeddings(
    wav_scp: str | Path,
    embedder: Embedder,
    out_dir: str | Path,
    *,
    batch_size: int = 16,
    max_batch_frames: int = DEFAULT_MAX_BATCH_FRAMES,
    window_seconds: float = DEFAULT_WINDOW_SECONDS,
    num_workers: int = 0,
    ranks: DistContext | None = None,
    progress: bool = True,
    lock_wait_seconds: float = 0.0,
) -> Path:
    """Embed every utterance of ``wav_scp`` into ``<out_dir>/embedding.scp`` (see the module
    docstring) and return that path.

    Resumes what an earlier run of the same model left in ``out_dir``. Under torchrun pass the
    context of :func:`speakerlab.distributed.init_distributed`; every rank must call this with
    the same arguments.
    """
    ranks = ranks or single_process()
    out_dir = Path(out_dir)
    window_frames = window_frames_for(window_seconds)
    check_window(window_frames, embedder.min_frames)
    run_key = json_digest({"embedder": embedder.identity, "window_frames": window_frames})
    with output_lock(out_dir, ranks, lock_wait_seconds):
        utterances = scan_wav_scp(wav_scp, embedder.min_frames, window_frames, ranks)
        todo = _on_main(ranks, lambda: prepare(out_dir, utterances, run_key))
        mine = make_batches(todo, batch_size, max_batch_frames)[ranks.rank :: ranks.world_size]
        if mine:
            total = sum(map(len, mine))
            with (
                part_writer(out_dir, ranks, run_key) as writer,
                tqdm(
                    total=total,
                    unit="utt",
                    desc="extract",
                    disable=not (progress and ranks.is_main),
                    dynamic_ncols=True,
                ) as bar,
            ):
                _embed_share(
                    mine, embedder, writer, window_frames, max_batch_frames, num_workers, bar
                )
        barrier(ranks)
        _on_main(ranks, lambda: _finish(out_dir, utterances, run_key, merge_needed=bool(todo)))
    return out_dir / SCP_NAME


def _finish(
    out_dir: Path, utterances: Sequence[Utterance], run_key: str, merge_needed: bool
) -> None:
    if merge_needed or not _up_to_date(out_dir, utterances, run_key):
        merge(out_dir, utterances, run_key)
    _write_skipped(out_dir, skipped_in_committed(out_dir))


def extract_with_model(
    source: str | Path,
    wav_scp: str | Path,
    out_dir: str | Path,
    *,
    backend: str = "auto",
    device: str | torch.device = "cpu",
    ranks: DistContext | None = None,
    lock_wait_seconds: float = 0.0,
    **options: Any,
) -> Path:
    """:func:`extract_embeddings` with the model ``source`` (registry id, checkpoint or .onnx
    file). With the ONNX backend a checkpoint is exported to ``<out_dir>/model.onnx`` first
    (unless it holds that export already), inside the folder's lock."""
    ranks = ranks or single_process(device)
    with output_lock(out_dir, ranks, lock_wait_seconds):
        embedder, _ = load_embedder(
            source, ranks.device, backend=backend, onnx_path=Path(out_dir) / ONNX_NAME, ranks=ranks
        )
        return extract_embeddings(wav_scp, embedder, out_dir, ranks=ranks, **options)


# --------------------------------------------------------------------------- embed (any audio)


def keys_for_files(paths: Sequence[str | Path]) -> dict[str, str]:
    """Key -> path for audio files: the file name without extension, each run of whitespace
    replaced by ``_`` (a key holds no whitespace); two files with one key are an error."""
    table: dict[str, str] = {}
    for path in paths:
        key = "_".join(Path(path).stem.split()) or "_"
        if key in table:
            raise ConfigError(
                f"{table[key]} and {path} would both be called {key!r}; "
                "give them ids with a wav.scp"
            )
        table[key] = str(path)
    return table


def embed_recordings(
    verifier: SpeakerVerifier,
    recordings: dict[str, str],
    out_dir: str | Path,
    *,
    normalize: bool = False,
    chunk: int = 64,
) -> tuple[Path, int]:
    """Embed ``key -> audio file`` (any rate, any channels) into ``<out_dir>/embedding.scp``.

    Every file is checked (present, readable, long enough) before anything is written; the new
    set replaces the folder's old one only when every recording is embedded, so a bad input
    leaves the earlier results as they were. Returns the scp and the embedding dimension.
    """
    if not recordings:
        raise ConfigError("no recordings to embed")
    verifier.check_files(list(recordings.values()))
    out_dir = Path(out_dir)
    keys = list(recordings)
    with output_lock(out_dir), embedding_set(out_dir, run_key=None) as writer:
        for start in range(0, len(keys), chunk):
            part = keys[start : start + chunk]
            matrix = verifier.embed_many([recordings[k] for k in part], normalize=normalize)
            for key, vector in zip(part, matrix):
                writer.add(key, vector, path=recordings[key])
            writer.flush()
    return out_dir / SCP_NAME, matrix.shape[1]
