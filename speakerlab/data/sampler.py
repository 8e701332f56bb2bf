"""A distributed sampler that can resume in the middle of an epoch.

All ranks draw the same permutation of the dataset for a given ``(seed, epoch)`` (whatever the
number of ranks) and take interleaved, disjoint, equal-length slices of it. After a restart,
``set_epoch(epoch, start)`` skips the first ``start`` indices of this rank's slice, so training
continues with exactly the items it would have seen next.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from speakerlab.errors import ConfigError


class DistributedResumableSampler(Sampler[int]):
    """Indices of one rank for the current epoch, from position ``start`` on."""

    def __init__(
        self,
        dataset_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
    ):
        if dataset_size <= 0:
            raise ConfigError(f"cannot sample from an empty dataset (size {dataset_size})")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ConfigError(f"rank {rank} is not in [0, {num_replicas})")
        if drop_last and dataset_size < num_replicas:
            raise ConfigError(
                f"dataset of {dataset_size} items is smaller than the {num_replicas} ranks"
            )
        self.dataset_size = dataset_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        # drop_last: leave out the tail; otherwise repeat the head to fill the last round.
        if drop_last:
            self.num_samples = dataset_size // num_replicas
        else:
            self.num_samples = -(-dataset_size // num_replicas)
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch; skip the first ``start`` of this rank's indices (mid-epoch resume)."""
        if not 0 <= start <= self.num_samples:
            raise ConfigError(
                f"resume position {start} is outside this rank's "
                f"{self.num_samples} samples per epoch"
            )
        self.epoch = epoch
        self.start = start

    def epoch_indices(self) -> list[int]:
        """All of this rank's indices of the current epoch (ignoring ``start``)."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.dataset_size, generator=generator)
        else:
            order = torch.arange(self.dataset_size)
        total = self.num_samples * self.num_replicas
        if total > self.dataset_size:
            order = order.repeat(-(-total // self.dataset_size))[:total]
        return order[self.rank : total : self.num_replicas].tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices()[self.start :])

    def __len__(self) -> int:
        """Indices left in this epoch after ``start``."""
        return self.num_samples - self.start
