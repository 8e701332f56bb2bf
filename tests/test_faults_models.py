"""Fault injection for checkpoints (issue 10): every bad checkpoint file gets a one-line error that
names the file and what is wrong, pickled code never runs, and weights that are not finite are
never loaded or written."""

from __future__ import annotations

import builtins
import os
import pickle
import subprocess
from pathlib import Path

import pytest
import torch

from speakerlab.bin.export import main as export_main
from speakerlab.errors import CheckpointError
from speakerlab.models import build_model
from speakerlab.models.checkpoint import (
    check_finite,
    load_embedding_model,
    read_checkpoint,
    save_embedding_model,
)
from speakerlab.pretrained import load_model
from speakerlab.training.checkpointing import load_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")

REFERENCE = Path(__file__).parent / "fixtures" / "reference"
SMALL_ERES2NET = {"feat_dim": 80, "embedding_size": 32, "m_channels": 8}


def reference_state() -> dict[str, torch.Tensor]:
    return torch.load(REFERENCE / "eres2net_small.pt", weights_only=True)["state_dict"]


class _Payload:
    """An arbitrary class: unpickling it would import and run code named by the file."""


class _RunsCode:
    """Unpickling this calls ``function(*args)``: the classic malicious checkpoint."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def test_a_pickled_class_is_refused_by_name(tmp_path):
    """Guards against: a checkpoint refused for holding pickled code got the generic "not a
    readable PyTorch checkpoint" (torch 2.11 reworded the refusal), hiding why."""
    path = tmp_path / "with_class.pt"
    torch.save({"model": reference_state(), "hook": _Payload()}, path)
    for read in (read_checkpoint, load_embedding_model, load_checkpoint):
        with pytest.raises(CheckpointError) as err:
            read(path)
        message = str(err.value)
        assert message.startswith(f"{path}: refused to load pickled objects")
        assert f"{_Payload.__module__}._Payload" in message and "\n" not in message


@pytest.mark.parametrize(
    ("function", "make_args", "named"),
    [
        (os.system, lambda marker: (f"touch {marker}",), "system"),
        # pickle protocol 2 writes subprocess.call under its Python 2 name, commands.call
        (subprocess.call, lambda marker: (["touch", str(marker)],), ".call"),
        (builtins.exec, lambda marker: (f"open({str(marker)!r}, 'w')",), "exec"),
    ],
    ids=["os.system", "subprocess.call", "exec"],
)
@pytest.mark.parametrize("layout", ["torch.save", "raw pickle"])
def test_malicious_reduce_never_runs_and_is_named(tmp_path, function, make_args, named, layout):
    """Guards against: loading a checkpoint running the code its pickle names (a side-effect file
    appears), or the refusal not saying what was refused."""
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.ckpt"
    payload = {"x": _RunsCode(function, *make_args(marker))}
    if layout == "torch.save":
        torch.save({"w": torch.ones(2), **payload}, path)
    else:  # a plain pickle (a pickled tensor would be refused first, by another name)
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(CheckpointError, match="refused to load pickled objects") as err:
        load_embedding_model(path)
    assert named in str(err.value)
    assert not marker.exists(), "the checkpoint's code ran"


@pytest.mark.parametrize(
    ("torch_message", "expected"),
    [
        (
            "Unsupported global: GLOBAL evil.Payload was not an allowed global by default.",
            "holds a pickled evil.Payload,",
        ),
        ("Refusing GLOBAL 'evil.Payload': it is not allowlisted", "holds a pickled evil.Payload,"),
        (
            "Can only create new object for classes allowlisted via `add_safe_globals` but got "
            "<class 'evil.Payload'>",
            "holds a pickled evil.Payload,",
        ),
        (
            "this object is not on the allowlist",
            "refused to load pickled objects: the file holds a pickled Python object other than "
            "tensors and plain containers",
        ),
        ("Unsupported operand 110", "not a readable PyTorch checkpoint (UnpicklingError: "),
    ],
    ids=["torch-2.11", "quoted", "class-repr", "unnamed", "not-a-refusal"],
)
def test_refusals_are_recognised_in_any_wording(tmp_path, monkeypatch, torch_message, expected):
    """Guards against: recognising a refusal by one exact torch wording, which the next torch
    release breaks (the refusal then reads as a damaged file), or calling junk a refusal."""

    def refusing_load(*args, **kwargs):
        try:  # torch re-raises the unpickler's error with a longer message, ``from None``
            raise pickle.UnpicklingError(torch_message)
        except pickle.UnpicklingError:
            raise pickle.UnpicklingError("Weights only load failed. See the message.") from None

    path = tmp_path / "model.ckpt"
    path.write_bytes(b"\x80\x02}q\x00.")
    monkeypatch.setattr(torch, "load", refusing_load)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(path)
    assert str(err.value).startswith(f"{path}: ") and expected in str(err.value)


