"""Averaging the embedding-model weights of the last epoch-end checkpoints of a run.

WeSpeaker exports the average of its last 10 epochs; the 3D-Speaker recipes export the last
checkpoint. ``speakerlab export --average N`` (and ``trainer.export_average``, which stage 4 of the
recipes uses through that command) does the former:

- **which checkpoints**: the newest N taken at the end of an epoch (``step == 0``), so a
  mid-epoch save (``trainer.save_every_minutes``) never enters an average. The run must keep
  them: ``trainer.keep_last`` must be at least N (:func:`check_retention`).
- **what is averaged**: every floating-point tensor of the embedding model, parameters and
  batch-norm running statistics alike, as a mean in float64 stored in the tensor's own dtype.
- **integer tensors** (``num_batches_tracked``, the only ones in our models) are counters, not
  estimates: the average takes the newest checkpoint's value, as if the averaged model had
  trained as long as the newest one.
- **checks**: all checkpoints must hold the same architecture (model name and constructor
  arguments) and the same tensor names, shapes and dtypes; one error lists every mismatch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from speakerlab.errors import CheckpointError, ConfigError
from speakerlab.models.checkpoint import strip_ddp_prefix
from speakerlab.training.checkpointing import (
    checkpoint_dir,
    is_training_checkpoint,
    list_checkpoints,
    load_checkpoint,
)

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]
_MAX_LISTED = 12


@dataclass
class AveragedModel:
    """The averaged embedding-model weights and where they came from."""

    state: StateDict
    model_name: str
    model_kwargs: dict[str, Any]
    sources: list[Path]  # oldest first
    epochs: list[int]  # the epoch each source ended (1-based), oldest first


def check_retention(keep_last: int, export_average: int) -> None:
    """Refuse a run that would prune checkpoints its export needs to average."""
    if export_average < 1:
        raise ConfigError(f"trainer.export_average={export_average} must be at least 1")
    if keep_last < export_average:
        raise ConfigError(
            f"trainer.export_average={export_average} averages the last {export_average} "
            f"epoch-end checkpoints but trainer.keep_last={keep_last} keeps only {keep_last}; "
            f"set trainer.keep_last={export_average} (or more)"
        )


def is_epoch_end(state: dict[str, Any]) -> bool:
    """Whether a training checkpoint was taken at the end of an epoch."""
    return is_training_checkpoint(state) and int(state["step"]) == 0 and int(state["epoch"]) >= 1


def last_epoch_end_checkpoints(source: str | Path, count: int) -> list[tuple[Path, dict[str, Any]]]:
    """The newest ``count`` epoch-end checkpoints of an experiment folder (or of the folder of a
    checkpoint file, up to and including that file), oldest first, with their embedding model
    (``model``, ``model_name``, ``model_kwargs``) and ``epoch``."""
    source = Path(source)
    if source.is_dir():
        folder = checkpoint_dir(source) if list_checkpoints(checkpoint_dir(source)) else source
        candidates = list_checkpoints(folder)
    elif source.is_file():
        folder = source.parent
        candidates = [p for p in list_checkpoints(folder) if p.name <= source.name]
        if source not in candidates:
            raise CheckpointError(f"{source}: averaging needs a training checkpoint (ckpt_*.pt)")
    else:
        raise CheckpointError(f"{source}: no such checkpoint file or experiment folder")
    chosen: list[tuple[Path, dict[str, Any]]] = []
    for path in reversed(candidates):
        state = load_checkpoint(path)  # an unreadable file might be one we need: stop, say so
        if is_epoch_end(state):  # keep what averaging needs, not the optimizer state
            kept = {k: state[k] for k in ("model_name", "model_kwargs", "epoch")}
            chosen.append((path, {**kept, "model": strip_ddp_prefix(state["model"])}))
            if len(chosen) == count:
                return chosen[::-1]
    raise CheckpointError(
        f"{folder}: averaging {count} checkpoints needs {count} taken at the end of an epoch, "
        f"found {len(chosen)}; train with trainer.keep_last >= {count} (and enough epochs), or "
        "average fewer"
    )


def average_states(states: Sequence[StateDict], sources: Sequence[str | Path]) -> StateDict:
    """Mean of each floating tensor over ``states``; integer tensors from the last state.

    All states must have the same names, shapes and dtypes: one :class:`CheckpointError` lists
    every difference from the first state.
    """
    if not states:
        raise ValueError("nothing to average")
    first, problems = states[0], []
    for state, source in zip(states[1:], sources[1:]):
        missing = [k for k in first if k not in state]
        unexpected = [k for k in state if k not in first]
        differing = [
            f"{k} {tuple(state[k].shape)} {state[k].dtype} vs {tuple(v.shape)} {v.dtype}"
            for k, v in first.items()
            if k in state and (state[k].shape != v.shape or state[k].dtype != v.dtype)
        ]
        for title, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape/dtype", differing),
        ):
            if items:
                problems.append(f"  {source}: {title} ({len(items)}): {_listing(items)}")
    if problems:
        raise CheckpointError(
            f"cannot average: the weights differ from {sources[0]}\n" + "\n".join(problems)
        )
    averaged: StateDict = {}
    for key, tensor in first.items():
        if tensor.is_floating_point():
            total = torch.stack([state[key].to(torch.float64) for state in states]).mean(dim=0)
            averaged[key] = total.to(tensor.dtype)
        else:
            averaged[key] = states[-1][key].clone()
    return averaged


def average_checkpoints(source: str | Path, count: int) -> AveragedModel:
    """Average the embedding models of the last ``count`` epoch-end checkpoints of ``source``
    (an experiment folder, or a checkpoint file: that one and the ones before it)."""
    if count < 1:
        raise ConfigError(f"--average {count}: must be at least 1")
    chosen = last_epoch_end_checkpoints(source, count)
    paths = [path for path, _ in chosen]
    specs = {(state["model_name"], repr(state["model_kwargs"])) for _, state in chosen}
    if len(specs) > 1:
        listed = "; ".join(
            f"{path.name}: {state['model_name']} {state['model_kwargs']}" for path, state in chosen
        )
        raise CheckpointError(f"cannot average checkpoints of different models: {listed}")
    _, newest = chosen[-1]
    state = average_states([s["model"] for _, s in chosen], paths)
    log.info("averaged %d epoch-end checkpoints: %s", count, ", ".join(p.name for p in paths))
    return AveragedModel(
        state=state,
        model_name=newest["model_name"],
        model_kwargs=dict(newest["model_kwargs"]),
        sources=paths,
        epochs=[int(s["epoch"]) for _, s in chosen],
    )


def _listing(items: list[str]) -> str:
    more = f" ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return ", ".join(items[:_MAX_LISTED]) + more
