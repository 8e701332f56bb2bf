#!/usr/bin/env python3
"""Throughput of the training data pipeline: 3 s training samples per second per worker process.

Each configuration (speed perturbation on/off x augmentation on/off) makes ``--num_items`` items
in one process with one torch thread, as a DataLoader worker does. Two rates are reported: per
wall-clock second, and per CPU second of the process (what a worker gets from a core of its own;
steadier when other jobs share the machine). A reference-style pipeline (whole file read, crop,
scipy convolution, torchaudio's Kaldi fbank) is timed the same way as a baseline on the same
machine at the same moment; without torchaudio installed, the baseline computes fbank with
speakerlab's (the report says which).

Without ``--data_dir`` a small corpus of 8 s utterances is simulated and prepared in a temporary
folder first. Prints JSON (and writes it to ``--out`` if given).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.signal
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for local/ when run as a script

from speakerlab.audio import read_audio  # noqa: E402
from speakerlab.data.dataset import TrainDataset, limit_worker_threads  # noqa: E402
from speakerlab.data.index import build_train_index, load_train_index  # noqa: E402
from speakerlab.features import fbank  # noqa: E402

CONFIGS = [
    ("plain", (1.0,), 0.0),
    ("speed", (1.0, 0.9, 1.1), 0.0),
    ("augment", (1.0,), 0.8),
    ("speed+augment", (1.0, 0.9, 1.1), 0.8),
]


def simulate_data(work_dir: Path) -> tuple[Path, Path, Path]:
    """A small simulated corpus of 8 s utterances, prepared: (train dir, noise list, rir list)."""
    from local.prepare_3dspeaker import prepare_3dspeaker
    from local.simulate_mini_corpus import SimulationConfig, simulate_corpus

    config = SimulationConfig(
        num_train_speakers=10,
        num_test_speakers=2,
        utts_per_speaker=8,
        min_seconds=7.0,
        max_seconds=9.0,
        num_noises=8,
        num_rirs=8,
    )
    corpus = simulate_corpus(work_dir / "raw", config, num_workers=os.cpu_count() or 1)
    prepare_3dspeaker(corpus.corpus_dir, work_dir / "data", corpus.musan_dir, corpus.rirs_dir)
    data = work_dir / "data"
    return data / "3dspeaker" / "train", data / "musan" / "wav.scp", data / "rirs" / "wav.scp"


def time_items(make_item, num_items: int, warmup: int = 10) -> dict:
    """Rates of ``make_item(i)`` over ``num_items`` items."""
    for i in range(warmup):
        make_item(i)
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(num_items):
        make_item(warmup + i)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "samples_per_s_wall": round(num_items / wall, 1),
        "samples_per_s_cpu": round(num_items / cpu, 1),
    }


def baseline_fbank() -> tuple[str, object]:
    """(name, wav -> mean-normalised fbank): torchaudio's Kaldi fbank if installed."""
    if importlib.util.find_spec("torchaudio") is None:
        return "speakerlab", fbank
    from torchaudio.compliance import kaldi

    def torchaudio_fbank(wav: torch.Tensor) -> torch.Tensor:
        feats = kaldi.fbank(wav.unsqueeze(0), num_mel_bins=80, dither=0.0)
        return feats - feats.mean(dim=0, keepdim=True)

    return "torchaudio", torchaudio_fbank


