"""Preparation of the (simulated) 3D-Speaker corpus into Kaldi-style lists."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from local.prepare_3dspeaker import TRIAL_LISTS, prepare_3dspeaker, prepare_musan, prepare_rirs
from local.prepare_3dspeaker import main as prepare_main
from speakerlab.data.kaldi_dir import read_table
from speakerlab.errors import DataError

REPO = Path(__file__).resolve().parents[1]


def lines(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text(encoding="utf-8").splitlines() if line]


def test_prepared_lists_match_the_corpus_without_device09(mini_data):
    files = mini_data.root / "files"
    for split, out in (("train", mini_data.train_dir), ("test", mini_data.test_dir)):
        listed = read_table(files / f"{split}_wav.scp")
        expected = sorted(u for u in listed if "_Device09_" not in u)
        assert any("_Device09_" in u for u in listed)  # the removal is exercised
        wav_scp = read_table(out / "wav.scp")
        assert sorted(wav_scp) == expected
        assert all(Path(p).is_absolute() and Path(p).is_file() for p in wav_scp.values())
        utt2spk = read_table(out / "utt2spk")
        assert sorted(utt2spk) == expected
        assert all(utt2spk[u] == u[:12] for u in utt2spk)  # 3D_SPK_NNNNN prefix
        spk2utt = {f[0]: f[1:] for f in lines(out / "spk2utt")}
        assert sorted(u for us in spk2utt.values() for u in us) == expected
        assert all(utt2spk[u] == spk for spk, us in spk2utt.items() for u in us)
        info = {f[0]: f[1:] for f in lines(out / "utt2info")}
        assert sorted(info) == expected
        for utt, (spk, session, device, _distance, dialect) in info.items():
            assert spk == utt2spk[utt] and utt.split("_")[3] == session
            assert device != "ARRAY" and " " not in dialect
    config = mini_data.config
    assert len(lines(mini_data.train_dir / "spk2utt")) == config.num_train_speakers
    assert len(lines(mini_data.test_dir / "spk2utt")) == config.num_test_speakers


def test_trial_lists_are_copied_intact(mini_data):
    test_utts = set(read_table(mini_data.test_dir / "wav.scp"))
    for name in TRIAL_LISTS:
        prepared = mini_data.trials_dir / name
        assert prepared.read_bytes() == (mini_data.root / "files" / name).read_bytes()
        trials = lines(prepared)
        assert {t[2] for t in trials} == {"target", "nontarget"}
        assert all(t[0] in test_utts and t[1] in test_utts for t in trials)


def test_noise_and_rir_lists(mini_data):
    noises = read_table(mini_data.noise_list)
    assert len(noises) == mini_data.config.num_noises
    assert all(k.startswith("noise/free-sound/") and Path(p).is_file() for k, p in noises.items())
    rirs = read_table(mini_data.rir_list)
    # Only what rir_list names: the isotropic-noise recordings beside them are left out.
    assert len(rirs) == mini_data.config.num_rirs
    assert all(Path(p).name.startswith("sim_rir_") for p in rirs.values())
    assert all(k.startswith("RIRS_NOISES/real_rirs_isotropic_noises/") for k in rirs)


def partial_corpus(mini_data, tmp_path: Path, drop: list[str]) -> Path:
    """A corpus root that links to the mini corpus except for the parts named in ``drop``."""
    root = tmp_path / "corpus"
    (root / "files").mkdir(parents=True)
    for split in ("train", "test"):
        if split not in drop:
            (root / split).symlink_to(mini_data.root / split)
    for item in (mini_data.root / "files").iterdir():
        if item.name not in drop:
            shutil.copy(item, root / "files" / item.name)
    return root


def test_missing_corpus_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"corpus not found: .*nowhere is not a directory"):
        prepare_3dspeaker(tmp_path / "nowhere", tmp_path / "data")


def test_every_missing_part_is_named_with_where_it_was_sought(mini_data, tmp_path):
    root = partial_corpus(mini_data, tmp_path, ["test", "trials_cross_dialect", "train_utt2spk"])
    with pytest.raises(DataError) as err:
        prepare_3dspeaker(root, tmp_path / "data")
    message = str(err.value)
    assert "is incomplete" in message
    for missing in (
        root / "test",
        root / "files" / "trials_cross_dialect",
        root / "files" / "train_utt2spk",
    ):
        assert str(missing) in message
    assert str(root / "files" / "trials_cross_device") not in message


def test_missing_audio_files_are_reported_or_skipped_on_request(mini_data, tmp_path):
    root = partial_corpus(mini_data, tmp_path, [])
    test_scp = read_table(root / "files" / "test_wav.scp")
    victim = next(u for u in sorted(test_scp) if "_Device09_" not in u)
    # A test folder holding every file but one: a partly extracted archive.
    (root / "test").unlink()
    for utt, rel in test_scp.items():
        if utt != victim:
            link = root / rel
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(mini_data.root / rel)
    with pytest.raises(DataError, match=r"1 of \d+ test audio files .* are missing") as err:
        prepare_3dspeaker(root, tmp_path / "data")
    assert str(root / test_scp[victim]) in str(err.value)

    summary = prepare_3dspeaker(root, tmp_path / "data", skip_missing=True)
    assert summary["test"].num_missing == 1
    assert victim not in read_table(tmp_path / "data" / "3dspeaker" / "test" / "wav.scp")
    for name in TRIAL_LISTS:  # trials naming the missing file are left out, the rest kept
        kept = lines(tmp_path / "data" / "3dspeaker" / "trials" / name)
        original = lines(root / "files" / name)
        assert kept == [t for t in original if victim not in t[:2]]


def test_malformed_trial_line_names_file_and_line(mini_data, tmp_path):
    root = partial_corpus(mini_data, tmp_path, [])
    trials = root / "files" / "trials_cross_distance"
    content = trials.read_text().splitlines()
    content[2] = content[2].rsplit(" ", 1)[0] + " maybe"
    trials.write_text("\n".join(content) + "\n")
    with pytest.raises(DataError, match=r"trials_cross_distance:3: expected 'enrol_utt test_utt"):
        prepare_3dspeaker(root, tmp_path / "data")


def test_missing_noise_and_rir_folders_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match=r"no MUSAN noise found: .*noise/free-sound does not exist"):
        prepare_musan(tmp_path / "musan", tmp_path / "data" / "musan")
    with pytest.raises(DataError, match=r"real_rirs_isotropic_noises does not exist"):
        prepare_rirs(tmp_path / "RIRS_NOISES", tmp_path / "data" / "rirs")


def test_command_line_prints_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        prepare_main(["--corpus_dir", str(tmp_path / "none"), "--data_dir", str(tmp_path / "d")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: 3D-Speaker corpus not found") and err.count("\n") == 1


def test_scripts_run_standalone_with_help():
    for script in ("download_3dspeaker.py", "prepare_3dspeaker.py", "simulate_mini_corpus.py"):
        result = subprocess.run(
            [sys.executable, str(REPO / "local" / script), "--help"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("usage:")
