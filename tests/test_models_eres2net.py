"""Tests for ERes2Net, ERes2NetV2 and temporal statistics pooling.

Compatibility with the 3D-Speaker reference is checked against its fixtures: small-width
weights with reference outputs (numerical parity) and the full-size state-dict manifests
(key names, shapes and parameter counts). Full-size models are only constructed, never run.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from speakerlab.models import count_parameters
from speakerlab.models.eres2net import ERes2Net, Res2NetBottleneck
from speakerlab.models.eres2netv2 import ERes2NetV2
from speakerlab.models.pooling import TemporalStatsPool

pytestmark = pytest.mark.usefixtures("single_thread")

REFERENCE = Path(__file__).parent / "fixtures" / "reference"
MODEL_CLASSES = {"eres2net": ERes2Net, "eres2netv2": ERes2NetV2}
# Constructor arguments of the small reference fixtures (tests/fixtures/README.md).
SMALL_KWARGS = {"feat_dim": 80, "embedding_size": 32, "m_channels": 8}


def load_fixture(name: str) -> dict:
    return torch.load(REFERENCE / f"{name}_small.pt", weights_only=True)


@pytest.fixture(scope="module", params=sorted(MODEL_CLASSES))
def small_model(request) -> torch.nn.Module:
    """Small-width model carrying the reference fixture weights, in eval mode."""
    model = MODEL_CLASSES[request.param](**SMALL_KWARGS)
    model.load_state_dict(load_fixture(request.param)["state_dict"], strict=True)
    return model.eval()


@pytest.mark.parametrize("name", sorted(MODEL_CLASSES))
def test_matches_reference_output(name):
    fixture = load_fixture(name)
    model = MODEL_CLASSES[name](**SMALL_KWARGS)
    model.load_state_dict(fixture["state_dict"], strict=True)
    model.eval()
    features = fixture["input"].clone()
    with torch.no_grad():
        output = model(features)
    assert output.shape == fixture["output"].shape
    torch.testing.assert_close(output, fixture["output"], atol=1e-4, rtol=0)
    assert torch.equal(features, fixture["input"]), "the input tensor must not be modified"


@pytest.mark.parametrize(
    ("entry", "model_class", "kwargs"),
    [
        ("eres2net_base_emb192", ERes2Net, {"embedding_size": 192, "m_channels": 32}),
        ("eres2net_base_emb512", ERes2Net, {"embedding_size": 512, "m_channels": 32}),
        ("eres2net_large_emb512", ERes2Net, {"embedding_size": 512, "m_channels": 64}),
        ("eres2netv2_emb192", ERes2NetV2, {}),
    ],
)
def test_full_size_state_dict_matches_reference_manifest(entry, model_class, kwargs):
    manifest = json.loads((REFERENCE / "full_size_state_dicts.json").read_text())[entry]
    model = model_class(**kwargs)
    shapes = {key: list(value.shape) for key, value in model.state_dict().items()}
    assert shapes.keys() == manifest["state_dict"].keys()
    expected = manifest["state_dict"]
    mismatched = {k: (shape, expected[k]) for k, shape in shapes.items() if shape != expected[k]}
    assert not mismatched
    assert count_parameters(model) == manifest["num_parameters"]


@pytest.mark.parametrize("frames", [20, 37, 200, 801])
@pytest.mark.parametrize("batch", [1, 3])
def test_variable_length_inputs(small_model, frames, batch):
    torch.manual_seed(frames + batch)
    with torch.no_grad():
        output = small_model(torch.randn(batch, frames, 80))
    assert output.shape == (batch, 32)
    assert torch.isfinite(output).all()


def test_utterance_embedding_independent_of_batch(small_model):
    torch.manual_seed(0)
    batch = torch.randn(3, 123, 80)
    with torch.no_grad():
        together = small_model(batch)
        alone = torch.cat([small_model(batch[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    # Distinct utterances must give distinct embeddings (the batch rows are not mixed up).
    assert not torch.allclose(together[0], together[1])


@pytest.mark.parametrize("name", sorted(MODEL_CLASSES))
def test_gradients_reach_the_first_convolution(name):
    torch.manual_seed(0)
    model = MODEL_CLASSES[name](**SMALL_KWARGS).train()
    model(torch.randn(2, 24, 80)).pow(2).sum().backward()
    grad = model.conv1.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_wrong_feature_dimension_is_rejected():
    model = ERes2Net(**SMALL_KWARGS)
    with pytest.raises(ValueError, match=r"\(batch, frames, 80\).*\(2, 50, 64\)"):
        model(torch.randn(2, 50, 64))


def test_block_relu_is_capped_at_20():
    torch.manual_seed(0)
    block = Res2NetBottleneck(8, 8, fuse_branches=True).eval()
    with torch.no_grad():
        output = block(1000.0 * torch.randn(2, 8, 6, 10).abs())
    assert output.min() >= 0.0
    assert output.max() == 20.0


def test_stats_pool_matches_numpy():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(2, 3, 4, 9)).astype(np.float64)
    pooled = TemporalStatsPool(eps=1e-7)(torch.from_numpy(features)).numpy()
    mean = features.mean(axis=-1).reshape(2, -1)
    std = np.sqrt(features.var(axis=-1, ddof=1) + 1e-7).reshape(2, -1)
    np.testing.assert_allclose(pooled, np.concatenate([mean, std], axis=1), rtol=1e-12)
    biased = TemporalStatsPool(eps=0.0, unbiased=False)(torch.from_numpy(features[:, 0])).numpy()
    np.testing.assert_allclose(biased[:, 4:], features[:, 0].std(axis=-1), rtol=1e-12)


def test_stats_pool_gradient_finite_on_constant_input():
    features = torch.ones(1, 2, 5, requires_grad=True)
    TemporalStatsPool()(features).sum().backward()
    assert torch.isfinite(features.grad).all()


def test_shallower_eres2net_has_the_requested_blocks_and_is_inferred_back():
    from speakerlab.models.checkpoint import infer_architecture

    model = ERes2Net(**SMALL_KWARGS, num_blocks=(1, 2, 1, 1))
    assert [len(model.layer1), len(model.layer2), len(model.layer3), len(model.layer4)] == [
        1,
        2,
        1,
        1,
    ]
    assert model(torch.randn(2, 120, 80)).shape == (2, 32)
    name, kwargs = infer_architecture(model.state_dict())
    assert name == "eres2net" and kwargs == {**SMALL_KWARGS, "num_blocks": [1, 2, 1, 1]}
    # The released depth stays implicit, so released checkpoints infer as before.
    assert "num_blocks" not in infer_architecture(ERes2Net(**SMALL_KWARGS).state_dict())[1]
    with pytest.raises(ValueError, match="num_blocks must be four positive block counts"):
        ERes2Net(**SMALL_KWARGS, num_blocks=(1, 0, 1, 1))
