"""A rank's running statistics of the epoch, kept on its device so that a step never waits for
the GPU: the host reads them once per logging window (:func:`gather_stats`, one collective).

Sums are float64, in which the per-step terms (a float32 loss times the batch size) add exactly,
so the epoch's figures do not depend on where the windows or a resume cut it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from speakerlab.distributed import DistContext, all_gather_tensor

# The fields of a rank's statistics vector: epoch sums, then the first non-finite step of the run
# (global step number, from 1; -1 while none) with its loss, and the last finite step before it.
LOSS_SUM, CORRECT, COUNT, BAD_STEPS = range(4)
FIRST_BAD_STEP, FIRST_BAD_LOSS, LAST_GOOD_LOSS, LAST_GOOD_STEP = range(4, 8)
# The epoch sums a checkpoint keeps per rank: loss_sum, correct, count, skipped (bad) steps.
EPOCH_FIELDS = 4
_NONE = -1.0  # no step recorded


class RunningStats:
    """Sums of the current epoch and the first non-finite step of one rank, on its device."""

    def __init__(self, device: torch.device) -> None:
        self.values = torch.zeros(8, dtype=torch.float64, device=device)
        self.values[[FIRST_BAD_STEP, LAST_GOOD_STEP]] = _NONE

    def add_step(
        self,
        number: int,
        loss_sum: torch.Tensor,
        correct: torch.Tensor,
        count: int,
        bad: torch.Tensor,
    ) -> None:
        """Record optimizer step ``number`` (global, from 1): summed loss and correct predictions
        over its ``count`` items, and whether it was non-finite (its sums are then left out)."""
        values = self.values
        mean = loss_sum / count
        zero = torch.zeros((), dtype=values.dtype, device=values.device)
        step = torch.full((), float(number), dtype=values.dtype, device=values.device)
        sums = torch.stack((loss_sum, correct.to(values.dtype), zero + count))
        values[:BAD_STEPS] += torch.where(bad, zero, sums)
        values[BAD_STEPS] += bad.to(values.dtype)
        unseen = values[FIRST_BAD_STEP] < 0
        values[FIRST_BAD_STEP : FIRST_BAD_LOSS + 1] = torch.where(
            bad & unseen, torch.stack((step, mean)), values[FIRST_BAD_STEP : FIRST_BAD_LOSS + 1]
        )
        values[LAST_GOOD_LOSS : LAST_GOOD_STEP + 1] = torch.where(
            ~bad & unseen, torch.stack((mean, step)), values[LAST_GOOD_LOSS : LAST_GOOD_STEP + 1]
        )

    def start_epoch(self, epoch_sums: list[float] | None = None) -> None:
        """Reset the epoch sums (to ``epoch_sums`` when resuming one)."""
        sums = epoch_sums or [0.0] * EPOCH_FIELDS
        self.values[:EPOCH_FIELDS] = torch.tensor(sums, dtype=torch.float64)


@dataclass(frozen=True)
class GatheredStats:
    """Every rank's statistics vector (rows in rank order) and rank 0's extra flags."""

    rows: np.ndarray  # (world_size, 8)
    flags: np.ndarray  # rank 0's flags, as passed to gather_stats

    @property
    def sums(self) -> np.ndarray:
        """Epoch totals over the ranks: loss_sum, correct, count."""
        return self.rows[:, :BAD_STEPS].sum(axis=0)

    @property
    def skipped(self) -> int:
        """Skipped steps (every rank skips the same ones)."""
        return int(self.rows[0, BAD_STEPS])

    def epoch_rows(self) -> list[list[float]]:
        """Per-rank epoch sums, as a checkpoint keeps them."""
        return [row[:EPOCH_FIELDS].tolist() for row in self.rows]

    def first_bad_step(self) -> int | None:
        steps = self.rows[:, FIRST_BAD_STEP]
        return int(steps[steps >= 0].min()) if (steps >= 0).any() else None


def gather_stats(ctx: DistContext, stats: RunningStats, flags: list[float]) -> GatheredStats:
    """Every rank's statistics and rank 0's ``flags`` (decisions that must agree on all ranks,
    e.g. a save asked for by rank 0's clock): one collective and one wait for the device."""
    flags_tensor = torch.tensor(flags, dtype=torch.float64).to(stats.values.device)
    rows = all_gather_tensor(ctx, torch.cat((stats.values, flags_tensor))).cpu().numpy()
    return GatheredStats(rows[:, :8], rows[0, 8:])
