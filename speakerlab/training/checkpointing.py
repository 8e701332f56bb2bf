"""Training checkpoints: atomic files in ``<exp_dir>/checkpoints``, the newest K kept.

A checkpoint is a ``torch.save`` of plain containers, tensors, numbers and strings only, so it loads
with ``torch.load(weights_only=True)``. Its keys (written by the trainer):

``model`` (embedding-model state_dict, no ``module.`` prefix), ``model_name``, ``model_kwargs``,
``classifier``, ``optimizer``, ``scaler`` (fp16 only), ``epoch`` and ``step`` (the position: the
next batch to train is batch ``step`` of epoch ``epoch``, both from 0), ``global_step``,
``sampler`` (epoch, start index, local batch, world size, dataset size, seed), ``rank_states``
(one per rank: random number generator states and the running epoch statistics),
``history`` (per-epoch summaries), ``config`` (the merged config) and ``format_version``.

Files are named ``ckpt_<global step, 9 digits>.pt`` so that the newest sorts last. A save writes a
temporary file in the same folder, flushes it to disk and renames it over the final name, so a
kill at any moment leaves either the old set of checkpoints or the new one, never a torn file.
"""

from __future__ import annotations

import logging
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from speakerlab.errors import CheckpointError
from speakerlab.fileio import atomic_write, temporary_files
from speakerlab.models.checkpoint import read_checkpoint

CHECKPOINT_DIR = "checkpoints"
FORMAT_VERSION = 1
_NAME = re.compile(r"^ckpt_(\d{9})\.pt$")

log = logging.getLogger(__name__)


def checkpoint_dir(exp_dir: str | Path) -> Path:
    """Folder holding an experiment's training checkpoints."""
    return Path(exp_dir) / CHECKPOINT_DIR


def checkpoint_path(directory: str | Path, global_step: int) -> Path:
    """File name of the checkpoint taken after ``global_step`` iterations."""
    return Path(directory) / f"ckpt_{global_step:09d}.pt"


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints in ``directory``, oldest first (temporary files are ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` to ``path`` atomically: a kill during the save leaves ``path`` as it was."""
    with atomic_write(path, "wb") as handle:
        torch.save(state, handle)


def prune_checkpoints(directory: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints (and stale temporary files)."""
    directory = Path(directory)
    for stale in temporary_files(directory):  # left by a killed save (rank 0 is the only writer)
        stale.unlink(missing_ok=True)
    checkpoints = list_checkpoints(directory)
    doomed = checkpoints[:-keep_last] if keep_last > 0 else []
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a training checkpoint (``weights_only``: tensors and plain containers only)."""
    return read_checkpoint(path)


def is_training_checkpoint(state: dict[str, Any]) -> bool:
    """Whether ``state`` is a full speakerlab training checkpoint (resumable)."""
    return {"model", "classifier", "optimizer", "epoch", "step", "rank_states"} <= state.keys()


def load_latest_checkpoint(directory: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest readable training checkpoint in ``directory``, or None if there is none.

    A file that cannot be read (damaged outside our atomic writes, e.g. a full disk) is reported
    and skipped in favour of the one before it.
    """
    for path in reversed(list_checkpoints(directory)):
        try:
            state = load_checkpoint(path)
        except CheckpointError as err:
            log.warning("skipping unreadable checkpoint: %s", err)
            continue
        if not is_training_checkpoint(state):
            log.warning("skipping %s: not a full training checkpoint", path)
            continue
        return path, state
    return None


def capture_rng_state(device: torch.device) -> dict[str, Any]:
    """This process's random-number generator states as tensors and plain values."""
    numpy_state = np.random.get_state()
    version, python_state, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
            "pos": int(numpy_state[2]),
            "has_gauss": int(numpy_state[3]),
            "cached_gaussian": float(numpy_state[4]),
        },
        "python": {
            "version": version,
            "state": torch.tensor(python_state, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Set the generators back to a state from :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    python_state = state["python"]
    random.setstate(
        (python_state["version"], tuple(python_state["state"].tolist()), python_state["gauss_next"])
    )
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
