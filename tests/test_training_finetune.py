"""Classifier width for fine-tuning and loading of the starting weights."""

import logging
from pathlib import Path

import pytest
import torch

from speakerlab.errors import CheckpointError, ConfigError
from speakerlab.models import build_model
from speakerlab.training.finetune import InitSource, apply_init_source, classifier_width
from speakerlab.training.losses import CosineClassifier

ECAPA = dict(
    feat_dim=80,
    embedding_size=8,
    channels=[16, 16, 16, 16, 48],
    attention_channels=8,
    se_channels=8,
)


def source(classes: int | None, name: str | None = "ecapa_tdnn") -> InitSource:
    torch.manual_seed(5)
    model = build_model("ecapa_tdnn", **ECAPA)
    head = None if classes is None else CosineClassifier(8, classes).state_dict()
    return InitSource(Path("src.pt"), model.state_dict(), name, ECAPA if name else None, head)


def test_classifier_width_choices():
    assert classifier_width("auto", 36, None) == 36
    assert classifier_width("init", 12, source(36)) == 36
    assert classifier_width(40, 36, None) == 40
    with pytest.raises(ConfigError, match="loss.num_classes=init .* src.pt has no classifier"):
        classifier_width("init", 12, source(None))
    with pytest.raises(ConfigError, match="no trainer.init_from"):
        classifier_width("init", 12, None)
    with pytest.raises(
        ConfigError, match="the classifier has 10 classes but the training data has 12"
    ):
        classifier_width(10, 12, None)
    with pytest.raises(ConfigError, match="use auto, init or a positive integer"):
        classifier_width("many", 12, None)


def test_matching_classifier_is_loaded(caplog):
    init = source(36)
    torch.manual_seed(0)
    model, head = build_model("ecapa_tdnn", **ECAPA), CosineClassifier(8, 36)
    with caplog.at_level(logging.INFO):
        apply_init_source(init, "ecapa_tdnn", model, head)
    assert torch.equal(head.weight, init.classifier_state["weight"])
    assert all(torch.equal(v, init.model_state[k]) for k, v in model.state_dict().items())
    assert "embedding model and classifier (36 classes)" in caplog.text


def test_other_class_count_keeps_fresh_classifier(caplog):
    torch.manual_seed(0)
    model, head = build_model("ecapa_tdnn", **ECAPA), CosineClassifier(8, 12)
    fresh = head.weight.detach().clone()
    with caplog.at_level(logging.WARNING):
        apply_init_source(source(36), "ecapa_tdnn", model, head)
    assert torch.equal(head.weight, fresh)
    assert (
        "has 36 classes but this run needs 12, so the classifier is re-initialised" in caplog.text
    )


def test_wrong_model_is_a_clear_error():
    with pytest.raises(
        CheckpointError, match="holds a ecapa_tdnn model but this run trains eres2net"
    ):
        apply_init_source(
            source(12),
            "eres2net",
            build_model("eres2net", m_channels=4, embedding_size=8),
            CosineClassifier(8, 12),
        )
    # a released file records no name: the strict load lists what does not fit
    with pytest.raises(CheckpointError, match="shape mismatch"):
        wider = build_model("ecapa_tdnn", **{**ECAPA, "embedding_size": 16})
        apply_init_source(source(None, name=None), "ecapa_tdnn", wider, CosineClassifier(16, 12))
