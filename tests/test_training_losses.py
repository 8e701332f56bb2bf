"""Cosine classifier and margin softmax losses against hand-computed logits."""

import math

import pytest
import torch
import torch.nn.functional as F

from speakerlab.errors import ConfigError
from speakerlab.training.losses import CosineClassifier, MarginSoftmaxLoss, SpeakerClassifierNet


def test_cosine_classifier_outputs_cosines_and_xavier_init():
    torch.manual_seed(0)
    head = CosineClassifier(embedding_size=16, num_classes=40)
    bound = math.sqrt(6.0 / (16 + 40))
    assert head.weight.abs().max() <= bound
    assert head.weight.std() > bound / 3  # spread over the interval, not near zero
    embeddings = torch.randn(5, 16) * 7.0  # scale must not matter
    expected = torch.stack(
        [torch.stack([F.cosine_similarity(e, w, dim=0) for w in head.weight]) for e in embeddings]
    )
    torch.testing.assert_close(head(embeddings), expected, atol=1e-6, rtol=1e-5)
    assert head.num_classes == 40


def cosines_with_target(target_cos: float, others: float = 0.1) -> torch.Tensor:
    row = torch.full((1, 4), others)
    row[0, 2] = target_cos
    return row


@pytest.mark.parametrize("target_cos", [0.9, 0.3, -0.5])
def test_aam_target_logit_is_cos_theta_plus_m(target_cos):
    loss_fn = MarginSoftmaxLoss("aam", scale=32.0, margin=0.3)
    cos = cosines_with_target(target_cos)
    theta = math.acos(target_cos)
    logits = cos.clone()
    logits[0, 2] = math.cos(theta + 0.3)
    expected = F.cross_entropy(32.0 * logits, torch.tensor([2]))
    assert loss_fn(cos, torch.tensor([2])).item() == pytest.approx(expected.item(), rel=1e-5)


def test_aam_beyond_pi_minus_m_uses_linear_continuation():
    m = 0.3
    loss_fn = MarginSoftmaxLoss("aam", scale=32.0, margin=m)
    target_cos = math.cos(math.pi - 0.1)  # theta + m > pi
    cos = cosines_with_target(target_cos)
    logits = cos.clone()
    logits[0, 2] = target_cos - m * math.sin(m)
    expected = F.cross_entropy(32.0 * logits, torch.tensor([2]))
    assert loss_fn(cos, torch.tensor([2])).item() == pytest.approx(expected.item(), rel=1e-5)
    # cos(theta + m) would have been larger than the continuation (the loss would reward it)
    assert math.cos(math.pi - 0.1 + m) > target_cos - m * math.sin(m)


def test_easy_margin_keeps_negative_cosines():
    loss_fn = MarginSoftmaxLoss("aam", scale=32.0, margin=0.3, easy_margin=True)
    cos = cosines_with_target(-0.4)
    assert loss_fn(cos, torch.tensor([2])).item() == pytest.approx(
        F.cross_entropy(32.0 * cos, torch.tensor([2])).item(), rel=1e-6
    )


def test_am_subtracts_margin_from_target_only():
    loss_fn = MarginSoftmaxLoss("am", scale=30.0, margin=0.2)
    cos = torch.tensor([[0.5, 0.1, -0.2], [0.0, 0.7, 0.3]])
    labels = torch.tensor([0, 2])
    logits = cos.clone()
    logits[0, 0] -= 0.2
    logits[1, 2] -= 0.2
    expected = F.cross_entropy(30.0 * logits, labels)
    assert loss_fn(cos, labels).item() == pytest.approx(expected.item(), rel=1e-6)


def test_margin_can_change_between_calls_and_zero_margin_is_plain_softmax():
    loss_fn = MarginSoftmaxLoss("aam", scale=32.0, margin=0.0)
    cos = torch.tensor([[0.6, 0.2, -0.1]])
    plain = F.cross_entropy(32.0 * cos, torch.tensor([0])).item()
    assert loss_fn(cos, torch.tensor([0])).item() == pytest.approx(plain, rel=1e-5)
    loss_fn.margin = 0.3
    assert loss_fn(cos, torch.tensor([0])).item() > 100 * plain


def test_gradient_is_finite_when_embedding_equals_class_weight():
    torch.manual_seed(0)
    head = CosineClassifier(8, 3)
    embeddings = head.weight.detach()[:2].clone().requires_grad_(True)  # cos = 1 exactly
    loss = MarginSoftmaxLoss("aam", margin=0.3)(head(embeddings), torch.tensor([0, 1]))
    loss.backward()
    assert torch.isfinite(embeddings.grad).all() and torch.isfinite(head.weight.grad).all()


def test_unknown_margin_type_is_config_error():
    with pytest.raises(ConfigError, match="loss.margin_type"):
        MarginSoftmaxLoss("arcface")


def test_classifier_runs_in_float32_under_bf16_autocast():
    torch.manual_seed(0)
    net = SpeakerClassifierNet(torch.nn.Linear(10, 6), CosineClassifier(6, 5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cosines = net(torch.randn(3, 10))
    assert cosines.dtype == torch.float32 and cosines.shape == (3, 5)
