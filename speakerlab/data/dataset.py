"""The on-the-fly training dataset: crop, speed perturbation, augmentation, fbank.

Item ``i`` of epoch ``e`` is a random ``crop_seconds`` crop of index row ``i`` (zero-padded if
the file is shorter), played at a random speed from ``speeds`` (speed ``k > 0`` of speaker ``s``
is the class ``s + k * num_speakers``), augmented with probability ``augment_prob``, turned into
mean-normalised Kaldi fbank. Every random choice comes from a generator seeded with
``(seed, epoch, i)``, so an item is the same whichever worker or rank makes it.

The epoch lives in shared memory: :meth:`TrainDataset.set_epoch` in the main process reaches
DataLoader workers, persistent ones included, as long as it is called before the epoch's iterator
is created.

An item whose audio fails to load does not stop training: the failure is logged once per file
and a substitute row, drawn from the same seeded generator, takes its place.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from torch.utils.data import Dataset

from speakerlab.audio import SAMPLE_RATE
from speakerlab.data.augment import Augmenter
from speakerlab.data.index import TrainIndex, load_train_index
from speakerlab.data.speed_perturb import SpeedPerturbation
from speakerlab.errors import AudioError, ConfigError
from speakerlab.features import KaldiFbank

logger = logging.getLogger(__name__)

MAX_SUBSTITUTES = 10  # rows tried in place of one that fails before giving up


def init_data_worker(worker_id: int = 0) -> None:
    """Set up a training DataLoader worker (its ``worker_init_fn``): one compute thread, and the
    objects inherited from the training process frozen out of the garbage collector.

    A forked worker shares the training process's memory until it writes to a page. A full
    collection writes to every object the collector tracks (tens of MB of pages once torch is
    imported) and so would copy them all into each worker; frozen, they are never visited.
    """
    gc.freeze()
    limit_worker_threads(worker_id)


def limit_worker_threads(worker_id: int = 0) -> None:
    """One compute thread per data worker.

    The DataLoader limits torch in its workers, not numpy's BLAS, which would otherwise start a
    thread per core in every worker for the resampler's matrix products: on a machine whose cores
    the workers and the training process already share, that only adds contention.
    """
    torch.set_num_threads(1)
    threadpool_limits(limits=1, user_api="blas")


class TrainDataset(Dataset):
    """``dataset[i] -> (fbank float32 (frames, num_mel_bins), class label)``."""

    def __init__(
        self,
        index: TrainIndex,
        *,
        crop_seconds: float = 3.0,
        speeds: tuple[float, ...] = (1.0, 0.9, 1.1),
        augment_prob: float = 0.8,
        noise_list: str | Path | None = None,
        rir_list: str | Path | None = None,
        snr_db: tuple[float, float] = (0.0, 15.0),
        num_mel_bins: int = 80,
        seed: int = 0,
    ):
        speeds = tuple(float(s) for s in speeds)
        if crop_seconds <= 0:
            raise ConfigError(f"data.crop_seconds must be positive, got {crop_seconds}")
        if not speeds or any(s <= 0 for s in speeds) or len(set(speeds)) != len(speeds):
            raise ConfigError(f"data.speeds must be distinct positive factors, got {list(speeds)}")
        if num_mel_bins <= 0:
            raise ConfigError(f"data.num_mel_bins must be positive, got {num_mel_bins}")
        self.index = index
        self.crop_samples = int(round(crop_seconds * SAMPLE_RATE))
        self.speeds = speeds
        self.speed_perturbation = SpeedPerturbation(speeds)
        self.augmenter = Augmenter(noise_list, rir_list, snr_db, augment_prob)
        self.fbank = KaldiFbank(num_mel_bins)
        self.seed = int(seed)
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._reported: set[str] = set()

    @property
    def num_speakers(self) -> int:
        return self.index.num_speakers

    @property
    def num_classes(self) -> int:
        """Classifier width: each extra speed makes a new speaker of every speaker."""
        return self.num_speakers * len(self.speeds)

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    def set_epoch(self, epoch: int) -> None:
        self._epoch[0] = int(epoch)

    def __len__(self) -> int:
        return len(self.index)

    def item_rng(self, index: int, attempt: int = 0) -> np.random.Generator:
        """Generator behind item ``index`` of the current epoch (``attempt`` > 0: substitutes)."""
        return np.random.default_rng([self.seed, self.epoch, int(index), attempt])

    def waveform(self, row: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        """The crop of ``row`` at a random speed, augmented: (float32 samples, speed position)."""
        speed_pos = int(rng.integers(len(self.speeds))) if len(self.speeds) > 1 else 0
        speed = self.speeds[speed_pos]
        num_samples = int(self.index.num_samples[row])
        total = self.speed_perturbation.perturbed_length(num_samples, speed)
        start = (
            int(rng.integers(0, total - self.crop_samples + 1)) if total > self.crop_samples else 0
        )
        wav = self.speed_perturbation.read_crop(
            self.index.paths[row], num_samples, speed, start, self.crop_samples
        )
        return self.augmenter(wav, rng), speed_pos

    def example(self, row: int, rng: np.random.Generator) -> tuple[torch.Tensor, int]:
        """Features and label of ``row`` with the random choices of ``rng``."""
        wav, speed_pos = self.waveform(row, rng)
        label = int(self.index.speaker_ids[row]) + speed_pos * self.num_speakers
        return self.fbank(torch.from_numpy(wav)), label

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        row, last_error = int(index), None
        for attempt in range(MAX_SUBSTITUTES + 1):
            rng = self.item_rng(index, attempt)
            if attempt:
                row = int(rng.integers(len(self)))
            try:
                return self.example(row, rng)
            except AudioError as err:
                last_error = err
                self._report(row, err)
        raise AudioError(
            f"training item {index}: it and {MAX_SUBSTITUTES} substitutes failed to "
            f"load; last error: {last_error}"
        )

    def _report(self, row: int, err: AudioError) -> None:
        path = self.index.paths[row]
        if path not in self._reported:
            self._reported.add(path)
            logger.warning(
                "training item from %s (utterance %s) failed, using another item instead: %s",
                path,
                self.index.utts[row],
                err,
            )


def build_train_dataset(
    data_cfg: Mapping[str, Any], index_path: str | Path, seed: int = 0
) -> TrainDataset:
    """A :class:`TrainDataset` from the Hydra ``data`` group (see conf/data/default.yaml)."""

    def optional_path(key: str) -> str | None:
        value = data_cfg[key]
        return None if value in (None, "") else str(value)

    return TrainDataset(
        load_train_index(index_path),
        crop_seconds=float(data_cfg["crop_seconds"]),
        speeds=tuple(float(s) for s in data_cfg["speeds"]),
        augment_prob=float(data_cfg["augment_prob"]),
        noise_list=optional_path("noise_list"),
        rir_list=optional_path("rir_list"),
        snr_db=tuple(float(v) for v in data_cfg["snr_db"]),
        num_mel_bins=int(data_cfg["num_mel_bins"]),
        seed=seed,
    )
