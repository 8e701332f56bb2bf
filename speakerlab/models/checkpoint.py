"""Checkpoint files: the one reader of them all, and embedding-model weights in and out.

Every checkpoint is read by :func:`read_checkpoint` with ``torch.load(weights_only=True)``, so
that a file can never run code on the user's machine. Accepted embedding-model inputs:

- a released 3D-Speaker checkpoint: a plain ``state_dict`` (with or without
  ``num_batches_tracked``);
- a DDP ``state_dict`` whose keys start with ``module.``;
- a speakerlab training checkpoint: a dict with ``model`` (the embedding model's state_dict),
  ``model_name`` and ``model_kwargs`` (and training state that is ignored here).

When the architecture is not recorded in the file it is inferred from the key names and shapes
(each model module's :class:`~speakerlab.models.ModelSpec` says how), so
``load_embedding_model("eres2net_base_model.ckpt")`` needs no further arguments. Weights that are
not finite are refused on load and never written.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from speakerlab.errors import CheckpointError
from speakerlab.fileio import atomic_write
from speakerlab.models import build_model, model_specs

StateDict = dict[str, torch.Tensor]

_DDP_PREFIX = "module."
_MAX_LISTED = 12
# How torch's weights-only unpickler names an object it refused. Its wording changes between
# releases (torch 2.11: "Unsupported global: GLOBAL m.C was not an allowed global by default",
# "Trying to load unsupported GLOBAL posix.system whose module posix is blocked", "... but got
# <class 'm.C'>"), so only the pickle opcode name GLOBAL or a class repr is relied on, and a
# quote around the name is tolerated.
_REFUSED_OBJECT_PATTERNS = (
    re.compile(r"\bGLOBAL\s+[`'\"]?([\w.]+)"),
    re.compile(r"<class '([\w.]+)'>"),
)
# Words torch uses when it refuses an object without naming it in a form matched above.
_REFUSAL_HINT = re.compile(r"safe_globals|allowlist|not an allowed global", re.IGNORECASE)
_REASON_CHARS = 200


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The dict saved in the checkpoint file ``path`` (tensors and plain containers only).

    Every failure is a one-line :class:`CheckpointError` naming the file: not found, a folder,
    unreadable, empty, not a PyTorch checkpoint, holding pickled code (the refused class named),
    or not a dict.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file")
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        if path.stat().st_size == 0:
            raise CheckpointError(f"{path}: empty file, not a checkpoint")
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read the file ({err.strerror or err})") from None
    except pickle.UnpicklingError as err:
        raise _load_error(path, err) from None
    except Exception as err:  # torch raises many types for a damaged or foreign file
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint ({_reason(err)})"
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a checkpoint (it holds a {type(obj).__name__})")
    return obj


def _exception_chain(err: BaseException) -> Iterator[BaseException]:
    """``err`` and the exceptions it was raised from or while handling (torch re-raises the
    unpickler's own error with a longer message, ``from None``)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _load_error(path: Path, err: pickle.UnpicklingError) -> CheckpointError:
    """The error for a file the weights-only unpickler stopped on: a refused object (named when
    torch names it) or a file that is not a pickle at all."""
    messages = [str(e) for e in _exception_chain(err)]
    name = _refused_object(messages)
    if name is not None:
        what = f"a pickled {name}"
    elif any(_REFUSAL_HINT.search(message) for message in messages):
        what = "a pickled Python object other than tensors and plain containers"
    else:
        return CheckpointError(f"{path}: not a readable PyTorch checkpoint ({_reason(err)})")
    return CheckpointError(
        f"{path}: refused to load pickled objects: the file holds {what}, and loading it could "
        "run code; a checkpoint must hold only tensors and plain containers"
    )


def _refused_object(messages: list[str]) -> str | None:
    """The name of the object torch refused, as its messages give it, or None."""
    for pattern in _REFUSED_OBJECT_PATTERNS:
        for message in messages:
            found = pattern.search(message)
            if found:
                return found.group(1)
    return None


def _reason(err: BaseException) -> str:
    """The innermost error's type and first line, for a one-line message."""
    innermost = list(_exception_chain(err))[-1]
    lines = str(innermost).strip().splitlines()
    text = f"{type(innermost).__name__}: {lines[0]}" if lines else type(innermost).__name__
    return text[:_REASON_CHARS]


def model_state_of(
    checkpoint: Mapping[str, Any], source: str | Path = "checkpoint"
) -> tuple[StateDict, str | None, dict[str, Any] | None]:
    """The embedding-model weights in a checkpoint read by :func:`read_checkpoint`.

    Returns ``(state_dict, model_name, model_kwargs)``; the name and kwargs are ``None`` unless
    the checkpoint records them (speakerlab training checkpoints do). A ``module.`` prefix is
    removed.
    """
    name = kwargs = None
    if isinstance(checkpoint.get("model"), dict):
        state = checkpoint["model"]
        name, kwargs = checkpoint.get("model_name"), checkpoint.get("model_kwargs")
    elif isinstance(checkpoint.get("state_dict"), dict):
        state = checkpoint["state_dict"]
    elif checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        state = checkpoint
    else:
        raise CheckpointError(
            f"{source}: no model weights found (top level: {list(checkpoint)[:_MAX_LISTED]})"
        )
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(
            f"{source}: model weights hold entries that are not tensors: "
            + ", ".join(map(str, not_tensors[:_MAX_LISTED]))
        )
    if not isinstance(name, (str, type(None))) or not isinstance(kwargs, (dict, type(None))):
        raise CheckpointError(f"{source}: model_name must be a string and model_kwargs a dict")
    return strip_ddp_prefix(state), name, None if kwargs is None else dict(kwargs)


def read_model_state(path: str | Path) -> tuple[StateDict, str | None, dict[str, Any] | None]:
    """Read the embedding-model weights in ``path``: :func:`model_state_of` its checkpoint."""
    return model_state_of(read_checkpoint(path), path)


def strip_ddp_prefix(state: StateDict) -> StateDict:
    """Remove the ``module.`` prefix that DistributedDataParallel adds to every key."""
    if state and all(k.startswith(_DDP_PREFIX) for k in state):
        return {k[len(_DDP_PREFIX) :]: v for k, v in state.items()}
    return state


def infer_architecture(
    state: Mapping[str, torch.Tensor], source: str | Path = "weights"
) -> tuple[str, dict[str, Any]]:
    """Model name and constructor kwargs that produce the keys and shapes of ``state``."""
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    matches = [spec for spec in model_specs() if spec.signature_key in shapes]
    if not matches:
        raise CheckpointError(
            f"{source}: cannot tell the architecture from the weights (first keys: "
            f"{list(shapes)[:5]}); pass the model name and its arguments"
        )
    if len(matches) > 1:
        names = ", ".join(spec.name for spec in matches)
        raise CheckpointError(
            f"{source}: the weights look like several architectures ({names}); "
            "pass the model name and its arguments"
        )
    spec = matches[0]
    try:
        return spec.name, spec.kwargs_from_shapes(shapes)
    except KeyError as err:
        raise CheckpointError(
            f"{source}: the weights look like {spec.name} but key {err} is missing"
        ) from None
    except (ValueError, IndexError) as err:
        raise CheckpointError(
            f"{source}: the weights look like {spec.name} but do not fit it ({err})"
        ) from None


def check_finite(tensors: Mapping[str, torch.Tensor], source: str | Path = "weights") -> None:
    """Raise a :class:`CheckpointError` naming the first floating-point tensor that holds NaN or
    infinity."""
    floating = [key for key, tensor in tensors.items() if tensor.is_floating_point()]
    if not floating:
        return
    # NaN and infinity propagate into a sum, so one sum per tensor clears the finite ones an order
    # of magnitude faster than isfinite(); a sum that overflowed is re-checked element by element.
    sums = torch.stack([tensors[key].sum().float() for key in floating])
    suspects = [key for key, ok in zip(floating, torch.isfinite(sums).tolist()) if not ok]
    bad = [key for key in suspects if not torch.isfinite(tensors[key]).all()]
    if bad:
        raise CheckpointError(
            f"{source}: the weights are not finite: {bad[0]} holds NaN or infinite values "
            f"({len(bad)} of {len(tensors)} tensors do)"
        )


def load_state_into(model: nn.Module, state: StateDict, source: str | Path = "weights") -> None:
    """Load ``state`` into ``model`` strictly, or raise one :class:`CheckpointError` that lists the
    missing, unexpected and shape-mismatched keys, or names the first tensor that is not finite.
    Missing ``num_batches_tracked`` counters (older checkpoints do not store them) are taken from
    the model."""
    expected = model.state_dict()
    state = dict(state)
    for key, value in expected.items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = value
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = [f"{source}: weights do not fit {type(model).__name__}"]
        for title, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape mismatch", mismatched),
        ):
            if items:
                more = (
                    f" ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
                )
                parts.append(f"  {title} ({len(items)}): " + ", ".join(items[:_MAX_LISTED]) + more)
        raise CheckpointError("\n".join(parts))
    check_finite(state, source)
    model.load_state_dict(state, strict=True)


