"""Training index, on-the-fly dataset, augmentation, speed perturbation, sampler, data config."""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.signal
import soundfile
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from speakerlab.bin import make_index
from speakerlab.data.augment import Augmenter, add_noise, add_reverb, mix_at_snr
from speakerlab.data.dataset import TrainDataset, build_train_dataset, limit_worker_threads
from speakerlab.data.index import build_train_index, load_train_index
from speakerlab.data.kaldi_dir import read_table, write_table
from speakerlab.data.sampler import DistributedResumableSampler
from speakerlab.data.speed_perturb import SpeedPerturbation
from speakerlab.errors import AudioError, ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]
SR = 16000


def write_wav(path: Path, samples: np.ndarray, rate: int = SR) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, samples, rate, subtype="PCM_16")
    return path


def kaldi_dir(path: Path, wavs: dict[str, str], speaker_of=lambda utt: utt[:12]) -> Path:
    write_table(path / "wav.scp", sorted(wavs.items()))
    write_table(path / "utt2spk", sorted((u, speaker_of(u)) for u in wavs))
    return path


@pytest.fixture(scope="module")
def train_index(mini_data, tmp_path_factory):
    return load_train_index(
        build_train_index(mini_data.train_dir, tmp_path_factory.mktemp("index") / "index.tsv")
    )


# ---------------------------------------------------------------------------------- index


def test_index_has_one_row_per_segment_of_audio(mini_data, tmp_path):
    path = build_train_index(mini_data.train_dir, tmp_path / "index.tsv", segment_seconds=1.0)
    index = load_train_index(path)
    wav_scp = read_table(mini_data.train_dir / "wav.scp")
    expected_rows = {utt: max(1, int(soundfile.info(p).frames / SR)) for utt, p in wav_scp.items()}
    assert len(index) == sum(expected_rows.values())
    assert {u: index.utts.count(u) for u in set(index.utts)} == expected_rows
    assert index.speakers == sorted(set(read_table(mini_data.train_dir / "utt2spk").values()))
    row = index.utts.index(next(iter(wav_scp)))
    assert index.paths[row] == wav_scp[index.utts[row]]
    assert index.speakers[index.speaker_ids[row]] == index.utts[row][:12]
    assert index.num_samples[row] == soundfile.info(index.paths[row]).frames


def test_index_is_reused_until_its_inputs_change(mini_data, tmp_path, caplog):
    data = tmp_path / "train"
    data.mkdir()
    for name in ("wav.scp", "utt2spk"):
        shutil.copy(mini_data.train_dir / name, data / name)
    out = tmp_path / "index.tsv"

    def build(**kwargs) -> bool:
        """Build; True if the index was written again."""
        before = out.stat().st_ino if out.exists() else None
        with caplog.at_level(logging.INFO, logger="speakerlab.data.index"):
            build_train_index(data, out, **kwargs)
        return out.stat().st_ino != before

    assert build()
    (data / "wav.scp").touch()  # newer lists, same content: reused
    assert not build()
    assert build(segment_seconds=2.0)
    assert "segment_seconds 4.0 -> 2.0" in caplog.text
    assert build(segment_seconds=2.0, max_bad_fraction=0.2)
    assert "max_bad_fraction 0.1 -> 0.2" in caplog.text
    (data / "utt2spk").write_text((data / "utt2spk").read_text() + "\n")
    assert build(segment_seconds=2.0, max_bad_fraction=0.2)
    assert "utt2spk changed" in caplog.text


def make_bad_files(folder: Path) -> dict[str, str]:
    """One file of each unusable kind, keyed by utterance id."""
    folder.mkdir(parents=True, exist_ok=True)
    bad = {
        "3D_SPK_09999_001_empty": write_wav(folder / "empty.wav", np.zeros(0)),
        "3D_SPK_09999_002_8k": write_wav(folder / "8k.wav", np.zeros(8000), rate=8000),
        "3D_SPK_09999_003_stereo": write_wav(folder / "stereo.wav", np.zeros((16000, 2))),
        "3D_SPK_09999_004_garbage": folder / "garbage.wav",
        "3D_SPK_09999_005_missing": folder / "missing.wav",
    }
    (folder / "garbage.wav").write_bytes(b"this is not audio" * 10)
    return {utt: str(path) for utt, path in bad.items()}


