"""The released-model registry: ids in both hub spellings, downloads through modelscope (faked
here: no network), clear errors for unknown ids, and the weights digest of a loaded model."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

from speakerlab.errors import CheckpointError
from speakerlab.pretrained import (
    PRETRAINED,
    PretrainedModel,
    download_pretrained,
    load_model,
    released_model,
)

pytestmark = pytest.mark.usefixtures("single_thread")

REFERENCE = Path(__file__).parent / "fixtures" / "reference"
# The example id of the ERes2Net-base model card, in the hub's former namespace.
MODEL_CARD_EXAMPLE = "damo/speech_eres2net_base_sv_zh-cn_3dspeaker_16k"


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """A stand-in for ``modelscope.hub.snapshot_download``: a snapshot folder per requested id
    holding that model's file (empty unless the test writes it); returns the requested ids."""
    requested: list[str] = []

    def snapshot_download(model_id: str, cache_dir: str | None = None) -> str:
        requested.append(model_id)
        folder = tmp_path / "hub" / model_id
        folder.mkdir(parents=True, exist_ok=True)
        for entry in PRETRAINED.values():
            if entry.model_id == model_id and not (folder / entry.file_name).exists():
                (folder / entry.file_name).write_bytes(b"")
        return str(folder)

    module = types.ModuleType("modelscope.hub.snapshot_download")
    module.snapshot_download = snapshot_download
    monkeypatch.setitem(sys.modules, "modelscope", types.ModuleType("modelscope"))
    monkeypatch.setitem(sys.modules, "modelscope.hub", types.ModuleType("modelscope.hub"))
    monkeypatch.setitem(sys.modules, "modelscope.hub.snapshot_download", module)
    return requested


@pytest.mark.parametrize("model_id", sorted(PRETRAINED))
def test_every_released_id_is_accepted_in_both_spellings(model_id, fake_hub, tmp_path):
    assert model_id.startswith("iic/")
    former = "damo/" + model_id.removeprefix("iic/")
    entry = PRETRAINED[model_id]
    assert released_model(model_id) is entry and released_model(former) is entry
    for spelling in (model_id, former):
        path = download_pretrained(spelling)
        assert path == tmp_path / "hub" / model_id / entry.file_name
    assert fake_hub == [model_id, model_id]  # the hub is always asked under today's id


def test_the_model_card_example_names_a_released_model():
    assert released_model(MODEL_CARD_EXAMPLE).file_name == "eres2net_base_model.ckpt"


def test_other_namespaces_and_unknown_ids_list_the_known_ones(tmp_path):
    for unknown in (
        "other/speech_eres2net_base_sv_zh-cn_3dspeaker_16k",
        "damo/speech_resnet_sv",
        "speech_eres2net_base_sv_zh-cn_3dspeaker_16k",
    ):
        assert released_model(unknown) is None
        with pytest.raises(CheckpointError) as err:
            download_pretrained(unknown)
        assert str(err.value).startswith(f"unknown model id {unknown!r}; known ids: ")
        assert all(model_id in str(err.value) for model_id in PRETRAINED)
        assert "each also as iic/damo/..." in str(err.value)
    with pytest.raises(CheckpointError, match="neither a checkpoint file nor a known model id"):
        load_model("damo/speech_resnet_sv")


def test_a_former_spelling_loads_the_released_model(fake_hub, monkeypatch, tmp_path):
    ref = torch.load(REFERENCE / "eres2net_small.pt", weights_only=True)
    small = PretrainedModel(
        "iic/speech_eres2net_tiny_test_16k",
        "tiny.ckpt",
        "eres2net",
        {"feat_dim": 80, "embedding_size": 32, "m_channels": 8},
        threshold=0.3,
    )
    monkeypatch.setitem(PRETRAINED, small.model_id, small)
    folder = tmp_path / "hub" / small.model_id
    folder.mkdir(parents=True)
    torch.save(ref["state_dict"], folder / "tiny.ckpt")

    loaded = load_model("damo/speech_eres2net_tiny_test_16k")
    assert (loaded.name, loaded.threshold, loaded.source) == ("eres2net", 0.3, small.model_id)
    assert fake_hub == [small.model_id]
    with torch.no_grad():
        out = loaded.model(ref["input"])
    torch.testing.assert_close(out, ref["output"], atol=1e-4, rtol=0)


def test_init_from_accepts_the_former_spelling(monkeypatch, tmp_path):
    from speakerlab.training import finetune

    fetched = tmp_path / "eres2net_base_model.ckpt"
    monkeypatch.setattr(finetune, "download_pretrained", lambda model_id: fetched)
    assert finetune.resolve_init_path(MODEL_CARD_EXAMPLE) == fetched


def test_weights_digest_is_the_weights_identity(tmp_path):
    state = torch.load(REFERENCE / "campplus_small.pt", weights_only=True)["state_dict"]
    torch.save(state, tmp_path / "plain.ckpt")
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "ddp.ckpt")
    changed = dict(state)
    changed["head.conv1.weight"] = state["head.conv1.weight"] + 1e-3
    torch.save(changed, tmp_path / "changed.ckpt")

    digests = {
        name: load_model(tmp_path / f"{name}.ckpt").weights_digest
        for name in ("plain", "ddp", "changed")
    }
    assert digests["plain"] == digests["ddp"]  # the same weights in another container
    assert digests["changed"] != digests["plain"]
    assert len(digests["plain"]) == 64  # SHA-256, hex
