"""Learning-rate and margin schedules, both functions of the training position.

Positions are measured in fractional epochs ``t = epoch + step / steps_per_epoch``, so both
schedules are set at every iteration and are recovered exactly on resume from ``(epoch, step)``
alone: they hold no state of their own.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from speakerlab.errors import ConfigError


def training_position(epoch: int, step: int, steps_per_epoch: int) -> float:
    """Fractional epoch reached after ``step`` iterations of ``epoch`` (both counted from 0)."""
    return epoch + step / steps_per_epoch


@dataclass(frozen=True)
class WarmupCosineLR:
    """Linear warm-up from ``min_lr`` to ``lr`` over ``warmup_epochs``, then a half cosine that
    reaches ``min_lr`` at ``epochs`` (and stays there). A run shorter than its warm-up (a
    shortened trial run) only warms up."""

    lr: float
    min_lr: float
    warmup_epochs: float
    epochs: float

    def __post_init__(self) -> None:
        if self.warmup_epochs < 0 or self.epochs <= 0:
            raise ConfigError(
                f"optim.warmup_epochs={self.warmup_epochs} and trainer.epochs="
                f"{self.epochs} must be non-negative and positive"
            )

    def scaled(self, factor: float) -> WarmupCosineLR:
        """The same schedule with ``lr`` and ``min_lr`` multiplied by ``factor``."""
        return dataclasses.replace(self, lr=self.lr * factor, min_lr=self.min_lr * factor)

    def __call__(self, t: float) -> float:
        if t < self.warmup_epochs:
            return self.min_lr + (self.lr - self.min_lr) * t / self.warmup_epochs
        if t >= self.epochs:
            return self.min_lr
        progress = (t - self.warmup_epochs) / (self.epochs - self.warmup_epochs)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))


def batch_lr_factor(global_batch: int, reference_batch: int | None) -> float:
    """Linear scaling rule: the factor on a learning rate stated for ``reference_batch`` items
    per optimizer step when the run takes ``global_batch`` (1 without a reference)."""
    if reference_batch is None:
        return 1.0
    if reference_batch < 1:
        raise ConfigError(f"optim.reference_batch={reference_batch} must be a positive batch size")
    return global_batch / reference_batch


@dataclass(frozen=True)
class MarginSchedule:
    """Margin ``initial`` until ``increase_start_epoch``, then the exponential ramp
    ``m(t) = initial + (final - initial) * (1 - 0.001 ** (u / T))`` (``u`` epochs since the start
    of the ramp, ``T = fix_epoch - increase_start_epoch``), and ``final`` from ``fix_epoch`` on.

    With ``fix_epoch <= increase_start_epoch`` the margin jumps straight to ``final``.
    """

    initial: float
    final: float
    increase_start_epoch: float
    fix_epoch: float

    # The ramp has covered 1 - RAMP_FLOOR of the distance when it reaches fix_epoch.
    RAMP_FLOOR = 1e-3

    def __call__(self, t: float) -> float:
        if t < self.increase_start_epoch:
            return self.initial
        if t >= self.fix_epoch:
            return self.final
        ramp = (t - self.increase_start_epoch) / (self.fix_epoch - self.increase_start_epoch)
        return self.initial + (self.final - self.initial) * (1.0 - self.RAMP_FLOOR**ramp)
