"""ONNX export of embedding models, and its check against PyTorch.

The graph takes ``feats`` (batch, frames, feat_dim) fbank and returns ``embedding``
(batch, embedding_size); batch and frames are dynamic axes. Export uses the TorchScript-based
exporter (``dynamo=False``): for all four architectures it gives graphs that follow the frame
axis exactly (checked by :func:`onnx_parity` and the tests) and exports in seconds, where the
dynamo exporter takes minutes for the same models. The model's name, constructor arguments and
decision threshold travel in the file's metadata, with an ``export_key``: a digest of the weights,
the opset and that metadata, so that :func:`export_onnx_if_changed` exports again exactly when the
file would differ. :class:`speakerlab.embedder.OnnxEmbedder` runs the exported files.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from speakerlab.errors import ConfigError
from speakerlab.fileio import atomic_path, json_digest, tensors_digest

INPUT_NAME = "feats"
OUTPUT_NAME = "embedding"
DEFAULT_OPSET = 17
EXPORT_FRAMES = 200  # length of the example input; any length works in the exported graph
METADATA_PREFIX = "speakerlab."


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Export ``model`` (fbank -> embedding) to ``path`` with dynamic batch and frame axes.

    ``metadata`` (e.g. ``model_name``, ``model_kwargs``, ``threshold``) is stored as JSON
    strings in the ONNX metadata properties, with ``feat_dim`` and the ``export_key``.
    """
    onnx = _import_onnx()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval().cpu()
    feat_dim = int(getattr(model, "feat_dim", 80))
    example = torch.randn(2, EXPORT_FRAMES, feat_dim, generator=torch.Generator().manual_seed(0))
    with atomic_path(path) as tmp, warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter warns that it is no longer the default; it is chosen on purpose.
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        # Informational: strided slices stay in the graph instead of being pre-computed.
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")
        torch.onnx.export(
            model,
            (example,),
            str(tmp),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            dynamo=False,
            dynamic_axes={INPUT_NAME: {0: "batch", 1: "frames"}, OUTPUT_NAME: {0: "batch"}},
        )
        graph = onnx.load(str(tmp))
        stored = {"feat_dim": feat_dim, **(metadata or {})}
        stored["export_key"] = export_key(model, opset, metadata)
        for key, value in stored.items():
            entry = graph.metadata_props.add()
            entry.key, entry.value = METADATA_PREFIX + key, json.dumps(value)
        onnx.save(graph, str(tmp))
    return path


def export_key(model: nn.Module, opset: int, metadata: dict[str, Any] | None) -> str:
    """What an export of ``model`` depends on: its weights and buffers, the opset, the metadata."""
    weights = tensors_digest(model.state_dict())
    return json_digest({"weights": weights, "opset": opset, "metadata": metadata or {}})


def read_metadata(properties: dict[str, str]) -> dict[str, Any]:
    """Our entries of an ONNX file's metadata properties, decoded, without the prefix."""
    return {
        key.removeprefix(METADATA_PREFIX): json.loads(value)
        for key, value in properties.items()
        if key.startswith(METADATA_PREFIX)
    }


def export_onnx_if_changed(
    model: nn.Module,
    path: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    metadata: dict[str, Any] | None = None,
) -> bool:
    """Export ``model`` to ``path`` unless that file records the same :func:`export_key`
    (a file that cannot be read is exported again). True when it exported."""
    path = Path(path)
    if path.is_file():
        onnx = _import_onnx()
        try:
            properties = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
            recorded = read_metadata(properties).get("export_key")
        except Exception:  # a torn or foreign file: replaced below
            recorded = None
        if recorded == export_key(model, opset, metadata):
            return False
    export_onnx(model, path, opset=opset, metadata=metadata)
    return True


def _import_onnx():
    try:
        import onnx
    except ImportError:
        raise ConfigError("ONNX export needs the 'onnx' package (pip install onnx)") from None
    return onnx


def onnx_parity(
    model: nn.Module,
    onnx_path: str | Path,
    shapes: Sequence[tuple[int, int]] = ((1, 150), (3, 301)),
    seed: int = 0,
) -> float:
    """Smallest cosine similarity between PyTorch and ONNX Runtime embeddings of random fbank
    inputs of the given (batch, frames) shapes."""
    from speakerlab.embedder import OnnxEmbedder

    embedder = OnnxEmbedder(onnx_path)
    generator = torch.Generator().manual_seed(seed)
    worst = 1.0
    model = model.eval()
    for batch, frames in shapes:
        feats = torch.randn(batch, frames, embedder.feat_dim, generator=generator)
        with torch.inference_mode():
            expected = model(feats).numpy()
        actual = embedder(feats)
        cosine = np.sum(expected * actual, axis=1) / (
            np.linalg.norm(expected, axis=1) * np.linalg.norm(actual, axis=1)
        )
        worst = min(worst, float(np.nan_to_num(cosine, nan=-1.0).min()))  # NaN fails
    return worst
