"""The training index: one row per ``segment_seconds`` of usable training audio.

Built from the audio headers only (no samples are read), so indexing a large corpus takes minutes
rather than hours. Files that cannot be used (unreadable, empty, not 16 kHz, not mono) are reported
by name, listed in ``<index>.bad`` and left out; if more than ``max_bad_fraction`` of the files are
bad the build stops, since that points at a broken corpus rather than a few damaged files.

File format (tab separated, one comment line with the build parameters first)::

    # speakerlab-train-index segment_seconds=4.0 data_dir=/abs/path/to/train
    utt <TAB> path <TAB> num_samples <TAB> speaker
"""

from __future__ import annotations

import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from speakerlab.audio import SAMPLE_RATE, audio_info
from speakerlab.data.kaldi_dir import read_utt2spk, read_wav_scp
from speakerlab.errors import AudioError, DataError
from speakerlab.fileio import atomic_write

logger = logging.getLogger(__name__)

INDEX_MAGIC = "# speakerlab-train-index"


@dataclass(frozen=True)
class TrainIndex:
    """Rows of the index as parallel arrays, plus the sorted speaker list (label = position)."""

    utts: list[str]
    paths: list[str]
    num_samples: np.ndarray  # int64, samples of each row's file
    speaker_ids: np.ndarray  # int64, index into ``speakers``
    speakers: list[str]

    def __len__(self) -> int:
        return len(self.utts)

    @property
    def num_speakers(self) -> int:
        return len(self.speakers)


def check_audio_header(path: str) -> tuple[int, str | None]:
    """``(num_samples, None)`` for a usable training file, ``(0, reason)`` otherwise."""
    try:
        info = audio_info(path)
    except AudioError as err:
        return 0, str(err)
    if info.frames <= 0:
        return 0, f"{path}: audio is empty"
    if info.samplerate != SAMPLE_RATE:
        return 0, f"{path}: sample rate is {info.samplerate} Hz, expected {SAMPLE_RATE} Hz"
    if info.channels != 1:
        return 0, f"{path}: has {info.channels} channels, expected mono"
    return int(info.frames), None


def scan_audio_headers(paths: list[str], num_workers: int = 8) -> list[tuple[int, str | None]]:
    """:func:`check_audio_header` for many files; threads overlap the file-system latency."""
    with ThreadPoolExecutor(max(1, num_workers)) as pool:
        return list(
            tqdm(
                pool.map(check_audio_header, paths, chunksize=64),
                total=len(paths),
                desc="reading audio headers",
                unit="file",
                disable=len(paths) < 10000,
            )
        )


def _header_line(data_dir: Path, segment_seconds: float) -> str:
    return f"{INDEX_MAGIC} segment_seconds={float(segment_seconds)} data_dir={data_dir.resolve()}"


def index_is_current(out_path: Path, data_dir: Path, segment_seconds: float) -> bool:
    """True if ``out_path`` was built from ``data_dir`` with these parameters after its lists
    last changed."""
    if not out_path.is_file():
        return False
    sources = [data_dir / "wav.scp", data_dir / "utt2spk"]
    if any(not s.is_file() or s.stat().st_mtime > out_path.stat().st_mtime for s in sources):
        return False
    with open(out_path, encoding="utf-8") as f:
        return f.readline().rstrip("\n") == _header_line(data_dir, segment_seconds)


