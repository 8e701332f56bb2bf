"""The 3D-Speaker layout: utterance ids, the metadata files of ``files/`` and cross-condition
trial lists."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from local.simulate.recording import DEVICE_NAMES, DISTANCES_M
from local.simulate.voices import Dialect

TRIAL_CONDITIONS = ("device", "distance", "dialect")
UTT2INFO_HEADER = ["Utt-id", "Spk-id", "Seg-id", "Device", "Distance", "Dialect"]


@dataclass
class UttRecord:
    """One simulated recording and its metadata."""

    utt: str
    speaker: str
    session: str
    device: str
    distance: str
    dialect: str
    relpath: str
    num_samples: int = 0


def speaker_id(number: int) -> str:
    return f"3D_SPK_{number:05d}"


def utt_id(speaker: str, session: int, device: str, distance: str, dialect: str) -> str:
    return f"{speaker}_{session:03d}_Device{device}_Distance{distance}_Dialect{dialect}"


def make_trials(
    records: list[UttRecord], condition: str, rng: np.random.Generator, nontarget_ratio: float
) -> list[tuple[str, str, str]]:
    """Cross-``condition`` trials: enrolment and test differ in that condition.

    Targets are all same-speaker pairs from different sessions (different spoken texts) and
    different condition values; nontargets are sampled from the different-speaker pairs that
    differ in the condition, ``nontarget_ratio`` times as many as the targets.
    """
    records = sorted(records, key=lambda r: r.utt)
    utts = np.array([r.utt for r in records])
    spk = np.array([r.speaker for r in records])
    sess = np.array([r.speaker + r.session for r in records])
    cond = np.array([getattr(r, condition) for r in records])
    first, second = np.triu_indices(len(records), k=1)
    differs = cond[first] != cond[second]
    is_target = differs & (spk[first] == spk[second]) & (sess[first] != sess[second])
    nontarget_pool = np.flatnonzero(differs & (spk[first] != spk[second]))
    num_nontargets = min(len(nontarget_pool), int(round(nontarget_ratio * is_target.sum())))
    chosen = np.zeros(len(first), dtype=bool)
    chosen[rng.choice(nontarget_pool, size=num_nontargets, replace=False)] = True
    keep = np.flatnonzero(is_target | chosen)
    return [
        (str(utts[first[k]]), str(utts[second[k]]), "target" if is_target[k] else "nontarget")
        for k in keep
    ]


def write_metadata(
    corpus_dir: Path, split: str, records: list[UttRecord], dialects: list[Dialect]
) -> None:
    """``files/<split>_wav.scp``, ``<split>_utt2spk`` and ``<split>_utt2info.csv``."""
    files = corpus_dir / "files"
    files.mkdir(parents=True, exist_ok=True)
    records = sorted(records, key=lambda r: r.utt)
    with open(files / f"{split}_wav.scp", "w", encoding="utf-8") as f:
        f.writelines(f"{r.utt} {r.relpath}\n" for r in records)
    with open(files / f"{split}_utt2spk", "w", encoding="utf-8") as f:
        f.writelines(f"{r.utt} {r.speaker}\n" for r in records)
    with open(files / f"{split}_utt2info.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(UTT2INFO_HEADER)
        for r in records:
            writer.writerow(
                [
                    r.utt,
                    r.speaker,
                    r.session,
                    DEVICE_NAMES[r.device],
                    f"{DISTANCES_M[r.distance]}m",
                    dialects[int(r.dialect)].name,
                ]
            )
