"""Fault injection for scoring, calibration and the speaker database (issue 10's classes): bad
input names the file and line and touches no output, no non-finite score is written, outputs are
atomic, and the speaker database survives kills and concurrent writers."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import kaldiio
import numpy as np
import pytest

from speakerlab.bin import calibrate as calibrate_cli
from speakerlab.bin import score as score_cli
from speakerlab.errors import DataError
from speakerlab.fileio import LockedError, exclusive_lock, temporary_files
from speakerlab.identification import SpeakerDB, updating
from speakerlab.scoring import write_scores
from speakerlab.trials import read_trials
from tests.processes import kill_session, run_bounded


def write_scp(directory, vectors):
    directory.mkdir(parents=True, exist_ok=True)
    scp = directory / "embedding.scp"
    kaldiio.save_ark(
        str(directory / "embedding.ark"),
        {k: np.asarray(v, dtype=np.float32) for k, v in vectors.items()},
        scp=str(scp),
    )
    return scp


@pytest.fixture()
def case(tmp_path):
    rng = np.random.default_rng(0)
    # Four speakers along four axes: their trials are perfectly separable.
    vectors = {
        f"s{s}_u{u}": 5 * np.eye(8)[s] + rng.standard_normal(8) for s in range(4) for u in range(4)
    }
    scp = write_scp(tmp_path / "emb", vectors)
    utts = list(vectors)
    lines = [
        f"{a} {b} {'target' if a[:2] == b[:2] else 'nontarget'}"
        for i, a in enumerate(utts)
        for b in utts[i + 1 :]
    ]
    good = tmp_path / "good"
    good.write_text("\n".join(lines) + "\n")
    return scp, good, lines


def score(scp, trials, out, *extra):
    score_cli.main(
        [
            "--embeddings",
            str(scp),
            "--trials",
            *map(str, trials),
            "--out-dir",
            str(out),
            "--no-plot",
            *extra,
        ]
    )


def snapshot(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_a_bad_trial_line_names_file_and_line_and_touches_no_output(case, tmp_path, capsys):
    """Failing behaviour: a malformed line in the second list stops scoring after the first
    list's outputs were already replaced (outputs of two runs mixed), or ends in a traceback."""
    scp, good, lines = case
    out = tmp_path / "out"
    score(scp, [good], out)
    before = snapshot(out)
    bad = tmp_path / "bad"
    bad.write_text("\n".join(lines[:5] + ["s0_u0 s1_u1 maybe"] + lines[5:]) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        score(scp, [good, bad], out, "--p-target", "0.05")
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.startswith(f"speakerlab score: error: {bad}:6: expected")
    assert snapshot(out) == before


def test_an_utterance_without_embedding_names_its_line_and_touches_no_output(
    case, tmp_path, capsys
):
    """Failing behaviour: a trial naming an utterance that has no embedding is found only while
    the lists are written one by one, after earlier score files were replaced."""
    scp, good, lines = case
    out = tmp_path / "out"
    score(scp, [good], out)
    before = snapshot(out)
    missing = tmp_path / "missing"
    missing.write_text("\n".join(lines[:3] + ["s0_u0 ghost target"]) + "\n")
    with pytest.raises(SystemExit):
        score(scp, [good, missing], out, "--p-target", "0.05")
    assert f"{missing}:4: test utterance 'ghost' has no embedding" in capsys.readouterr().err
    assert snapshot(out) == before


def test_non_finite_embeddings_and_scores_are_never_written(case, tmp_path, capsys):
    """Failing behaviour: a NaN embedding, or a calibration so steep that LLRs overflow, yields
    NaN/inf scores in a score file and a metrics table computed from them."""
    scp, good, _ = case
    nan_scp = write_scp(tmp_path / "nan", {"s0_u0": [np.nan] * 8, "s0_u1": [1.0] * 8})
    with pytest.raises(SystemExit):
        score(nan_scp, [good], tmp_path / "out_nan")
    assert "embedding of 's0_u0' is zero or not finite" in capsys.readouterr().err
    assert not (tmp_path / "out_nan").exists()

    steep = {
        "format": "speakerlab-calibration",
        "version": 1,
        "llr": {"scale": 1e308, "offset": 1e308, "duration_weights": None},
        "score_kind": {"normalisation": "none"},
        "prior": 0.5,
        "p_target": 0.01,
    }
    (tmp_path / "steep.json").write_text(json.dumps(steep))
    with pytest.raises(SystemExit):
        score(scp, [good], tmp_path / "out_inf", "--calibration", str(tmp_path / "steep.json"))
    assert "NaN or infinite" in capsys.readouterr().err
    assert not (tmp_path / "out_inf").exists()

    trials = read_trials(good)
    scores = np.zeros(len(trials))
    scores[7] = np.inf
    with pytest.raises(DataError, match=f"{good}:8: score is inf; no score file written"):
        write_scores(tmp_path / "direct.score", trials, scores)
    assert not (tmp_path / "direct.score").exists()


def test_a_failed_calibration_keeps_the_previous_one(case, tmp_path, capsys):
    """Failing behaviour: a calibration run that fails (here: a separable list) leaves a
    truncated or emptied calibration file where a good one was."""
    scp, good, lines = case
    out = tmp_path / "calibration.json"
    noisy = tmp_path / "noisy"
    # Flip some labels so the list is not separable and the fit exists.
    flipped = [
        line.replace("nontarget", "target") if i % 7 == 0 else line for i, line in enumerate(lines)
    ]
    noisy.write_text("\n".join(flipped) + "\n")
    calibrate_cli.main(["--embeddings", str(scp), "--trials", str(noisy), "--out", str(out)])
    before = out.read_bytes()
    with pytest.raises(SystemExit):  # well-separated speakers: no finite calibration
        calibrate_cli.main(["--embeddings", str(scp), "--trials", str(good), "--out", str(out)])
    assert "perfectly separated" in capsys.readouterr().err
    assert out.read_bytes() == before and not temporary_files(tmp_path)


def test_a_truncated_database_is_a_clear_error(tmp_path):
    """Failing behaviour: a database cut short (copied while being written by another tool, a
    full disk) raises a raw zipfile traceback."""
    db = SpeakerDB.create("weights:x", 4)
    db.enroll("a", np.ones((1, 4)))
    path = db.save(tmp_path / "speakers.db")
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(DataError, match="speakers.db: not a readable speaker database"):
        SpeakerDB.load(path)


SAVER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from speakerlab.identification import SpeakerDB
    path = sys.argv[1]
    dbs = []
    for value in (1.0, 2.0):
        names = [f"s{i}" for i in range(20000)]
        means = np.full((20000, 192), value, np.float32)
        dbs.append(SpeakerDB("weights:x", names, means, np.full(20000, int(value), np.int64)))
    dbs[0].save(path)
    print("ready", flush=True)
    while True:
        for db in dbs:
            db.save(path)
    """
)


def test_a_database_killed_while_saving_is_whole(tmp_path):
    """Failing behaviour: killing ``enroll`` while it writes the database leaves a torn file
    that no later command can read (every speaker lost)."""
    path = tmp_path / "speakers.db"
    rng = np.random.default_rng(0)
    for _ in range(4):
        process = subprocess.Popen(
            [sys.executable, "-c", SAVER, str(path)],
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            assert process.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0.05, 0.4))
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
        finally:
            kill_session(process.pid)
        db = SpeakerDB.load(path)  # whole: either of the two versions, never a mix
        assert len(db) == 20000
        value = int(db.counts[0])
        assert value in (1, 2) and np.all(db.counts == value)
        np.testing.assert_allclose(db.means, value, rtol=1e-6)


ENROLLER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from speakerlab.identification import updating
    path, prefix = sys.argv[1], sys.argv[2]
    for i in range(15):
        with updating(path, "weights:x", 4) as db:
            db.enroll(f"{prefix}{i}", np.random.default_rng(i).standard_normal((1, 4)))
    """
)


