"""Non-finite losses: batches that leave no trace when skipped, and the report when a run stops.

A training-mode forward pass updates batch-norm running statistics before the loss can be looked
at, so skipping a bad batch (``trainer.skip_nonfinite=true``) restores the model's buffers from a
copy taken before the step (:class:`BufferSnapshot`; the buffers are a few kilobytes, the
parameters and optimizer state are untouched because the optimizer does not step).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from speakerlab.distributed import EveryRankError

# Items of a bad batch named in messages.
NAMED_ITEMS = 8


class NonFiniteLossError(EveryRankError):
    """The loss became NaN or infinite (every rank learns of it and stops together)."""


class BufferSnapshot:
    """A copy of a module's buffers (batch-norm statistics and counters), restorable in place."""

    def __init__(self, module: nn.Module) -> None:
        self.buffers = [b for b in module.buffers() if b is not None]
        self.saved = [torch.empty_like(b) for b in self.buffers]

    def take(self) -> None:
        torch._foreach_copy_(self.saved, self.buffers)

    def restore(self) -> None:
        torch._foreach_copy_(self.buffers, self.saved)


@dataclass(frozen=True)
class BadStep:
    """Where a non-finite loss happened and what surrounded it."""

    epoch: int  # from 0
    iteration: int  # within the epoch, from 0
    steps_per_epoch: int
    global_step: int  # from 1
    lr: float
    losses: dict[int, float]  # rank -> its loss at that step (bad ranks only)
    last_finite: tuple[float, int] | None  # (loss, global step) before it, if any

    @property
    def ranks(self) -> dict[int, float]:
        """The ranks whose loss was not finite, or else (finite losses, non-finite gradients
        after their synchronisation) every bad rank."""
        bad_losses = {r: v for r, v in self.losses.items() if not math.isfinite(v)}
        return bad_losses or self.losses

    def what(self) -> str:
        return "loss" if any(not math.isfinite(v) for v in self.losses.values()) else "gradients"

    def where(self) -> str:
        return (
            f"epoch {self.epoch + 1}, iteration {self.iteration + 1}/{self.steps_per_epoch} "
            f"(global step {self.global_step}"
        )

    def batches(self, describe_items: Callable[[int, int], str]) -> str:
        """``rank R: loss V on items ...`` for each bad rank (``describe_items(rank, step)``)."""
        return "; ".join(
            f"rank {rank}: loss {value} on items {describe_items(rank, self.iteration)}"
            for rank, value in sorted(self.ranks.items())
        )


def skip_message(bad: BadStep, describe_items: Callable[[int, int], str]) -> str:
    return (
        f"non-finite {bad.what()} at {bad.where()}), batch skipped ({bad.batches(describe_items)})"
    )


def stop_message(
    bad: BadStep, describe_items: Callable[[int, int], str], last_checkpoint: str | None
) -> str:
    """The error of a run stopped by a non-finite loss: the step, its learning rate, the last
    finite loss, and how to go on with a lower learning rate."""
    last = (
        f"the last finite loss was {bad.last_finite[0]:.4f} (global step {bad.last_finite[1]})"
        if bad.last_finite
        else "no finite loss since the run (re)started"
    )
    if last_checkpoint:
        resume = (
            f"The newest checkpoint, {last_checkpoint}, holds no non-finite value: to go on from "
            "it with half the learning rate, run the same command with optim.lr_factor=0.5 "
            "(a factor on the whole schedule; later resumes keep it)"
        )
    else:
        resume = "No checkpoint was written yet: lower optim.lr and start again"
    return (
        f"non-finite {bad.what()} at {bad.where()}, learning rate {bad.lr:.4g}): "
        f"{bad.batches(describe_items)}; {last}. {resume}; or check those items, or set "
        "trainer.skip_nonfinite=true to skip such batches"
    )
