"""Fault injection for the data stage (issue 10): the training index and the Kaldi lists.

Each case names the failing behaviour it guards against and asserts the correct one.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import soundfile

from speakerlab.bin import make_index
from speakerlab.data.index import build_train_index, load_train_index, read_header
from speakerlab.data.kaldi_dir import read_table, write_table
from speakerlab.errors import DataError
from speakerlab.fileio import LockedError, exclusive_lock, temporary_files
from tests.processes import run_bounded

SR = 16000


def copy_lists(mini_data, folder: Path, count: int | None = None) -> Path:
    """A Kaldi dir with (the first ``count``) of the mini corpus's training utterances."""
    wav_scp = list(read_table(mini_data.train_dir / "wav.scp").items())[:count]
    utt2spk = read_table(mini_data.train_dir / "utt2spk")
    write_table(folder / "wav.scp", wav_scp)
    write_table(folder / "utt2spk", [(utt, utt2spk[utt]) for utt, _ in wav_scp])
    return folder


def age(*paths: Path) -> None:
    for path in paths:
        os.utime(path, (1e9, 1e9))


def index_rows(path: Path) -> list[tuple[str, str, int, str]]:
    index = load_train_index(path)
    return [
        (
            index.utts[r],
            index.paths[r],
            int(index.num_samples[r]),
            index.speakers[index.speaker_ids[r]],
        )
        for r in range(len(index))
    ]


# ------------------------------------------------------------------------------ stale index


def test_index_follows_a_content_change_that_keeps_old_mtimes(mini_data, tmp_path, caplog):
    """Guards against: the index reused after wav.scp changed, because the list is older than
    the index (restored from a backup, copied with its times, edited on a clock behind)."""
    data = copy_lists(mini_data, tmp_path / "train", 12)
    out = tmp_path / "index.tsv"
    build_train_index(data, out)
    wav_scp = read_table(data / "wav.scp")
    utts = list(wav_scp)
    swapped = {**wav_scp, utts[0]: wav_scp[utts[1]], utts[1]: wav_scp[utts[0]]}
    write_table(data / "wav.scp", swapped.items())
    age(data / "wav.scp", data / "utt2spk")
    with caplog.at_level(logging.INFO, logger="speakerlab.data.index"):
        build_train_index(data, out)
    assert "wav.scp changed" in caplog.text
    rows = index_rows(out)
    assert {(utt, path) for utt, path, _, _ in rows} == set(swapped.items())


def test_index_follows_new_speaker_labels_that_keep_old_mtimes(mini_data, tmp_path, caplog):
    """Guards against: training on the old labels after utt2spk was corrected in place."""
    data = copy_lists(mini_data, tmp_path / "train", 12)
    out = tmp_path / "index.tsv"
    build_train_index(data, out)
    utt2spk = read_table(data / "utt2spk")
    relabelled = {utt: "3D_SPK_77777" for utt in utt2spk}
    write_table(data / "utt2spk", relabelled.items())
    age(data / "wav.scp", data / "utt2spk")
    with caplog.at_level(logging.INFO, logger="speakerlab.data.index"):
        build_train_index(data, out)
    assert "utt2spk changed" in caplog.text
    assert load_train_index(out).speakers == ["3D_SPK_77777"]


def test_an_index_of_the_old_format_is_rebuilt(mini_data, tmp_path, caplog):
    """Guards against: an index written by an earlier version taken as up to date (its first
    line only named the data folder and the segment length)."""
    data = copy_lists(mini_data, tmp_path / "train", 4)
    out = tmp_path / "index.tsv"
    out.write_text(f"# speakerlab-train-index segment_seconds=4.0 data_dir={data.resolve()}\n")
    with caplog.at_level(logging.INFO, logger="speakerlab.data.index"):
        build_train_index(data, out)
    assert "not an index of this speakerlab version" in caplog.text
    assert len(load_train_index(out)) >= 4


def test_stage_2_builds_the_index_training_then_reuses(mini_data, tmp_path, capsys, caplog):
    """Guards against: stage 2 indexing with a fixed 4 s while the experiment trains with
    another data.segment_seconds, so that training silently builds a second index."""
    data = copy_lists(mini_data, tmp_path / "train", 12)
    out = tmp_path / "index.tsv"
    overrides = [
        "experiment=eres2net_mini",
        "data.segment_seconds=2.0",
        "data.max_bad_fraction=0.3",
    ]
    make_index.main(["--data_dir", str(data), "--out", str(out), *overrides])
    assert "(2 s per row)" in capsys.readouterr().out
    assert " segment_seconds=2.0 max_bad_fraction=0.3 " in read_header(out)
    inode = out.stat().st_ino
    with caplog.at_level(logging.INFO, logger="speakerlab.data.index"):
        build_train_index(data, out, segment_seconds=2.0, max_bad_fraction=0.3)  # as training does
    assert out.stat().st_ino == inode and "reusing up-to-date training index" in caplog.text
    with pytest.raises(SystemExit):
        make_index.main(
            ["--data_dir", str(data), "--out", str(out), "--segment_seconds", "3", *overrides]
        )
    assert "not both" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        make_index.main(["--data_dir", str(data), "--out", str(out), "experiment=no_such_one"])
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("speakerlab make-index: error: training configuration") and "\n" not in err
    )


