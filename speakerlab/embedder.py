"""Running an embedding model: the embedders, long recordings in windows, loading a model.

An :class:`Embedder` maps fbank ``(batch, frames, feat_dim)`` to numpy float32 embeddings
``(batch, dim)``: :class:`TorchEmbedder` runs a PyTorch module, :class:`OnnxEmbedder` an exported
graph with ONNX Runtime. :func:`load_embedder` makes one from a registry id, a checkpoint file or an
``.onnx`` file. Every embedder has an :attr:`~Embedder.identity`, a digest of what decides its
output (the weights and the precision, or the bytes of the ONNX file), so that work done with one
model is never taken for work done with another.

On the CPU, :class:`TorchEmbedder` runs the model prepared by
:func:`speakerlab.cpu_inference.prepare_cpu_model` (batch norms folded into the convolutions,
channels-last weights), in float32 or, with ``precision="bf16"``, in bfloat16 on CPUs that have
bfloat16 instructions; int8 is an ONNX file written by ``speakerlab export-onnx --quantize int8``
(:mod:`speakerlab.quantize`), run by :class:`OnnxEmbedder` like any other.

Long recordings (:func:`window_spans`): a recording of more than ``window_frames`` fbank frames is
cut into the fewest windows that cover it, all of the same length (at most ``window_frames``,
evenly spread, the last one ending with the recording). Each window is embedded as an utterance of
its own (with its own mean normalisation) and the recording's embedding is the mean of the window
embeddings. Shorter recordings are embedded whole. Windows of one length batch together, and
:func:`embed_windowed` never gives the model more than ``max_batch_frames`` frames at a time (one
window at least). A recording is given as :class:`Windows`, whose fbank is made only when its
windows are embedded: from a waveform in memory, or read from a 16 kHz file one window at a time.
Memory then depends on the window length and ``max_batch_frames``, not on the recording's length.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from speakerlab.audio import SAMPLE_RATE, read_audio
from speakerlab.cpu_inference import (
    PRECISIONS,
    onnx_session_options,
    prepare_cpu_model,
    require_bf16,
    reuse_freed_memory,
)
from speakerlab.distributed import DistContext, resolve_device, run_on_every_rank, single_process
from speakerlab.errors import CheckpointError, ConfigError
from speakerlab.features import FRAME_LENGTH_MS, FRAME_SHIFT_MS, fbank, num_frames
from speakerlab.fileio import tensors_digest

DEFAULT_WINDOW_SECONDS = 60.0
DEFAULT_MAX_BATCH_FRAMES = 6000  # 60 s of fbank frames per model call
BACKENDS = ("auto", "torch", "onnx")
PRECISION_HELP = (
    "fp32 (default) or bf16: bfloat16 convolutions and matrix products with PyTorch on the CPU, "
    "refused where the CPU has no bfloat16 instructions (AVX512-BF16 or AMX). int8: give --model "
    "an .onnx file written by 'speakerlab export-onnx --quantize int8'"
)
_PROBE_MAX_FRAMES = 200  # 2 s: a model that needs more is of no use for verification
_WINDOW_SAMPLES = int(SAMPLE_RATE * FRAME_LENGTH_MS / 1000)
_SHIFT_SAMPLES = int(SAMPLE_RATE * FRAME_SHIFT_MS / 1000)


# --------------------------------------------------------------------------- embedders


class Embedder(ABC):
    """Maps fbank ``(batch, frames, feat_dim)`` to embeddings ``(batch, dim)`` (numpy float32).

    Subclasses implement :meth:`embed_features` and :attr:`identity`; :attr:`min_frames` is the
    shortest input the model turns into finite embeddings, found once by probing.
    """

    feat_dim: int = 80
    precision: str = "fp32"  # of the arithmetic: fp32, bf16 (PyTorch) or int8 (ONNX file)
    _min_frames: int | None = None

    @abstractmethod
    def embed_features(self, feats: torch.Tensor) -> np.ndarray:
        """Embeddings ``(batch, dim)`` of fbank ``(batch, frames, feat_dim)``."""

    @property
    @abstractmethod
    def identity(self) -> str:
        """A digest of everything that decides the embeddings (equal identities, equal output)."""

    def __call__(self, feats: torch.Tensor) -> np.ndarray:
        return self.embed_features(feats)

    def _accepts(self, frames: int) -> bool:
        probe = torch.randn(1, frames, self.feat_dim, generator=torch.Generator().manual_seed(0))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. "degrees of freedom <= 0" from pooling
                return bool(np.all(np.isfinite(self.embed_features(probe))))
        except Exception:  # too-short inputs fail inside the model (padding, pooling, reshapes)
            return False

    @property
    def min_frames(self) -> int:
        """Smallest frame count giving a finite embedding (binary search; inputs this short are
        rejected by every model in the zoo in a way that only depends on the length)."""
        if self._min_frames is None:
            if not self._accepts(_PROBE_MAX_FRAMES):
                raise ConfigError(
                    f"the model gives no finite embedding even for "
                    f"{_PROBE_MAX_FRAMES} frames of input"
                )
            low, high = 1, _PROBE_MAX_FRAMES  # high is accepted
            while low < high:
                middle = (low + high) // 2
                if self._accepts(middle):
                    high = middle
                else:
                    low = middle + 1
            self._min_frames = high
        return self._min_frames


class TorchEmbedder(Embedder):
    """A PyTorch embedding model in eval mode on ``device``.

    On the CPU it runs a copy of ``model`` prepared by
    :func:`speakerlab.cpu_inference.prepare_cpu_model` when it is first used (:attr:`runner`;
    ``model`` itself is left unchanged, and must not change after that); ``precision="bf16"``
    runs the convolutions and matrix products in bfloat16 there (refused, with
    :class:`ConfigError`, where the CPU has no bfloat16 instructions). Embeddings are float32
    either way.
    """

    def __init__(
        self, model: nn.Module, device: str | torch.device = "cpu", precision: str = "fp32"
    ) -> None:
        self.device = torch.device(device)
        check_precision(precision, self.device)
        self.precision = precision
        self.model = model.to(self.device).eval()
        self.feat_dim = int(getattr(model, "feat_dim", 80))
        self._runner: nn.Module | None = None
        self._identity: str | None = None

    @property
    def runner(self) -> nn.Module:
        """The module that computes the embeddings: on the CPU the prepared copy of the model."""
        if self._runner is None:
            is_cpu = self.device.type == "cpu"
            self._runner = prepare_cpu_model(copy.deepcopy(self.model)) if is_cpu else self.model
        return self._runner

    def embed_features(self, feats: torch.Tensor) -> np.ndarray:
        runner = self.runner  # prepared (once) in float32, outside the contexts below
        bf16 = self.precision == "bf16"
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = runner(feats.to(self.device, non_blocking=True))
        return out.float().cpu().numpy()

    @property
    def identity(self) -> str:
        """The precision, the model class and a digest of its weights and buffers (computed
        once: the model must not be changed while this embedder is in use)."""
        if self._identity is None:
            weights = tensors_digest(self.model.state_dict())
            name = type(self.model).__name__
            self._identity = f"torch:{self.precision}:{name}:{weights}"
        return self._identity


def check_precision(precision: str, device: torch.device) -> None:
    """Raise :class:`ConfigError` unless PyTorch can run ``precision`` on ``device`` here."""
    if precision not in PRECISIONS:
        raise ConfigError(
            f"precision {precision!r}: choose one of {', '.join(PRECISIONS)} (int8 is an ONNX "
            "file: speakerlab export-onnx --quantize int8)"
        )
    if precision == "bf16":
        if device.type != "cpu":
            raise ConfigError(f"bf16 inference runs on the CPU here, not on {device}")
        require_bf16()


class OnnxEmbedder(Embedder):
    """Embeddings from an exported model with ONNX Runtime on the CPU (or ``providers``)."""

    def __init__(
        self,
        path: str | Path,
        num_threads: int | None = None,
        providers: Sequence[str] | None = None,
    ) -> None:
        try:
            import onnxruntime
        except ImportError:
            raise ConfigError(
                "the ONNX backend needs the 'onnxruntime' package (pip install onnxruntime)"
            ) from None
        from speakerlab.onnx_export import read_metadata

        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: ONNX model not found")
        data = path.read_bytes()  # one read: what runs is what the identity describes
        try:
            self.session = onnxruntime.InferenceSession(
                data,
                onnx_session_options(num_threads),
                providers=list(providers or ["CPUExecutionProvider"]),
            )
        except Exception as err:
            raise CheckpointError(f"{path}: not a loadable ONNX model ({err})") from None
        self.path = path
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 3 or not isinstance(inputs[0].shape[2], int):
            raise CheckpointError(
                f"{path}: expected one input (batch, frames, feat_dim), got "
                f"{[(i.name, i.shape) for i in inputs]}"
            )
        self.input_name = inputs[0].name
        self.feat_dim = inputs[0].shape[2]
        self.metadata = read_metadata(self.session.get_modelmeta().custom_metadata_map)
        self.precision = str(self.metadata.get("precision", "fp32"))
        self._identity = f"onnx:{self.precision}:{hashlib.sha256(data).hexdigest()}"

    def embed_features(self, feats: torch.Tensor) -> np.ndarray:
        array = np.ascontiguousarray(feats.detach().cpu().numpy(), dtype=np.float32)
        return self.session.run(None, {self.input_name: array})[0]

    @property
    def identity(self) -> str:
        """The precision and a digest of the ONNX file's bytes."""
        return self._identity


