"""Reading and writing embedding-model weights.

Accepted inputs, all read with ``torch.load(weights_only=True)`` so that a checkpoint can never run
code on the user's machine:

- a released 3D-Speaker checkpoint: a plain ``state_dict`` (with or without
  ``num_batches_tracked``);
- a DDP ``state_dict`` whose keys start with ``module.``;
- a speakerlab training checkpoint: a dict with ``model`` (the embedding model's state_dict),
  ``model_name`` and ``model_kwargs`` (and training state that is ignored here).

When the architecture is not recorded in the file it is inferred from the key names and shapes, so
``load_embedding_model("eres2net_base_model.ckpt")`` needs no further arguments.
"""

from __future__ import annotations

import math
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from speakerlab.errors import CheckpointError
from speakerlab.fileio import atomic_write
from speakerlab.models import build_model
from speakerlab.models.eres2net import BLOCKS_PER_STAGE

StateDict = dict[str, torch.Tensor]

_DDP_PREFIX = "module."
_MAX_LISTED = 12


def read_model_state(path: str | Path) -> tuple[StateDict, str | None, dict[str, Any] | None]:
    """Read the embedding-model weights in ``path``.

    Returns ``(state_dict, model_name, model_kwargs)``; the name and kwargs are ``None`` unless the
    file records them (speakerlab training checkpoints do). A ``module.`` prefix is removed.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if found is None:
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint") from None
        raise CheckpointError(
            f"{path}: refused to load: the file holds a Python object ({found.group(1)}) and "
            "loading it could run code; checkpoints must hold only tensors and plain containers"
        ) from None
    except Exception as err:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({err})") from None
    return model_state_from(obj, path)


def model_state_from(
    obj: Any, path: str | Path
) -> tuple[StateDict, str | None, dict[str, Any] | None]:
    """:func:`read_model_state` for a file already loaded (``obj``, read from ``path``)."""
    name = kwargs = None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        state, name, kwargs = obj["model"], obj.get("model_name"), obj.get("model_kwargs")
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        state = obj["state_dict"]
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state = obj
    else:
        keys = list(obj)[:_MAX_LISTED] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path}: no model weights found (top level: {keys})")
    return strip_ddp_prefix(state), name, dict(kwargs) if kwargs is not None else None


def strip_ddp_prefix(state: StateDict) -> StateDict:
    """Remove the ``module.`` prefix that DistributedDataParallel adds to every key."""
    if state and all(k.startswith(_DDP_PREFIX) for k in state):
        return {k[len(_DDP_PREFIX) :]: v for k, v in state.items()}
    return state


def infer_architecture(state: StateDict) -> tuple[str, dict[str, Any]]:
    """Model name and constructor kwargs that produce the keys and shapes of ``state``."""
    shape = {k: tuple(v.shape) for k, v in state.items()}
    try:
        if "layer1_downsample.weight" in shape:
            m = shape["conv1.weight"][0]
            emb, stats = shape["seg_1.weight"]
            kwargs = {
                "m_channels": m,
                "embedding_size": emb,
                "feat_dim": stats // (m * 8 * 2 * 2) * 8,
            }
            num_blocks = [
                sum(1 for k in shape if re.fullmatch(rf"layer{i}\.\d+\.conv1\.weight", k))
                for i in range(1, 5)
            ]
            if tuple(num_blocks) != BLOCKS_PER_STAGE:
                kwargs["num_blocks"] = num_blocks
            return "eres2net", kwargs
        if "fuse34.local_att.0.weight" in shape:
            m = shape["conv1.weight"][0]
            emb, stats = shape["seg_1.weight"]
            expansion = shape["layer1.0.conv3.weight"][0] // m
            scale = sum(
                1 for k in shape if k.startswith("layer1.0.convs.") and k.endswith(".weight")
            )
            widths = [shape[f"layer{i}.0.convs.0.weight"][0] for i in range(1, 5)]
            return "eres2netv2", {
                "m_channels": m,
                "embedding_size": emb,
                "feat_dim": stats // (m * 8 * expansion * 2) * 8,
                "base_width": _res2net_base_width(m, widths),
                "scale": scale,
                "expansion": expansion,
            }
        if "xvector.dense.linear.weight" in shape:
            growth = shape["xvector.block1.tdnnd1.cam_layer.linear_local.weight"][0]
            head_channels = shape["head.conv2.weight"][0]
            init_channels, tdnn_in, _ = shape["xvector.tdnn.linear.weight"]
            return "campplus", {
                "feat_dim": tdnn_in // head_channels * 8,
                "embedding_size": shape["xvector.dense.linear.weight"][0],
                "growth_rate": growth,
                "bn_size": shape["xvector.block1.tdnnd1.linear1.weight"][0] // growth,
                "init_channels": init_channels,
            }
        if "asp_bn.norm.weight" in shape:
            channels = [
                shape[
                    f"blocks.{i}.conv.conv.weight"
                    if i == 0
                    else f"blocks.{i}.tdnn1.conv.conv.weight"
                ][0]
                for i in range(4)
            ]
            return "ecapa_tdnn", {
                "feat_dim": shape["blocks.0.conv.conv.weight"][1],
                "embedding_size": shape["fc.conv.weight"][0],
                "channels": channels + [shape["mfa.conv.conv.weight"][0]],
                "attention_channels": shape["asp.tdnn.conv.conv.weight"][0],
                "se_channels": shape["blocks.1.se_block.conv1.conv.weight"][0],
            }
    except (KeyError, ValueError) as err:
        raise CheckpointError(
            f"weights look like a known architecture but key {err} is missing or malformed"
        ) from None
    raise CheckpointError(
        "cannot tell the architecture from the weights (first keys: "
        f"{list(shape)[:5]}); pass the model name and its arguments"
    )


def _res2net_base_width(m_channels: int, widths: list[int]) -> int:
    """The Res2Net base width giving ``floor(planes * base_width / 64)`` channels per split in
    each of the four stages (planes = m, 2m, 4m, 8m); the reference default 26 when it fits."""
    candidates = [26] + list(range(1, 257))
    for base_width in candidates:
        if all(math.floor(m_channels * 2**i * base_width / 64) == w for i, w in enumerate(widths)):
            return base_width
    raise CheckpointError(f"no Res2Net base width gives split widths {widths}")


def load_state_into(model: nn.Module, state: StateDict, source: str | Path = "weights") -> None:
    """Load ``state`` into ``model`` strictly, or raise one :class:`CheckpointError` that lists the
    missing, unexpected and shape-mismatched keys. Missing ``num_batches_tracked`` counters
    (older checkpoints do not store them) are taken from the model."""
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
            name, inferred = infer_architecture(state)
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
    """Write the plain state_dict of ``model`` (the released checkpoint layout), atomically."""
    model = getattr(model, "module", model)  # unwrap DDP
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    with atomic_write(path, "wb") as handle:
        torch.save(state, handle)