# ------------------------------------------------------------------------------ concurrency


def test_a_second_build_of_the_same_index_waits_or_stops(mini_data, tmp_path):
    """Guards against: two processes writing the same index and .bad list at once."""
    data = copy_lists(mini_data, tmp_path / "train", 6)
    out = tmp_path / "index.tsv"
    with exclusive_lock(tmp_path / "index.tsv.lock", what="test"):
        with pytest.raises(LockedError, match=r"training index .*index\.tsv is in use by process"):
            build_train_index(data, out, lock_wait_seconds=0)
        assert not out.exists()
    # Held by another thread for a moment: the build waits for it, then goes ahead.
    holding = threading.Event()

    def hold() -> None:
        with exclusive_lock(tmp_path / "index.tsv.lock", what="test"):
            holding.set()
            time.sleep(1.0)

    holder = threading.Thread(target=hold)
    holder.start()
    holding.wait()
    start = time.monotonic()
    build_train_index(data, out, lock_wait_seconds=30)
    assert time.monotonic() - start >= 0.8 and out.is_file()
    holder.join()


@pytest.mark.slow
def test_two_make_index_processes_build_once(mini_data, tmp_path):
    """Guards against: two concurrent `speakerlab make-index` runs interleaving one index."""
    data = copy_lists(mini_data, tmp_path / "train")
    out = tmp_path / "index.tsv"
    command = [sys.executable, "-m", "speakerlab", "make-index"]
    command += ["--data_dir", str(data), "--out", str(out)]
    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda _: run_bounded(command, timeout=120), range(2)))
    assert [run.returncode for run in runs] == [0, 0], runs[0].stderr + runs[1].stderr
    logs = [run.stderr for run in runs]
    assert sum("building training index" in log for log in logs) == 1
    assert sum("reusing up-to-date training index" in log for log in logs) == 1
    assert index_rows(out) and not temporary_files(tmp_path)


# ------------------------------------------------------------------------------ outputs


def make_bad(folder: Path, count: int) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    bad = {}
    for i in range(count):
        path = folder / f"bad{i}.wav"
        path.write_bytes(b"not audio")
        bad[f"3D_SPK_09999_{i:03d}_bad"] = str(path)
    return bad


def test_a_failed_build_leaves_the_index_and_its_bad_list_as_they_were(mini_data, tmp_path):
    """Guards against: the .bad list of a failed build written next to the previous index
    (or the index replaced), so that the two no longer describe the same build."""
    good = read_table(mini_data.train_dir / "wav.scp")
    utt2spk = read_table(mini_data.train_dir / "utt2spk")
    bad = make_bad(tmp_path / "bad", 20)
    data = tmp_path / "train"
    some_bad = {**good, **dict(list(bad.items())[:1])}
    write_table(data / "wav.scp", some_bad.items())
    write_table(data / "utt2spk", [(u, utt2spk.get(u, "3D_SPK_09999")) for u in some_bad])
    out = tmp_path / "index.tsv"
    build_train_index(data, out)
    before = out.read_bytes(), (tmp_path / "index.tsv.bad").read_bytes()
    many_bad = {**dict(list(good.items())[:10]), **bad}
    write_table(data / "wav.scp", many_bad.items())
    write_table(data / "utt2spk", [(u, utt2spk.get(u, "3D_SPK_09999")) for u in many_bad])
    with pytest.raises(
        DataError, match=r"20 of 30 audio files .* most common: 20 x not a readable audio file"
    ):
        build_train_index(data, out)
    assert (out.read_bytes(), (tmp_path / "index.tsv.bad").read_bytes()) == before
    assert not temporary_files(tmp_path)
    write_table(data / "wav.scp", good.items())
    write_table(data / "utt2spk", [(u, utt2spk[u]) for u in good])
    build_train_index(data, out)
    assert not (tmp_path / "index.tsv.bad").exists()  # no stale list beside a clean index