def test_bad_files_are_reported_by_name_and_skipped(mini_data, tmp_path, capsys):
    good = read_table(mini_data.train_dir / "wav.scp")
    bad = make_bad_files(tmp_path / "bad")
    data = kaldi_dir(tmp_path / "train", {**good, **bad})
    index = load_train_index(build_train_index(data, tmp_path / "index.tsv"))
    assert set(index.utts) == set(good)
    err = capsys.readouterr().err
    for reason in (
        "audio is empty",
        "sample rate is 8000 Hz",
        "has 2 channels",
        "garbage.wav: not a readable audio file",
        "missing.wav: file not found",
    ):
        assert reason in err
    assert all(utt in err for utt in bad)
    listed = (tmp_path / "index.tsv.bad").read_text().splitlines()
    assert sorted(line.split("\t")[0] for line in listed) == sorted(bad)


def test_too_many_bad_files_abort_with_a_clear_message(mini_data, tmp_path):
    good = dict(list(read_table(mini_data.train_dir / "wav.scp").items())[:20])
    bad = make_bad_files(tmp_path / "bad")
    data = kaldi_dir(tmp_path / "train", {**good, **bad})
    with pytest.raises(
        DataError,
        match=r"5 of 25 audio files of .*wav\.scp are unusable "
        r"\(20\.0% > 10% allowed\)",
    ):
        build_train_index(data, tmp_path / "index.tsv")
    assert build_train_index(data, tmp_path / "index.tsv", max_bad_fraction=0.25).is_file()


def test_unlabelled_utterances_are_an_error(mini_data, tmp_path):
    wavs = dict(list(read_table(mini_data.train_dir / "wav.scp").items())[:3])
    data = kaldi_dir(tmp_path / "train", wavs)
    write_table(data / "utt2spk", [(u, u[:12]) for u in list(wavs)[:2]])
    with pytest.raises(DataError, match=r"utt2spk: no speaker for 1 utterances"):
        build_train_index(data, tmp_path / "index.tsv")


