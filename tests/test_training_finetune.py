"""Classifier width for fine-tuning and loading of the starting weights."""

import logging
from pathlib import Path

import pytest
import torch

from speakerlab.errors import CheckpointError, ConfigError
from speakerlab.models import build_model
from speakerlab.training.finetune import (
    InitSource,
    apply_init_source,
    classifier_width,
    resolve_model_spec,
)
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


# ------------------------------------------------------------------ architecture of a fine-tune

BASE = ("eres2net", {"feat_dim": 80, "embedding_size": 192, "m_channels": 32})
NARROW = {"feat_dim": 80, "embedding_size": 64, "m_channels": 8, "num_blocks": [1, 1, 1, 1]}


def test_without_a_starting_checkpoint_the_configuration_decides():
    name, kwargs = resolve_model_spec(BASE, None, None, set())
    assert name == "eres2net" and kwargs["m_channels"] == 32
    assert kwargs["num_blocks"] == [3, 4, 6, 3]  # the constructor's default, filled in


def test_the_starting_checkpoint_decides_over_the_experiment(caplog):
    """The large-margin experiment states the base model; the run it continues was narrower."""
    with caplog.at_level(logging.INFO):
        name, kwargs = resolve_model_spec(BASE, ("eres2net", NARROW), Path("mini.pt"), set())
    assert (name, kwargs) == ("eres2net", NARROW)
    assert (
        "configured model values replaced: embedding_size 192 -> 64, m_channels 32 -> 8, "
        "num_blocks [3, 4, 6, 3] -> [1, 1, 1, 1]" in caplog.text
    )


def test_command_line_values_must_agree_with_the_starting_checkpoint():
    agreeing = ("eres2net", {**BASE[1], "m_channels": 8})
    name, kwargs = resolve_model_spec(
        agreeing, ("eres2net", NARROW), Path("mini.pt"), {"m_channels"}
    )
    assert kwargs == NARROW
    with pytest.raises(ConfigError) as err:
        resolve_model_spec(BASE, ("eres2net", NARROW), Path("mini.pt"), {"embedding_size"})
    assert str(err.value) == (
        "mini.pt: the run starts from (or continues) a eres2net model that the command line "
        "changes (model.embedding_size=192 on the command line, 64 in the checkpoint); its "
        "weights cannot load into another architecture: drop those overrides, or train from "
        "scratch without trainer.init_from"
    )
    with pytest.raises(ConfigError, match=r"model.name=ecapa_tdnn on the command line, eres2net"):
        resolve_model_spec(("ecapa_tdnn", {}), ("eres2net", NARROW), Path("mini.pt"), {"name"})


def test_a_released_state_dict_shows_its_architecture():
    """A plain state dict records no name: the architecture is inferred from its weights."""
    torch.manual_seed(0)
    weights = build_model("eres2net", **NARROW).state_dict()
    released = InitSource(Path("released.ckpt"), weights, None, None, None)
    name, kwargs = resolve_model_spec(BASE, released.architecture(), released.path, set())
    assert name == "eres2net" and kwargs == NARROW
