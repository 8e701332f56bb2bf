"""Checkpoint loading in every accepted form, architecture inference and the clear errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from speakerlab.errors import CheckpointError
from speakerlab.models import build_model, count_parameters
from speakerlab.models.checkpoint import (
    infer_architecture,
    load_embedding_model,
    read_model_state,
    save_embedding_model,
)
from speakerlab.pretrained import PRETRAINED, load_model

pytestmark = pytest.mark.usefixtures("single_thread")

REFERENCE = Path(__file__).parent / "fixtures" / "reference"

SMALL = {
    "eres2net": {"feat_dim": 80, "embedding_size": 32, "m_channels": 8},
    "eres2netv2": {"feat_dim": 80, "embedding_size": 32, "m_channels": 8},
    "campplus": {
        "feat_dim": 80,
        "embedding_size": 32,
        "growth_rate": 8,
        "bn_size": 2,
        "init_channels": 16,
    },
    "ecapa_tdnn": {
        "feat_dim": 80,
        "embedding_size": 32,
        "channels": [64, 64, 64, 64, 192],
        "attention_channels": 16,
        "se_channels": 16,
    },
}


def reference(name: str) -> dict:
    return torch.load(REFERENCE / f"{name}_small.pt", weights_only=True)


def check_output(model: torch.nn.Module, ref: dict) -> None:
    assert not model.training
    with torch.no_grad():
        out = model(ref["input"])
    torch.testing.assert_close(out, ref["output"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", list(SMALL))
def test_plain_released_state_dict_loads_with_inferred_architecture(tmp_path, name):
    ref = reference(name)
    path = tmp_path / "plain.ckpt"
    torch.save(ref["state_dict"], path)
    inferred_name, inferred = infer_architecture(ref["state_dict"])
    assert inferred_name == name
    for key, value in SMALL[name].items():
        assert inferred[key] == value, key
    check_output(load_embedding_model(path), ref)


@pytest.mark.parametrize("name", ["eres2net", "campplus"])
def test_state_dict_without_num_batches_tracked(tmp_path, name):
    ref = reference(name)
    state = {k: v for k, v in ref["state_dict"].items() if not k.endswith("num_batches_tracked")}
    assert len(state) < len(ref["state_dict"])
    torch.save(state, tmp_path / "old.ckpt")
    check_output(load_embedding_model(tmp_path / "old.ckpt", name, **SMALL[name]), ref)


def test_ddp_prefixed_state_dict(tmp_path):
    ref = reference("ecapa_tdnn")
    torch.save({f"module.{k}": v for k, v in ref["state_dict"].items()}, tmp_path / "ddp.ckpt")
    state, name, kwargs = read_model_state(tmp_path / "ddp.ckpt")
    assert not any(k.startswith("module.") for k in state) and name is None and kwargs is None
    check_output(load_embedding_model(tmp_path / "ddp.ckpt"), ref)


def test_training_checkpoint_records_architecture(tmp_path):
    ref = reference("eres2net")
    checkpoint = {
        "model": ref["state_dict"],
        "model_name": "eres2net",
        "model_kwargs": SMALL["eres2net"],
        "classifier": {"weight": torch.zeros(3, 32)},
        "optimizer": {"state": {}, "param_groups": []},
        "epoch": 3,
        "step": 120,
    }
    torch.save(checkpoint, tmp_path / "checkpoint.pt")
    _, name, kwargs = read_model_state(tmp_path / "checkpoint.pt")
    assert name == "eres2net" and kwargs == SMALL["eres2net"]
    check_output(load_embedding_model(tmp_path / "checkpoint.pt"), ref)


def test_save_embedding_model_writes_plain_released_layout(tmp_path):
    model = build_model("campplus", **SMALL["campplus"])

    class Wrapped(torch.nn.Module):  # stands in for DistributedDataParallel's .module
        def __init__(self):
            super().__init__()
            self.module = model

    save_embedding_model(Wrapped(), tmp_path / "export.ckpt")
    state = torch.load(tmp_path / "export.ckpt", weights_only=True)
    assert list(state) == list(reference("campplus")["state_dict"])
    loaded = load_embedding_model(tmp_path / "export.ckpt")
    x = torch.randn(1, 150, 80)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_full_size_architectures_are_inferred_from_manifests():
    manifests = json.loads((REFERENCE / "full_size_state_dicts.json").read_text())
    for entry_name, entry in manifests.items():
        state = {k: torch.empty(shape, device="meta") for k, shape in entry["state_dict"].items()}
        name, kwargs = infer_architecture(state)
        assert entry_name.startswith(name)
        with torch.device("meta"):
            model = build_model(name, **kwargs)
        assert count_parameters(model) == entry["num_parameters"], entry_name
        assert {k: list(v.shape) for k, v in model.state_dict().items()} == entry["state_dict"]


def test_wrong_architecture_lists_missing_and_unexpected_keys(tmp_path):
    state = reference("eres2net")["state_dict"]
    torch.save(state, tmp_path / "eres2net.ckpt")
    with pytest.raises(CheckpointError) as err:
        load_embedding_model(tmp_path / "eres2net.ckpt", "campplus", **SMALL["campplus"])
    message = str(err.value)
    # num_batches_tracked counters are never reported missing: they are taken from the model
    expected = [
        k
        for k in build_model("campplus", **SMALL["campplus"]).state_dict()
        if not k.endswith("num_batches_tracked")
    ]
    assert message.startswith(f"{tmp_path / 'eres2net.ckpt'}: weights do not fit CAMPPlus")
    assert f"missing ({len(expected)}): head.conv1.weight," in message
    assert f"unexpected ({len(state)}): conv1.weight," in message
    assert f"... and {len(state) - 12} more" in message


def test_wrong_width_lists_shape_mismatches(tmp_path):
    torch.save(reference("eres2net")["state_dict"], tmp_path / "eres2net.ckpt")
    with pytest.raises(
        CheckpointError,
        match=r"shape mismatch \(\d+\): conv1.weight: checkpoint "
        r"\(8, 1, 3, 3\) vs model \(16, 1, 3, 3\)",
    ):
        load_embedding_model(
            tmp_path / "eres2net.ckpt", "eres2net", m_channels=16, embedding_size=32
        )


class _Payload:
    """An arbitrary object: unpickling it would run code from the file."""


def test_checkpoint_with_code_is_refused(tmp_path):
    torch.save(
        {"model": reference("eres2net")["state_dict"], "hook": _Payload()}, tmp_path / "evil.pt"
    )
    with pytest.raises(CheckpointError, match="refused to load"):
        load_embedding_model(tmp_path / "evil.pt")


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_embedding_model(tmp_path / "nope.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.ckpt: not a readable PyTorch checkpoint"):
        load_embedding_model(tmp_path / "junk.ckpt")
    torch.save({"epoch": 3}, tmp_path / "empty.ckpt")
    with pytest.raises(CheckpointError, match="no model weights found"):
        load_embedding_model(tmp_path / "empty.ckpt")
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "unknown.ckpt")
    with pytest.raises(CheckpointError, match="cannot tell the architecture"):
        load_embedding_model(tmp_path / "unknown.ckpt")


def test_load_model_from_local_file_and_registry_errors(tmp_path, monkeypatch):
    ref = reference("eres2netv2")
    torch.save(ref["state_dict"], tmp_path / "v2.ckpt")
    loaded = load_model(tmp_path / "v2.ckpt")
    assert loaded.name == "eres2netv2" and loaded.threshold is None
    check_output(loaded.model, ref)

    with pytest.raises(CheckpointError, match="neither a checkpoint file nor a known model id"):
        load_model(tmp_path / "missing.ckpt")
    monkeypatch.setitem(sys.modules, "modelscope", None)  # as if modelscope were not installed
    model_id = "iic/speech_eres2net_base_sv_zh-cn_3dspeaker_16k"
    with pytest.raises(CheckpointError, match="pip install modelscope.*eres2net_base_model.ckpt"):
        load_model(model_id)


def test_registry_entries_build_the_published_sizes():
    manifests = json.loads((REFERENCE / "full_size_state_dicts.json").read_text())
    expected = {
        "iic/speech_eres2net_base_sv_zh-cn_3dspeaker_16k": "eres2net_base_emb512",
        "iic/speech_eres2net_large_sv_zh-cn_3dspeaker_16k": "eres2net_large_emb512",
        "iic/speech_ecapa-tdnn_sv_zh-cn_3dspeaker_16k": "ecapa_tdnn_c1024_emb192",
        "iic/speech_campplus_sv_zh-cn_16k-common": "campplus_emb192",
        "iic/speech_eres2net_sv_en_voxceleb_16k": "eres2net_base_emb192",
        "iic/speech_eres2netv2_sv_zh-cn_16k-common": "eres2netv2_emb192",
    }
    assert set(PRETRAINED) == set(expected)
    for model_id, manifest in expected.items():
        entry = PRETRAINED[model_id]
        with torch.device("meta"):
            model = build_model(entry.model_name, **entry.model_kwargs)
        assert count_parameters(model) == manifests[manifest]["num_parameters"], model_id
