"""A corpus of the real 3D-Speaker's size and layout with short noise files, for scale benchmarks.

What matters at scale is how many files, speakers and trials there are, not what the audio
says, so every recording is a short burst of noise (0.5-2 s, 16 kHz mono) and the corpus is
written by parallel processes. The layout is the one ``local/prepare_3dspeaker.py`` reads::

    <out>/3dspeaker/{train,test}/<SPK>/<SPK>_<NNN>_DeviceXX_DistanceYY_DialectZZ.wav
    <out>/3dspeaker/files/{train,test}_wav.scp, {train,test}_utt2spk, {train,test}_utt2info.csv,
                          trials_cross_device, trials_cross_distance, trials_cross_dialect

At ``fraction=1`` it has the real corpus's counts: 10,000 training speakers with 57 recordings
each, a 20,000-utterance test set and three 180,000-pair trial lists. About one recording in 19
is made with Device09 (the array device that preparation drops), as in the real corpus.

    python benchmarks/scale_corpus.py --out_dir /tmp/scale_1pct --fraction 0.01
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import multiprocessing
import os
import shutil
import time
import wave
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000
BLOCK = 4096  # file-system allocation unit assumed for the disk estimate
DEVICE09_EVERY = 19  # one recording in this many is made with the array device (Device09)
TRIAL_LISTS = ("trials_cross_device", "trials_cross_distance", "trials_cross_dialect")
TARGET_SHARE = 0.1  # share of target trials in each list
UTT2INFO_HEADER = ["Utt-id", "Spk-id", "Seg-id", "Device", "Distance", "Dialect"]
BYTES_PER_SAMPLE = {"PCM_16": 2, "PCM_U8": 1}


@dataclass(frozen=True)
class CorpusPlan:
    """Counts of a corpus at ``fraction`` of the real one's size."""

    fraction: float
    train_speakers: int
    recordings_per_speaker: int
    test_speakers: int
    test_utterances: int
    trials_per_list: int
    min_seconds: float = 0.5
    max_seconds: float = 2.0
    subtype: str = "PCM_16"
    seed: int = 0

    @classmethod
    def at(cls, fraction: float, subtype: str = "PCM_16", seed: int = 0) -> CorpusPlan:
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        if subtype not in BYTES_PER_SAMPLE:
            raise ValueError(f"subtype must be one of {sorted(BYTES_PER_SAMPLE)}, got {subtype}")
        return cls(
            fraction=fraction,
            train_speakers=max(2, round(10_000 * fraction)),
            recordings_per_speaker=57,
            test_speakers=max(4, round(240 * fraction)),
            test_utterances=max(40, round(20_000 * fraction)),
            trials_per_list=max(100, round(180_000 * fraction)),
            subtype=subtype,
            seed=seed,
        )

    @property
    def num_files(self) -> int:
        return self.train_speakers * self.recordings_per_speaker + self.test_utterances

    def disk_bytes(self) -> int:
        """Expected disk use: mean file size rounded up to whole blocks, times the file count."""
        mean_seconds = (self.min_seconds + self.max_seconds) / 2
        mean_bytes = 44 + mean_seconds * SAMPLE_RATE * BYTES_PER_SAMPLE[self.subtype]
        return int(self.num_files * (math.ceil(mean_bytes / BLOCK) + 0.5) * BLOCK)


def speaker_id(number: int) -> str:
    return f"3D_SPK_{number:05d}"


def speaker_recordings(number: int, count: int, first: int) -> list[list[str]]:
    """utt2info rows ``[utt, speaker, session, device, distance, dialect]`` of one speaker:
    three devices record each session; the speaker's recording ``k`` is recording ``first + k``
    of the corpus, whose number decides whether it is made with Device09."""
    speaker = speaker_id(number)
    rows = []
    for k in range(count):
        session = k // 3 + 1
        device = 9 if (first + k) % DEVICE09_EVERY == DEVICE09_EVERY - 1 else k % 3 + 1 + k // 3 % 6
        distance, dialect = k % 6, session % 14
        conditions = f"Device{device:02d}_Distance{distance:02d}_Dialect{dialect:02d}"
        utt = f"{speaker}_{session:03d}_{conditions}"
        rows.append(
            [utt, speaker, f"{session:03d}", f"Device{device:02d}", f"{distance}m", str(dialect)]
        )
    return rows


