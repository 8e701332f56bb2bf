"""Starting a run from earlier weights (``trainer.init_from``) and sizing its classifier.

``init_from`` may name a speakerlab experiment folder (its newest checkpoint is used), one of our
training checkpoints, a plain embedding-model state_dict such as a released 3D-Speaker
checkpoint, or the ModelScope id of a released model (fetched by :mod:`speakerlab.pretrained`).
The embedding model always loads strictly. The classifier loads too when the source has one of the
width this run needs; otherwise it keeps its fresh initialisation and the log says why.

Architecture (:func:`resolve_model_spec`): a run started from ``init_from`` trains the architecture
of its starting checkpoint, the name and constructor arguments that the file records (speakerlab
checkpoints) or that its weights show (released state dicts). Values of the ``model`` group that
differ, e.g. those an experiment states for a full-size model, are replaced, and the log lists
each one. A ``model.*`` value given on the command line is the user's explicit choice: it must agree
with the checkpoint, else the run stops with both values named (the weights could not load into
another architecture). A resumed run keeps the architecture it recorded, by the same rule.

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
from speakerlab.models.checkpoint import infer_architecture, load_state_into, model_state_of
from speakerlab.pretrained import download_pretrained, released_model
from speakerlab.training.builders import full_model_kwargs
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

    def architecture(self) -> tuple[str, dict[str, Any]]:
        """Model name and kwargs: recorded in the file, else inferred from the weights."""
        if self.model_name is not None:
            return self.model_name, dict(self.model_kwargs or {})
        try:
            return infer_architecture(self.model_state)
        except CheckpointError as err:
            raise CheckpointError(f"{self.path}: {err}") from None


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
    """Read the weights ``trainer.init_from`` points to (the file is read once)."""
    path = resolve_init_path(path)
    stored = load_checkpoint(path)
    state, name, kwargs = model_state_of(stored, path)
    classifier = stored.get("classifier") if name is not None else None
    if not (isinstance(classifier, dict) and isinstance(classifier.get("weight"), torch.Tensor)):
        classifier = None  # a released model, or a checkpoint without a classifier
    return InitSource(path, state, name, kwargs, classifier)


def resolve_model_spec(
    configured: tuple[str, dict[str, Any]],
    source: tuple[str, dict[str, Any]] | None,
    source_path: Path | None,
    explicit_keys: set[str],
) -> tuple[str, dict[str, Any]]:
    """The architecture to build (see the module docstring): ``configured`` from the ``model``
    group, ``source`` (name, kwargs) of the checkpoint the run starts or resumed from when it
    began with ``init_from`` (None otherwise), ``explicit_keys`` the ``model`` keys given on the
    command line (``name`` for ``model=...``). Returns complete constructor kwargs."""
    name, kwargs = configured
    if source is None:
        return name, full_model_kwargs(name, kwargs)
    source_name, source_kwargs = source[0], full_model_kwargs(*source)
    given = {"name": name, **kwargs}
    chosen = {"name": source_name, **source_kwargs}
    explicit = sorted(key for key in explicit_keys if key in given)
    conflicts = [key for key in explicit if _plain(given[key]) != chosen.get(key)]
    if conflicts:
        listed = "; ".join(
            f"model.{key}={given[key]} on the command line, "
            + (
                f"{chosen[key]} in the checkpoint"
                if key in chosen
                else f"no {key} in {source_name}"
            )
            for key in conflicts
        )
        raise ConfigError(
            f"{source_path}: the run starts from (or continues) a {source_name} model that the "
            f"command line changes ({listed}); its weights cannot load into another "
            "architecture: drop those overrides, or train from scratch without trainer.init_from"
        )
    configured_full = {"name": name, **full_model_kwargs(name, kwargs)}
    replaced = [
        f"{key} {configured_full.get(key)} -> {value}"
        for key, value in chosen.items()
        if configured_full.get(key) != value
    ]
    if replaced:
        log.info(
            "architecture from %s (trainer.init_from): %s; configured model values replaced: %s",
            source_path,
            source_name,
            ", ".join(replaced),
        )
    return source_name, source_kwargs


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


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
