"""int8 quantisation of an exported ONNX embedding model with ONNX Runtime.

Static quantisation in the QDQ format: weights are int8 per output channel, activations uint8
with a scale and zero point per tensor measured on calibration utterances (fbank of a few real
recordings). ONNX Runtime's CPU provider fuses every ``DequantizeLinear -> Conv ->
QuantizeLinear`` into an int8 convolution (VNNI instructions where the CPU has them); everything
that is not a convolution or matrix product -- batch norm folded into the convolutions,
activations, attentional fusion, statistics pooling -- stays in float32, where int8 would cost
accuracy for little speed.

After quantising, the int8 model's embeddings of the calibration features are compared with the
float model's; a model whose smallest cosine similarity is below ``min_cosine`` (or whose
embeddings are not finite) is not written. The int8 file records ``precision: int8`` in its
metadata (:class:`speakerlab.embedder.OnnxEmbedder` reads it into its identity) and an
``export_key`` of its own, so that a float export to the same path is never taken for it.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from speakerlab.errors import CheckpointError, ConfigError
from speakerlab.fileio import atomic_path, json_digest

# Quantised operator types: the convolutions and matrix products that hold all the compute.
QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")
PRECISION_KEY = "speakerlab.precision"
QUANTIZATION_KEY = "speakerlab.quantization"
EXPORT_KEY = "speakerlab.export_key"
# Smallest cosine similarity to the float embeddings accepted after quantisation: measured
# values are >= 0.998 (ERes2Net base and CAM++ with trained-like statistics, the trained
# mini-recipe model); a broken quantisation (bad scales, a saturated layer) is far below.
DEFAULT_MIN_COSINE = 0.95
DEFAULT_CALIBRATION_UTTS = 16


def calibration_features(
    wav_scp: str | Path, count: int = DEFAULT_CALIBRATION_UTTS, num_mel_bins: int = 80
) -> list[torch.Tensor]:
    """fbank of ``count`` recordings of ``wav_scp`` spread evenly over the list (so that they
    come from many speakers when it is sorted by speaker), for :func:`quantize_onnx`. The
    recordings must be 16 kHz and finite, as for extraction."""
    from speakerlab.audio import check_finite, load_audio
    from speakerlab.data.kaldi_dir import read_wav_scp
    from speakerlab.features import fbank

    if count < 1:
        raise ConfigError(f"the number of calibration utterances must be >= 1, got {count}")
    if not Path(wav_scp).is_file():
        raise ConfigError(f"{wav_scp}: calibration list not found")
    paths = list(read_wav_scp(wav_scp).values())
    if not paths:
        raise ConfigError(f"{wav_scp}: no recordings to calibrate on")
    picks = np.unique(np.linspace(0, len(paths) - 1, num=min(count, len(paths))).round())
    features = []
    for index in picks:
        wav = load_audio(paths[int(index)])
        check_finite(wav, paths[int(index)])
        features.append(fbank(wav, num_mel_bins=num_mel_bins))
    return features


def _as_batches(features: Sequence[torch.Tensor | np.ndarray]) -> list[np.ndarray]:
    """Each calibration item as a float32 ``(1, frames, feat_dim)`` array."""
    batches = []
    for index, feats in enumerate(features):
        array = np.asarray(feats.detach().cpu() if isinstance(feats, torch.Tensor) else feats)
        array = np.ascontiguousarray(array, dtype=np.float32)
        if array.ndim == 2:
            array = array[None]
        if array.ndim != 3 or not np.all(np.isfinite(array)):
            raise ConfigError(
                f"calibration item {index}: expected finite fbank (frames, feat_dim) or "
                f"(batch, frames, feat_dim), got shape {array.shape}"
            )
        batches.extend(array[i : i + 1] for i in range(array.shape[0]))
    if not batches:
        raise ConfigError("quantisation needs at least one calibration utterance")
    return batches


class _CalibrationReader:
    """ONNX Runtime's calibration data reader protocol over a list of fbank arrays."""

    def __init__(self, input_name: str, batches: Sequence[np.ndarray]) -> None:
        self._items: Iterator[dict[str, np.ndarray]] = iter(
            {input_name: batch} for batch in batches
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._items, None)


