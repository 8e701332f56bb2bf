"""A whole simulated corpus: speakers synthesised in parallel, written in the 3D-Speaker layout with
its metadata and trial lists, plus the noise and room-response sets.

As in the real corpus, one session (``NNN``) is a single spoken text recorded at once by several
devices at several distances, so an utterance id ``<SPK>_<NNN>_DeviceXX_DistanceYY_DialectZZ``
names one rendering of a session. Speakers talk Standard Mandarin in some sessions and their native
dialect in others. Everything is deterministic for a given seed and size: each speaker, noise and
room response draws from its own generator, seeded by the corpus seed and its number.
"""

from __future__ import annotations

import multiprocessing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile

from local.simulate.layout import (
    TRIAL_CONDITIONS,
    UttRecord,
    make_trials,
    speaker_id,
    utt_id,
    write_metadata,
)
from local.simulate.noise_sets import simulate_noises, simulate_rirs
from local.simulate.recording import (
    DISTANCES_M,
    DeviceProfile,
    make_devices,
    render_device,
    render_distance,
)
from local.simulate.speech import synthesize_speech
from local.simulate.voices import Dialect, make_dialects, sample_voice
from speakerlab.audio import SAMPLE_RATE


@dataclass(frozen=True)
class SimulationConfig:
    """Sizes and seed of a simulated corpus (defaults: the mini corpus of the recipe)."""

    num_train_speakers: int = 160
    num_test_speakers: int = 20
    utts_per_speaker: int = 8
    renders_per_session: int = 2  # devices/distances recording each spoken text at once
    min_seconds: float = 3.0
    max_seconds: float = 8.0
    num_noises: int = 8
    num_rirs: int = 8
    nontarget_ratio: float = 3.0  # nontarget trials per target trial in each list
    seed: int = 0


@dataclass
class SimulatedCorpus:
    """Where the simulation wrote its parts."""

    corpus_dir: Path
    musan_dir: Path
    rirs_dir: Path
    train: list[UttRecord] = field(default_factory=list)
    test: list[UttRecord] = field(default_factory=list)


def simulate_speaker(job: dict) -> list[UttRecord]:
    """Synthesise and write all recordings of one speaker (a unit of parallel work)."""
    config: SimulationConfig = job["config"]
    dialects: list[Dialect] = job["dialects"]
    devices: dict[str, DeviceProfile] = job["devices"]
    number, split, root = job["number"], job["split"], Path(job["corpus_dir"])
    speaker = speaker_id(number)
    rng = np.random.default_rng([config.seed, 3003, number])
    # One speaker in five talks only Standard Mandarin; the others also their own dialect.
    native = 0 if rng.random() < 0.2 else int(rng.integers(1, len(dialects)))
    voice = sample_voice(rng, native)
    num_sessions = -(-config.utts_per_speaker // config.renders_per_session)
    first_dialect = int(rng.integers(2))
    spk_dir = root / split / speaker
    spk_dir.mkdir(parents=True, exist_ok=True)
    records, written = [], 0
    for session in range(1, num_sessions + 1):
        dialect = dialects[native if (session + first_dialect) % 2 else 0]
        seconds = rng.uniform(config.min_seconds, config.max_seconds)
        speech = synthesize_speech(voice, dialect, seconds, rng)
        room = {
            "rt60": rng.uniform(0.2, 0.6),
            "critical_distance": rng.uniform(1.0, 2.0),
            "snr_close": rng.uniform(40.0, 46.0),
            "noise_exponent": rng.uniform(0.0, 2.0),
            "hum": rng.uniform(0.0, 0.5),
        }
        renders = min(config.renders_per_session, config.utts_per_speaker - written)
        device_codes = list(rng.choice(sorted(devices), size=renders, replace=False))
        if job["force_device09"] and session == 1 and "09" not in device_codes:
            device_codes[0] = "09"  # so that every split exercises the Device09 removal
        for device_code in device_codes:
            distance = str(rng.choice(sorted(DISTANCES_M)))
            audio = render_device(
                render_distance(speech, DISTANCES_M[distance], room, rng),
                devices[str(device_code)],
                rng,
            )
            utt = utt_id(speaker, session, str(device_code), distance, dialect.code)
            relpath = f"{split}/{speaker}/{utt}.wav"
            soundfile.write(root / relpath, audio.astype(np.float32), SAMPLE_RATE, subtype="PCM_16")
            records.append(
                UttRecord(
                    utt,
                    speaker,
                    f"{session:03d}",
                    str(device_code),
                    distance,
                    dialect.code,
                    relpath,
                    len(audio),
                )
            )
            written += 1
    return records


def simulate_corpus(
    out_dir: str | Path, config: SimulationConfig = SimulationConfig(), num_workers: int = 1
) -> SimulatedCorpus:
    """Write the corpus, its metadata and trials, and the noise and RIR sets under ``out_dir``."""
    if config.utts_per_speaker < 2 or config.renders_per_session < 1:
        raise ValueError("need at least 2 utterances per speaker and 1 render per session")
    if not 0 < config.min_seconds <= config.max_seconds:
        raise ValueError(f"bad duration range {config.min_seconds}..{config.max_seconds}")
    out_dir = Path(out_dir).resolve()
    corpus = SimulatedCorpus(
        corpus_dir=out_dir / "3dspeaker",
        musan_dir=out_dir / "musan",
        rirs_dir=out_dir / "RIRS_NOISES",
    )
    dialects, devices = make_dialects(config.seed), make_devices(config.seed)
    splits = {
        "train": range(1, config.num_train_speakers + 1),
        "test": range(
            config.num_train_speakers + 1, config.num_train_speakers + config.num_test_speakers + 1
        ),
    }
    jobs = [
        {
            "config": config,
            "dialects": dialects,
            "devices": devices,
            "number": number,
            "split": split,
            "corpus_dir": str(corpus.corpus_dir),
            "force_device09": number == numbers[0],
        }
        for split, numbers in splits.items()
        for number in numbers
    ]
    if num_workers > 1:
        with multiprocessing.get_context("fork").Pool(num_workers) as pool:
            results = pool.map(simulate_speaker, jobs, chunksize=1)
    else:
        results = [simulate_speaker(job) for job in jobs]
    for job, records in zip(jobs, results):
        getattr(corpus, job["split"]).extend(records)
    for split in splits:
        write_metadata(corpus.corpus_dir, split, getattr(corpus, split), dialects)
    testable = [r for r in corpus.test if r.device != "09"]  # Device09 is dropped at preparation
    for number, condition in enumerate(TRIAL_CONDITIONS):
        rng = np.random.default_rng([config.seed, 6006, number])
        trials = make_trials(testable, condition, rng, config.nontarget_ratio)
        with open(
            corpus.corpus_dir / "files" / f"trials_cross_{condition}", "w", encoding="utf-8"
        ) as f:
            f.writelines(f"{a} {b} {label}\n" for a, b, label in trials)
    simulate_noises(corpus.musan_dir, config.num_noises, dialects, config.seed)
    simulate_rirs(corpus.rirs_dir, config.num_rirs, config.seed)
    return corpus
