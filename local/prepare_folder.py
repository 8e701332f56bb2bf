#!/usr/bin/env python3
"""Prepare any corpus for the recipes: a folder of speakers or a Kaldi data dir becomes
``train/``, ``test/`` and ``trials/``, as the 3D-Speaker preparation writes them.

Sources:

- a folder tree ``<source>/<speaker>/**/*.{wav,flac}``: each folder directly under the source is
  a speaker; files in a sub-folder of a speaker's folder share a session (VoxCeleb's
  ``<speaker>/<video>/<n>.wav``), files directly in it have none;
- a Kaldi data dir (``wav.scp`` + ``utt2spk``), with sessions from its ``utt2session``
  (``utt session``) or ``utt2info`` (``utt spk session ...``, as local/prepare_3dspeaker.py writes
  it) when present.

``--utt2session FILE`` gives the sessions of either kind of source. Sessions count within a
speaker: two recordings of one session are never paired as a target trial.

Written under ``--out_dir``::

    train/{wav.scp,utt2spk,spk2utt[,utt2session]}  the speakers not held out
    test/{wav.scp,utt2spk,spk2utt[,utt2session]}   held-out speakers (--test_fraction)
    trials/test_trials                             balanced trials of the test speakers

Audio paths are absolute. Every file's header is read first: unreadable or empty files, and
files that are not 16 kHz mono, are listed by name and nothing is written, unless
``--convert_dir`` (rate and channels: converted once into that folder, keyed by the content of
the source file, channel 0 of multi-channel files) or ``--skip_unreadable`` says what to do.
Training never resamples.
"""

from __future__ import annotations

import argparse
import logging
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from speakerlab.audio import SAMPLE_RATE, complete_audio_info, read_audio  # noqa: E402
from speakerlab.data.kaldi_dir import (  # noqa: E402
    read_table,
    read_utt2spk,
    read_wav_scp,
    spk2utt_from_utt2spk,
    write_table,
)
from speakerlab.errors import AudioError, DataError, SpeakerlabError  # noqa: E402
from speakerlab.fileio import atomic_path, file_digest  # noqa: E402

log = logging.getLogger("prepare_folder")

AUDIO_SUFFIXES = (".wav", ".flac")
TRIALS_NAME = "test_trials"
SUBDIRS = ("train", "test", "trials")
ENUMERATE_LIMIT = 2_000_000  # up to this many candidate pairs are listed; beyond, sampled
_UNSAFE = re.compile(r"\s+")


@dataclass
class Corpus:
    """Utterances of a source, sorted by id."""

    wav: dict[str, str]  # utt -> absolute audio path
    spk: dict[str, str]  # utt -> speaker
    session: dict[str, str]  # utt -> session (only utterances whose session is known)


# --------------------------------------------------------------------------------- reading


def safe_id(name: str) -> str:
    """A Kaldi id: whitespace becomes ``_``."""
    return _UNSAFE.sub("_", name.strip())


def read_folder_tree(root: Path) -> Corpus:
    """Speakers are the folders directly under ``root``; ids ``<speaker>-<path below it>``."""
    wav, spk, session, owner = {}, {}, {}, {}
    stray = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES]
    if stray:
        log.warning(
            "ignoring %d audio file(s) directly in %s (not in a speaker folder), e.g. %s",
            len(stray),
            root,
            stray[0].name,
        )
    for speaker_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        speaker = safe_id(speaker_dir.name)
        for path in sorted(speaker_dir.rglob("*")):
            if path.suffix.lower() not in AUDIO_SUFFIXES or not path.is_file():
                continue
            relative = path.relative_to(speaker_dir)
            utt = safe_id(f"{speaker}-{relative.with_suffix('').as_posix().replace('/', '-')}")
            if utt in owner:
                raise DataError(f"{path} and {owner[utt]} both get the utterance id {utt!r}")
            owner[utt] = path
            wav[utt], spk[utt] = str(path.resolve()), speaker
            if len(relative.parts) > 1:
                session[utt] = relative.parent.as_posix()
    if not wav:
        raise DataError(
            f"{root}: no speaker folders with {'/'.join(AUDIO_SUFFIXES)} files "
            "(expected <source>/<speaker>/**/<file>.wav)"
        )
    return Corpus(wav, spk, session)


