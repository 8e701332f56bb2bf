"""CAM++ and ECAPA-TDNN: reference parity, checkpoint layout, variable lengths, gradients."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from speakerlab.models import count_parameters
from speakerlab.models.campplus import CAMPPlus, segment_average
from speakerlab.models.ecapa_tdnn import ECAPATDNN

pytestmark = pytest.mark.usefixtures("single_thread")

REFERENCE_DIR = Path(__file__).parent / "fixtures" / "reference"

# Constructor arguments of the small reference fixtures (tests/fixtures/README.md).
SMALL_CONFIGS = {
    "campplus": (
        CAMPPlus,
        dict(feat_dim=80, embedding_size=32, growth_rate=8, bn_size=2, init_channels=16),
    ),
    "ecapa_tdnn": (
        ECAPATDNN,
        dict(
            feat_dim=80,
            embedding_size=32,
            channels=[64, 64, 64, 64, 192],
            attention_channels=16,
            se_channels=16,
        ),
    ),
}

# Released full-size configurations and their manifest entries.
FULL_SIZE_CONFIGS = {
    "campplus_emb512": (CAMPPlus, dict(feat_dim=80, embedding_size=512)),
    "campplus_emb192": (CAMPPlus, dict(feat_dim=80, embedding_size=192)),
    "ecapa_tdnn_c1024_emb192": (
        ECAPATDNN,
        dict(feat_dim=80, embedding_size=192, channels=[1024, 1024, 1024, 1024, 3072]),
    ),
}


def load_fixture(name: str) -> dict:
    return torch.load(REFERENCE_DIR / f"{name}_small.pt", weights_only=True)


@pytest.fixture(scope="module", params=sorted(SMALL_CONFIGS))
def reference_model(request) -> tuple[str, torch.nn.Module, dict]:
    """Small model with the reference fixture's weights, in eval mode."""
    model_class, kwargs = SMALL_CONFIGS[request.param]
    fixture = load_fixture(request.param)
    model = model_class(**kwargs)
    model.load_state_dict(fixture["state_dict"], strict=True)
    return request.param, model.eval(), fixture


def test_reproduces_reference_output(reference_model):
    name, model, fixture = reference_model
    inputs = fixture["input"]
    original = inputs.clone()
    with torch.no_grad():
        output = model(inputs)
    assert output.shape == fixture["output"].shape, name
    torch.testing.assert_close(output, fixture["output"], atol=1e-4, rtol=0)
    assert torch.equal(inputs, original), f"{name} modified its input in place"


@pytest.mark.parametrize("frames", [20, 37, 200, 801])
@pytest.mark.parametrize("batch", [1, 3])
def test_variable_length_and_batch_size(reference_model, frames, batch):
    name, model, _ = reference_model
    inputs = torch.randn(batch, frames, 80, generator=torch.Generator().manual_seed(frames))
    with torch.no_grad():
        output = model(inputs)
    assert output.shape == (batch, 32), name
    assert torch.isfinite(output).all(), name


def test_utterance_alone_equals_utterance_in_batch(reference_model):
    name, model, _ = reference_model
    batch = torch.randn(3, 250, 80, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        together = model(batch)
        alone = model(batch[1:2])
    torch.testing.assert_close(alone, together[1:2], atol=1e-5, rtol=1e-5, msg=name)
    # Different utterances must give different embeddings (the batch rows are not mixed up).
    assert not torch.allclose(together[0], together[1], atol=1e-3), name


@pytest.mark.parametrize("name", sorted(SMALL_CONFIGS))
def test_gradients_reach_every_parameter(name):
    model_class, kwargs = SMALL_CONFIGS[name]
    torch.manual_seed(0)
    model = model_class(**kwargs).train()
    inputs = torch.randn(2, 60, 80, requires_grad=True)
    output = model(inputs)
    assert output.shape == (2, 32)
    output.pow(2).sum().backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None, f"{name}: no gradient for {param_name}"
        assert torch.isfinite(param.grad).all(), f"{name}: non-finite gradient for {param_name}"
        assert param.grad.abs().sum() > 0, f"{name}: zero gradient for {param_name}"
    assert inputs.grad is not None and inputs.grad.abs().sum() > 0


@pytest.mark.parametrize("entry", sorted(FULL_SIZE_CONFIGS))
def test_full_size_state_dict_matches_reference_manifest(entry):
    manifest = json.loads((REFERENCE_DIR / "full_size_state_dicts.json").read_text())[entry]
    model_class, kwargs = FULL_SIZE_CONFIGS[entry]
    model = model_class(**kwargs)
    shapes = {key: list(value.shape) for key, value in model.state_dict().items()}
    expected = manifest["state_dict"]
    assert sorted(set(shapes) - set(expected)) == [], "keys not in the reference"
    assert sorted(set(expected) - set(shapes)) == [], "reference keys missing"
    mismatched = {
        key: (shapes[key], expected[key]) for key in expected if shapes[key] != expected[key]
    }
    assert mismatched == {}
    assert count_parameters(model) == manifest["num_parameters"]


@pytest.mark.parametrize("frames", [1, 37, 99, 100, 101, 200, 257])
def test_segment_average_equals_ceil_mode_average_pooling(frames):
    x = torch.randn(2, 3, frames, generator=torch.Generator().manual_seed(frames))
    pooled = F.avg_pool1d(x, kernel_size=100, stride=100, ceil_mode=True)
    expected = pooled.repeat_interleave(100, dim=-1)[..., :frames]
    torch.testing.assert_close(segment_average(x, 100), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(SMALL_CONFIGS))
def test_rejects_wrong_input_shape(name):
    model_class, kwargs = SMALL_CONFIGS[name]
    model = model_class(**kwargs).eval()
    with pytest.raises(ValueError, match="expects fbank of shape"):
        model(torch.randn(2, 100, 40))
    with pytest.raises(ValueError, match="expects fbank of shape"):
        model(torch.randn(100, 80))


def test_ecapa_rejects_width_not_divisible_by_res2net_scale():
    with pytest.raises(ValueError, match="res2net_scale"):
        ECAPATDNN(channels=[60, 60, 60, 60, 180])
