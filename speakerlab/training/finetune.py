"""Starting a run from earlier weights (``trainer.init_from``) and sizing its classifier.

``init_from`` may name a speakerlab experiment folder (its newest checkpoint is used), one of our
training checkpoints, a plain embedding-model state_dict such as a released 3D-Speaker
checkpoint, or the ModelScope id of a released model (fetched by :mod:`speakerlab.pretrained`).
The embedding model always loads strictly. The classifier loads too when the source has one of the
width this run needs; otherwise it keeps its fresh initialisation and the log says why.

Classifier width (``loss.num_classes``): ``auto`` is the number of classes of the training data
(speakers x speeds); ``init`` keeps the width of the ``init_from`` classifier, as large-margin
fine-tuning does (it drops speed perturbation but keeps the 3N classes of the run it continues,
whose first N classes are the unperturbed speakers); an integer fixes it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from speakerlab.errors import CheckpointError, ConfigError
from speakerlab.models.checkpoint import load_state_into, read_model_state
from speakerlab.pretrained import download_pretrained, released_model
from speakerlab.training.checkpointing import checkpoint_dir, list_checkpoints, load_checkpoint

log = logging.getLogger(__name__)


@dataclass
class InitSource:
    """Weights to start from: the embedding model's, and the classifier's when the file has one."""

    path: Path
    model_state: dict[str, torch.Tensor]
    model_name: str | None
    model_kwargs: dict[str, Any] | None
    classifier_state: dict[str, torch.Tensor] | None

    @property
    def num_classes(self) -> int | None:
        """Width of the stored classifier, None without one."""
        if self.classifier_state is None:
            return None
        return int(self.classifier_state["weight"].shape[0])


def resolve_init_path(path: str | Path) -> Path:
    """The checkpoint file meant by ``path``: the file itself, an experiment folder's newest, or
    the downloaded file of a released model id (``trainer.init_from`` and ``speakerlab export
    --checkpoint`` accept all three)."""
    if released_model(str(path)) is not None and not Path(path).exists():
        return download_pretrained(str(path))
    path = Path(path)
    if path.is_dir():
        for folder in (checkpoint_dir(path), path):
            checkpoints = list_checkpoints(folder)
            if checkpoints:
                return checkpoints[-1]
        raise CheckpointError(
            f"{path}: a folder without training checkpoints (expected an "
            "experiment folder with checkpoints/ckpt_*.pt)"
        )
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file or experiment folder")
    return path


def read_init_source(path: str | Path) -> InitSource:
    """Read the weights ``trainer.init_from`` points to."""
    path = resolve_init_path(path)
    state, name, kwargs = read_model_state(path)
    classifier = None
    if name is not None:  # a speakerlab training checkpoint: it may also hold the classifier
        stored = load_checkpoint(path).get("classifier")
        if isinstance(stored, dict) and isinstance(stored.get("weight"), torch.Tensor):
            classifier = stored
    return InitSource(path, state, name, kwargs, classifier)


def classifier_width(setting: Any, data_classes: int, init: InitSource | None) -> int:
    """Number of classifier outputs for ``loss.num_classes`` (auto, init or an integer)."""
    if setting == "auto":
        width = data_classes
    elif setting == "init":
        if init is None or init.num_classes is None:
            source = "no trainer.init_from" if init is None else f"{init.path} has no classifier"
            raise ConfigError(
                f"loss.num_classes=init keeps the classifier of trainer.init_from, but "
                f"{source}; give a speakerlab training checkpoint or use "
                "loss.num_classes=auto"
            )
        width = init.num_classes
    elif isinstance(setting, int) and not isinstance(setting, bool) and setting > 0:
        width = setting
    else:
        raise ConfigError(f"loss.num_classes={setting!r}: use auto, init or a positive integer")
    if width < data_classes:
        raise ConfigError(
            f"the classifier has {width} classes but the training data has "
            f"{data_classes} (speakers x speeds); labels would not fit"
        )
    return width


def apply_init_source(
    init: InitSource, model_name: str, model: nn.Module, classifier: nn.Module
) -> None:
    """Load the embedding model (strictly) and, when the widths agree, the classifier."""
    if init.model_name is not None and init.model_name != model_name:
        raise CheckpointError(
            f"{init.path}: holds a {init.model_name} model but this run trains "
            f"{model_name} (model.name)"
        )
    load_state_into(model, init.model_state, init.path)
    width = classifier.weight.shape[0]
    stored = init.classifier_state
    if stored is not None and stored["weight"].shape == classifier.weight.shape:
        classifier.load_state_dict(stored)
        log.info(
            "initialised embedding model and classifier (%d classes) from %s", width, init.path
        )
    elif stored is None:
        log.info(
            "initialised the embedding model from %s; it has no classifier, so the classifier "
            "(%d classes) is newly initialised",
            init.path,
            width,
        )
    else:
        log.warning(
            "initialised the embedding model from %s; its classifier has %d classes but this "
            "run needs %d, so the classifier is re-initialised",
            init.path,
            init.num_classes,
            width,
        )
