"""How the global batch of one optimizer step is split over processes and accumulation steps.

The global batch ``G`` (``trainer.batch_size``) is cut into ``W x A`` micro-batches of ``B`` items:
``W`` processes each run ``A`` micro-batches (``trainer.accumulate_steps``) before the optimizer
steps. Optimizer step ``s`` of an epoch trains on items ``s*G ... (s+1)*G - 1`` of the epoch's
permutation (the one :class:`~speakerlab.data.sampler.DistributedResumableSampler` draws from
``(seed, epoch)``); micro-batch slot ``k`` of that step holds the ``B`` items from
``s*G + k*B`` on and is run by rank ``k % W`` as its micro-step ``k // W``.

So every layout with the same ``G`` and ``B`` trains each step on the same items, grouped into
the same micro-batches (batch-norm statistics are per micro-batch): two processes without
accumulation and one process accumulating two micro-batches compute the same gradient up to float
rounding, and a run can resume on another number of processes and continue the same data order.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import Sampler

from speakerlab.data.sampler import DistributedResumableSampler
from speakerlab.errors import ConfigError


@dataclass(frozen=True)
class BatchLayout:
    """Per optimizer step: ``world_size`` processes x ``micro_batch`` items x
    ``accumulate_steps``."""

    world_size: int
    micro_batch: int
    accumulate_steps: int

    @property
    def global_batch(self) -> int:
        return self.world_size * self.micro_batch * self.accumulate_steps

    @property
    def items_per_rank_step(self) -> int:
        """Items one process trains on per optimizer step."""
        return self.micro_batch * self.accumulate_steps

    def describe(self) -> str:
        """e.g. ``256 (2 processes x 64 items x 2 accumulation steps)``."""
        return (
            f"{self.global_batch} ({self.world_size} process(es) x {self.micro_batch} items x "
            f"{self.accumulate_steps} accumulation step(s))"
        )

    def as_dict(self) -> dict[str, int]:
        return {
            "world_size": self.world_size,
            "micro_batch": self.micro_batch,
            "accumulate_steps": self.accumulate_steps,
            "global_batch": self.global_batch,
        }


def batch_layout(global_batch: int, world_size: int, accumulate_steps: int) -> BatchLayout:
    """The layout for ``trainer.batch_size`` (the global batch) over ``world_size`` processes
    with ``trainer.accumulate_steps``; the global batch must split evenly."""
    if global_batch < 1:
        raise ConfigError(f"trainer.batch_size={global_batch} must be positive")
    if accumulate_steps < 1:
        raise ConfigError(f"trainer.accumulate_steps={accumulate_steps} must be at least 1")
    parts = world_size * accumulate_steps
    if global_batch % parts:
        raise ConfigError(
            f"trainer.batch_size={global_batch} (the global batch) does not divide over "
            f"{world_size} processes x {accumulate_steps} accumulation step(s); choose a "
            f"multiple of {parts} or change --nproc_per_node / trainer.accumulate_steps"
        )
    return BatchLayout(world_size, global_batch // parts, accumulate_steps)


def steps_per_epoch(dataset_size: int, layout: BatchLayout) -> int:
    """Full optimizer steps in one pass over the data (the same for every layout of a global
    batch)."""
    return dataset_size // layout.global_batch


class MicroBatchSampler(Sampler[int]):
    """This rank's items of an epoch, micro-batch after micro-batch (see the module docstring),
    from optimizer step ``start_step`` on; a DataLoader with ``batch_size=micro_batch`` cuts them
    into the micro-batches."""

    def __init__(self, dataset_size: int, layout: BatchLayout, rank: int, seed: int) -> None:
        if not 0 <= rank < layout.world_size:
            raise ConfigError(f"rank {rank} is not in [0, {layout.world_size})")
        # One replica: the whole permutation of (seed, epoch), which this sampler slices.
        self.order = DistributedResumableSampler(dataset_size, seed=seed, shuffle=True)
        self.layout = layout
        self.rank = rank
        self.steps = steps_per_epoch(dataset_size, layout)
        self.start_step = 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the epoch and the first optimizer step to serve (mid-epoch resume)."""
        if not 0 <= start_step <= self.steps:
            raise ConfigError(f"resume step {start_step} is outside the {self.steps} of an epoch")
        self.order.set_epoch(epoch)
        self.start_step = start_step

    def rank_items(self, rank: int) -> list[int]:
        """Items of rank ``rank`` for the whole epoch, in training order (any rank can name any
        other rank's items, e.g. those of a bad batch)."""
        layout = self.layout
        order = torch.tensor(self.order.epoch_indices()[: self.steps * layout.global_batch])
        # slot = (step * accumulate_steps + micro) * world_size + rank
        slots = order.view(self.steps, layout.accumulate_steps, layout.world_size, -1)
        return slots[:, :, rank].reshape(-1).tolist()

    def step_items(self, rank: int, step: int) -> list[int]:
        """Items of rank ``rank`` in optimizer step ``step`` of the epoch."""
        per_step = self.layout.items_per_rank_step
        return self.rank_items(rank)[step * per_step : (step + 1) * per_step]

    def __iter__(self) -> Iterator[int]:
        return iter(self.rank_items(self.rank)[self.start_step * self.layout.items_per_rank_step :])

    def __len__(self) -> int:
        return (self.steps - self.start_step) * self.layout.items_per_rank_step
