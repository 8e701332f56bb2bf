"""local/prepare_folder.py (issue 14, part 1): any corpus into the recipe's data layout."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile

import local.prepare_folder as prep
from local.prepare_folder import Corpus, make_trials, prepare_folder, split_speakers
from speakerlab.data.kaldi_dir import read_table
from speakerlab.errors import DataError


def tone(seconds: float, rate: int, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def make_tree(root: Path, speakers: int = 6, sessions: int = 3, per_session: int = 2) -> None:
    """<root>/spkNN/sessM/uK.wav: short tones, one frequency per speaker."""
    for s in range(speakers):
        for m in range(sessions):
            for k in range(per_session):
                path = root / f"spk{s:02d}" / f"sess{m}" / f"u{k}.wav"
                path.parent.mkdir(parents=True, exist_ok=True)
                soundfile.write(path, tone(0.5, 16000, 200 + 50 * s), 16000)


def read_trials(path: Path) -> list[tuple[str, str, str]]:
    return [tuple(line.split()) for line in path.read_text().splitlines()]


def check_trials(trials, utt2spk, utt2session) -> None:
    """Labels agree with speakers; no pair twice, no self pair, no same-session target."""
    assert len({(a, b) for a, b, _ in trials}) == len(trials)
    for enrol, test, label in trials:
        assert enrol != test
        assert (utt2spk[enrol] == utt2spk[test]) == (label == "target")
        if label == "target":
            assert utt2session[enrol] != utt2session[test]


def test_folder_tree_becomes_train_test_and_balanced_trials(tmp_path):
    make_tree(tmp_path / "src", speakers=10)
    counts = prepare_folder(
        tmp_path / "src", tmp_path / "out", test_fraction=0.3, num_trials=40, split_seed=1
    )
    train = read_table(tmp_path / "out" / "train" / "utt2spk")
    test = read_table(tmp_path / "out" / "test" / "utt2spk")
    assert len(set(test.values())) == 3 and len(set(train.values())) == 7
    assert not set(train.values()) & set(test.values())
    assert counts == {
        "train_speakers": 7,
        "train_utts": 42,
        "test_speakers": 3,
        "test_utts": 18,
        "trials": 40,
        "converted": 0,
        "left_out": 0,
    }
    for split in ("train", "test"):
        wav_scp = read_table(tmp_path / "out" / split / "wav.scp")
        assert all(Path(p).is_absolute() and Path(p).is_file() for p in wav_scp.values())
        spk2utt = read_table(tmp_path / "out" / split / "spk2utt")
        assert sum(len(v.split()) for v in spk2utt.values()) == len(wav_scp)
    # ids: speaker, then the path below the speaker folder; sessions from the folder level
    assert "spk00-sess1-u0" in {**train, **test}
    sessions = read_table(tmp_path / "out" / "test" / "utt2session")
    assert set(sessions.values()) == {"sess0", "sess1", "sess2"}
    trials = read_trials(tmp_path / "out" / "trials" / "test_trials")
    assert sum(label == "target" for *_, label in trials) == 20
    check_trials(trials, test, sessions)


def test_split_is_seeded_and_checked():
    speakers = [f"s{i}" for i in range(20)]
    train, test = split_speakers(speakers, 0.25, None, seed=3)
    assert len(test) == 5 and sorted(train + test) == sorted(speakers)
    assert split_speakers(speakers, 0.25, None, seed=3) == (train, test)
    assert split_speakers(speakers, 0.25, None, seed=4)[1] != test
    assert len(split_speakers(speakers, 0.01, None, seed=3)[1]) == 2  # at least 2 for trials
    assert split_speakers(speakers, 0.0, None, seed=3) == (sorted(speakers), [])
    assert len(split_speakers(speakers, 0.5, 7, seed=3)[1]) == 7
    with pytest.raises(DataError, match="need at least 2"):
        split_speakers(speakers, 0.1, 1, seed=0)
    with pytest.raises(DataError, match="at least 1 left for training"):
        split_speakers(speakers, 0.1, 20, seed=0)


def corpus_of(speakers: int, sessions: int, per_session: int) -> Corpus:
    wav, spk, session = {}, {}, {}
    for s in range(speakers):
        for m in range(sessions):
            for k in range(per_session):
                utt = f"s{s}-m{m}-u{k}"
                wav[utt], spk[utt], session[utt] = f"/x/{utt}.wav", f"s{s}", f"m{m}"
    return Corpus(wav, spk, session)


@pytest.mark.parametrize("enumerate_limit", [prep.ENUMERATE_LIMIT, 10])
def test_trials_are_balanced_deterministic_and_never_same_session(monkeypatch, enumerate_limit):
    """Both ways of drawing pairs: listing all (few candidates) and sampling (many)."""
    monkeypatch.setattr(prep, "ENUMERATE_LIMIT", enumerate_limit)
    corpus = corpus_of(speakers=8, sessions=4, per_session=3)
    trials, half = make_trials(corpus, 200, seed=5)
    assert half == 100 and len(trials) == 200
    assert sum(label == "target" for *_, label in trials) == 100
    check_trials(trials, corpus.spk, corpus.session)
    assert make_trials(corpus, 200, seed=5)[0] == trials
    assert make_trials(corpus, 200, seed=6)[0] != trials


def test_trials_shrink_to_the_pairs_that_exist():
    # 2 speakers x 2 sessions x 1 recording: 2 targets (across sessions), 4 nontargets.
    corpus = corpus_of(speakers=2, sessions=2, per_session=1)
    trials, half = make_trials(corpus, 100, seed=0)
    assert half == 2 and sorted(label for *_, label in trials) == ["nontarget"] * 2 + ["target"] * 2
    # Without sessions every pair of a speaker's recordings is a target.
    corpus.session = {}
    assert make_trials(corpus, 100, seed=0)[1] == 2


def write_kaldi_dir(directory: Path, entries: dict[str, tuple[str, Path]]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "wav.scp").write_text("".join(f"{u} {p}\n" for u, (_, p) in entries.items()))
    (directory / "utt2spk").write_text("".join(f"{u} {s}\n" for u, (s, _) in entries.items()))


@pytest.fixture()
def kaldi_with_bad_files(tmp_path):
    """A Kaldi dir of 4 speakers x 3 good files, plus an 8 kHz file, a stereo 44.1 kHz file and
    a file that is not audio."""
    audio = tmp_path / "audio"
    audio.mkdir()
    entries = {}
    for s in range(4):
        for k in range(3):
            path = audio / f"s{s}_{k}.wav"
            soundfile.write(path, tone(0.5, 16000), 16000)
            entries[f"s{s}_{k}"] = (f"s{s}", path)
    soundfile.write(audio / "narrow.wav", tone(1.0, 8000, freq=1000.0), 8000)
    stereo = np.stack([tone(0.5, 44100, 500.0), tone(0.5, 44100, 3000.0)], axis=1)
    soundfile.write(audio / "stereo.flac", stereo, 44100)
    (audio / "broken.wav").write_bytes(b"RIFF not really a wave file")
    entries["s0_narrow"] = ("s0", audio / "narrow.wav")
    entries["s1_stereo"] = ("s1", audio / "stereo.flac")
    entries["s2_broken"] = ("s2", audio / "broken.wav")
    write_kaldi_dir(tmp_path / "kaldi", entries)
    return tmp_path


def test_bad_files_are_listed_by_name_and_nothing_is_written(kaldi_with_bad_files, capsys):
    base = kaldi_with_bad_files
    message = (
        r"of 15 audio files, 1 cannot be used and 2 are not 16 kHz mono \(listed above\); fix "
        r"them, or leave unusable ones out with --skip_unreadable, or convert those once with "
        r"--convert_dir DIR"
    )
    with pytest.raises(DataError, match=message):
        prepare_folder(base / "kaldi", base / "out", num_test_speakers=2)
    listed = capsys.readouterr().err
    assert f"unusable: {base / 'audio' / 'broken.wav'}: not a readable audio file" in listed
    assert f"{base / 'audio' / 'narrow.wav'}: 8000 Hz, 1 channel(s)" in listed
    assert f"{base / 'audio' / 'stereo.flac'}: 44100 Hz, 2 channel(s)" in listed
    with pytest.raises(DataError, match=r"of 15 audio files, 2 are not 16 kHz mono"):
        prepare_folder(base / "kaldi", base / "out", num_test_speakers=2, skip_unreadable=True)
    assert not (base / "out").exists()


def test_conversion_flag_converts_once_into_the_cache(kaldi_with_bad_files, caplog):
    base = kaldi_with_bad_files
    cache = base / "cache"
    with caplog.at_level(logging.WARNING, logger="prepare_folder"):
        counts = prepare_folder(
            base / "kaldi", base / "out", num_test_speakers=2, convert_dir=cache,
            skip_unreadable=True,
        )  # fmt: skip
    assert "broken.wav" in caplog.text  # left out, by name
    assert (counts["converted"], counts["left_out"]) == (2, 1)
    wav_scp = {
        **read_table(base / "out" / "train" / "wav.scp"),
        **read_table(base / "out" / "test" / "wav.scp"),
    }
    assert "s2_broken" not in wav_scp and len(wav_scp) == 14
    narrow, stereo = Path(wav_scp["s0_narrow"]), Path(wav_scp["s1_stereo"])
    assert narrow.parent.parent == cache and stereo.parent.parent == cache
    samples, rate = soundfile.read(narrow)
    assert rate == 16000 and samples.ndim == 1 and len(samples) == 16000
    # The 1 kHz tone at 8 kHz is the same tone at 16 kHz (away from the edges of the filter).
    expected = tone(1.0, 16000, freq=1000.0)
    assert np.max(np.abs(samples[400:-400] - expected[400:-400])) < 1e-2
    samples, rate = soundfile.read(stereo)
    assert rate == 16000 and samples.ndim == 1 and len(samples) == 8000
    spectrum = np.abs(np.fft.rfft(samples))
    assert np.argmax(spectrum) == 250  # 500 Hz: channel 0, not the 3 kHz of channel 1

    # A second run reuses the copies; a changed source gets a new one.
    inode = narrow.stat().st_ino
    prepare_folder(
        base / "kaldi", base / "out", num_test_speakers=2, convert_dir=cache, skip_unreadable=True
    )
    assert narrow.stat().st_ino == inode
    soundfile.write(base / "audio" / "narrow.wav", tone(1.0, 8000, freq=500.0), 8000)
    prepare_folder(
        base / "kaldi", base / "out", num_test_speakers=2, convert_dir=cache, skip_unreadable=True
    )
    again = read_table(base / "out" / "train" / "wav.scp") | read_table(
        base / "out" / "test" / "wav.scp"
    )
    assert Path(again["s0_narrow"]) != narrow and len(list(cache.glob("s0/*.wav"))) == 2


def test_kaldi_dir_sessions_come_from_utt2info(tmp_path):
    make_tree(tmp_path / "tree", speakers=4, sessions=2, per_session=2)
    entries = {}
    for path in sorted((tmp_path / "tree").rglob("*.wav")):
        speaker, session = path.parts[-3], path.parts[-2]
        entries[f"{speaker}-{session}-{path.stem}"] = (speaker, path)
    write_kaldi_dir(tmp_path / "kaldi", entries)
    (tmp_path / "kaldi" / "utt2info").write_text(
        "".join(f"{u} {s} {u.split('-')[1]} dev dist dial\n" for u, (s, _) in entries.items())
    )
    prepare_folder(tmp_path / "kaldi", tmp_path / "out", num_test_speakers=3, num_trials=1000)
    sessions = read_table(tmp_path / "out" / "test" / "utt2session")
    test = read_table(tmp_path / "out" / "test" / "utt2spk")
    trials = read_trials(tmp_path / "out" / "trials" / "test_trials")
    check_trials(trials, test, sessions)
    # 3 speakers x (2 x 2 cross-session pairs) targets exist; as many nontargets are drawn.
    assert sum(label == "target" for *_, label in trials) == 12 and len(trials) == 24


def test_a_rerun_replaces_the_lists_of_the_earlier_one(tmp_path):
    make_tree(tmp_path / "src", speakers=6)
    prepare_folder(tmp_path / "src", tmp_path / "out", num_test_speakers=2)
    (tmp_path / "out" / "keep.txt").write_text("mine")
    prepare_folder(tmp_path / "src", tmp_path / "out", test_fraction=0.0)
    assert not (tmp_path / "out" / "test").exists() and not (tmp_path / "out" / "trials").exists()
    assert len(read_table(tmp_path / "out" / "train" / "wav.scp")) == 36
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    assert [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")] == []


def test_source_errors_name_the_problem(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no speaker folders"):
        prepare_folder(tmp_path / "empty", tmp_path / "out")
    (tmp_path / "twice" / "spk").mkdir(parents=True)
    soundfile.write(tmp_path / "twice" / "spk" / "a.wav", tone(0.2, 16000), 16000)
    soundfile.write(tmp_path / "twice" / "spk" / "a.flac", tone(0.2, 16000), 16000)
    with pytest.raises(DataError, match="both get the utterance id 'spk-a'"):
        prepare_folder(tmp_path / "twice", tmp_path / "out")
    write_kaldi_dir(tmp_path / "piped", {"u1": ("s", Path("sox in.wav -t wav - |"))})
    with pytest.raises(DataError, match="u1 is a command"):
        prepare_folder(tmp_path / "piped", tmp_path / "out")


def test_command_line_error_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        prep.main(["--source", str(tmp_path / "missing"), "--out_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 1
    assert (
        capsys.readouterr().err
        == f"prepare_folder.py: error: {tmp_path / 'missing'}: not a directory\n"
    )


def test_a_truncated_file_is_unusable_by_name(tmp_path, capsys):
    """Guards against: a WAV cut short of what its header promises (a copy that stopped early)
    taken in with the length libsndfile quietly reads (issue 10, item 7)."""
    make_tree(tmp_path / "src", speakers=4)
    cut = tmp_path / "src" / "spk01" / "sess0" / "u0.wav"
    cut.write_bytes(cut.read_bytes()[:-4000])  # 2000 of its 8000 samples gone
    with pytest.raises(DataError, match=r"of 24 audio files, 1 cannot be used"):
        prepare_folder(tmp_path / "src", tmp_path / "out", num_test_speakers=1)
    listed = capsys.readouterr().err
    assert f"unusable: {cut}: truncated" in listed
    assert not (tmp_path / "out").exists()
