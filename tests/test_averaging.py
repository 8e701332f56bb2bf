"""Checkpoint averaging (issue 14, part 3): values by hand, which checkpoints, and every check."""

from __future__ import annotations

import pytest
import torch

from speakerlab.bin.export import export_embedding_model
from speakerlab.bin.export import main as export_main
from speakerlab.errors import CheckpointError, ConfigError
from speakerlab.models import build_model
from speakerlab.training.averaging import (
    average_checkpoints,
    average_states,
    check_retention,
)
from speakerlab.training.checkpointing import checkpoint_path, save_checkpoint

TINY = {"m_channels": 4, "embedding_size": 8, "num_blocks": [1, 1, 1, 1]}


def test_two_states_average_by_hand():
    older = {
        "fc.weight": torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
        "bn.running_mean": torch.tensor([0.5, -1.0]),
        "bn.running_var": torch.tensor([1.0, 3.0]),
        "bn.num_batches_tracked": torch.tensor(100),
    }
    newer = {
        "fc.weight": torch.tensor([[3.0, 2.0], [1.0, 0.0]]),
        "bn.running_mean": torch.tensor([1.5, 0.0]),
        "bn.running_var": torch.tensor([2.0, 1.0]),
        "bn.num_batches_tracked": torch.tensor(200),
    }
    averaged = average_states([older, newer], ["a", "b"])
    assert torch.equal(averaged["fc.weight"], torch.tensor([[2.0, 2.0], [2.0, 2.0]]))
    assert torch.equal(averaged["bn.running_mean"], torch.tensor([1.0, -0.5]))
    assert torch.equal(averaged["bn.running_var"], torch.tensor([1.5, 2.0]))
    # A counter is not averaged: the newest checkpoint's count.
    assert averaged["bn.num_batches_tracked"].item() == 200
    assert averaged["bn.num_batches_tracked"].dtype == torch.int64


def test_half_precision_is_averaged_in_double():
    # 60000 + 60000 overflows float16 (largest 65504): a float16 sum would average to infinity.
    states = [{"w": torch.tensor([60000.0], dtype=torch.float16)} for _ in range(2)]
    averaged = average_states(states, ["a", "b"])
    assert averaged["w"].dtype == torch.float16 and averaged["w"].item() == 60000.0


def test_every_mismatch_is_listed_in_one_error():
    first = {"a": torch.zeros(2), "b": torch.zeros(3), "c": torch.zeros(1)}
    second = {"a": torch.zeros(4), "c": torch.zeros(1, dtype=torch.float64), "d": torch.zeros(1)}
    with pytest.raises(CheckpointError) as error:
        average_states([first, second], ["one.pt", "two.pt"])
    message = str(error.value)
    assert "differ from one.pt" in message
    assert "two.pt: missing (1): b" in message
    assert "two.pt: unexpected (1): d" in message
    assert "a (4,) torch.float32 vs (2,) torch.float32" in message
    assert "c (1,) torch.float64 vs (1,) torch.float32" in message


