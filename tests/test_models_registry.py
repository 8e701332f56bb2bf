"""The model registry: one module per architecture declares its ModelSpec, imported lazily; the
specs read constructor arguments back from state-dict shapes; a new model needs only its module
(and its config)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml
from processes import run_bounded
from torch import nn

import speakerlab.models as models
from speakerlab.errors import CheckpointError
from speakerlab.models import MODEL_NAMES, ModelSpec, build_model, model_spec, model_specs
from speakerlab.models.checkpoint import infer_architecture, load_embedding_model

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).parents[1]
REFERENCE = ROOT / "tests" / "fixtures" / "reference"
# The fbank size conf/model/*.yaml take from data.num_mel_bins.
NUM_MEL_BINS = 80


def test_each_name_is_its_module_and_builds():
    assert [spec.name for spec in model_specs()] == list(MODEL_NAMES)
    for name in MODEL_NAMES:
        spec = model_spec(name)
        assert spec.build.__module__ == f"speakerlab.models.{name}"
        assert sys.modules[f"speakerlab.models.{name}"].SPEC is spec


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown model 'resnet'; known models: eres2net, "):
        build_model("resnet")
    # a helper module of the package is not a model
    with pytest.raises(ValueError, match="unknown model 'pooling'"):
        build_model("pooling")


@pytest.mark.slow
def test_building_one_model_imports_no_other_architecture():
    code = (
        "import sys\n"
        "from speakerlab.models import build_model\n"
        "import speakerlab.models.checkpoint\n"
        "build_model('campplus')\n"
        "print(sorted(m for m in sys.modules if m.startswith('speakerlab.models.')))\n"
    )
    done = run_bounded([sys.executable, "-c", code], timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    loaded = eval(done.stdout.strip().splitlines()[-1])
    expected = ["speakerlab.models.campplus", "speakerlab.models.checkpoint"]
    assert loaded == [*expected, "speakerlab.models.pooling"]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_has_a_config_that_builds_it(name):
    config = yaml.safe_load((ROOT / "conf" / "model" / f"{name}.yaml").read_text())
    assert config.pop("name") == name
    assert config.pop("feat_dim") == "${data.num_mel_bins}"
    with torch.device("meta"):  # shapes only: full-size weights are not needed
        model = build_model(name, feat_dim=NUM_MEL_BINS, **config)
    # The spec reads the configured architecture back from the weights it gives.
    inferred_name, inferred = infer_architecture(model.state_dict())
    assert inferred_name == name
    mismatched = {k: (v, config[k]) for k, v in inferred.items() if k in config and config[k] != v}
    assert not mismatched
    assert inferred["feat_dim"] == NUM_MEL_BINS


def test_signature_keys_tell_every_reference_state_dict_apart():
    manifests = json.loads((REFERENCE / "full_size_state_dicts.json").read_text())
    states = {entry: set(manifest["state_dict"]) for entry, manifest in manifests.items()}
    for name in MODEL_NAMES:
        states[f"{name}_small"] = set(
            torch.load(REFERENCE / f"{name}_small.pt", weights_only=True)["state_dict"]
        )
    for entry, keys in states.items():
        matching = [spec.name for spec in model_specs() if spec.signature_key in keys]
        assert len(matching) == 1 and entry.startswith(matching[0]), (entry, matching)


# Constructor arguments away from the defaults, to be read back from the shapes alone.
NON_DEFAULT = {
    "eres2net": {"feat_dim": 40, "embedding_size": 24, "m_channels": 4, "num_blocks": [1, 2, 1, 1]},
    "eres2netv2": {
        "feat_dim": 64,
        "embedding_size": 24,
        "m_channels": 8,
        "base_width": 40,
        "scale": 3,
        "expansion": 3,
    },
    "campplus": {
        "feat_dim": 64,
        "embedding_size": 24,
        "growth_rate": 8,
        "bn_size": 3,
        "init_channels": 24,
    },
    "ecapa_tdnn": {
        "feat_dim": 64,
        "embedding_size": 24,
        "channels": [32, 48, 48, 48, 96],
        "attention_channels": 8,
        "res2net_scale": 4,
        "se_channels": 16,
    },
}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_kwargs_are_read_back_from_shapes(name):
    with torch.device("meta"):
        state = build_model(name, **NON_DEFAULT[name]).state_dict()
    assert infer_architecture(state) == (name, NON_DEFAULT[name])


class ToyModel(nn.Module):
    """A model added in one module, as a contributor would."""

    def __init__(self, feat_dim: int = 80, embedding_size: int = 8) -> None:
        super().__init__()
        self.toy_proj = nn.Linear(feat_dim, embedding_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.toy_proj(features).mean(dim=1)


def toy_kwargs(shapes) -> dict:
    embedding_size, feat_dim = shapes["toy_proj.weight"]
    return {"feat_dim": feat_dim, "embedding_size": embedding_size}


@pytest.fixture
def toy_registered(monkeypatch):
    """``speakerlab.models.toy`` with its SPEC, listed in MODEL_NAMES."""
    module = types.ModuleType("speakerlab.models.toy")
    module.SPEC = ModelSpec("toy", ToyModel, "toy_proj.weight", toy_kwargs)
    monkeypatch.setitem(sys.modules, "speakerlab.models.toy", module)
    monkeypatch.setattr(models, "MODEL_NAMES", (*MODEL_NAMES, "toy"))
    return module


def test_a_new_model_needs_only_its_module(toy_registered, tmp_path):
    model = build_model("toy", feat_dim=20, embedding_size=6)
    torch.save(model.state_dict(), tmp_path / "toy.ckpt")
    loaded = load_embedding_model(tmp_path / "toy.ckpt")  # architecture inferred
    assert isinstance(loaded, ToyModel) and loaded.toy_proj.in_features == 20
    x = torch.randn(2, 7, 20)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_a_spec_under_another_name_is_refused(toy_registered):
    toy_registered.SPEC = ModelSpec("toy2", ToyModel, "toy_proj.weight", toy_kwargs)
    with pytest.raises(RuntimeError, match="speakerlab.models.toy declares SPEC.name='toy2'"):
        build_model("toy")


def test_two_specs_claiming_one_state_dict_is_an_error(toy_registered):
    toy_registered.SPEC = ModelSpec("toy", ToyModel, "seg_1.weight", toy_kwargs)
    state = torch.load(REFERENCE / "eres2net_small.pt", weights_only=True)["state_dict"]
    with pytest.raises(CheckpointError, match=r"look like several architectures \(eres2net, toy"):
        infer_architecture(state)


def test_shapes_that_do_not_fit_the_recognised_model_name_it(tmp_path):
    state = torch.load(REFERENCE / "campplus_small.pt", weights_only=True)["state_dict"]
    del state["head.conv2.weight"]
    with pytest.raises(CheckpointError, match="look like campplus but key 'head.conv2.weight'"):
        infer_architecture(state, tmp_path / "cut.ckpt")