def load_embedding_model(
    path: str | Path, name: str | None = None, **model_kwargs: Any
) -> nn.Module:
    """Build the embedding model stored in ``path`` and load its weights; returned in eval mode.

    The architecture comes from ``name``/``model_kwargs`` when given, else from the file's own
    record (training checkpoints), else it is inferred from the weights.
    """
    return load_embedding_model_spec(path, name, **model_kwargs)[0]


def load_embedding_model_spec(
    path: str | Path, name: str | None = None, **model_kwargs: Any
) -> tuple[nn.Module, str, dict[str, Any]]:
    """Like :func:`load_embedding_model`, also returning the model name and constructor kwargs."""
    state, stored_name, stored_kwargs = read_model_state(path)
    if name is None:
        if stored_name is not None:
            name, model_kwargs = stored_name, {**(stored_kwargs or {}), **model_kwargs}
        else:
            name, inferred = infer_architecture(state, path)
            model_kwargs = {**inferred, **model_kwargs}
    try:
        model = build_model(name, **model_kwargs)
    except (TypeError, ValueError) as err:
        raise CheckpointError(
            f"{path}: cannot build model {name!r} with {model_kwargs}: {err}"
        ) from None
    load_state_into(model, state, path)
    return model.eval(), name, model_kwargs


def save_embedding_model(model: nn.Module, path: str | Path) -> None:
    """Write the plain state_dict of ``model`` (the released checkpoint layout), atomically;
    weights that are not finite are refused and nothing is written."""
    model = getattr(model, "module", model)  # unwrap DDP
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    check_finite(state, f"{path} (not written)")
    with atomic_write(path, "wb") as handle:
        torch.save(state, handle)
