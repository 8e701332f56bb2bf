"""Training checkpoints: what they hold, how they are written, pruned, validated and restored.

A checkpoint is a ``torch.save`` of plain containers, tensors, numbers and strings only, so it loads
with ``torch.load(weights_only=True)``. Its keys (:func:`training_state`):

``model`` (embedding-model state_dict, no ``module.`` prefix), ``model_name``, ``model_kwargs``,
``classifier``, ``optimizer``, ``scaler`` (fp16 only), ``epoch`` and ``step`` (the position: the
next optimizer step is step ``step`` of epoch ``epoch``, both from 0), ``global_step``, ``layout``
(processes, micro-batch, accumulation steps, global batch), ``data`` (items, content digest and
seed of the training index), ``rank_states`` (one per rank: random-number generator states and the
running epoch statistics ``[loss_sum, correct, count, skipped]``), ``lr_factor`` (the factor set
with ``optim.lr_factor``), ``lr_schedule`` (peak and final learning rate after batch scaling),
``history`` (per-epoch summaries), ``config`` (the merged config) and ``format_version``.

Files are named ``ckpt_<global step, 9 digits>.pt`` so that the newest sorts last. A save writes a
temporary file in the same folder, flushes it to disk and renames it over the final name, so a
kill at any moment leaves either the old set of checkpoints or the new one, never a torn file; a
state holding a NaN or infinite tensor is refused before anything is written. A file that cannot
be resumed from is moved aside as ``<name>.corrupt`` with a warning; pruning counts only files the
run wrote or read back, so the newest good checkpoint is never deleted.

Resuming checks that the run would continue as it started (:func:`resume_conflicts`): the same
model, classifier width, training data, seed and global batch. The number of processes may
change when the global batch stays (see :mod:`speakerlab.training.batching`).
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from speakerlab.errors import CheckpointError
from speakerlab.fileio import atomic_write, temporary_files
from speakerlab.models.checkpoint import read_checkpoint
from speakerlab.training.batching import BatchLayout
from speakerlab.training.builders import full_model_kwargs

CHECKPOINT_DIR = "checkpoints"
FORMAT_VERSION = 2
CORRUPT_SUFFIX = ".corrupt"
_NAME = re.compile(r"^ckpt_(\d{9})\.pt$")
_TRAINING_KEYS = {"model", "classifier", "optimizer", "epoch", "step", "rank_states"}

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- files


def checkpoint_dir(exp_dir: str | Path) -> Path:
    """Folder holding an experiment's training checkpoints."""
    return Path(exp_dir) / CHECKPOINT_DIR


def checkpoint_path(directory: str | Path, global_step: int) -> Path:
    """File name of the checkpoint taken after ``global_step`` iterations."""
    return Path(directory) / f"ckpt_{global_step:09d}.pt"


