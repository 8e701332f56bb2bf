"""Embedding extraction of a ``wav.scp`` into Kaldi ark/scp: sharded, resumable, one run at a time.

Batching rule: a batch only holds utterances with exactly the same number of fbank frames, so
nothing is padded or cropped and every embedding equals the one computed for the utterance alone.
Utterances are sorted by (frames, id) and each run of equal frame counts is cut into batches of at
most ``batch_size`` utterances and ``max_batch_frames`` frames. A recording longer than the window
(``window_seconds``) is embedded in windows (see :mod:`speakerlab.embedder`), in a batch of its own.

Output folder (a folder of :mod:`speakerlab.embedding_store`: ``embedding.scp`` and the set it
refers to, written one run at a time under the folder's lock), and while a run goes on::

    parts/        one ark and record per rank; removed once merged into the folder's set
    skipped.txt   utterances that could not be embedded and why (only when there are some)
    model.onnx    the model exported for the ONNX backend (extract_with_model)

Resume, keyed on content: the run key is a digest of the embedder's identity (its weights, or the
bytes of its ONNX file); an utterance counts as done only when a record of the same run key holds
it with the same path, the same digest of its audio file's bytes and the same windows (a longer or
shorter window affects only the recordings it cuts differently).
Anything else is discarded or embedded again, with one log line saying how many and why. Parts are
written batch by batch, the ark before its record lines, so a complete record line always points
at a complete embedding; a killed run goes on where it stopped. While a run changes the result,
``embedding.scp`` is absent: no reader ever sees embeddings of another model or of changed files.

Skips: an utterance found unusable while it is embedded (audio that cannot be read or holds NaN or
infinite samples, a file changed since the list was read, an embedding that is not finite) is left
out by name, never written with a bad value; the skips are logged at the end of every run and
listed in ``skipped.txt``, and are tried again only when the model or the file changes. Problems
visible in the headers (missing files, unreadable headers, other sample rates, too-short audio)
stop the run before any work, all listed at once.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from speakerlab.audio import SAMPLE_RATE, audio_info, read_audio
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
    Windows,
    check_window,
    embed_windowed,
    load_embedder,
    nonfinite_rows,
    window_frames_for,
    window_shape,
)
from speakerlab.embedding_store import (
    SCP_NAME,
    SET_PREFIX,
    ArkWriter,
    committed_set,
    embedding_set,
    output_lock,
    read_entry,
    read_record,
    write_record,
)
from speakerlab.errors import AudioError, ConfigError, DataError
from speakerlab.features import num_frames
from speakerlab.fileio import file_digest, json_digest, write_text_atomic
from speakerlab.inference import SpeakerVerifier, prepare_waveform, require_file

SKIPPED_NAME = "skipped.txt"
PARTS_DIR = "parts"
ONNX_NAME = "model.onnx"
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
    def source(self) -> dict[str, Any]:
        """What its record line says it was made from: the file, its digest, the windows."""
        return {
            "path": self.path,
            "digest": self.digest,
            "windows": self.windows,
            "frames": self.frames,
        }

    def same_input(self, entry: dict[str, Any]) -> bool:
        """Whether a record entry was made from this very file content at this path, cut into
        the same windows."""
        return all(entry.get(key) == value for key, value in self.source.items())


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
    """Dataset of whole batches: item ``i`` is ([(utt, windows)], [(utt, why skipped)]).

    A recording of one window is read and its fbank made here (in a loader worker); a longer one
    is read through here only to check it (a block at a time), and its windows are read again one
    at a time when they are embedded, so that no recording costs memory for its length.
    """

    def __init__(
        self, batches: Sequence[Sequence[Utterance]], feat_dim: int, window_frames: int
    ) -> None:
        self.batches = batches
        self.feat_dim = feat_dim
        self.window_frames = window_frames

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> tuple[list[tuple[str, Windows]], list[tuple[str, str]]]:
        loaded, skipped = [], []
        for utt in self.batches[index]:
            try:
                loaded.append((utt.utt, self.windows(utt)))
            except AudioError as err:
                skipped.append((utt.utt, str(err)))
        return loaded, skipped

    def windows(self, utt: Utterance) -> Windows:
        if window_shape(utt.num_samples, self.window_frames)[0] > 1:
            num_samples = check_readable(utt.path)
            _check_unchanged(utt, num_samples)
            return Windows(utt.path, num_samples, self.window_frames, self.feat_dim)
        wav = prepare_waveform(utt.path)
        _check_unchanged(utt, wav.numel())
        return Windows(wav, wav.numel(), self.window_frames, self.feat_dim).made()


def check_readable(path: str, block: int = 60 * SAMPLE_RATE) -> int:
    """Read ``path`` through a block at a time (truncation, decoding errors and non-finite
    samples raise :class:`AudioError`) and return its number of samples."""
    total, start = 0, 0
    while True:
        samples, _ = read_audio(path, start, block)
        total += len(samples)
        if len(samples) < block:
            return total
        start += block


def _check_unchanged(utt: Utterance, num_samples: int) -> None:
    if num_samples != utt.num_samples:
        raise AudioError(
            f"{utt.path}: the file changed while the run went on (it had "
            f"{utt.num_samples} samples when the list was read, now {num_samples})"
        )


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
    run, entries = read_record(out_dir / f"{SET_PREFIX}{set_id}.jsonl")
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
        log.info("%d entries changed path/content/windows: re-embedding them", len(changed))
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
    _remove_parts(out_dir)
    return skipped


def _remove_parts(out_dir: Path) -> None:
    """Remove the parts (records first: a record must never outlive its ark); under the lock."""
    parts = out_dir / PARTS_DIR
    if parts.is_dir():
        for path in [*sorted(parts.glob("*.jsonl")), *sorted(parts.glob("*.ark"))]:
            path.unlink()
        parts.rmdir()


def skipped_in_committed(out_dir: Path) -> list[str]:
    """The ``"utt: reason"`` lines of the committed set's skipped utterances."""
    set_id = committed_set(out_dir)
    if set_id is None:
        return []
    _, entries = read_record(out_dir / f"{SET_PREFIX}{set_id}.jsonl")
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
    write_record(record_path, run_key, entries)  # its readable lines only: appends stay readable
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
    run_key = json_digest({"embedder": embedder.identity})
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
    precision: str = "fp32",
    **options: Any,
) -> Path:
    """:func:`extract_embeddings` with the model ``source`` (registry id, checkpoint or .onnx
    file, an int8 one included) in ``precision`` (:func:`speakerlab.embedder.load_embedder`).
    With the ONNX backend a checkpoint is exported to ``<out_dir>/model.onnx`` first (unless it
    holds that export already), inside the folder's lock."""
    ranks = ranks or single_process(device)
    with output_lock(out_dir, ranks, lock_wait_seconds):
        embedder, _ = load_embedder(
            source,
            ranks.device,
            backend=backend,
            onnx_path=Path(out_dir) / ONNX_NAME,
            ranks=ranks,
            precision=precision,
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
    with output_lock(out_dir):
        with embedding_set(out_dir, run_key=None) as writer:
            for start in range(0, len(keys), chunk):
                part = keys[start : start + chunk]
                matrix = verifier.embed_many([recordings[k] for k in part], normalize=normalize)
                for key, vector in zip(part, matrix):
                    writer.add(key, vector, path=recordings[key])
                writer.flush()
        _remove_parts(out_dir)  # what an extraction left here belongs to the replaced set
        (out_dir / SKIPPED_NAME).unlink(missing_ok=True)
    return out_dir / SCP_NAME, matrix.shape[1]
