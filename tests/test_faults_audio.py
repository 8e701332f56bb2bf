"""Fault injection for the audio layer (issue 10): truncated files, missing files, files that are
not audio, non-finite samples. Each case names the failure it guards against."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import soundfile
import torch

from speakerlab.audio import (
    audio_info,
    audio_truncation,
    check_finite,
    load_audio,
    read_audio,
)
from speakerlab.data.augment import Augmenter
from speakerlab.data.speed_perturb import SpeedPerturbation
from speakerlab.errors import AudioError

RATE = 16000


def write(path, samples, subtype="PCM_16", rate=RATE, fmt=None):
    soundfile.write(path, samples, rate, subtype=subtype, format=fmt)
    return path


def cut(path, num_bytes):
    """Drop the last ``num_bytes`` bytes of ``path``, as an interrupted copy does."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - num_bytes])
    return path


@pytest.fixture
def samples():
    return (np.random.default_rng(0).standard_normal(RATE) * 0.1).astype(np.float32)


@pytest.fixture
def truncated_wav(tmp_path, samples):
    """A 16-bit WAV whose header promises 16000 samples and whose data stops at sample 10000."""
    return cut(write(tmp_path / "cut.wav", samples), 6000 * 2)


def test_a_truncated_wav_read_whole_is_an_error(truncated_wav):
    """Was: read short without a word (libsndfile reports only the samples that are there)."""
    with pytest.raises(AudioError) as err:
        read_audio(truncated_wav)
    message = str(err.value)
    assert (
        message
        == f"{truncated_wav}: truncated: header promises 16000 samples, the file holds 10000"
    )
    with pytest.raises(AudioError, match="truncated: header promises 16000 samples"):
        load_audio(truncated_wav)


@pytest.mark.parametrize("start,frames", [(9000, 2000), (12000, 1000), (0, 16000), (10000, 1)])
def test_a_range_inside_the_promised_length_but_past_the_data_is_an_error(
    truncated_wav, start, frames
):
    """Was: a crop of a truncated file silently came back short (then zero-padded)."""
    with pytest.raises(
        AudioError, match="truncated: header promises 16000 samples, the file holds 10000"
    ):
        read_audio(truncated_wav, start, frames)


def test_ranges_within_the_data_or_past_the_promised_end_read_normally(truncated_wav, samples):
    got, rate = read_audio(truncated_wav, 2000, 3000)
    assert rate == RATE and len(got) == 3000
    np.testing.assert_allclose(got, samples[2000:5000], atol=1 / 32768)
    intact = write(truncated_wav.with_name("intact.wav"), samples)
    assert len(read_audio(intact, 15000, 5000)[0]) == 1000  # past the end: what there is


@pytest.mark.parametrize("subtype", ["PCM_16", "PCM_24", "FLOAT"])
def test_header_only_check_finds_truncated_wavs(tmp_path, samples, subtype):
    """The cheap check for the index builder: header and file size only, no decoding."""
    path = write(tmp_path / f"{subtype}.wav", samples, subtype)
    assert audio_truncation(path) is None
    cut(path, 1001)  # not even a whole last sample
    block = soundfile.info(path).frames
    assert audio_truncation(path) == (
        f"{path}: truncated: header promises 16000 samples, the file holds {block}"
    )
    assert block < 16000
    with pytest.raises(AudioError, match="truncated"):
        read_audio(path)


def test_a_wav_whose_size_was_left_open_by_a_streaming_writer_is_not_truncated(tmp_path, samples):
    path = write(tmp_path / "stream.wav", samples)
    data = bytearray(path.read_bytes())
    at = data.index(b"data") + 4
    data[at : at + 4] = b"\xff\xff\xff\xff"  # "unknown length", as written by pipes
    path.write_bytes(bytes(data))
    assert audio_truncation(path) is None
    assert len(read_audio(path)[0]) == 16000


def test_a_truncated_flac_is_an_error(tmp_path, samples):
    """Compressed formats: the header check cannot tell, reading does."""
    path = cut(write(tmp_path / "cut.flac", samples, fmt="FLAC"), 8000)
    assert audio_truncation(path) is None
    with pytest.raises(AudioError, match=r"cut\.flac: (cannot decode|truncated)"):
        read_audio(path)


def test_a_missing_file_says_file_not_found(tmp_path):
    """Was: "System error" (libsndfile's word for a failed open)."""
    missing = tmp_path / "nowhere.wav"
    for read in (audio_info, read_audio, load_audio, audio_truncation):
        with pytest.raises(AudioError) as err:
            read(missing)
        assert str(err.value) == f"{missing}: file not found"


def test_files_that_are_not_audio(tmp_path):
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(np.random.default_rng(1).bytes(5000))
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    folder = tmp_path / "folder.wav"
    folder.mkdir()
    for read in (audio_info, read_audio):
        with pytest.raises(AudioError, match=r"garbage\.wav: not a readable audio file \(.+\)$"):
            read(garbage)
        with pytest.raises(
            AudioError, match=r"empty\.wav: not a readable audio file \(the file is empty\)"
        ):
            read(empty)
        with pytest.raises(AudioError, match=r"folder\.wav: is a directory"):
            read(folder)
    for path in (garbage, empty):
        assert audio_truncation(path) is None  # not a WAV header: nothing promised


def test_non_finite_samples_are_an_error(tmp_path, samples):
    """Was: NaN audio read as is, giving NaN features and embeddings."""
    samples[1234] = np.nan
    samples[2000] = np.inf
    path = write(tmp_path / "nan.wav", samples, "FLOAT")
    with pytest.raises(
        AudioError,
        match=r"nan\.wav: audio contains 2 NaN or infinite sample\(s\), the first at sample 1234",
    ):
        read_audio(path)
    assert len(read_audio(path, 0, 1000)[0]) == 1000  # a range without them is fine
    with pytest.raises(AudioError, match="utt1: audio contains 1 NaN"):
        check_finite(torch.tensor([0.0, float("nan")]), "utt1")
    check_finite(np.zeros(10, dtype=np.float32), "zeros")


def test_a_crop_of_a_file_shorter_than_its_index_entry_is_an_error(tmp_path, samples):
    """Was: zero-padded in silence when a file was replaced by a shorter one after indexing."""
    path = write(tmp_path / "short.wav", samples[:8000])
    perturb = SpeedPerturbation((1.0, 1.1))
    for speed in (1.0, 1.1):
        with pytest.raises(AudioError, match=r"short\.wav: holds 8000 samples, its index entry"):
            perturb.read_crop(str(path), 16000, speed, 4000, 8000)


def test_truncated_noise_files_are_left_out_by_name(tmp_path, samples, caplog):
    good = write(tmp_path / "good.wav", samples)
    bad = cut(write(tmp_path / "bad.wav", samples), 4000)
    noise_list = tmp_path / "noise.scp"
    noise_list.write_text(f"good {good}\nbad {bad}\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        augmenter = Augmenter(noise_list=noise_list, prob=1.0)
    assert augmenter.noise_paths == [str(good)]
    assert f"leaving out noise file: {bad}: truncated: header promises 16000" in caplog.text
