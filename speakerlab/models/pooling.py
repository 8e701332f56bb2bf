"""Temporal statistics pooling.

Speaker-embedding networks turn a variable-length sequence of frame-level features into one
fixed-size vector by taking the mean and the standard deviation of every feature over time
(x-vector "statistics pooling"). The feature map may carry extra axes besides time, e.g. the
(channels, frequency) map of a 2-D ResNet: every position of those axes is pooled
independently and flattened, so a ``(batch, channels, freq, frames)`` map gives
``2 * channels * freq`` statistics.

The standard deviation uses the unbiased (n - 1) variance plus a small ``eps`` inside the
square root, which keeps the gradient finite on constant inputs. With the defaults this is the
pooling of the reference ERes2Net / ERes2NetV2 models (their ``TSTP`` layer).
"""

import torch
from torch import nn


def temporal_mean_std(
    features: torch.Tensor, eps: float = 1e-7, unbiased: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation over the last (time) axis.

    Args:
        features: tensor ``(batch, ..., frames)``.
        eps: added to the variance before the square root.
        unbiased: divide the variance by ``frames - 1`` (True) or ``frames`` (False).

    Returns:
        ``(mean, std)``, each shaped ``(batch, ...)``.
    """
    mean = features.mean(dim=-1)
    variance = torch.var(features, dim=-1, correction=1 if unbiased else 0)
    return mean, torch.sqrt(variance + eps)


class TemporalStatsPool(nn.Module):
    """Concatenated, flattened mean and standard deviation over time.

    Input ``(batch, ..., frames)`` -> output ``(batch, 2 * prod(...))`` laid out as
    ``[all means, all standard deviations]``.
    """

    def __init__(self, eps: float = 1e-7, unbiased: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.unbiased = unbiased

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        mean, std = temporal_mean_std(features, eps=self.eps, unbiased=self.unbiased)
        return torch.cat((mean.flatten(start_dim=1), std.flatten(start_dim=1)), dim=1)

    def extra_repr(self) -> str:
        return f"eps={self.eps}, unbiased={self.unbiased}"