def checkpoint_step(path: Path) -> int:
    """The global step in a checkpoint's file name."""
    return int(_NAME.match(path.name).group(1))


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints in ``directory``, oldest first (temporary files are ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted((p for p in directory.iterdir() if _NAME.match(p.name)), key=checkpoint_step)


def first_nonfinite(state: Any, prefix: str = "") -> str | None:
    """The key path of the first floating-point tensor in ``state`` holding NaN or inf."""
    if isinstance(state, torch.Tensor):
        bad = state.is_floating_point() and not bool(torch.isfinite(state).all())
        return (prefix or "<tensor>") if bad else None
    if isinstance(state, dict):
        items = state.items()
    elif isinstance(state, (list, tuple)):
        items = enumerate(state)
    else:
        return None
    for key, value in items:
        found = first_nonfinite(value, f"{prefix}.{key}" if prefix else str(key))
        if found is not None:
            return found
    return None


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` to ``path`` atomically: a kill during the save leaves ``path`` as it was.
    A state holding a non-finite tensor is refused (CheckpointError naming it)."""
    bad = first_nonfinite(state)
    if bad is not None:
        raise CheckpointError(
            f"refusing to write {path}: {bad} holds NaN or infinite values (the checkpoints "
            "already written are untouched)"
        )
    with atomic_write(path, "wb") as handle:
        torch.save(state, handle)


def move_aside(path: Path, reason: str) -> Path:
    """Rename an unusable checkpoint to ``<name>.corrupt`` (numbered if taken), with a warning."""
    target = path.with_name(path.name + CORRUPT_SUFFIX)
    number = 1
    while target.exists():
        target = path.with_name(f"{path.name}{CORRUPT_SUFFIX}.{number}")
        number += 1
    path.rename(target)
    log.warning("%s cannot be resumed from (%s); moved aside to %s", path, reason, target.name)
    return target


def prune_checkpoints(
    directory: str | Path, keep_last: int, known_good: Iterable[Path]
) -> list[Path]:
    """Keep the newest ``keep_last`` of the checkpoints in ``known_good`` (written or read back
    by this run) and delete the files older than the oldest of those kept; files of unknown
    state that are newer are left alone. Stale temporary files of killed saves are removed."""
    directory = Path(directory)
    for stale in temporary_files(directory):  # left by a killed save (rank 0 is the only writer)
        stale.unlink(missing_ok=True)
    present = list_checkpoints(directory)
    good = sorted({p for p in known_good if p in present}, key=checkpoint_step)
    if keep_last < 1 or not good:
        return []
    oldest_kept = checkpoint_step(good[-keep_last:][0])
    doomed = [p for p in present if checkpoint_step(p) < oldest_kept]
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a training checkpoint (``weights_only``: tensors and plain containers only)."""
    return read_checkpoint(path)


def is_training_checkpoint(state: dict[str, Any]) -> bool:
    """Whether ``state`` is a full speakerlab training checkpoint (resumable)."""
    return _TRAINING_KEYS <= state.keys()


def load_latest_checkpoint(
    directory: str | Path, move_bad_aside: bool = True
) -> tuple[Path, dict[str, Any]] | None:
    """The newest resumable checkpoint in ``directory``, or None if there is none.

    A newer file that cannot be read (damaged outside our atomic writes, e.g. a full disk) or
    holds no full training state is moved aside (``move_bad_aside``: only one process of a job
    may do so) or else skipped, with a warning, in favour of the one before it.
    """
    for path in reversed(list_checkpoints(directory)):
        try:
            state = load_checkpoint(path)
            reason = None if is_training_checkpoint(state) else "not a full training checkpoint"
        except CheckpointError as err:
            reason = str(err).removeprefix(f"{path}: ")
        if reason is None:
            return path, state
        if move_bad_aside:
            move_aside(path, reason)
        else:
            log.warning("skipping %s: %s", path, reason)
    return None


# ----------------------------------------------------------------------------- random states


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


# ----------------------------------------------------------------------------- content


@dataclass(frozen=True)
class RunIdentity:
    """What a run must keep to be resumed: model, classifier width, data, seed, global batch."""

    model_name: str
    model_kwargs: dict[str, Any]  # complete (constructor defaults filled in)
    classifier_width: int
    data_items: int
    data_digest: str
    seed: int
    layout: BatchLayout

    def data_record(self) -> dict[str, Any]:
        return {"items": self.data_items, "digest": self.data_digest, "seed": self.seed}


def data_digest(utts: list[str], speaker_ids: np.ndarray, num_samples: np.ndarray) -> str:
    """Content digest of a training index: its utterances, speakers and lengths (not the audio
    paths, so that moving the corpus keeps a run resumable)."""
    digest = hashlib.sha256("\n".join(utts).encode())
    digest.update(np.asarray(speaker_ids, dtype=np.int64).tobytes())
    digest.update(np.asarray(num_samples, dtype=np.int64).tobytes())
    return digest.hexdigest()


def training_state(
    identity: RunIdentity,
    *,
    model: torch.nn.Module,
    classifier: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    position: tuple[int, int, int],
    rank_states: list[dict[str, Any]],
    lr_factor: float,
    lr_schedule: dict[str, float],
    history: list[dict[str, float]],
    config: dict[str, Any],
) -> dict[str, Any]:
    """The checkpoint of a run at ``position`` = (epoch, step, global_step)."""
    epoch, step, global_step = position
    return {
        "format_version": FORMAT_VERSION,
        "model": model.state_dict(),
        "model_name": identity.model_name,
        "model_kwargs": dict(identity.model_kwargs),
        "classifier": classifier.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch,
        "step": step,
        "global_step": global_step,
        "layout": identity.layout.as_dict(),
        "data": identity.data_record(),
        "rank_states": [_cpu_tensors(state) for state in rank_states],
        "lr_factor": float(lr_factor),
        "lr_schedule": dict(lr_schedule),
        "history": list(history),
        "config": config,
    }


def saved_layout(state: dict[str, Any]) -> BatchLayout:
    """The batch layout a checkpoint was written with (format 1 had no accumulation)."""
    if "layout" in state:
        layout = state["layout"]
        return BatchLayout(layout["world_size"], layout["micro_batch"], layout["accumulate_steps"])
    sampler = state["sampler"]
    return BatchLayout(sampler["world_size"], sampler["local_batch"], 1)


def resume_conflicts(state: dict[str, Any], current: RunIdentity) -> list[str]:
    """What differs between the run saved in ``state`` and the configuration ``current``, one
    line each naming both sides (empty: the run can continue)."""
    conflicts = []
    name, kwargs = state.get("model_name"), state.get("model_kwargs") or {}
    if name != current.model_name or full_model_kwargs(name, kwargs) != current.model_kwargs:
        conflicts.append(
            f"model: the run trains {name} {_kwargs(kwargs)}, this configuration builds "
            f"{current.model_name} {_kwargs(current.model_kwargs)}"
        )
    width = int(state["classifier"]["weight"].shape[0])
    if width != current.classifier_width:
        conflicts.append(
            f"classifier: the run has {width} classes, this configuration needs "
            f"{current.classifier_width} (the data or loss.num_classes changed)"
        )
    data = state.get("data") or {
        "items": state["sampler"]["dataset_size"],
        "seed": state["sampler"]["seed"],
    }
    if data["items"] != current.data_items or data.get("digest", current.data_digest) != (
        current.data_digest
    ):
        same_size = data["items"] == current.data_items
        conflicts.append(
            f"training data: the run started on {data['items']} index rows, the index now has "
            f"{current.data_items}" + (" with other utterances" if same_size else "")
        )
    if data["seed"] != current.seed:
        conflicts.append(f"seed: the run uses {data['seed']}, this configuration {current.seed}")
    layout = saved_layout(state)
    if layout.global_batch != current.layout.global_batch:
        conflicts.append(
            f"global batch: the run takes {layout.describe()} per step, this configuration "
            f"{current.layout.describe()} (trainer.batch_size; keep it and use "
            "trainer.accumulate_steps to fit fewer processes)"
        )
    return conflicts


def check_resumable(path: Path, state: dict[str, Any], current: RunIdentity) -> None:
    """Raise one CheckpointError listing every :func:`resume_conflicts` of ``state``."""
    conflicts = resume_conflicts(state, current)
    if conflicts:
        lines = "\n".join(f"  {line}" for line in conflicts)
        raise CheckpointError(
            f"{path}: this configuration would not continue the run saved there:\n{lines}\n"
            "Resume with the configuration the run started with (its config.yaml), or start a "
            "new run in another exp_dir (trainer.init_from=... starts from its weights)"
        )


def _kwargs(kwargs: dict[str, Any]) -> str:
    return "(" + ", ".join(f"{k}={v}" for k, v in sorted(kwargs.items())) + ")"


def _cpu_tensors(state: Any) -> Any:
    """``state`` with every tensor on the CPU (gathered RNG states may arrive on a GPU)."""
    if isinstance(state, torch.Tensor):
        return state.cpu()
    if isinstance(state, dict):
        return {k: _cpu_tensors(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_cpu_tensors(v) for v in state)
    return state
