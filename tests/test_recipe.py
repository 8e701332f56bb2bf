"""The sv-eres2net recipe: option errors, a reduced end-to-end run, re-runs and --pretrained."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from processes import run_bounded

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "egs" / "3dspeaker" / "sv-eres2net" / "run.sh"
TRIAL_LISTS = ["trials_cross_device", "trials_cross_distance", "trials_cross_dialect"]
# A reduced configuration: a tiny ERes2Net, one short epoch, 2 s crops.
TINY_TRAINING = [
    "model.m_channels=4",
    "model.embedding_size=16",
    "trainer.epochs=1",
    "trainer.batch_size=16",
    "data.crop_seconds=2.0",
    "data.num_workers=0",
    "trainer.progress_bar=false",
]


def run_recipe(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    result = run_bounded(["bash", str(RECIPE), *args], timeout=900, env=env)
    if check and result.returncode != 0:
        raise AssertionError(
            f"recipe failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result


def test_unknown_option_is_an_error():
    result = run_recipe("--stgae", "3", check=False)
    assert result.returncode == 2
    assert "unknown option --stgae" in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--corpus", "timit"], "--corpus must be 3dspeaker or mini, not 'timit'"),
        (["--experiment", "resnet"], "unknown experiment 'resnet'"),
        (["--stage"], "option --stage needs a value"),
        (["stage=3"], "unexpected argument 'stage=3'"),
    ],
)
def test_bad_option_values(args, message):
    result = run_recipe(*args, check=False)
    assert result.returncode != 0
    assert message in result.stderr


def test_missing_real_corpus_without_download(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    result = run_recipe(
        "--corpus",
        "3dspeaker",
        "--download",
        "false",
        "--raw_data",
        str(raw),
        "--data",
        str(tmp_path / "data"),
        "--stop_stage",
        "1",
        check=False,
    )
    assert result.returncode != 0
    assert str(raw / "3dspeaker") in result.stderr
    assert not (tmp_path / "data" / "3dspeaker" / ".done").exists()


def read_results(exp: Path) -> list[dict]:
    """The rows of the results table, without the paths that differ between experiments."""
    rows = json.loads((exp / "scores" / "results.json").read_text())["results"]
    return [{k: v for k, v in row.items() if k != "score_file"} for row in rows]


@pytest.mark.slow
def test_reduced_mini_recipe_end_to_end_reruns_and_pretrained(tmp_path):
    paths = ["--raw_data", str(tmp_path / "raw"), "--data", str(tmp_path / "data")]
    exp = tmp_path / "exp"
    first = run_recipe(
        "--corpus", "mini", "--mini_size", "ci", *paths, "--exp", str(exp), "--", *TINY_TRAINING
    )

    # Stage 5 printed the table, and wrote it with every trial list as a row.
    for name in TRIAL_LISTS:
        assert f"| {name} |" in first.stdout
        assert (exp / "scores" / f"{name}.score").stat().st_size > 0
    assert (exp / "scores" / "det.png").stat().st_size > 0
    results = read_results(exp)
    assert [row["trials"] for row in results] == TRIAL_LISTS
    for row in results:
        assert 0.0 <= row["eer"] <= 1.0 and 0 < row["num_targets"] < row["num_trials"]

    # Re-running everything redoes nothing: data, index, training, extraction are skipped.
    scores_mtime = (exp / "scores" / "trials_cross_device.score").stat().st_mtime_ns
    again = run_recipe(
        "--corpus", "mini", "--mini_size", "ci", *paths, "--exp", str(exp), "--", *TINY_TRAINING
    )
    assert "already prepared" in again.stderr
    assert "reusing up-to-date training index" in again.stderr + again.stdout
    assert "training was already complete" in again.stderr + again.stdout
    assert read_results(exp) == results
    assert (exp / "scores" / "trials_cross_device.score").stat().st_mtime_ns >= scores_mtime

    # A single stage re-runs alone.
    only_scoring = run_recipe(*paths, "--exp", str(exp), "--stage", "5", "--stop_stage", "5")
    assert "stage 5" in only_scoring.stderr and "stage 3" not in only_scoring.stderr
    assert read_results(exp) == results

    # --pretrained evaluates the exported checkpoint without training: the same numbers.
    pretrained_exp = tmp_path / "exp_pretrained"
    run_recipe(
        *paths,
        "--pretrained",
        str(exp / "model.ckpt"),
        "--exp",
        str(pretrained_exp),
        "--stage",
        "2",
        "--stop_stage",
        "5",
    )
    assert not (pretrained_exp / "checkpoints").exists()
    assert read_results(pretrained_exp) == results
