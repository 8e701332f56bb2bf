"""Atomic checkpoint files, keep-last-K, newest-readable lookup and RNG state round trips."""

import logging
import random

import numpy as np
import pytest
import torch

from speakerlab import fileio
from speakerlab.errors import CheckpointError
from speakerlab.training import checkpointing
from speakerlab.training.checkpointing import (
    capture_rng_state,
    checkpoint_path,
    list_checkpoints,
    load_checkpoint,
    load_latest_checkpoint,
    prune_checkpoints,
    restore_rng_state,
    save_checkpoint,
)


def training_state(step: int) -> dict:
    return {
        "model": {"w": torch.full((3,), float(step))},
        "classifier": {"weight": torch.ones(2, 3)},
        "optimizer": {"state": {}, "param_groups": []},
        "epoch": 0,
        "step": step,
        "global_step": step,
        "rank_states": [{"rng": capture_rng_state(torch.device("cpu"))}],
        "config": {"a": [1, 2.5, "x", None]},
    }


def test_round_trip_with_weights_only_and_newest_sorts_last(tmp_path):
    for step in (10, 2, 100):
        save_checkpoint(training_state(step), checkpoint_path(tmp_path, step))
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "ckpt_000000002.pt",
        "ckpt_000000010.pt",
        "ckpt_000000100.pt",
    ]
    state = torch.load(checkpoint_path(tmp_path, 100), weights_only=True)
    assert state["step"] == 100 and state["config"]["a"] == [1, 2.5, "x", None]
    path, latest = load_latest_checkpoint(tmp_path)
    assert path.name == "ckpt_000000100.pt" and torch.equal(
        latest["model"]["w"], torch.full((3,), 100.0)
    )


def test_kill_during_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(training_state(1), checkpoint_path(tmp_path, 1))
    real_save = torch.save

    def dying_save(obj, handle):
        real_save(obj, handle)
        handle.truncate(100)  # half-written file, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpointing.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(training_state(2), checkpoint_path(tmp_path, 2))
    monkeypatch.undo()
    assert not checkpoint_path(tmp_path, 2).exists()
    path, state = load_latest_checkpoint(tmp_path)
    assert path == checkpoint_path(tmp_path, 1) and state["step"] == 1


def test_overwriting_a_checkpoint_is_atomic(tmp_path, monkeypatch):
    path = checkpoint_path(tmp_path, 5)
    save_checkpoint(training_state(5), path)
    monkeypatch.setattr(fileio.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk")))
    with pytest.raises(OSError):
        save_checkpoint(training_state(6), path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 5
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


def test_prune_keeps_newest_and_removes_partial_files(tmp_path):
    for step in range(1, 6):
        save_checkpoint(training_state(step), checkpoint_path(tmp_path, step))
    (tmp_path / ".ckpt_000000006.pt.x1y2z3.tmp").write_bytes(b"torn")  # left by a killed save
    written = list_checkpoints(tmp_path)
    removed = prune_checkpoints(tmp_path, keep_last=2, known_good=written)
    assert [p.name for p in removed] == [f"ckpt_00000000{i}.pt" for i in (1, 2, 3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_000000004.pt", "ckpt_000000005.pt"]


def test_unreadable_newest_checkpoint_falls_back_with_warning(tmp_path, caplog):
    save_checkpoint(training_state(3), checkpoint_path(tmp_path, 3))
    checkpoint_path(tmp_path, 4).write_bytes(b"not a checkpoint")
    with caplog.at_level(logging.WARNING):
        path, state = load_latest_checkpoint(tmp_path)
    assert state["step"] == 3
    assert "ckpt_000000004.pt" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt_000000003.pt",
        "ckpt_000000004.pt.corrupt",
    ]
    assert load_latest_checkpoint(tmp_path / "missing") is None


def test_load_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="bad.pt"):
        load_checkpoint(bad)


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    save_checkpoint({"rng": capture_rng_state(torch.device("cpu"))}, tmp_path / "rng.pt")
    expected = (torch.rand(4), np.random.standard_normal(3), random.random(), random.gauss(0, 1))
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    restore_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"], torch.device("cpu"))
    again = (torch.rand(4), np.random.standard_normal(3), random.random(), random.gauss(0, 1))
    assert torch.equal(expected[0], again[0])
    assert np.array_equal(expected[1], again[1])
    assert expected[2:] == again[2:]


def test_init_source_is_a_file_an_experiment_folder_or_a_released_model_id(tmp_path, monkeypatch):
    from speakerlab.training import finetune

    save_checkpoint(training_state(4), checkpoint_path(tmp_path / "exp" / "checkpoints", 4))
    save_checkpoint(training_state(9), checkpoint_path(tmp_path / "exp" / "checkpoints", 9))
    assert finetune.resolve_init_path(tmp_path / "exp") == checkpoint_path(
        tmp_path / "exp" / "checkpoints", 9
    )
    single = checkpoint_path(tmp_path / "exp" / "checkpoints", 4)
    assert finetune.resolve_init_path(single) == single
    released = tmp_path / "eres2net_base_model.ckpt"
    monkeypatch.setattr(finetune, "download_pretrained", lambda model_id: released)
    assert finetune.resolve_init_path("iic/speech_eres2net_base_sv_zh-cn_3dspeaker_16k") == released
    with pytest.raises(CheckpointError, match="no such checkpoint file or experiment folder"):
        finetune.resolve_init_path(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="a folder without training checkpoints"):
        finetune.resolve_init_path(tmp_path)
