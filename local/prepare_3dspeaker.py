#!/usr/bin/env python3
"""Prepare the 3D-Speaker corpus (or a simulated one in the same layout) as Kaldi-style lists.

Reads ``<corpus_dir>/files/`` (the corpus metadata) and writes::

    <data_dir>/3dspeaker/{train,test}/{wav.scp,utt2spk,spk2utt,utt2info}
    <data_dir>/3dspeaker/trials/{trials_cross_device,trials_cross_distance,trials_cross_dialect}
    <data_dir>/musan/wav.scp     (MUSAN noise/free-sound)
    <data_dir>/rirs/wav.scp      (RIRS_NOISES real_rirs_isotropic_noises, as listed in its rir_list)

Utterances recorded with Device09 (the ARRAY device) are dropped from train and test. Audio paths
in the lists are absolute. ``utt2info`` is ``utt2info.csv`` as a space-separated table (spaces
inside a field become ``_``): ``utt spk session device distance dialect``.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from speakerlab.data.kaldi_dir import read_table, spk2utt_from_utt2spk, write_table
from speakerlab.errors import DataError, SpeakerlabError
from speakerlab.fileio import write_bytes_atomic
from speakerlab.trials import read_trials, write_trials

SPLITS = ("train", "test")
TRIAL_LISTS = ("trials_cross_device", "trials_cross_distance", "trials_cross_dialect")
METADATA_FILES = (
    tuple(f"{split}_{name}" for split in SPLITS for name in ("wav.scp", "utt2spk", "utt2info.csv"))
    + TRIAL_LISTS
)
EXCLUDED_DEVICE = "Device09"  # the ARRAY device, left out of training and evaluation
MUSAN_NOISE_SUBDIR = Path("noise") / "free-sound"
RIRS_SUBDIR = "real_rirs_isotropic_noises"


@dataclass
class SplitSummary:
    """What preparation kept of one split."""

    num_utts: int
    num_speakers: int
    num_device09: int
    num_missing: int


def check_corpus_layout(corpus_dir: Path) -> None:
    """Fail with one message that lists every missing part of the corpus and where it was sought."""
    missing = []
    if not corpus_dir.is_dir():
        raise DataError(
            f"3D-Speaker corpus not found: {corpus_dir} is not a directory (expected "
            f"train/, test/ and files/ from train.tar.gz, test.tar.gz and "
            f"3dspeaker_files.tar.gz; see local/download_3dspeaker.py)"
        )
    for split in SPLITS:
        if not (corpus_dir / split).is_dir():
            missing.append(f"{corpus_dir / split}/ (audio of {split}.tar.gz)")
    for name in METADATA_FILES:
        if not (corpus_dir / "files" / name).is_file():
            missing.append(f"{corpus_dir / 'files' / name} (from 3dspeaker_files.tar.gz)")
    if missing:
        raise DataError(
            f"3D-Speaker corpus at {corpus_dir} is incomplete; missing: " + "; ".join(missing)
        )


def resolve_audio_paths(corpus_dir: Path, split: str, relative: dict[str, str]) -> dict[str, str]:
    """Absolute paths of ``files/<split>_wav.scp`` entries.

    The metadata gives paths relative to the corpus root (``train/<SPK>/<utt>.wav``); paths relative
    to the split folder are accepted too. The first entry decides which convention applies.
    """
    if not relative:
        return {}
    first = next(iter(relative.values())).lstrip("/")
    base = corpus_dir
    if not (corpus_dir / first).exists() and (corpus_dir / split / first).exists():
        base = corpus_dir / split
    prefix = f"{base}{os.sep}"  # plain strings: a Path per file costs more than the stat
    return {utt: prefix + rel.lstrip("/") for utt, rel in relative.items()}


def read_utt2info_csv(path: Path) -> dict[str, str]:
    """``utt -> "spk session device distance dialect"`` from ``<split>_utt2info.csv`` (comma
    separated; an ``Utt-id`` header row is skipped; the 6th field is the dialect name; spaces
    inside a field become ``_``, empty fields ``-``)."""
    info: dict[str, str] = {}
    with open(path, encoding="utf-8-sig", newline="") as f:
        for lineno, row in enumerate(csv.reader(f), 1):
            if not row or (lineno == 1 and row[0].strip().lower() == "utt-id"):
                continue
            if len(row) < 6:
                raise DataError(
                    f"{path}:{lineno}: expected at least 6 comma-separated fields "
                    f"(utt, speaker, session, device, distance, dialect), got {len(row)}"
                )
            info[row[0].strip()] = " ".join(
                field.strip().replace(" ", "_") or "-" for field in row[1:]
            )
    return info


def _examples(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def prepare_split(
    corpus_dir: Path, split: str, out_dir: Path, skip_missing: bool = False
) -> SplitSummary:
    """Write the Kaldi directory of one split without Device09; check that all audio exists."""
    files = corpus_dir / "files"
    relative = read_table(files / f"{split}_wav.scp")
    utt2spk = read_table(files / f"{split}_utt2spk")
    if relative.keys() != utt2spk.keys():
        only_scp = sorted(set(relative) - set(utt2spk))
        only_spk = sorted(set(utt2spk) - set(relative))
        raise DataError(
            f"{files / f'{split}_wav.scp'} and {files / f'{split}_utt2spk'} list "
            f"different utterances: only in wav.scp: {_examples(only_scp) or 'none'}; "
            f"only in utt2spk: {_examples(only_spk) or 'none'}"
        )
    kept = {utt: rel for utt, rel in relative.items() if EXCLUDED_DEVICE not in utt}
    num_listed = len(relative)
    del relative  # the lists of a full corpus take hundreds of MB: keep one copy at a time
    paths = resolve_audio_paths(corpus_dir, split, kept)
    del kept
    missing = [path for path in paths.values() if not os.path.isfile(path)]
    if missing and not skip_missing:
        raise DataError(
            f"{len(missing)} of {len(paths)} {split} audio files listed in "
            f"{files / f'{split}_wav.scp'} are missing under {corpus_dir}: "
            f"{_examples(missing)} (is {split}.tar.gz fully extracted? "
            f"--skip_missing drops them)"
        )
    if missing:
        print(
            f"warning: dropping {len(missing)} missing {split} files: {_examples(missing)}",
            file=sys.stderr,
        )
        missing_set = set(missing)
        paths = {utt: path for utt, path in paths.items() if path not in missing_set}
    info = read_utt2info_csv(files / f"{split}_utt2info.csv")
    no_info = [utt for utt in paths if utt not in info]
    if no_info:
        print(
            f"warning: {len(no_info)} {split} utterances have no row in "
            f"{files / f'{split}_utt2info.csv'}: {_examples(no_info)}",
            file=sys.stderr,
        )
    utts = sorted(paths)
    kept_utt2spk = {utt: utt2spk[utt] for utt in utts}
    del utt2spk
    write_table(out_dir / "wav.scp", ((utt, paths[utt]) for utt in utts))
    write_table(out_dir / "utt2spk", kept_utt2spk.items())
    spk2utt = spk2utt_from_utt2spk(kept_utt2spk)
    write_table(out_dir / "spk2utt", ((spk, " ".join(u)) for spk, u in spk2utt.items()))
    write_table(out_dir / "utt2info", ((utt, info[utt]) for utt in utts if utt in info))
    return SplitSummary(
        num_utts=len(utts),
        num_speakers=len(spk2utt),
        num_device09=num_listed - len(utts) - len(missing),
        num_missing=len(missing),
    )


def prepare_trials(corpus_dir: Path, out_dir: Path, test_utts: set[str]) -> dict[str, int]:
    """Check the three trial lists against the prepared test set and copy them unchanged.

    A trial that names an utterance missing from the test set is an error, unless that utterance
    was dropped as missing audio (``--skip_missing``): such trials are left out with a warning.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    listed = set(read_table(corpus_dir / "files" / "test_wav.scp"))
    counts = {}
    for name in TRIAL_LISTS:
        src = corpus_dir / "files" / name
        trials = read_trials(src)
        known = np.fromiter(
            (e in test_utts and t in test_utts for e, t in zip(trials.enrol, trials.test)),
            dtype=bool,
            count=len(trials),
        )
        for i in np.flatnonzero(~known).tolist():
            unknown = [u for u in (trials.enrol[i], trials.test[i]) if u not in test_utts]
            if not all(u in listed and EXCLUDED_DEVICE not in u for u in unknown):
                raise DataError(
                    f"{src}:{trials.line_numbers[i]}: utterance {unknown[0]} is not in the "
                    f"prepared test set (not in files/test_wav.scp, or recorded with "
                    f"{EXCLUDED_DEVICE})"
                )
        dest = out_dir / name
        dropped = len(trials) - int(known.sum())
        if dropped:  # their audio was missing and dropped on request
            print(
                f"warning: {name}: left out {dropped} trials whose audio is missing",
                file=sys.stderr,
            )
            write_trials(dest, trials.subset(known))
        else:
            write_bytes_atomic(dest, src.read_bytes())
        counts[name] = len(trials) - dropped
    return counts


