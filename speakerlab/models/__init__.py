"""The model zoo: ERes2Net, ERes2NetV2, CAM++ and ECAPA-TDNN.

Every model maps fbank ``(batch, frames, feat_dim)`` to an embedding ``(batch, embedding_size)``
(not L2-normalised) and has exactly the state_dict layout of the reference implementation, so the
released 3D-Speaker checkpoints load with ``strict=True``.
"""

from __future__ import annotations

from torch import nn

MODEL_NAMES = ("eres2net", "eres2netv2", "campplus", "ecapa_tdnn")


def model_class(name: str) -> type[nn.Module]:
    """The class registered under ``name``.

    Imported on first use, so that importing one architecture does not import them all.
    """
    if name == "eres2net":
        from speakerlab.models.eres2net import ERes2Net

        return ERes2Net
    if name == "eres2netv2":
        from speakerlab.models.eres2netv2 import ERes2NetV2

        return ERes2NetV2
    if name == "campplus":
        from speakerlab.models.campplus import CAMPPlus

        return CAMPPlus
    if name == "ecapa_tdnn":
        from speakerlab.models.ecapa_tdnn import ECAPATDNN

        return ECAPATDNN
    raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}")


def build_model(name: str, **kwargs) -> nn.Module:
    """The embedding model ``name`` built with ``kwargs`` (feat_dim, embedding_size, ...)."""
    return model_class(name)(**kwargs)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable and frozen parameters (buffers such as BN statistics excluded)."""
    return sum(p.numel() for p in model.parameters())