def read_kaldi_dir(data_dir: Path) -> Corpus:
    """``wav.scp`` + ``utt2spk`` (+ sessions from ``utt2session`` or ``utt2info``)."""
    wav_scp = read_wav_scp(data_dir / "wav.scp")
    utt2spk = read_utt2spk(data_dir / "utt2spk")
    for utt, path in wav_scp.items():
        if path.rstrip().endswith("|"):
            raise DataError(
                f"{data_dir / 'wav.scp'}: {utt} is a command ({path!r}); audio must be a file"
            )
    missing = [u for u in wav_scp if u not in utt2spk]
    if missing:
        raise DataError(
            f"{data_dir / 'utt2spk'}: no speaker for {len(missing)} utterance(s) of wav.scp, "
            f"e.g. {', '.join(missing[:5])}"
        )
    session = {}
    if (data_dir / "utt2session").is_file():
        session = read_table(data_dir / "utt2session")
    elif (data_dir / "utt2info").is_file():
        info = read_table(data_dir / "utt2info")
        session = {
            utt: fields.split()[1] for utt, fields in info.items() if len(fields.split()) > 1
        }
    wav = {utt: str(Path(path).resolve()) for utt, path in sorted(wav_scp.items())}
    return Corpus(wav, {u: utt2spk[u] for u in wav}, {u: s for u, s in session.items() if u in wav})


def read_source(source: Path, utt2session: Path | None = None) -> Corpus:
    """A folder tree or a Kaldi dir (recognised by its ``wav.scp``)."""
    if not source.is_dir():
        raise DataError(f"{source}: not a directory")
    kaldi = (source / "wav.scp").is_file()
    corpus = read_kaldi_dir(source) if kaldi else read_folder_tree(source)
    if utt2session is not None:
        sessions = read_table(utt2session)
        corpus.session = {u: s for u, s in sessions.items() if u in corpus.wav}
    return corpus


# --------------------------------------------------------------------------------- audio


@dataclass
class AudioReport:
    """Files that cannot be used as they are."""

    unreadable: dict[str, str]  # utt -> reason
    to_convert: dict[str, str]  # utt -> what is wrong (rate, channels)


def check_audio(corpus: Corpus) -> AudioReport:
    """Read every header: unreadable, truncated or empty files, and files that are not 16 kHz
    mono."""
    from tqdm import tqdm

    unreadable, to_convert = {}, {}
    for utt, path in tqdm(corpus.wav.items(), desc="checking audio", unit="file", leave=False):
        try:
            info = complete_audio_info(path)
        except AudioError as err:
            unreadable[utt] = str(err)
            continue
        if info.frames == 0:
            unreadable[utt] = f"{path}: no samples"
        elif info.samplerate != SAMPLE_RATE or info.channels != 1:
            to_convert[utt] = f"{path}: {info.samplerate} Hz, {info.channels} channel(s)"
    return AudioReport(unreadable, to_convert)


def converted_path(convert_dir: Path, speaker: str, utt: str, source: str) -> Path:
    """Where the 16 kHz mono copy of ``source`` lives: named by the source's content, so a
    changed source gets a new copy and an unchanged one is never converted twice."""
    return convert_dir / speaker / f"{utt}-{file_digest(source)[:16]}.wav"


def convert_to_16k_mono(source: str, target: Path) -> None:
    """Channel 0 of ``source`` resampled to 16 kHz, written as 32-bit float WAV (no clipping of
    resampling overshoot, no requantisation)."""
    import soundfile
    import torch

    from speakerlab.resample import resample

    samples, rate = read_audio(source)
    if rate != SAMPLE_RATE:  # the resampler the inference API uses on whatever it is given
        samples = resample(torch.from_numpy(samples), rate, SAMPLE_RATE).numpy()
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as temporary:
        soundfile.write(
            str(temporary), samples.astype(np.float32), SAMPLE_RATE, subtype="FLOAT", format="WAV"
        )