def prepare_musan(musan_dir: Path, out_dir: Path) -> int:
    """``wav.scp`` of MUSAN ``noise/free-sound`` (ids: the last three path components)."""
    noise_dir = musan_dir / MUSAN_NOISE_SUBDIR
    wavs = sorted(noise_dir.glob("*.wav")) if noise_dir.is_dir() else []
    if not wavs:
        raise DataError(
            f"no MUSAN noise found: {noise_dir} "
            f"{'has no .wav files' if noise_dir.is_dir() else 'does not exist'} "
            f"(expected the MUSAN root from musan.tar.gz, containing noise/free-sound)"
        )
    write_table(
        out_dir / "wav.scp",
        ((f"{MUSAN_NOISE_SUBDIR.as_posix()}/{wav.name}", str(wav.resolve())) for wav in wavs),
    )
    return len(wavs)


def prepare_rirs(rirs_dir: Path, out_dir: Path) -> int:
    """``wav.scp`` of the room responses in ``real_rirs_isotropic_noises``.

    Uses its ``rir_list`` (the 5th field is the path relative to the folder above RIRS_NOISES) so
    that the isotropic-noise recordings kept in the same folder are left out; without a list,
    every .wav of the folder is taken.
    """
    rir_dir = rirs_dir / RIRS_SUBDIR
    if not rir_dir.is_dir():
        raise DataError(
            f"no room impulse responses found: {rir_dir} does not exist (expected the "
            f"RIRS_NOISES root from rirs_noises.zip)"
        )
    rir_list = rir_dir / "rir_list"
    entries = []
    if rir_list.is_file():
        with open(rir_list, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                fields = line.split()
                if not fields:
                    continue
                if len(fields) < 5:
                    raise DataError(
                        f"{rir_list}:{lineno}: expected '--rir-id ID --room-id ROOM "
                        f"PATH', got {line.strip()!r}"
                    )
                rel = fields[4]
                path = rirs_dir.parent / rel
                if not path.is_file():
                    path = rirs_dir / Path(*Path(rel).parts[1:])
                if not path.is_file():
                    raise DataError(f"{rir_list}:{lineno}: {rel} not found under {rirs_dir.parent}")
                entries.append((rel, str(path.resolve())))
    else:
        entries = [
            (f"{rirs_dir.name}/{RIRS_SUBDIR}/{wav.name}", str(wav.resolve()))
            for wav in sorted(rir_dir.glob("*.wav"))
        ]
    if not entries:
        raise DataError(f"no room impulse responses found in {rir_dir}")
    write_table(out_dir / "wav.scp", entries)
    return len(entries)


def prepare_3dspeaker(
    corpus_dir: str | Path,
    data_dir: str | Path,
    musan_dir: str | Path | None = None,
    rirs_dir: str | Path | None = None,
    skip_missing: bool = False,
) -> dict:
    """Prepare everything; returns a summary (counts per split, trials, noises, RIRs)."""
    corpus_dir, data_dir = Path(corpus_dir).resolve(), Path(data_dir)
    check_corpus_layout(corpus_dir)
    summary: dict = {}
    for split in SPLITS:
        summary[split] = prepare_split(
            corpus_dir, split, data_dir / "3dspeaker" / split, skip_missing
        )
    test_utts = set(read_table(data_dir / "3dspeaker" / "test" / "wav.scp"))
    summary["trials"] = prepare_trials(corpus_dir, data_dir / "3dspeaker" / "trials", test_utts)
    if musan_dir is not None:
        summary["musan"] = prepare_musan(Path(musan_dir), data_dir / "musan")
    if rirs_dir is not None:
        summary["rirs"] = prepare_rirs(Path(rirs_dir), data_dir / "rirs")
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--corpus_dir", required=True, help="3D-Speaker root with train/, test/ and files/"
    )
    parser.add_argument("--data_dir", required=True, help="where 3dspeaker/, musan/, rirs/ go")
    parser.add_argument("--musan_dir", help="MUSAN root (with noise/free-sound); omit to skip")
    parser.add_argument("--rirs_dir", help="RIRS_NOISES root; omit to skip")
    parser.add_argument(
        "--skip_missing",
        action="store_true",
        help="drop listed utterances whose audio is missing instead of failing",
    )
    args = parser.parse_args(argv)
    try:
        summary = prepare_3dspeaker(
            args.corpus_dir, args.data_dir, args.musan_dir, args.rirs_dir, args.skip_missing
        )
    except SpeakerlabError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    for split in SPLITS:
        s = summary[split]
        print(
            f"{split}: {s.num_utts} utterances, {s.num_speakers} speakers "
            f"({s.num_device09} {EXCLUDED_DEVICE} utterances dropped"
            f"{f', {s.num_missing} missing dropped' if s.num_missing else ''})"
        )
    print("trials: " + ", ".join(f"{name} {n}" for name, n in summary["trials"].items()))
    for name in ("musan", "rirs"):
        if name in summary:
            print(f"{name}: {summary[name]} files")


if __name__ == "__main__":
    main()