def test_lists_changed_during_the_build_are_an_error(mini_data, tmp_path, monkeypatch):
    """Guards against: an index recorded as built from lists that changed while it was built."""
    import speakerlab.data.index as index_module

    data = copy_lists(mini_data, tmp_path / "train", 6)
    check = index_module.check_audio_header

    def check_and_edit(path: str):
        (data / "utt2spk").write_text((data / "utt2spk").read_text().replace("3D_SPK", "3D_SPX"))
        return check(path)

    monkeypatch.setattr(index_module, "check_audio_header", check_and_edit)
    with pytest.raises(DataError, match="changed while indexing"):
        build_train_index(data, tmp_path / "index.tsv", num_workers=1)
    assert not (tmp_path / "index.tsv").exists()


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("name", ["wav.scp", "utt2spk"])
def test_lists_that_are_not_utf8_are_one_line_errors(mini_data, tmp_path, capsys, name):
    """Guards against: a UnicodeDecodeError traceback for a list saved in Latin-1."""
    data = copy_lists(mini_data, tmp_path / "train", 4)
    lines = (data / name).read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b"3D_SPK", "3D_SPK_\xe9".encode("latin-1"), 1)
    (data / name).write_bytes(b"".join(lines))
    with pytest.raises(DataError, match=rf"{name}:3: not UTF-8 text \(byte 0xe9 at column 8\)"):
        read_table(data / name)
    with pytest.raises(SystemExit) as exit_info:
        make_index.main(["--data_dir", str(data), "--out", str(tmp_path / "index.tsv")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("speakerlab make-index: error:") and f"{name}:3: not UTF-8" in err
    assert "\n" not in err and not (tmp_path / "index.tsv").exists()


def test_a_tab_in_a_path_or_speaker_is_an_error(mini_data, tmp_path):
    """Guards against: an index line split at a tab inside a path, read back as other fields."""
    data = copy_lists(mini_data, tmp_path / "train", 3)
    wav_scp = read_table(data / "wav.scp")
    utt = next(iter(wav_scp))
    tabbed = Path(str(tmp_path / "a\tb.wav"))
    shutil.copy(wav_scp[utt], tabbed)
    write_table(data / "wav.scp", {**wav_scp, utt: str(tabbed)}.items())
    with pytest.raises(DataError, match=r"wav\.scp:1: audio path .* contains a tab"):
        build_train_index(data, tmp_path / "index.tsv")


def test_a_repeated_utterance_is_an_error(mini_data, tmp_path):
    """Guards against: an utterance listed twice in wav.scp (two paths) indexed twice."""
    data = copy_lists(mini_data, tmp_path / "train", 3)
    lines = (data / "wav.scp").read_text().splitlines()
    (data / "wav.scp").write_text(
        "\n".join([*lines, lines[0].split()[0] + " /elsewhere.wav"]) + "\n"
    )
    with pytest.raises(DataError, match=r"wav\.scp:4: duplicate key '3D_SPK_"):
        build_train_index(data, tmp_path / "index.tsv")
    assert not (tmp_path / "index.tsv").exists()


def write_truncated(path: Path) -> Path:
    """A WAV file whose header promises 2 s but which holds 1 s (cut by a failing copy)."""
    soundfile.write(path, np.zeros(2 * SR, dtype=np.float32), SR, subtype="PCM_16")
    data = path.read_bytes()
    path.write_bytes(data[: 44 + 2 * SR])
    return path


def test_a_truncated_file_is_a_named_skip(mini_data, tmp_path, capsys):
    """Guards against: a file whose header promises more samples than it holds indexed with
    the length libsndfile finds, without a word (issue 10, item 7)."""
    wav_scp = dict(list(read_table(mini_data.train_dir / "wav.scp").items())[:19])
    truncated = write_truncated(tmp_path / "cut.wav")
    wav_scp["3D_SPK_00001_999_cut"] = str(truncated)
    data = tmp_path / "train"
    write_table(data / "wav.scp", wav_scp.items())
    write_table(data / "utt2spk", [(u, u[:12]) for u in wav_scp])
    out = build_train_index(data, tmp_path / "index.tsv")
    assert "3D_SPK_00001_999_cut" not in set(load_train_index(out).utts)
    assert "3D_SPK_00001_999_cut" in (tmp_path / "index.tsv.bad").read_text()
    assert "truncated" in capsys.readouterr().err


def test_a_downloaded_archive_changed_after_its_check_is_checked_again(tmp_path):
    """Guards against: a verified archive overwritten in place (same size, its modification
    time set back) still taken as verified, because the marker was newer than the file."""
    import hashlib

    from local.download_3dspeaker import check_md5

    archive = tmp_path / "test.tar.gz"
    archive.write_bytes(b"A" * 1000)
    stat = archive.stat()
    good = hashlib.md5(b"A" * 1000).hexdigest()
    check_md5(archive, good)
    assert (tmp_path / "test.tar.gz.md5ok").is_file()
    with open(archive, "r+b") as f:  # bit rot, or another download over the same file
        f.write(b"B")
    os.utime(archive, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(DataError, match="differs from the published"):
        check_md5(archive, good)
    assert not archive.exists()