def resolve_bad_audio(
    corpus: Corpus, report: AudioReport, convert_dir: Path | None, skip_unreadable: bool
) -> None:
    """Apply the options to the files of ``report`` (in place), or stop listing every file that
    neither option covers."""
    problems, remedies = [], []
    if report.unreadable and not skip_unreadable:
        for reason in report.unreadable.values():
            print(f"unusable: {reason}", file=sys.stderr)
        problems.append(f"{len(report.unreadable)} cannot be used")
        remedies.append("leave unusable ones out with --skip_unreadable")
    if report.to_convert and convert_dir is None:
        for reason in report.to_convert.values():
            print(f"not 16 kHz mono: {reason}", file=sys.stderr)
        problems.append(f"{len(report.to_convert)} are not 16 kHz mono")
        remedies.append("convert those once with --convert_dir DIR")
    if problems:
        raise DataError(
            f"of {len(corpus.wav)} audio files, {' and '.join(problems)} (listed above); fix "
            f"them, or {', or '.join(remedies)}"
        )
    for utt, reason in report.unreadable.items():
        log.warning("leaving out %s", reason)
        for table in (corpus.wav, corpus.spk, corpus.session):
            table.pop(utt, None)
    if report.to_convert:
        from tqdm import tqdm

        converted = 0
        for utt in tqdm(report.to_convert, desc="converting", unit="file", leave=False):
            target = converted_path(convert_dir, corpus.spk[utt], utt, corpus.wav[utt])
            if not target.is_file():
                convert_to_16k_mono(corpus.wav[utt], target)
                converted += 1
            corpus.wav[utt] = str(target.resolve())
        log.info(
            "%d file(s) not 16 kHz mono: %d converted into %s, %d already there",
            len(report.to_convert),
            converted,
            convert_dir,
            len(report.to_convert) - converted,
        )


# --------------------------------------------------------------------------------- split


def split_speakers(
    speakers: list[str], test_fraction: float, num_test: int | None, seed: int
) -> tuple[list[str], list[str]]:
    """Held-out test speakers drawn with ``seed``: ``num_test`` of them, else the fraction
    (rounded, at least 2 when positive, so that there are nontarget trials)."""
    speakers = sorted(speakers)
    if num_test is None:
        if not 0.0 <= test_fraction < 1.0:
            raise DataError(f"--test_fraction {test_fraction}: must be in [0, 1)")
        num_test = max(2, round(test_fraction * len(speakers))) if test_fraction > 0 else 0
    if num_test and not 2 <= num_test <= len(speakers) - 1:
        raise DataError(
            f"{num_test} test speakers of {len(speakers)}: need at least 2 for trials and at "
            "least 1 left for training"
        )
    order = np.random.default_rng(seed).permutation(len(speakers))
    test = sorted(speakers[i] for i in order[:num_test])
    held_out = set(test)
    return [s for s in speakers if s not in held_out], test


# --------------------------------------------------------------------------------- trials