def write_speaker(job: tuple[str, str, int, list[str], str, int]) -> None:
    """Write the noise files of one speaker (a unit of parallel work). The standard library's
    ``wave`` writes a small file ten times faster than libsndfile, which rewrites its header."""
    root, split, number, utts, subtype, seed = job
    rng = np.random.default_rng([seed, number])
    folder = Path(root) / split / speaker_id(number)
    folder.mkdir(parents=True, exist_ok=True)
    lengths = rng.integers(SAMPLE_RATE // 2, 2 * SAMPLE_RATE + 1, size=len(utts))
    width = BYTES_PER_SAMPLE[subtype]
    noise = rng.normal(0.0, 0.1, int(lengths.max())) * 2 ** (8 * width - 1)
    samples = (noise + 128).astype(np.uint8) if width == 1 else noise.astype("<i2")
    for utt, length in zip(utts, lengths):
        shift = int(rng.integers(len(samples) - length + 1))  # a different stretch for each file
        with wave.open(str(folder / f"{utt}.wav"), "wb") as out:
            out.setnchannels(1)
            out.setsampwidth(width)
            out.setframerate(SAMPLE_RATE)
            out.writeframes(samples[shift : shift + length].tobytes())


def plan_rows(plan: CorpusPlan) -> dict[str, list[tuple[int, list[list[str]]]]]:
    """Per split: (speaker number, utt2info rows) of every speaker."""
    train, first = [], 0
    for number in range(1, plan.train_speakers + 1):
        train.append((number, speaker_recordings(number, plan.recordings_per_speaker, first)))
        first += plan.recordings_per_speaker
    test, per_speaker = [], np.array_split(np.arange(plan.test_utterances), plan.test_speakers)
    for offset, share in enumerate(per_speaker):
        number = plan.train_speakers + 1 + offset
        test.append((number, speaker_recordings(number, len(share), first)))
        first += len(share)
    return {"train": train, "test": test}


def write_metadata(files: Path, split: str, speakers: list[tuple[int, list[list[str]]]]) -> None:
    rows = sorted(row for _, rows in speakers for row in rows)
    with open(files / f"{split}_wav.scp", "w", encoding="utf-8") as f:
        f.writelines(f"{r[0]} {split}/{r[1]}/{r[0]}.wav\n" for r in rows)
    with open(files / f"{split}_utt2spk", "w", encoding="utf-8") as f:
        f.writelines(f"{r[0]} {r[1]}\n" for r in rows)
    with open(files / f"{split}_utt2info.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(UTT2INFO_HEADER)
        writer.writerows(rows)


def write_trials(files: Path, test: list[tuple[int, list[list[str]]]], plan: CorpusPlan) -> None:
    """Random target (same speaker) and non-target pairs of test utterances without Device09."""
    utts, spk = [], []
    for number, rows in test:
        kept = [r[0] for r in rows if r[3] != "Device09"]
        utts += kept
        spk += [number] * len(kept)
    utts_arr, spk_arr = np.array(utts), np.array(spk)
    # Utterances are grouped by speaker: [starts, starts + counts) are each one's speaker's.
    starts = np.searchsorted(spk_arr, spk_arr, side="left")
    counts = np.searchsorted(spk_arr, spk_arr, side="right") - starts
    for number, name in enumerate(TRIAL_LISTS):
        rng = np.random.default_rng([plan.seed, 77, number])
        n_target = int(plan.trials_per_list * TARGET_SHARE)
        a = rng.integers(len(utts), size=n_target)
        b = starts[a] + (a - starts[a] + rng.integers(1, counts[a])) % counts[a]
        n_non = plan.trials_per_list - n_target
        c = rng.integers(len(utts), size=2 * n_non)
        d = rng.integers(len(utts), size=2 * n_non)
        keep = np.flatnonzero(spk_arr[c] != spk_arr[d])[:n_non]
        enrol = np.concatenate([a, c[keep]])
        test_ = np.concatenate([b, d[keep]])
        labels = np.array(["target"] * n_target + ["nontarget"] * len(keep))
        order = rng.permutation(len(enrol))
        with open(files / name, "w", encoding="utf-8") as f:
            f.writelines(
                f"{e} {t} {lab}\n"
                for e, t, lab in zip(utts_arr[enrol[order]], utts_arr[test_[order]], labels[order])
            )


def generate_corpus(out_dir: str | Path, plan: CorpusPlan, num_workers: int | None = None) -> Path:
    """Write the corpus under ``out_dir/3dspeaker`` (reused when already complete for ``plan``);
    returns the corpus folder."""
    corpus = Path(out_dir) / "3dspeaker"
    marker = corpus / ".plan.json"
    if marker.is_file() and json.loads(marker.read_text()) == asdict(plan):
        return corpus
    if corpus.exists():
        shutil.rmtree(corpus)
    files = corpus / "files"
    files.mkdir(parents=True)
    rows = plan_rows(plan)
    jobs = [
        (str(corpus), split, number, [r[0] for r in speaker_rows], plan.subtype, plan.seed)
        for split, speakers in rows.items()
        for number, speaker_rows in speakers
    ]
    with multiprocessing.get_context("fork").Pool(num_workers or os.cpu_count()) as pool:
        for _ in pool.imap_unordered(write_speaker, jobs, chunksize=8):
            pass
    for split, speakers in rows.items():
        write_metadata(files, split, speakers)
    write_trials(files, rows["test"], plan)
    marker.write_text(json.dumps(asdict(plan)))
    return corpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--fraction", type=float, default=0.01, help="of the real corpus's size")
    parser.add_argument("--subtype", default="PCM_16", choices=sorted(BYTES_PER_SAMPLE))
    parser.add_argument("--num_workers", type=int, default=None, help="default: one per core")
    args = parser.parse_args()
    plan = CorpusPlan.at(args.fraction, args.subtype)
    print(f"{plan.num_files} files, about {plan.disk_bytes() / 1e9:.2f} GB")
    start = time.perf_counter()
    corpus = generate_corpus(args.out_dir, plan, args.num_workers)
    print(f"{corpus} written in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