def build_train_index(
    data_dir: str | Path,
    out_path: str | Path,
    segment_seconds: float = 4.0,
    max_bad_fraction: float = 0.1,
    num_workers: int = 8,
) -> Path:
    """Write the index of the Kaldi directory ``data_dir`` (``wav.scp`` + ``utt2spk``).

    Each usable utterance gets ``max(1, int(duration / segment_seconds))`` rows. An index that is
    newer than the lists and was built with the same parameters is reused as it is.
    """
    data_dir, out_path = Path(data_dir), Path(out_path)
    if segment_seconds <= 0:
        raise DataError(f"segment_seconds must be positive, got {segment_seconds}")
    if index_is_current(out_path, data_dir, segment_seconds):
        logger.info("reusing up-to-date training index %s", out_path)
        return out_path
    wav_scp = read_wav_scp(data_dir / "wav.scp")
    utt2spk = read_utt2spk(data_dir / "utt2spk")
    unlabelled = [utt for utt in wav_scp if utt not in utt2spk]
    if unlabelled:
        raise DataError(
            f"{data_dir / 'utt2spk'}: no speaker for {len(unlabelled)} utterances of "
            f"{data_dir / 'wav.scp'}, e.g. {', '.join(unlabelled[:5])}"
        )
    if not wav_scp:
        raise DataError(f"{data_dir / 'wav.scp'}: no utterances")
    utts = list(wav_scp)
    paths = [wav_scp[utt] for utt in utts]
    headers = scan_audio_headers(paths, num_workers)
    bad = [(utt, reason) for utt, (_, reason) in zip(utts, headers) if reason is not None]
    bad_path = out_path.with_name(out_path.name + ".bad")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if bad:
        bad_path.write_text("".join(f"{utt}\t{reason}\n" for utt, reason in bad), encoding="utf-8")
        for utt, reason in bad[:20]:
            print(f"skipping {utt}: {reason}", file=sys.stderr)
        if len(bad) > 20:
            print(f"... and {len(bad) - 20} more, all listed in {bad_path}", file=sys.stderr)
        if len(bad) > max_bad_fraction * len(utts):
            raise DataError(
                f"{len(bad)} of {len(utts)} audio files of {data_dir / 'wav.scp'} are "
                f"unusable ({100 * len(bad) / len(utts):.1f}% > "
                f"{100 * max_bad_fraction:g}% allowed); first: {bad[0][1]}; "
                f"all listed in {bad_path}"
            )
    elif bad_path.exists():
        bad_path.unlink()
    good = np.array([reason is None for _, reason in headers])
    samples = np.array([n for n, _ in headers], dtype=np.int64)
    repeats = np.where(
        good, np.maximum(1, (samples / (segment_seconds * SAMPLE_RATE)).astype(np.int64)), 0
    )
    with atomic_write(out_path) as f:
        f.write(_header_line(data_dir, segment_seconds) + "\n")
        for utt, path, n, count in zip(utts, paths, samples, repeats):
            if count:
                f.write(f"{utt}\t{path}\t{n}\t{utt2spk[utt]}\n" * int(count))
    logger.info(
        "training index %s: %d rows from %d files (%d skipped)",
        out_path,
        int(repeats.sum()),
        int(good.sum()),
        len(bad),
    )
    return out_path


def load_train_index(path: str | Path) -> TrainIndex:
    """Read an index written by :func:`build_train_index`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: training index not found (build it with `speakerlab make-index`)")
    utts, paths, samples, speakers = [], [], [], []
    with open(path, encoding="utf-8") as f:
        first = f.readline()
        if not first.startswith(INDEX_MAGIC):
            raise DataError(f"{path}:1: not a speakerlab training index (no '{INDEX_MAGIC}' line)")
        for lineno, line in enumerate(f, 2):
            fields = line.rstrip("\n").split("\t")
            if len(fields) != 4 or not fields[2].isdigit():
                raise DataError(
                    f"{path}:{lineno}: expected 'utt<TAB>path<TAB>num_samples<TAB>"
                    f"speaker', got {line.rstrip()!r}"
                )
            utts.append(fields[0])
            paths.append(fields[1])
            samples.append(int(fields[2]))
            speakers.append(fields[3])
    if not utts:
        raise DataError(f"{path}: the training index has no rows")
    speaker_list, speaker_ids = np.unique(np.array(speakers), return_inverse=True)
    return TrainIndex(
        utts=utts,
        paths=paths,
        num_samples=np.array(samples, dtype=np.int64),
        speaker_ids=speaker_ids.astype(np.int64),
        speakers=[str(s) for s in speaker_list],
    )