def possible_pairs(groups: np.ndarray) -> int:
    """Number of unordered pairs of items that share a group."""
    counts = np.unique(groups, return_counts=True)[1].astype(np.int64)
    return int(np.sum(counts * (counts - 1) // 2))


def sample_pairs(count: int, num_items: int, draw, valid, rng: np.random.Generator) -> np.ndarray:
    """``count`` distinct unordered pairs coded ``a * num_items + b`` (a < b): candidates from
    ``draw(size) -> (a, b)``, kept where ``valid(a, b)``, the first ``count`` distinct ones."""
    found = np.empty(0, dtype=np.int64)
    while len(found) < count:
        a, b = draw(2 * (count - len(found)) + 64)
        keep = (a != b) & valid(a, b)
        codes = np.minimum(a, b)[keep] * num_items + np.maximum(a, b)[keep]
        found = np.concatenate([found, codes])
        found = found[np.sort(np.unique(found, return_index=True)[1])]
    return found[:count]


class PairSpace:
    """The pairs of ``n`` utterances with speaker indices ``spk`` and session indices ``sess``
    (sessions are unique across speakers): targets are same-speaker pairs of two sessions,
    nontargets pairs of two speakers. Pairs are index pairs (a, b) with a < b."""

    def __init__(self, spk: np.ndarray, sess: np.ndarray) -> None:
        self.spk, self.sess, self.n = spk, sess, len(spk)
        self.by_speaker = np.argsort(spk, kind="stable")
        self.sizes = np.bincount(spk)
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])
        self.same_speaker = possible_pairs(spk)
        self.num_targets = self.same_speaker - possible_pairs(sess)
        self.num_nontargets = self.n * (self.n - 1) // 2 - self.same_speaker

    def is_target(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (self.spk[a] == self.spk[b]) & (self.sess[a] != self.sess[b])

    def is_nontarget(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return self.spk[a] != self.spk[b]

    def all_same_speaker(self) -> tuple[np.ndarray, np.ndarray]:
        """Every same-speaker pair (one array operation per speaker)."""
        firsts, seconds = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
        for start, size in zip(self.starts.tolist(), self.sizes.tolist()):
            i, j = np.triu_indices(size, k=1)
            members = np.sort(self.by_speaker[start : start + size])
            firsts.append(members[i])
            seconds.append(members[j])
        return np.concatenate(firsts), np.concatenate(seconds)

    def all_pairs(self) -> tuple[np.ndarray, np.ndarray]:
        return np.triu_indices(self.n, k=1)

    def draw_same_speaker(self, size: int, rng: np.random.Generator):
        """Random same-speaker pairs, uniform over them (a == b possible: rejected later)."""
        weights = self.sizes * (self.sizes - 1) / 2.0
        speakers = rng.choice(len(self.sizes), size=size, p=weights / weights.sum())
        a, b = self.starts[speakers] + (rng.random((2, size)) * self.sizes[speakers]).astype(int)
        return self.by_speaker[a], self.by_speaker[b]

    def draw_any(self, size: int, rng: np.random.Generator):
        return rng.integers(0, self.n, size), rng.integers(0, self.n, size)

    def pick(self, kind: str, count: int, rng: np.random.Generator) -> np.ndarray:
        """``count`` distinct pairs of ``kind`` (target or nontarget) as codes ``a * n + b``:
        from the list of all candidates when there are few, else by rejection sampling."""
        target = kind == "target"
        valid = self.is_target if target else self.is_nontarget
        candidates = self.same_speaker if target else self.n * (self.n - 1) // 2
        if candidates <= ENUMERATE_LIMIT:
            a, b = self.all_same_speaker() if target else self.all_pairs()
            codes = (a * self.n + b)[valid(a, b)]
            return rng.choice(codes, size=count, replace=False)
        draw = self.draw_same_speaker if target else self.draw_any
        return sample_pairs(count, self.n, lambda size: draw(size, rng), valid, rng)


def make_trials(
    corpus: Corpus, num_trials: int, seed: int
) -> tuple[list[tuple[str, str, str]], int]:
    """Balanced trials of ``corpus`` (half target, half nontarget), drawn with ``seed``.

    Targets pair two recordings of a speaker from different sessions (when sessions are known);
    nontargets pair two speakers. With fewer possible pairs of either kind than half the request,
    both halves shrink to that number (returned second, for the log). Trials are sorted.
    """
    utts = sorted(corpus.wav)
    spk = np.unique([corpus.spk[u] for u in utts], return_inverse=True)[1]
    # Sessions count within a speaker; a recording without one is a session of its own.
    sessions = [f"{corpus.spk[u]}/{corpus.session.get(u, '/' + u)}" for u in utts]
    space = PairSpace(spk, np.unique(sessions, return_inverse=True)[1])
    half = min(num_trials // 2, space.num_targets, space.num_nontargets)
    rng = np.random.default_rng(seed)
    trials = [
        (utts[code // space.n], utts[code % space.n], kind)
        for kind in ("target", "nontarget")
        for code in space.pick(kind, half, rng).tolist()
    ]
    return sorted(trials), half


# --------------------------------------------------------------------------------- writing


def write_data_dir(out: Path, corpus: Corpus, utts: list[str]) -> None:
    """``wav.scp``, ``utt2spk``, ``spk2utt`` (and ``utt2session``) of ``utts``."""
    utts = sorted(utts)
    write_table(out / "wav.scp", [(u, corpus.wav[u]) for u in utts])
    utt2spk = {u: corpus.spk[u] for u in utts}
    write_table(out / "utt2spk", utt2spk.items())
    write_table(out / "spk2utt", [(s, *us) for s, us in spk2utt_from_utt2spk(utt2spk).items()])
    sessions = [(u, safe_id(corpus.session[u])) for u in utts if u in corpus.session]
    if sessions:
        write_table(out / "utt2session", sessions)


def subset(corpus: Corpus, utts: list[str]) -> Corpus:
    keep = set(utts)
    return Corpus(
        *(
            {u: v for u, v in table.items() if u in keep}
            for table in (corpus.wav, corpus.spk, corpus.session)
        )
    )


def replace_outputs(staging: Path, out_dir: Path) -> None:
    """Move ``train/``, ``test/`` and ``trials/`` from ``staging`` into ``out_dir``, replacing
    those of an earlier run (also when this run has none, e.g. no test speakers): the data dir
    never mixes two preparations. Nothing else in ``out_dir`` is touched."""
    for name in SUBDIRS:
        old = out_dir / name
        if old.exists():
            shutil.rmtree(old)
        if (staging / name).exists():
            (staging / name).rename(old)
    shutil.rmtree(staging)


def prepare_folder(
    source: str | Path,
    out_dir: str | Path,
    *,
    test_fraction: float = 0.1,
    num_test_speakers: int | None = None,
    split_seed: int = 0,
    num_trials: int = 20000,
    trials_seed: int = 0,
    convert_dir: str | Path | None = None,
    skip_unreadable: bool = False,
    utt2session: str | Path | None = None,
) -> dict[str, int]:
    """Prepare ``source`` into ``out_dir`` (see the module docstring); returns counts."""
    source, out_dir = Path(source), Path(out_dir)
    corpus = read_source(source, Path(utt2session) if utt2session else None)
    report = check_audio(corpus)
    resolve_bad_audio(corpus, report, Path(convert_dir) if convert_dir else None, skip_unreadable)
    train_speakers, test_speakers = split_speakers(
        list(set(corpus.spk.values())), test_fraction, num_test_speakers, split_seed
    )
    held_out = set(test_speakers)
    test_utts = [u for u in corpus.wav if corpus.spk[u] in held_out]
    train_utts = [u for u in corpus.wav if corpus.spk[u] not in held_out]
    trials, half = [], 0
    if test_utts:
        trials, half = make_trials(subset(corpus, test_utts), num_trials, trials_seed)
        if half < num_trials // 2:
            log.warning(
                "the %d test speakers allow only %d target and %d nontarget trials",
                len(test_speakers),
                half,
                half,
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".prepare-", dir=out_dir))
    write_data_dir(staging / "train", corpus, train_utts)
    if test_utts:
        write_data_dir(staging / "test", corpus, test_utts)
        write_table(staging / "trials" / TRIALS_NAME, trials)
    replace_outputs(staging, out_dir)
    return {
        "train_speakers": len(train_speakers),
        "train_utts": len(train_utts),
        "test_speakers": len(test_speakers),
        "test_utts": len(test_utts),
        "trials": len(trials),
        "converted": len(report.to_convert),
        "left_out": len(report.unreadable),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--source", required=True, help="folder of speaker folders, or a Kaldi dir (wav.scp)"
    )
    parser.add_argument("--out_dir", required=True, help="where train/, test/, trials/ go")
    parser.add_argument(
        "--test_fraction", type=float, default=0.1, help="share of speakers held out for test"
    )
    parser.add_argument(
        "--num_test_speakers",
        type=int,
        default=None,
        help="held-out speakers (overrides the fraction)",
    )
    parser.add_argument("--split_seed", type=int, default=0, help="seed of the speaker split")
    parser.add_argument(
        "--num_trials", type=int, default=20000, help="trials to generate (half target)"
    )
    parser.add_argument("--trials_seed", type=int, default=0, help="seed of the trial draw")
    parser.add_argument(
        "--convert_dir",
        default=None,
        help="convert audio that is not 16 kHz mono into this folder (without: list it, stop)",
    )
    parser.add_argument(
        "--skip_unreadable",
        action="store_true",
        help="leave out unreadable or empty files (named in the log) instead of stopping",
    )
    parser.add_argument("--utt2session", default=None, help="'utt session' lines (optional)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        counts = prepare_folder(
            args.source,
            args.out_dir,
            test_fraction=args.test_fraction,
            num_test_speakers=args.num_test_speakers,
            split_seed=args.split_seed,
            num_trials=args.num_trials,
            trials_seed=args.trials_seed,
            convert_dir=args.convert_dir,
            skip_unreadable=args.skip_unreadable,
            utt2session=args.utt2session,
        )
    except SpeakerlabError as err:
        print(f"prepare_folder.py: error: {err}", file=sys.stderr)
        sys.exit(1)
    print(
        f"train: {counts['train_utts']} utterances of {counts['train_speakers']} speakers; "
        f"test: {counts['test_utts']} utterances of {counts['test_speakers']} speakers, "
        f"{counts['trials']} trials; written to {args.out_dir}"
    )


if __name__ == "__main__":
    main()