def test_concurrent_enrollments_lose_no_speaker(tmp_path):
    """Failing behaviour: two enroll commands read the same database, each adds its speaker and
    writes it back: the second write silently drops the first one's speaker."""
    path = tmp_path / "speakers.db"
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", ENROLLER, str(path), prefix], start_new_session=True
        )
        for prefix in ("a", "b")
    ]
    try:
        for process in processes:
            assert process.wait(timeout=120) == 0
    finally:
        for process in processes:
            kill_session(process.pid)
    names = set(SpeakerDB.load(path).names)
    assert names == {f"{p}{i}" for p in "ab" for i in range(15)}


def test_a_locked_database_waits_then_says_who_holds_it(tmp_path, monkeypatch):
    """Failing behaviour: a second writer either corrupts the database or waits forever in
    silence when the first one hangs."""
    import speakerlab.identification as identification

    path = tmp_path / "speakers.db"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from speakerlab.fileio import exclusive_lock\n"
            "with exclusive_lock(sys.argv[1], what='db'):\n"
            "    print('locked', flush=True); time.sleep(60)",
            str(path) + ".lock",
        ],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        monkeypatch.setattr(identification, "LOCK_WAIT_SECONDS", 0.5)
        start = time.monotonic()
        with pytest.raises(
            LockedError, match=rf"speaker database .* is in use by process {holder.pid}"
        ):
            with updating(path, "weights:x", 4):
                pass
        assert time.monotonic() - start < 10
        assert not path.exists()
    finally:
        kill_session(holder.pid)
        holder.wait()
    with exclusive_lock(str(path) + ".lock", what="db"):  # released with its holder
        pass


def test_score_outputs_in_a_folder_with_spaces_and_non_ascii(case, tmp_path):
    """Failing behaviour: paths with spaces or non-ASCII characters break the outputs."""
    scp, good, _ = case
    out = tmp_path / "résultats d'essai"
    result = run_bounded(
        [
            sys.executable,
            "-m",
            "speakerlab",
            "score",
            "--embeddings",
            str(scp),
            "--trials",
            str(good),
            "--out-dir",
            str(out),
            "--no-plot",
        ],
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert (out / "good.score").is_file() and (out / "results.json").is_file()