# --------------------------------------------------------------------------- long recordings


def window_frames_for(seconds: float) -> int:
    """The fbank frame count of ``seconds`` of 16 kHz audio: recordings up to that long are
    embedded whole."""
    if not seconds > 0:
        raise ConfigError(f"the window length must be positive, got {seconds} s")
    return max(1, num_frames(round(seconds * SAMPLE_RATE)))


def window_shape(num_samples: int, window_frames: int) -> tuple[int, int]:
    """(number of windows, frames per window) of a recording of ``num_samples`` 16 kHz
    samples (see the module docstring); (1, all frames) when it fits one window."""
    frames = num_frames(num_samples)
    if frames <= window_frames:
        return 1, frames
    count = math.ceil(frames / window_frames)
    return count, math.ceil(frames / count)


def window_spans(num_samples: int, window_frames: int) -> list[tuple[int, int]]:
    """(first sample, number of samples) of each window; every window gives the same number of
    fbank frames, on the frame grid of the whole recording."""
    count, frames = window_shape(num_samples, window_frames)
    if count == 1:
        return [(0, num_samples)]
    last_start = num_frames(num_samples) - frames  # in frames: the last window ends the recording
    length = _WINDOW_SAMPLES + (frames - 1) * _SHIFT_SAMPLES
    return [(k * last_start // (count - 1) * _SHIFT_SAMPLES, length) for k in range(count)]


@dataclass(frozen=True)
class Windows:
    """One recording as windows (see the module docstring) whose fbank is made when asked for.

    ``audio`` is the 16 kHz waveform, or the path of a 16 kHz file of ``num_samples`` samples
    that is read one window at a time (a window that cannot be read, is cut short or holds
    non-finite samples raises :class:`AudioError` naming the file).
    """

    audio: torch.Tensor | str | Path | None
    num_samples: int
    window_frames: int
    feat_dim: int
    features: torch.Tensor | None = None  # the fbank of every window, once made (:meth:`made`)

    @property
    def shape(self) -> tuple[int, int]:
        """(number of windows, frames per window)."""
        return window_shape(self.num_samples, self.window_frames)

    def made(self) -> Windows:
        """These windows with their fbank made now and the audio let go: what a data-loading
        worker hands over for a short recording, so that the main process only embeds."""
        return replace(self, audio=None, features=self.fbank())

    def fbank(self, first: int = 0, stop: int | None = None) -> torch.Tensor:
        """fbank of windows ``first`` to ``stop`` (exclusive): ``(windows, frames, feat_dim)``."""
        if self.features is not None:
            return self.features[first:stop]
        spans = window_spans(self.num_samples, self.window_frames)[first:stop]
        return torch.stack(
            [
                fbank(self._samples(start, length), num_mel_bins=self.feat_dim)
                for start, length in spans
            ]
        )

    def _samples(self, start: int, length: int) -> torch.Tensor:
        if isinstance(self.audio, torch.Tensor):
            return self.audio[start : start + length]
        return torch.from_numpy(read_audio(self.audio, start, length)[0])


def check_window(window_frames: int, min_frames: int) -> None:
    """Windows are at least half of ``window_frames`` long: that must satisfy the model."""
    if window_frames < 2 * min_frames:
        raise ConfigError(
            f"a window of {window_frames} frames is too short: windows can be half as long, and "
            f"the model needs at least {min_frames} frames; use a longer window"
        )


def embed_windowed(
    embedder: Embedder,
    items: Sequence[Windows],
    max_batch_frames: int = DEFAULT_MAX_BATCH_FRAMES,
) -> np.ndarray:
    """Embeddings ``(len(items), dim)`` of recordings, each the mean of its windows' embeddings:
    windows of equal length are batched, at most ``max_batch_frames`` frames (and one window at
    least) per model call, and a window's fbank is made only for the call that embeds it.

    Batching changes nothing but speed: nothing is padded or cropped.
    """
    if not items:
        raise ConfigError("no recordings to embed")
    by_frames: dict[int, list[int]] = {}
    for index, item in enumerate(items):
        by_frames.setdefault(item.shape[1], []).append(index)
    sums: dict[int, np.ndarray] = {}
    for frames, indices in by_frames.items():
        per_call = max(1, max_batch_frames // frames)
        windows = [(i, k) for i in indices for k in range(items[i].shape[0])]
        for start in range(0, len(windows), per_call):
            runs = itertools.groupby(windows[start : start + per_call], key=lambda w: w[0])
            owners, pieces = [], []
            for i, run in runs:
                ks = [k for _, k in run]
                owners += [i] * len(ks)
                pieces.append(items[i].fbank(ks[0], ks[-1] + 1))
            rows = embedder(torch.cat(pieces)).astype(np.float64)
            for i, row in zip(owners, rows):
                sums[i] = sums.get(i, 0.0) + row
    return np.stack([sums[i] / item.shape[0] for i, item in enumerate(items)]).astype(np.float32)


def nonfinite_rows(embeddings: np.ndarray) -> list[int]:
    """Indices of the embeddings that hold a NaN or an infinity (never to be written or used)."""
    return np.flatnonzero(~np.isfinite(embeddings).all(axis=1)).tolist()


# --------------------------------------------------------------------------- loading


def choose_backend(backend: str, device: torch.device, source: str | Path = "") -> str:
    """``auto``: ONNX Runtime for ``.onnx`` files and on the CPU, PyTorch on a GPU."""
    if backend not in BACKENDS:
        raise ConfigError(f"backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    is_onnx = str(source).endswith(".onnx")
    if backend == "torch" and is_onnx:
        raise ConfigError(f"{source}: an .onnx file runs with ONNX Runtime, not PyTorch")
    if backend != "auto":
        return backend
    return "onnx" if is_onnx or device.type == "cpu" else "torch"


def load_embedder(
    source: str | Path,
    device: str | torch.device = "cpu",
    *,
    backend: str = "auto",
    onnx_path: str | Path | None = None,
    ranks: DistContext | None = None,
    num_threads: int | None = None,
    precision: str = "fp32",
) -> tuple[Embedder, float | None]:
    """An embedder and its known decision threshold (or None) for a registry id, a checkpoint
    file or an ``.onnx`` file (an int8 one included).

    Without ``onnx_path`` an ``.onnx`` file runs with ONNX Runtime and anything else with
    PyTorch on ``device``. With ``onnx_path``, ``backend`` chooses (:func:`choose_backend`); to
    run a checkpoint or id with ONNX Runtime it is exported there first, unless that file already
    holds an export of the same weights and settings. Under torchrun (``ranks``) rank 0 exports
    and the others wait; a failure on rank 0 is raised on every rank.

    ``precision="bf16"`` runs a checkpoint or id with PyTorch in bfloat16 (the ``auto`` backend
    then chooses PyTorch). On the CPU the process keeps freed memory for reuse
    (:func:`speakerlab.cpu_inference.reuse_freed_memory`).
    """
    device = resolve_device(device) if isinstance(device, str) else device
    check_precision(precision, device)
    is_onnx = str(source).endswith(".onnx")
    if precision == "bf16":
        if is_onnx:
            raise ConfigError(
                f"{source}: an ONNX file runs in the precision it was exported in; bf16 needs "
                "a checkpoint or registry id"
            )
        if backend == "onnx":
            raise ConfigError("bf16 runs with the PyTorch backend: use --backend torch or auto")
        backend = "torch"
    if onnx_path is None and backend == "auto":
        backend = "onnx" if is_onnx else "torch"
    backend = choose_backend(backend, device, source)
    threads = num_threads or torch.get_num_threads()
    if device.type == "cpu":
        reuse_freed_memory()
    if backend == "torch":
        from speakerlab.pretrained import load_model

        loaded = load_model(source)
        return TorchEmbedder(loaded.model, device, precision), loaded.threshold
    if device.type != "cpu":
        raise ConfigError(f"ONNX models run on the CPU here, not on {device}; use the CPU")
    if not is_onnx:
        if onnx_path is None:
            raise ConfigError(f"{source}: to run it with ONNX Runtime, give a path to export it to")
        ranks = ranks or single_process(device)
        run_on_every_rank(
            ranks, lambda: _export_if_changed(source, onnx_path) if ranks.is_main else None
        )
        source = onnx_path
    embedder = OnnxEmbedder(source, num_threads=threads)
    return embedder, embedder.metadata.get("threshold")


def _export_if_changed(source: str | Path, onnx_path: str | Path) -> bool:
    """Export the model ``source`` to ``onnx_path`` unless it already holds the same export."""
    from speakerlab.onnx_export import export_onnx_if_changed
    from speakerlab.pretrained import load_model

    loaded = load_model(source)
    metadata = {"model_name": loaded.name, "model_kwargs": loaded.kwargs, "source": str(source)}
    if loaded.threshold is not None:
        metadata["threshold"] = loaded.threshold
    return export_onnx_if_changed(loaded.model, onnx_path, metadata=metadata)
