"""The model zoo: ERes2Net, ERes2NetV2, CAM++ and ECAPA-TDNN, and the registry that names them.

Every model maps fbank ``(batch, frames, feat_dim)`` to an embedding ``(batch, embedding_size)``
(not L2-normalised) and has exactly the state_dict layout of the reference implementation, so the
released 3D-Speaker checkpoints load with ``strict=True``.

Each architecture lives in one module ``speakerlab/models/<name>.py`` that defines ``SPEC``, a
:class:`ModelSpec` saying how to build the model and how to read its constructor arguments back
from a state dict. :data:`MODEL_NAMES` lists those modules; a module is imported only when its
model is asked for, so importing one architecture does not import them all.

Adding a model: write ``speakerlab/models/<name>.py`` with the model and its ``SPEC``, add
``<name>`` to :data:`MODEL_NAMES`, and add its config ``conf/model/<name>.yaml``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

# One entry per architecture module ``speakerlab.models.<name>`` (the model's name).
MODEL_NAMES = ("eres2net", "eres2netv2", "campplus", "ecapa_tdnn")

# Parameter and buffer shapes of a state dict, by key.
Shapes = Mapping[str, tuple[int, ...]]


@dataclass(frozen=True)
class ModelSpec:
    """What the registry knows about one architecture.

    Attributes:
        name: the model's name in configs and checkpoints (the module's name).
        build: the constructor (the model class), called with keyword arguments only.
        signature_key: a state-dict key that only this architecture has; it tells its state dicts
            apart from the others'.
        kwargs_from_shapes: the constructor arguments that give a state dict of these shapes
            (the released checkpoints record no architecture). May raise ``KeyError`` or
            ``ValueError`` when a key it needs is missing or malformed.
    """

    name: str
    build: Callable[..., nn.Module]
    signature_key: str
    kwargs_from_shapes: Callable[[Shapes], dict[str, Any]]


def model_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` of the model ``name`` (its module is imported on first use)."""
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}")
    spec = importlib.import_module(f"{__name__}.{name}").SPEC
    if spec.name != name:  # a copied module whose SPEC kept the old name
        raise RuntimeError(f"speakerlab.models.{name} declares SPEC.name={spec.name!r}")
    return spec


def model_specs() -> list[ModelSpec]:
    """The specs of every registered model, in :data:`MODEL_NAMES` order (imports them all)."""
    return [model_spec(name) for name in MODEL_NAMES]


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """The embedding model ``name`` built with ``kwargs`` (feat_dim, embedding_size, ...)."""
    return model_spec(name).build(**kwargs)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable and frozen parameters (buffers such as BN statistics excluded)."""
    return sum(p.numel() for p in model.parameters())
