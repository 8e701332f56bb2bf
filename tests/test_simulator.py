"""The mini-corpus simulator: layout, determinism, speaker identity and nuisance conditions."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from local.simulate.corpus import SimulationConfig, simulate_corpus
from local.simulate.recording import (
    DEVICE_NAMES,
    DISTANCES_M,
    make_devices,
    render_device,
    render_distance,
)
from local.simulate.speech import synthesize_speech
from local.simulate.voices import DIALECT_NAMES, make_dialects, sample_voice
from speakerlab.audio import load_audio
from speakerlab.data.kaldi_dir import read_table
from speakerlab.features import KaldiFbank

UTT_PATTERN = re.compile(r"(3D_SPK_\d{5})_(\d{3})_Device(0[1-9])_Distance(\d{2})_Dialect(\d{2})")
TINY = SimulationConfig(
    num_train_speakers=2,
    num_test_speakers=2,
    utts_per_speaker=4,
    min_seconds=1.0,
    max_seconds=1.5,
    num_noises=3,
    num_rirs=2,
    seed=3,
)


EXPECTED = Path(__file__).resolve().parent / "fixtures" / "expected"


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_corpus_is_the_one_the_single_file_simulator_wrote(tmp_path):
    """The simulator written before it became a package (tests/fixtures/README.md) made this
    corpus: every file byte for byte, except the recordings, whose noise is now mixed by
    ``speakerlab.data.augment.mix_at_snr`` in float32 where it was float64: a few samples in
    10^4 round to the neighbouring 16-bit value, none further."""
    config = SimulationConfig(
        num_train_speakers=1,
        num_test_speakers=2,
        utts_per_speaker=2,
        min_seconds=1.0,
        max_seconds=1.2,
        num_noises=5,
        num_rirs=2,
        seed=3,
    )
    simulate_corpus(tmp_path, config)
    expected = json.loads((EXPECTED / "simulator_digests.json").read_text())
    old_samples = dict(np.load(EXPECTED / "simulator_utterances.npz"))
    recordings = {name.replace("|", "/") for name in old_samples}
    got = tree_digest(tmp_path)
    assert got.keys() == expected.keys()
    assert {k: v for k, v in got.items() if k not in recordings} == {
        k: v for k, v in expected.items() if k not in recordings
    }
    changed = total = 0
    for name, old in old_samples.items():
        new, _ = soundfile.read(tmp_path / name.replace("|", "/"), dtype="int16")
        assert new.shape == old.shape
        difference = np.abs(new.astype(np.int32) - old)
        assert difference.max() <= 1, name
        changed, total = changed + np.count_nonzero(difference), total + difference.size
    assert changed < 1e-3 * total


def test_simulation_is_deterministic_for_a_seed(tmp_path):
    simulate_corpus(tmp_path / "a", TINY)
    simulate_corpus(tmp_path / "b", TINY, num_workers=2)  # parallel work changes nothing
    first = tree_digest(tmp_path / "a")
    assert first == tree_digest(tmp_path / "b")
    simulate_corpus(tmp_path / "c", dataclasses.replace(TINY, seed=4))
    other = tree_digest(tmp_path / "c")
    wavs = [name for name in first if name.endswith(".wav") and name in other]
    assert all(first[name] != other[name] for name in wavs if "free-sound" in name)
    assert first["3dspeaker/files/train_wav.scp"] != other["3dspeaker/files/train_wav.scp"]


def test_corpus_has_the_3dspeaker_layout(mini_data):
    root, files = mini_data.root, mini_data.root / "files"
    speakers = {}
    for split in ("train", "test"):
        wav_scp = read_table(files / f"{split}_wav.scp")
        utt2spk = read_table(files / f"{split}_utt2spk")
        assert wav_scp.keys() == utt2spk.keys()
        on_disk = sorted(p.relative_to(root).as_posix() for p in (root / split).rglob("*.wav"))
        assert sorted(wav_scp.values()) == on_disk
        for utt, rel in wav_scp.items():
            match = UTT_PATTERN.fullmatch(utt)
            assert match and rel == f"{split}/{match[1]}/{utt}.wav" and utt2spk[utt] == match[1]
        info = soundfile.info(root / next(iter(wav_scp.values())))
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        with open(files / f"{split}_utt2info.csv", newline="") as f:
            rows = list(csv.reader(f))
        assert rows[0] == ["Utt-id", "Spk-id", "Seg-id", "Device", "Distance", "Dialect"]
        for utt, spk, session, device, distance, dialect in rows[1:]:
            match = UTT_PATTERN.fullmatch(utt)
            assert (spk, session) == (match[1], match[2])
            assert device == DEVICE_NAMES[match[3]] and distance == f"{DISTANCES_M[match[4]]}m"
            assert dialect == DIALECT_NAMES[int(match[5])]  # 6th field: the dialect name
        assert len(rows) - 1 == len(wav_scp)
        speakers[split] = set(utt2spk.values())
    assert not speakers["train"] & speakers["test"]
    assert len(speakers["train"]) == mini_data.config.num_train_speakers
    noise_dir = mini_data.musan_dir / "noise" / "free-sound"
    assert len(list(noise_dir.glob("*.wav"))) == mini_data.config.num_noises
    rir_list = (mini_data.rirs_dir / "real_rirs_isotropic_noises" / "rir_list").read_text()
    assert len(rir_list.splitlines()) == mini_data.config.num_rirs


def test_trials_cross_their_condition(mini_data):
    files = mini_data.root / "files"
    position = {"device": 3, "distance": 4, "dialect": 5}
    for condition, group in position.items():
        trials = [
            line.split() for line in (files / f"trials_cross_{condition}").read_text().splitlines()
        ]
        assert trials and {t[2] for t in trials} == {"target", "nontarget"}
        for enrol, test, label in trials:
            a, b = UTT_PATTERN.fullmatch(enrol), UTT_PATTERN.fullmatch(test)
            assert a[group] != b[group]  # the condition differs
            assert "09" not in (a[3], b[3])  # Device09 is not evaluated
            assert (a[1] == b[1]) == (label == "target")
            if label == "target":
                assert a[2] != b[2]  # a different spoken text
        targets = sum(t[2] == "target" for t in trials)
        assert len(trials) - targets == round(mini_data.config.nontarget_ratio * targets)


RAW_FBANK = KaldiFbank(mean_norm=False)


def fbank_statistics(wav: torch.Tensor) -> np.ndarray:
    """Mean (less its average over bins, so that the recording level drops out) and standard
    deviation over time of the log-mel fbank."""
    feats = RAW_FBANK(wav)
    mean = feats.mean(dim=0)
    return torch.cat([mean - mean.mean(), feats.std(dim=0)]).numpy()


@pytest.mark.slow
def test_speakers_are_separable_by_fbank_statistics(tmp_path):
    """A simple embedding (fbank statistics, standardised, cosine) already scores the target
    trials of every cross-condition list above the nontarget ones on average."""
    config = SimulationConfig(
        num_train_speakers=0,
        num_test_speakers=16,
        utts_per_speaker=4,
        min_seconds=2.0,
        max_seconds=3.0,
        num_noises=0,
        num_rirs=0,
        seed=0,
    )
    corpus = simulate_corpus(tmp_path, config)
    wav_scp = read_table(corpus.corpus_dir / "files" / "test_wav.scp")
    utts = sorted(u for u in wav_scp if "_Device09_" not in u)
    stats = np.stack([fbank_statistics(load_audio(corpus.corpus_dir / wav_scp[u])) for u in utts])
    stats = (stats - stats.mean(axis=0)) / (stats.std(axis=0) + 1e-6)
    stats /= np.linalg.norm(stats, axis=1, keepdims=True)
    scores = stats @ stats.T
    row = {u: i for i, u in enumerate(utts)}
    for condition in ("device", "distance", "dialect"):
        trials = (
            (corpus.corpus_dir / "files" / f"trials_cross_{condition}").read_text().splitlines()
        )
        trials = [line.split() for line in trials]
        target = [scores[row[a], row[b]] for a, b, label in trials if label == "target"]
        nontarget = [scores[row[a], row[b]] for a, b, label in trials if label == "nontarget"]
        assert np.mean(target) > np.mean(nontarget), condition
    # All pairs: the same speaker (another text) against different speakers.
    speaker = np.array([u[:12] for u in utts])
    session = np.array([u[:16] for u in utts])
    i, j = np.triu_indices(len(utts), k=1)
    same = (speaker[i] == speaker[j]) & (session[i] != session[j])
    different = speaker[i] != speaker[j]
    assert scores[i, j][same].mean() - scores[i, j][different].mean() > 0.1


def distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b))


def test_device_and_distance_change_a_recording_more_than_a_second_take():
    rng = np.random.default_rng(0)
    speech = synthesize_speech(sample_voice(rng, 3), make_dialects(0)[3], 2.5, rng)
    devices = make_devices(0)
    room = {
        "rt60": 0.4,
        "critical_distance": 1.0,
        "snr_close": 38.0,
        "noise_exponent": 1.0,
        "hum": 0.2,
    }

    def record(device: str, metres: float, seed: int) -> np.ndarray:
        take = np.random.default_rng(seed)
        audio = render_device(render_distance(speech, metres, room, take), devices[device], take)
        return fbank_statistics(torch.from_numpy(audio.astype(np.float32)))

    reference = record("02", 0.25, 1)
    second_take = distance(reference, record("02", 0.25, 2))
    assert distance(reference, record("07", 0.25, 3)) > 2 * second_take  # phone vs tablet
    assert distance(reference, record("06", 0.25, 4)) > 2 * second_take  # PC microphone
    assert distance(reference, record("02", 4.0, 5)) > 2 * second_take  # far away
    assert distance(reference, record("02", 1.0, 6)) > second_take  # a little further


@pytest.mark.slow
def test_a_speaker_sounds_less_alike_across_dialects():
    rng = np.random.default_rng(0)
    dialects = make_dialects(0)
    within, across = [], []
    for native in (3, 7, 10, 12):
        voice = sample_voice(rng, native)
        native_takes = [
            fbank_statistics(
                torch.from_numpy(
                    synthesize_speech(voice, dialects[native], 2.0, rng).astype(np.float32)
                )
            )
            for _ in range(3)
        ]
        standard_takes = [
            fbank_statistics(
                torch.from_numpy(synthesize_speech(voice, dialects[0], 2.0, rng).astype(np.float32))
            )
            for _ in range(3)
        ]
        within += [
            distance(a, b) for k, a in enumerate(native_takes) for b in native_takes[k + 1 :]
        ]
        across += [distance(a, b) for a in native_takes for b in standard_takes]
    assert np.mean(across) > np.mean(within)
    inventories = [d.vowels.shape[0] for d in dialects]
    assert len(set(inventories)) > 1 and len({d.tones.shape[0] for d in dialects}) > 1
