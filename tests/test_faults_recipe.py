"""Fault injection for the recipes (issue 10): stale lists, bad options, missing inputs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
from processes import run_bounded

ROOT = Path(__file__).resolve().parents[1]
CUSTOM = ROOT / "egs" / "custom" / "sv" / "run.sh"
MINI = ROOT / "egs" / "3dspeaker" / "sv-eres2net" / "run.sh"


def run(recipe: Path, *args: str):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    return run_bounded(["bash", str(recipe), *args], timeout=300, env=env)


def add_speaker(root: Path, name: str, files: int = 4) -> None:
    for k in range(files):
        path = root / name / f"take{k}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(path, np.full(4000, 0.01 * (k + 1), dtype=np.float32), 16000)


def speakers(data: Path) -> set[str]:
    lines = []
    for split in ("train", "test"):
        lines += (data / "custom" / split / "utt2spk").read_text().splitlines()
    return {line.split()[1] for line in lines}


@pytest.mark.slow
def test_stage_1_prepares_the_source_as_it_is_now(tmp_path):
    """Stale outputs: a re-run of stage 1 after the source changed must not keep the lists of
    the earlier source (a `.done` marker alone would)."""
    source, data = tmp_path / "source", tmp_path / "data"
    for name in ("a", "b", "c", "d"):
        add_speaker(source, name)
    args = ["--source", str(source), "--data", str(data), "--stop_stage", "1"]
    assert run(CUSTOM, *args).returncode == 0
    assert speakers(data) == {"a", "b", "c", "d"}
    add_speaker(source, "e")
    assert run(CUSTOM, *args).returncode == 0
    assert speakers(data) == {"a", "b", "c", "d", "e"}
    other = tmp_path / "other"
    for name in ("x", "y", "z"):
        add_speaker(other, name)
    assert (
        run(CUSTOM, "--source", str(other), "--data", str(data), "--stop_stage", "1").returncode
        == 0
    )
    assert speakers(data) == {"x", "y", "z"}


@pytest.mark.slow
def test_a_failed_preparation_leaves_no_done_marker(tmp_path):
    """A source with an unreadable file stops stage 1 naming the file; later stages must not
    find a half-prepared corpus marked done."""
    source, data = tmp_path / "source", tmp_path / "data"
    for name in ("a", "b", "c"):
        add_speaker(source, name)
    (source / "a" / "bad.wav").write_bytes(b"not audio")
    result = run(CUSTOM, "--source", str(source), "--data", str(data), "--stop_stage", "1")
    assert result.returncode != 0
    assert f"unusable: {source / 'a' / 'bad.wav'}" in result.stderr
    assert not (data / "custom" / ".done").exists()
    assert not (data / "custom" / "train").exists()


def test_custom_recipe_input_errors_are_one_clear_line(tmp_path):
    cases = [
        ([], "give --source DIR (a folder of speaker folders, or a Kaldi dir), or your lists"),
        (
            ["--source", str(tmp_path), "--train_dir", str(tmp_path)],
            "give either --source or --train_dir/--test_dir/--trials, not both",
        ),
        (
            ["--source", str(tmp_path / "nowhere")],
            f"--source {tmp_path / 'nowhere'}: not a directory",
        ),
        (
            ["--train_dir", str(tmp_path / "tr"), "--test_dir", str(tmp_path / "te"),
             "--trials", f"{tmp_path / 't1'} {tmp_path / 't2'}"],
            f"stage 1: missing {tmp_path / 'tr' / 'wav.scp'} {tmp_path / 'tr' / 'utt2spk'} "
            f"{tmp_path / 'te' / 'wav.scp'} {tmp_path / 't1'} {tmp_path / 't2'}",
        ),
        (["--skip_unreadable", "yes"], "--skip_unreadable must be true or false"),
    ]  # fmt: skip
    for args, message in cases:
        result = run(CUSTOM, *args, "--data", str(tmp_path / "data"), "--stop_stage", "1")
        assert result.returncode == 1, args
        assert message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_stage_6_refuses_a_pretrained_model(tmp_path):
    result = run(
        MINI, "--pretrained", "some.ckpt", "--stage", "6", "--stop_stage", "6",
        "--exp", str(tmp_path / "exp"),
    )  # fmt: skip
    assert result.returncode == 1
    assert "stage 6 fine-tunes a model trained in stage 3; not with --pretrained" in result.stderr