class ReferenceStylePipeline:
    """The reference recipe's way, for comparison: read the whole file, crop 3 s, augment with
    ``scipy.signal.convolve`` and whole noise files, fbank with torchaudio's Kaldi fbank."""

    def __init__(self, dataset: TrainDataset, noises: list[str], rirs: list[str]):
        self.dataset, self.noises, self.rirs = dataset, noises, rirs
        self.crop = dataset.crop_samples
        self.fbank_name, self.fbank = baseline_fbank()

    def __call__(self, i: int) -> torch.Tensor:
        index = self.dataset.index
        row = i % len(index)
        wav, _ = read_audio(index.paths[row])
        if len(wav) >= self.crop:
            start = random.randint(0, len(wav) - self.crop)
            wav = wav[start : start + self.crop]
        else:
            wav = np.pad(wav, (0, self.crop - len(wav)))
        if random.random() < 0.8:
            kind = random.randint(0, 2)
            if kind in (0, 2):
                rir, _ = read_audio(random.choice(self.rirs))
                rir = rir / np.sqrt(np.sum(rir**2))
                wav = scipy.signal.convolve(wav, rir, mode="full")[: len(wav)]
                wav = wav / (np.max(np.abs(wav)) + 1e-6)
            if kind in (1, 2):
                noise, _ = read_audio(random.choice(self.noises))
                if len(noise) >= len(wav):
                    start = random.randint(0, len(noise) - len(wav))
                    noise = noise[start : start + len(wav)]
                else:
                    noise = np.resize(noise, len(wav))
                snr = random.uniform(0, 15)
                wav_db = 10 * np.log10(np.mean(wav**2) + 1e-6)
                noise_db = 10 * np.log10(np.mean(noise**2) + 1e-6)
                wav = wav + np.sqrt(10 ** ((wav_db - noise_db - snr) / 10)) * noise
                wav = wav / (np.max(np.abs(wav)) + 1e-6)
        return self.fbank(torch.from_numpy(np.asarray(wav, dtype=np.float32)))


def run(train_dir: Path, noise_list: Path, rir_list: Path, num_items: int) -> dict:
    """Time every configuration and the reference-style baseline."""
    limit_worker_threads()  # one thread, as in a DataLoader worker
    with tempfile.TemporaryDirectory(prefix="bench_index_") as work:
        index = load_train_index(build_train_index(train_dir, Path(work) / "index.tsv"))
    results = []
    for name, speeds, augment_prob in CONFIGS:
        dataset = TrainDataset(
            index,
            speeds=speeds,
            augment_prob=augment_prob,
            noise_list=noise_list,
            rir_list=rir_list,
            seed=0,
        )
        rates = time_items(lambda i, d=dataset: d[i % len(d)], num_items)
        results.append(
            {
                "pipeline": "speakerlab",
                "config": name,
                "speeds": list(speeds),
                "augment_prob": augment_prob,
                **rates,
            }
        )
    dataset = TrainDataset(index, speeds=(1.0,), augment_prob=0.0)
    noises = [line.split(maxsplit=1)[1].strip() for line in open(noise_list, encoding="utf-8")]
    rirs = [line.split(maxsplit=1)[1].strip() for line in open(rir_list, encoding="utf-8")]
    random.seed(0)
    baseline = ReferenceStylePipeline(dataset, noises, rirs)
    rates = time_items(baseline, num_items)
    results.append(
        {
            "pipeline": "reference-style",
            "config": "augment",
            "speeds": [1.0],
            "augment_prob": 0.8,
            "fbank": baseline.fbank_name,
            **rates,
        }
    )
    return {
        "num_items": num_items,
        "crop_seconds": dataset.crop_samples / 16000,
        "mean_utterance_seconds": round(float(index.num_samples.mean()) / 16000, 2),
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "load_average_1min": round(os.getloadavg()[0], 2),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "results": results,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", help="Kaldi training dir (default: simulate a small corpus)")
    parser.add_argument("--noise_list", help="noise wav.scp (with --data_dir)")
    parser.add_argument("--rir_list", help="room impulse response wav.scp (with --data_dir)")
    parser.add_argument("--num_items", type=int, default=500, help="items timed per configuration")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.data_dir:
        if not (args.noise_list and args.rir_list):
            parser.error("--data_dir needs --noise_list and --rir_list")
        report = run(
            Path(args.data_dir), Path(args.noise_list), Path(args.rir_list), args.num_items
        )
    else:
        with tempfile.TemporaryDirectory(prefix="bench_pipeline_") as work:
            report = run(*simulate_data(Path(work)), args.num_items)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