def quantize_onnx(
    fp32_path: str | Path,
    out_path: str | Path,
    calibration_feats: Sequence[torch.Tensor | np.ndarray],
    *,
    per_channel: bool = True,
    min_cosine: float = DEFAULT_MIN_COSINE,
) -> tuple[Path, float]:
    """Write an int8 version of the float ONNX model ``fp32_path`` to ``out_path``.

    ``calibration_feats``: fbank of a few (e.g. 8-32) representative utterances, each
    ``(frames, feat_dim)`` or ``(batch, frames, feat_dim)``. Returns the path and the smallest
    cosine similarity between int8 and float embeddings of those utterances; raises
    :class:`CheckpointError` (writing nothing) when it is below ``min_cosine``.
    """
    try:
        import onnx
        from onnxruntime.quantization import (
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError:
        raise ConfigError(
            "int8 quantisation needs the 'onnx' and 'onnxruntime' packages "
            "(pip install onnx onnxruntime)"
        ) from None
    from speakerlab.embedder import OnnxEmbedder

    float_embedder = OnnxEmbedder(fp32_path)  # validates the input model before any output
    if float_embedder.metadata.get("precision", "fp32") != "fp32":
        raise ConfigError(f"{fp32_path}: already quantised; quantise the float model")
    batches = _as_batches(calibration_feats)
    if any(batch.shape[2] != float_embedder.feat_dim for batch in batches):
        raise ConfigError(
            f"calibration fbank must have {float_embedder.feat_dim} bins for {fp32_path}"
        )
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch, atomic_path(out_path) as tmp:
        prepared = Path(scratch) / "prepared.onnx"
        # Shape inference and graph clean-up first, as ONNX Runtime recommends before quantising.
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(tmp),
            _CalibrationReader(float_embedder.input_name, batches),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(QUANTIZED_OPS),
            per_channel=per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
        graph = onnx.load(str(tmp))
        settings = {
            "format": "QDQ",
            "weights": "int8 per channel" if per_channel else "int8 per tensor",
            "activations": "uint8 per tensor (min-max)",
            "calibration_utterances": len(batches),
        }
        stored = _metadata(fp32_path)
        key = {"float": stored.get(EXPORT_KEY), "quantization": settings, "calibration": batches}
        stored[EXPORT_KEY] = _int8_key(key)
        _set_metadata(graph, {**stored, PRECISION_KEY: "int8", QUANTIZATION_KEY: settings})
        onnx.save(graph, str(tmp))
        cosine = _smallest_cosine(float_embedder, OnnxEmbedder(tmp), batches)
        if not cosine >= min_cosine:
            raise CheckpointError(
                f"{out_path}: int8 embeddings differ too much from float ones on the "
                f"calibration utterances (smallest cosine {cosine:.4f} < {min_cosine}); "
                "nothing written"
            )
    return out_path, cosine


def _int8_key(parts: dict[str, object]) -> str:
    """A digest of the float export's key, the settings and the calibration inputs."""
    import hashlib

    calibration = hashlib.sha256()
    for batch in parts["calibration"]:
        calibration.update(repr(batch.shape).encode())
        calibration.update(batch.tobytes())
    return json_digest({**parts, "calibration": calibration.hexdigest()})


def _metadata(path: str | Path) -> dict[str, object]:
    """The speakerlab entries of an ONNX model's metadata (JSON-decoded)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False)
    return {
        entry.key: json.loads(entry.value)
        for entry in graph.metadata_props
        if entry.key.startswith("speakerlab.")
    }


def _set_metadata(graph, values: dict[str, object]) -> None:
    """Set ``values`` (JSON-encoded) in the model's metadata, replacing entries of equal keys."""
    kept = [(e.key, e.value) for e in graph.metadata_props if e.key not in values]
    del graph.metadata_props[:]
    for key, value in [*kept, *((k, json.dumps(v)) for k, v in values.items())]:
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, value


def _smallest_cosine(reference, candidate, batches: Sequence[np.ndarray]) -> float:
    worst = 1.0
    for batch in batches:
        feats = torch.from_numpy(batch)
        a, b = reference(feats), candidate(feats)
        cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        worst = min(worst, float(np.nan_to_num(cos, nan=-1.0).min()))
    return worst
