"""The recipes: option errors, experiment selection, the mini recipe end to end (re-runs,
--pretrained, stage 6) and the custom recipe on a folder of speakers."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path

import pytest
from processes import run_bounded

from local.simulate.corpus import SimulationConfig, simulate_corpus

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "egs" / "3dspeaker"
RECIPE = RECIPES / "sv-eres2net" / "run.sh"
CUSTOM = ROOT / "egs" / "custom" / "sv" / "run.sh"
TRIAL_LISTS = ["trials_cross_device", "trials_cross_distance", "trials_cross_dialect"]
# A training budget of a few iterations; the models are the experiments' own.
SHORT_TRAINING = [
    "trainer.epochs=1",
    "trainer.max_steps_per_epoch=3",
    "trainer.batch_size=16",
    "data.num_workers=0",
    "trainer.progress_bar=false",
]


def run_recipe(*args: str, recipe: Path = RECIPE, check: bool = True):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    result = run_bounded(["bash", str(recipe), *args], timeout=900, env=env)
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
        (["--lm_experiment", "resnet_lm"], "unknown --lm_experiment 'resnet_lm'"),
        (["--stage"], "option --stage needs a value"),
        (["stage=3"], "unexpected argument 'stage=3'"),
    ],
)
def test_bad_option_values(args, message):
    result = run_recipe(*args, check=False)
    assert result.returncode != 0
    assert message in result.stderr


@pytest.mark.parametrize(
    "recipe, args, experiment, lm_experiment",
    [
        ("sv-eres2net", [], "eres2net", "eres2net_lm"),
        ("sv-eres2net", ["--corpus", "mini"], "eres2net_mini", "eres2net_lm_mini"),
        (
            "sv-eres2net",
            ["--corpus", "mini", "--experiment", "eres2net"],
            "eres2net",
            "eres2net_lm",
        ),
        ("sv-campplus", ["--corpus", "mini"], "campplus_mini", "none"),
        ("sv-ecapa", ["--corpus", "mini"], "ecapa_tdnn_mini", "none"),
        ("sv-ecapa", [], "ecapa_tdnn", "none"),
    ],
)
def test_corpus_mini_selects_the_recipes_mini_experiment(recipe, args, experiment, lm_experiment):
    """--corpus mini without --experiment trains the recipe's mini experiment (not the full-size
    model for days on a CPU); an explicit --experiment wins."""
    result = run_recipe(*args, "--stop_stage", "0", recipe=RECIPES / recipe / "run.sh")
    plan = f"experiment {experiment} in exp/{experiment} (stage 6: {lm_experiment})"
    assert plan in result.stderr


def test_stage_6_without_a_large_margin_experiment_is_a_clear_error():
    result = run_recipe(
        "--experiment", "campplus", "--stage", "6", "--stop_stage", "6", check=False
    )
    assert result.returncode == 1
    assert "stage 6: no large-margin experiment campplus_lm for campplus" in result.stderr


def test_missing_real_corpus_without_download(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    result = run_recipe(
        "--corpus", "3dspeaker", "--download", "false", "--raw_data", str(raw),
        "--data", str(tmp_path / "data"), "--stop_stage", "1",
        check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert str(raw / "3dspeaker") in result.stderr
    assert not (tmp_path / "data" / "3dspeaker" / ".done").exists()


def read_results(exp: Path) -> list[dict]:
    """The rows of the results table, without the paths that differ between experiments."""
    rows = json.loads((exp / "scores" / "results.json").read_text())["results"]
    return [{k: v for k, v in row.items() if k != "score_file"} for row in rows]


def embedding_files(exp: Path) -> dict[str, tuple[int, str]]:
    """Inode and SHA-256 of every embedding archive: a rewrite changes the inode."""
    return {
        p.name: (p.stat().st_ino, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted((exp / "embeddings" / "test").glob("*.ark"))
    }


@pytest.mark.slow
def test_mini_recipe_end_to_end_reruns_stage_6_and_pretrained(tmp_path):
    paths = ["--raw_data", str(tmp_path / "raw"), "--data", str(tmp_path / "data")]
    exp = tmp_path / "exp"
    mini = ["--corpus", "mini", "--mini_size", "ci", *paths, "--exp", str(exp)]
    first = run_recipe(*mini, "--", *SHORT_TRAINING)
    assert "experiment eres2net_mini" in first.stderr

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
    embeddings = embedding_files(exp)
    assert embeddings
    again = run_recipe(*mini, "--", *SHORT_TRAINING)
    assert "already prepared" in again.stderr
    assert "reusing up-to-date training index" in again.stderr + again.stdout
    assert "training was already complete" in again.stderr + again.stdout
    assert embedding_files(exp) == embeddings  # not re-embedded, not rewritten
    assert read_results(exp) == results

    # A single stage re-runs alone.
    only_scoring = run_recipe(*paths, "--exp", str(exp), "--stage", "5", "--stop_stage", "5")
    assert "stage 5" in only_scoring.stderr and "stage 3" not in only_scoring.stderr
    assert read_results(exp) == results

    # Stage 6 after the mini recipe: large-margin fine-tuning of the trained mini model.
    lm = run_recipe(*mini, "--stage", "6", "--stop_stage", "6", "--", *SHORT_TRAINING)
    assert f"stage 6: large-margin fine-tuning (eres2net_lm_mini) from {exp}" in lm.stderr
    assert "initialised embedding model and classifier" in lm.stderr + lm.stdout
    assert [row["trials"] for row in read_results(Path(f"{exp}_lm"))] == TRIAL_LISTS

    # --pretrained evaluates the exported checkpoint without training: the same numbers.
    pretrained_exp = tmp_path / "exp_pretrained"
    run_recipe(
        *paths, "--pretrained", str(exp / "model.ckpt"), "--exp", str(pretrained_exp),
        "--stage", "2", "--stop_stage", "5",
    )  # fmt: skip
    assert not (pretrained_exp / "checkpoints").exists()
    assert read_results(pretrained_exp) == results


@pytest.mark.slow
def test_custom_recipe_on_a_folder_of_speakers_from_scratch_fine_tuned_and_given_lists(tmp_path):
    """The folder tree of a simulated corpus: prepared, trained, scored; then fine-tuned from
    that model; then evaluated from lists given directly."""
    corpus = simulate_corpus(
        tmp_path / "raw",
        SimulationConfig(
            num_train_speakers=10, num_test_speakers=0, utts_per_speaker=6, min_seconds=2.0,
            max_seconds=3.0, num_noises=0, num_rirs=0, seed=11,
        ),
    )  # fmt: skip
    source = corpus.corpus_dir / "train"  # <speaker>/<files>: a folder of speakers
    data, exp = tmp_path / "data", tmp_path / "exp"
    common = ["--data", str(data), "--experiment", "eres2net_mini"]
    scratch = run_recipe(
        "--source", str(source), *common, "--num_test_speakers", "3", "--num_trials", "60",
        "--exp", str(exp), "--", *SHORT_TRAINING,
        recipe=CUSTOM,
    )  # fmt: skip
    assert "| test_trials |" in scratch.stdout
    [row] = read_results(exp)
    assert row["num_trials"] == 60 and row["num_targets"] == 30
    test_speakers = set(
        line.split()[1] for line in (data / "custom" / "test" / "utt2spk").read_text().splitlines()
    )
    train_speakers = set(
        line.split()[1] for line in (data / "custom" / "train" / "utt2spk").read_text().splitlines()
    )
    assert len(test_speakers) == 3 and not test_speakers & train_speakers

    # Fine-tuning from the model just trained: its embedding model is loaded.
    tuned = run_recipe(
        *common, "--init_from", str(exp), "--exp", str(tmp_path / "tuned"), "--stage", "2",
        "--", *SHORT_TRAINING,
        recipe=CUSTOM,
    )  # fmt: skip
    assert f"from {exp}" in tuned.stderr
    assert re.search(r"initialised (the )?embedding model", tuned.stderr + tuned.stdout)
    assert len(read_results(tmp_path / "tuned")) == 1

    # Lists given directly: evaluate the first model on them, the same numbers.
    given = run_recipe(
        "--train_dir", str(data / "custom" / "train"), "--test_dir", str(data / "custom" / "test"),
        "--trials", str(data / "custom" / "trials" / "test_trials"),
        "--pretrained", str(exp / "model.ckpt"), "--exp", str(tmp_path / "given"),
        recipe=CUSTOM,
    )  # fmt: skip
    assert "stage 1: using the lists given" in given.stderr
    assert read_results(tmp_path / "given") == read_results(exp)
