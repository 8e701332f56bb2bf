"""The speaker-classification head: a cosine classifier and additive-margin softmax losses.

Training maps each embedding to ``num_classes`` cosine similarities (L2-normalised embedding
against L2-normalised class weights) and applies a margin to the target class before a scaled
softmax cross-entropy:

* AAM-softmax (ArcFace): the target logit is ``s * cos(theta + m)``;
* AM-softmax (CosFace): the target logit is ``s * (cos(theta) - m)``.

The margin is set from outside at every iteration by the margin schedule
(:class:`speakerlab.training.schedules.MarginSchedule`), so it is a plain attribute, not state.

AAM margin near theta = pi: ``cos(theta + m)`` stops decreasing once ``theta + m > pi``, which would
reward pushing the target away. We use the usual remedy (``easy_margin=False``, the reference's
default): past ``theta > pi - m`` the target logit becomes the linear continuation
``cos(theta) - m * sin(m)``. With ``easy_margin=True`` the margin is applied only where
``cos(theta) > 0`` and the plain cosine is kept elsewhere.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from speakerlab.errors import ConfigError

MARGIN_TYPES = ("aam", "am")


class CosineClassifier(nn.Module):
    """Cosine similarity of the L2-normalised embedding to each L2-normalised class weight.

    ``weight`` has shape ``(num_classes, embedding_size)`` and is Xavier-initialised.
    """

    def __init__(self, embedding_size: int, num_classes: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size))
        nn.init.xavier_uniform_(self.weight)

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(embeddings, dim=1), F.normalize(self.weight, dim=1))


class MarginSoftmaxLoss(nn.Module):
    """Scaled softmax cross-entropy over cosines with an additive margin on the target class.

    ``forward(cosines, labels)`` returns the mean loss; ``margin`` may be changed between calls.
    """

    def __init__(
        self,
        margin_type: str = "aam",
        scale: float = 32.0,
        margin: float = 0.0,
        easy_margin: bool = False,
    ) -> None:
        super().__init__()
        if margin_type not in MARGIN_TYPES:
            raise ConfigError(
                f"unknown margin type {margin_type!r} (loss.margin_type); choose one of "
                f"{', '.join(MARGIN_TYPES)}"
            )
        self.margin_type = margin_type
        self.scale = scale
        self.margin = margin
        self.easy_margin = easy_margin

    def target_logits(self, cosine: torch.Tensor) -> torch.Tensor:
        """The margin-penalised cosine used for the target class (before scaling)."""
        m = self.margin
        if self.margin_type == "am":
            return cosine - m
        # Clamped so that the gradient of the square root stays finite at |cos| = 1.
        sine = torch.sqrt((1.0 - cosine * cosine).clamp(min=1e-7))
        shifted = cosine * math.cos(m) - sine * math.sin(m)  # cos(theta + m)
        if self.easy_margin:
            return torch.where(cosine > 0, shifted, cosine)
        return torch.where(cosine > math.cos(math.pi - m), shifted, cosine - m * math.sin(m))

    def forward(self, cosines: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cosines = cosines.float()
        target = cosines.gather(1, labels[:, None])
        logits = cosines.scatter(1, labels[:, None], self.target_logits(target))
        return F.cross_entropy(self.scale * logits, labels)


class SpeakerClassifierNet(nn.Module):
    """Embedding model and cosine classifier as one module, so that one DDP wrapper syncs both.

    ``forward(features)`` returns the cosines ``(batch, num_classes)``; the classifier runs in
    float32 even under autocast, since the margin arithmetic needs the precision.
    """

    def __init__(self, embedding_model: nn.Module, classifier: CosineClassifier) -> None:
        super().__init__()
        self.embedding_model = embedding_model
        self.classifier = classifier

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        embeddings = self.embedding_model(features)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            return self.classifier(embeddings.float())