def write_run(exp_dir, positions, model_kwargs=TINY, keep_last=3, export_average=None, seed=0):
    """Training checkpoints of a tiny ERes2Net at (global step, epoch, step) positions; returns
    the embedding-model state of each."""
    states = []
    for number, (global_step, epoch, step) in enumerate(positions):
        torch.manual_seed(seed + number)
        model = build_model("eres2net", **model_kwargs)
        for module in model.modules():  # distinct batch-norm statistics per checkpoint
            if isinstance(module, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
                module.num_batches_tracked.fill_(global_step)
        trainer = {"keep_last": keep_last}
        if export_average is not None:
            trainer["export_average"] = export_average
        state = {
            "model": model.state_dict(),
            "model_name": "eres2net",
            "model_kwargs": dict(model_kwargs),
            "classifier": {"weight": torch.zeros(3, 8)},
            "optimizer": {},
            "epoch": epoch,
            "step": step,
            "rank_states": [],
            "config": {"trainer": trainer},
        }
        save_checkpoint(state, checkpoint_path(exp_dir / "checkpoints", global_step))
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    return states


def mean(*states: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Element-wise mean of float tensors, written out as sum / count."""
    return {
        k: sum(s[k] for s in states) / len(states)
        for k in states[0]
        if states[0][k].is_floating_point()
    }


def test_export_averages_the_last_epoch_ends_and_skips_mid_epoch_saves(tmp_path):
    exp = tmp_path / "exp"
    # epoch 1 ends at step 10, a mid-epoch save at 15, epochs 2 and 3 end at 20 and 30.
    first, second, mid, third = write_run(exp, [(10, 1, 0), (20, 2, 0), (15, 2, 5), (30, 3, 0)])
    name, kwargs, origin = export_embedding_model(exp, tmp_path / "avg.ckpt", average=2)
    assert (name, kwargs) == ("eres2net", TINY) and "epochs 2, 3" in origin
    exported = torch.load(tmp_path / "avg.ckpt", weights_only=True)
    for key, value in exported.items():
        if key.endswith("num_batches_tracked"):
            assert value.item() == 30  # the newest checkpoint's counter
        else:
            assert torch.allclose(value, mean(second, third)[key], atol=1e-6), key
    assert not torch.allclose(
        exported["conv1.weight"], (mid["conv1.weight"] + third["conv1.weight"]) / 2
    )

    # A checkpoint file as the source: that one and the epoch ends before it.
    export_embedding_model(exp / "checkpoints" / "ckpt_000000020.pt", tmp_path / "b.ckpt", 2)
    older = torch.load(tmp_path / "b.ckpt", weights_only=True)
    assert torch.allclose(
        older["conv1.weight"], (first["conv1.weight"] + second["conv1.weight"]) / 2
    )


def test_export_defaults_to_the_runs_export_average(tmp_path, capsys):
    exp = tmp_path / "exp"
    states = write_run(exp, [(10, 1, 0), (20, 2, 0), (30, 3, 0)], export_average=3)
    export_main(["--checkpoint", str(exp), "--out", str(tmp_path / "model.ckpt")])
    assert "average of 3 epoch-end checkpoints (epochs 1, 2, 3)" in capsys.readouterr().out
    exported = torch.load(tmp_path / "model.ckpt", weights_only=True)
    expected = (
        states[0]["conv1.weight"] + states[1]["conv1.weight"] + states[2]["conv1.weight"]
    ) / 3
    assert torch.allclose(exported["conv1.weight"], expected, atol=1e-6)
    # --average 1: the newest checkpoint unchanged.
    export_main(["--checkpoint", str(exp), "--out", str(tmp_path / "last.ckpt"), "--average", "1"])
    last = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert all(torch.equal(last[k], v) for k, v in states[2].items())


def test_too_few_epoch_ends_is_a_clear_error(tmp_path):
    exp = tmp_path / "exp"
    write_run(exp, [(10, 1, 0), (15, 1, 5), (20, 2, 0)])
    with pytest.raises(
        CheckpointError, match=r"needs 3 taken at the end of an epoch, found 2.*keep_last >= 3"
    ):
        average_checkpoints(exp, 3)


def test_keep_last_below_export_average_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"export_average=10 .* trainer.keep_last=3 keeps only 3"):
        check_retention(3, 10)
    check_retention(10, 10)
    exp = tmp_path / "exp"
    write_run(exp, [(10, 1, 0), (20, 2, 0)], keep_last=1, export_average=2)
    with pytest.raises(ConfigError, match="set trainer.keep_last=2"):
        export_embedding_model(exp, tmp_path / "model.ckpt")
    assert not (tmp_path / "model.ckpt").exists()


def test_checkpoints_of_different_models_are_not_averaged(tmp_path):
    exp = tmp_path / "exp"
    write_run(exp, [(10, 1, 0)])
    write_run(exp, [(20, 2, 0)], model_kwargs={**TINY, "embedding_size": 16})
    with pytest.raises(CheckpointError, match="different models"):
        average_checkpoints(exp, 2)


def test_non_finite_weights_are_never_exported(tmp_path):
    exp = tmp_path / "exp"
    write_run(exp, [(10, 1, 0)])
    path = exp / "checkpoints" / "ckpt_000000010.pt"
    state = torch.load(path, weights_only=True)
    state["model"]["conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, path)  # as another tool might: the trainer refuses to write such a file
    with pytest.raises(CheckpointError, match=r"conv1.weight holds NaN or infinite values"):
        export_embedding_model(exp, tmp_path / "model.ckpt", average=1)
    assert not (tmp_path / "model.ckpt").exists()


def test_a_plain_state_dict_exports_unchanged_and_cannot_be_averaged(tmp_path):
    torch.manual_seed(0)
    model = build_model("eres2net", **TINY)
    torch.save(model.state_dict(), tmp_path / "released.ckpt")  # the released layout
    name, kwargs, _ = export_embedding_model(tmp_path / "released.ckpt", tmp_path / "out.ckpt")
    assert name == "eres2net" and kwargs["m_channels"] == 4
    exported = torch.load(tmp_path / "out.ckpt", weights_only=True)
    assert all(torch.equal(exported[k], v) for k, v in model.state_dict().items())
    with pytest.raises(CheckpointError, match="averaging needs a training checkpoint"):
        export_embedding_model(tmp_path / "released.ckpt", tmp_path / "avg.ckpt", average=2)