def test_make_index_command(mini_data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "index.tsv"
    make_index.main(["--data_dir", str(mini_data.train_dir), "--out", str(out)])
    assert f"{out}: " in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        make_index.main(["--data_dir", str(tmp_path / "nowhere"), "--out", str(out)])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("speakerlab make-index: error:") and "wav.scp: file not found" in err


# ---------------------------------------------------------------------------------- dataset


def test_crop_lengths_and_fbank_shapes(train_index):
    dataset = TrainDataset(train_index, speeds=(1.0, 0.9, 1.1), augment_prob=0.0)
    for i in range(0, len(dataset), 7):
        feats, label = dataset[i]
        assert feats.dtype == torch.float32 and feats.shape == (298, 80)
        assert torch.allclose(feats.mean(dim=0), torch.zeros(80), atol=1e-4)  # mean-normalised
        wav, _ = dataset.waveform(i, dataset.item_rng(i))
        assert wav.shape == (48000,)
    small = TrainDataset(train_index, crop_seconds=2.0, num_mel_bins=40, augment_prob=0.0)
    assert small[0][0].shape == (198, 40)


def test_short_files_are_zero_padded(tmp_path):
    tone = (0.5 * np.sin(np.arange(SR) * 0.05)).astype(np.float32)
    path = write_wav(tmp_path / "short.wav", tone)
    data = kaldi_dir(tmp_path / "train", {"3D_SPK_00001_001_short": str(path)})
    index = load_train_index(build_train_index(data, tmp_path / "index.tsv"))
    for speed, length in ((1.0, SR), (0.9, math.ceil(SR * 10 / 9)), (1.1, math.ceil(SR * 10 / 11))):
        dataset = TrainDataset(index, speeds=(speed,), augment_prob=0.0)
        wav, _ = dataset.waveform(0, dataset.item_rng(0))
        assert wav.shape == (3 * SR,)
        assert np.all(wav[length:] == 0) and np.abs(wav[length - 200 : length]).max() > 0.1
        if speed == 1.0:
            assert np.allclose(wav[:SR], soundfile.read(path, dtype="float32")[0])
        assert dataset[0][0].shape == (298, 80)


def test_speed_perturbed_crop_equals_perturbing_the_whole_file(tmp_path):
    samples = np.random.default_rng(0).standard_normal(40_001).astype(np.float32) * 0.1
    path = tmp_path / "x.wav"
    soundfile.write(path, samples, SR, subtype="FLOAT")
    perturb = SpeedPerturbation((1.0, 0.9, 1.1))
    for speed in (0.9, 1.1):
        whole = perturb.perturb(torch.from_numpy(samples), speed).numpy()
        assert len(whole) == perturb.perturbed_length(len(samples), speed)
        for start in (0, 1, 9, 11, 12_345, len(whole) - 30_000, len(whole) - 5):
            crop = perturb.read_crop(str(path), len(samples), speed, start, 30_000)
            expected = np.zeros(30_000, dtype=np.float32)
            piece = whole[start : start + 30_000]
            expected[: len(piece)] = piece
            assert np.allclose(crop, expected, atol=1e-6)


def test_labels_with_speed_perturbation(train_index):
    dataset = TrainDataset(train_index, speeds=(1.0, 0.9, 1.1), augment_prob=0.0)
    speakers = train_index.num_speakers
    assert dataset.num_speakers == speakers and dataset.num_classes == 3 * speakers
    for i in range(len(dataset)):  # speed k of speaker s is class s + k * speakers
        _, speed_pos = dataset.waveform(i, dataset.item_rng(i))
        assert dataset[i][1] == int(train_index.speaker_ids[i]) + speed_pos * speakers
    speed_of_item = []
    for epoch in range(1, 4):
        dataset.set_epoch(epoch)
        speed_of_item += [dataset.waveform(i, dataset.item_rng(i))[1] for i in range(30)]
    counts = np.bincount(speed_of_item, minlength=3)
    assert all(c > 0.2 * len(speed_of_item) for c in counts)  # each speed is used
    plain = TrainDataset(train_index, speeds=(1.0,), augment_prob=0.0)
    assert plain.num_classes == speakers
    assert [plain[i][1] for i in range(5)] == [int(s) for s in train_index.speaker_ids[:5]]


def test_items_are_deterministic_per_seed_and_epoch(mini_data, train_index):
    def make(seed):
        return TrainDataset(
            train_index, noise_list=mini_data.noise_list, rir_list=mini_data.rir_list, seed=seed
        )

    first, second, other_seed = make(3), make(3), make(4)
    items = [0, 5, len(first) - 1]
    for i in items:
        a, b = first[i], second[i]
        assert torch.equal(a[0], b[0]) and a[1] == b[1]
        assert not torch.equal(a[0], other_seed[i][0])
    epoch0 = [first[i][0] for i in items]
    first.set_epoch(1)
    assert all(not torch.equal(first[i][0], f) for i, f in zip(items, epoch0))
    first.set_epoch(0)
    assert all(torch.equal(first[i][0], f) for i, f in zip(items, epoch0))


def test_workers_and_ranks_see_the_same_items(mini_data, train_index):
    dataset = TrainDataset(
        train_index, noise_list=mini_data.noise_list, rir_list=mini_data.rir_list, seed=11
    )
    single = DistributedResumableSampler(len(dataset), num_replicas=1, rank=0, seed=5)
    loader = DataLoader(
        dataset,
        batch_size=4,
        sampler=single,
        num_workers=2,
        persistent_workers=True,
        drop_last=True,
    )
    for epoch in (0, 1):  # set_epoch reaches persistent workers
        dataset.set_epoch(epoch)
        single.set_epoch(epoch)
        batches = list(loader)
        order = list(single)
        expected = [dataset[i] for i in order[: len(batches) * 4]]
        got_feats = torch.cat([b[0] for b in batches])
        got_labels = torch.cat([b[1] for b in batches]).tolist()
        assert torch.equal(got_feats, torch.stack([e[0] for e in expected]))
        assert got_labels == [e[1] for e in expected]
    # Two ranks split the very same permutation into interleaved, disjoint halves.
    ranks = [DistributedResumableSampler(len(dataset), 2, r, seed=5) for r in (0, 1)]
    for sampler in ranks + [single]:
        sampler.set_epoch(1)
    halves = [list(s) for s in ranks]
    whole = list(single)
    assert len(halves[0]) == len(halves[1]) == len(dataset) // 2
    assert (
        halves[0] == whole[0 : 2 * len(halves[0]) : 2]
        and halves[1] == whole[1 : 2 * len(halves[0]) : 2]
    )


def test_sampler_resumes_mid_epoch():
    sampler = DistributedResumableSampler(103, num_replicas=4, rank=2, seed=9)
    sampler.set_epoch(3)
    full = list(sampler)
    assert len(full) == len(sampler) == 25 and len(set(full)) == 25
    sampler.set_epoch(3, start=8)
    assert list(sampler) == full[8:] and len(sampler) == 17
    sampler.set_epoch(4)
    assert list(sampler) != full  # another epoch, another order
    padded = DistributedResumableSampler(103, num_replicas=4, rank=3, drop_last=False)
    assert len(list(padded)) == 26
    union = sorted(
        i
        for r in range(4)
        for i in DistributedResumableSampler(103, num_replicas=4, rank=r, drop_last=False)
    )
    assert set(union) == set(range(103)) and len(union) == 104
    ordered = DistributedResumableSampler(10, shuffle=False)
    assert list(ordered) == list(range(10))
    with pytest.raises(ConfigError):
        DistributedResumableSampler(10, num_replicas=2, rank=2)
    with pytest.raises(ConfigError):
        sampler.set_epoch(0, start=26)


def test_a_file_that_breaks_after_indexing_does_not_stop_the_epoch(mini_data, tmp_path, caplog):
    wavs = dict(list(read_table(mini_data.train_dir / "wav.scp").items())[:6])
    copies = {}
    for utt, path in wavs.items():
        copies[utt] = str(tmp_path / "audio" / Path(path).name)
        Path(copies[utt]).parent.mkdir(exist_ok=True)
        shutil.copy(path, copies[utt])
    data = kaldi_dir(tmp_path / "train", copies)
    index = load_train_index(build_train_index(data, tmp_path / "index.tsv"))
    broken = 2
    Path(index.paths[broken]).write_bytes(b"truncated by a failing disk")
    dataset = TrainDataset(index, augment_prob=0.0)
    with caplog.at_level(logging.WARNING):
        feats, label = dataset[broken]
        again = dataset[broken]
    assert feats.shape == (298, 80)
    assert torch.equal(feats, again[0]) and label == again[1]  # the substitute is deterministic
    warnings = [r for r in caplog.records if index.paths[broken] in r.getMessage()]
    assert len(warnings) == 1  # reported once
    for i in range(len(dataset)):  # the whole epoch goes through
        assert dataset[i][0].shape == (298, 80)
    for path in index.paths:
        Path(path).write_bytes(b"")
    with pytest.raises(AudioError, match="substitutes failed to load"):
        dataset[0]


# ---------------------------------------------------------------------------------- augmentation


def test_noise_is_mixed_at_the_requested_snr():
    rng = np.random.default_rng(1)
    speech = (rng.standard_normal(48000) * 0.3).astype(np.float32)
    noise = (rng.standard_normal(48000) * 0.01).astype(np.float32)
    for snr in (0.0, 7.5, 15.0):
        mixed = mix_at_snr(speech, noise, snr)
        residual = mixed.astype(np.float64) - speech
        measured = 10 * np.log10(np.mean(speech.astype(np.float64) ** 2) / np.mean(residual**2))
        assert abs(measured - snr) < 1e-3
        out = add_noise(speech, noise, snr)
        assert np.isclose(np.abs(out).max(), 1.0) and np.allclose(out, mixed / np.abs(mixed).max())


def test_reverb_is_unit_energy_convolution_cut_to_length():
    rng = np.random.default_rng(2)
    speech = (rng.standard_normal(16000) * 0.3).astype(np.float32)
    delta = np.zeros(500, dtype=np.float32)
    delta[0] = 0.25
    assert np.allclose(add_reverb(speech, delta), speech / np.abs(speech).max(), atol=1e-5)
    for length in (3000, 20000):  # shorter and longer than the speech
        rir = (rng.standard_normal(length) * np.exp(-np.arange(length) / 800)).astype(np.float32)
        wet = scipy.signal.fftconvolve(speech, rir / np.sqrt(np.sum(rir.astype(np.float64) ** 2)))
        expected = wet[:16000] / np.abs(wet[:16000]).max()
        out = add_reverb(speech, rir)
        assert out.shape == speech.shape and np.allclose(out, expected, atol=1e-5)
        assert not np.allclose(out, speech / np.abs(speech).max(), atol=0.05)


def test_augmenter_changes_the_signal_with_the_listed_files(mini_data, tmp_path):
    both = Augmenter(mini_data.noise_list, mini_data.rir_list, prob=1.0)
    assert both.kinds == ["reverb", "noise", "reverb+noise"]
    assert Augmenter(mini_data.noise_list, None).kinds == ["noise"]
    assert not Augmenter(None, None, prob=1.0).enabled
    speech = (np.random.default_rng(3).standard_normal(48000) * 0.2).astype(np.float32)
    rng = np.random.default_rng(4)
    for _ in range(6):
        assert not np.allclose(both(speech, rng), speech / np.abs(speech).max(), atol=0.01)
    never = Augmenter(mini_data.noise_list, mini_data.rir_list, prob=0.0)
    assert never(speech, rng) is speech
    # One noise file exactly as long as the speech: the augmenter must use it at 6 dB SNR.
    noise = (np.random.default_rng(5).standard_normal(48000) * 0.05).astype(np.float32)
    write_wav(tmp_path / "noise.wav", noise)
    write_table(tmp_path / "noise.scp", [("n", str(tmp_path / "noise.wav"))])
    fixed = Augmenter(tmp_path / "noise.scp", None, snr_db=(6.0, 6.0), prob=1.0)
    out = fixed(speech, rng).astype(np.float64)
    stored = soundfile.read(tmp_path / "noise.wav", dtype="float32")[0].astype(np.float64)
    (a, b), *_ = np.linalg.lstsq(np.stack([speech, stored], axis=1), out, rcond=None)
    snr = 10 * np.log10(np.mean((a * speech) ** 2) / np.mean((b * stored) ** 2))
    assert abs(snr - 6.0) < 0.01


def test_unusable_augmentation_lists_are_errors(tmp_path):
    write_table(tmp_path / "noise.scp", [("n", str(tmp_path / "missing.wav"))])
    with pytest.raises(DataError, match=r"noise\.scp: no usable noise files"):
        Augmenter(tmp_path / "noise.scp", None)
    with pytest.raises(DataError, match="snr_db"):
        Augmenter(None, None, snr_db=(10.0, 5.0))


# ---------------------------------------------------------------------------------- config


def test_data_config_builds_the_dataset(mini_data, tmp_path):
    cfg = OmegaConf.load(REPO / "conf" / "data" / "default.yaml")
    OmegaConf.set_struct(cfg, True)  # reading a key that the group file lacks is an error
    assert OmegaConf.is_missing(cfg, "train_dir")
    cfg.train_dir = str(mini_data.train_dir)
    cfg.noise_list, cfg.rir_list = str(mini_data.noise_list), str(mini_data.rir_list)
    cfg.crop_seconds, cfg.num_mel_bins = 2.0, 64
    index_path = build_train_index(
        cfg.train_dir, tmp_path / "index.tsv", cfg.segment_seconds, cfg.max_bad_fraction
    )
    dataset = build_train_dataset(cfg, index_path, seed=2)
    assert dataset.num_classes == 3 * dataset.num_speakers and dataset.augmenter.enabled
    assert dataset[0][0].shape == (198, 64)
    cfg.speeds = [1.0]
    assert build_train_dataset(cfg, index_path).num_classes == dataset.num_speakers
    cfg.speeds = [1.0, 1.0]
    with pytest.raises(ConfigError, match="speeds"):
        build_train_dataset(cfg, index_path)


def test_data_workers_use_one_blas_thread():
    from threadpoolctl import threadpool_info, threadpool_limits

    torch_threads = torch.get_num_threads()
    try:
        with threadpool_limits(limits=None):  # restores the BLAS pools on leaving
            limit_worker_threads()
            assert torch.get_num_threads() == 1
            assert all(
                pool["num_threads"] == 1 for pool in threadpool_info() if pool["user_api"] == "blas"
            )
    finally:
        torch.set_num_threads(torch_threads)