def test_files_that_are_not_checkpoints_say_what_they_are(tmp_path):
    """Guards against: a missing file reported as a system error, and files that are no
    checkpoint at all (a folder, empty, text, junk, cut short, a bare tensor) ending in a raw
    traceback or a misleading message."""
    with pytest.raises(CheckpointError, match=r"nope\.ckpt: checkpoint file not found$"):
        read_checkpoint(tmp_path / "nope.ckpt")
    with pytest.raises(CheckpointError, match="is a folder, not a checkpoint file"):
        read_checkpoint(tmp_path)
    cases = {
        "empty.ckpt": (b"", r"empty\.ckpt: empty file, not a checkpoint$"),
        "text.ckpt": (b"hello world\n" * 10, r"text\.ckpt: not a readable PyTorch checkpoint \("),
        "junk.ckpt": (b"not a checkpoint", r"junk\.ckpt: not a readable PyTorch checkpoint \("),
    }
    for name, (content, expected) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=expected) as err:
            read_checkpoint(tmp_path / name)
        assert "\n" not in str(err.value)
    torch.save(reference_state(), tmp_path / "whole.ckpt")
    content = (tmp_path / "whole.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(content[: len(content) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.ckpt: not a readable PyTorch checkpoint"):
        read_checkpoint(tmp_path / "cut.ckpt")
    torch.save(torch.ones(3), tmp_path / "tensor.ckpt")
    with pytest.raises(
        CheckpointError, match=r"tensor\.ckpt: not a checkpoint \(it holds a Tensor"
    ):
        read_checkpoint(tmp_path / "tensor.ckpt")


def test_weights_that_are_not_tensors_are_refused(tmp_path):
    """Guards against: a training checkpoint whose model entry or architecture record holds other
    values crashing with a traceback deep inside the model loader."""
    state = reference_state()
    state["conv1.weight"] = [1.0, 2.0]
    torch.save({"model": state, "model_name": "eres2net"}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match="entries that are not tensors: conv1.weight"):
        load_embedding_model(tmp_path / "odd.pt")
    torch.save({"model": reference_state(), "model_kwargs": [8]}, tmp_path / "kwargs.pt")
    with pytest.raises(CheckpointError, match=r"kwargs\.pt: model_name must be a string and mod"):
        load_embedding_model(tmp_path / "kwargs.pt")


def test_non_finite_weights_are_refused_on_load_naming_the_first(tmp_path):
    """Guards against: a checkpoint holding NaN or infinity loading silently and producing NaN
    embeddings (and scores) for every input."""
    state = reference_state()
    first, last = next(iter(state)), list(state)[-1]
    state[first] = state[first].clone()
    state[first].view(-1)[3] = float("nan")
    state[last] = state[last].clone()
    state[last].view(-1)[0] = float("inf")
    path = tmp_path / "nan.ckpt"
    torch.save(state, path)
    expected = (
        f"{path}: the weights are not finite: {first} holds NaN or infinite values "
        f"(2 of {len(state)} tensors do)"
    )
    for load in (load_embedding_model, lambda p: load_model(p).model):
        with pytest.raises(CheckpointError) as err:
            load(path)
        assert str(err.value) == expected


def test_large_finite_weights_are_not_mistaken_for_overflow():
    """Guards against: refusing good weights because a fast check summed them into infinity."""
    check_finite({"big": torch.tensor([3e38, 3e38]), "half": torch.full((4,), 6e4).half()})
    with pytest.raises(CheckpointError, match=r"w: the weights are not finite: big holds NaN"):
        check_finite({"ok": torch.ones(2), "big": torch.tensor([3e38, float("nan")])}, "w")


def test_non_finite_weights_are_never_written(tmp_path):
    """Guards against: exporting a model whose weights went NaN, which every later stage would
    then use."""
    model = build_model("eres2net", **SMALL_ERES2NET)
    with torch.no_grad():
        model.seg_1.bias[1] = float("-inf")
    out = tmp_path / "model.ckpt"
    with pytest.raises(CheckpointError, match=r"model\.ckpt \(not written\): .*seg_1\.bias"):
        save_embedding_model(model, out)
    assert list(tmp_path.iterdir()) == []


def test_the_cli_reports_a_refused_checkpoint_in_one_line(tmp_path, capsys):
    """Guards against: a command-line user seeing a traceback, or nothing naming the refused
    object, for a checkpoint holding pickled code."""
    torch.save({"model": reference_state(), "hook": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(SystemExit) as exit_info:
        export_main(["--checkpoint", str(tmp_path / "evil.pt"), "--out", str(tmp_path / "o.ckpt")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("speakerlab export: error: ") and err.count("\n") == 1
    assert "refused to load pickled objects" in err and "_Payload" in err
    assert not (tmp_path / "o.ckpt").exists()
