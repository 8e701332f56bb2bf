"""Python API for embedding and verifying recordings.

    >>> from speakerlab.inference import SpeakerVerifier
    >>> verifier = SpeakerVerifier.load("iic/speech_eres2net_base_sv_zh-cn_3dspeaker_16k")
    >>> result = verifier.verify("alice_1.wav", "alice_2.wav")
    >>> result.score, result.same_speaker

Audio may be a file path, a numpy array or a torch tensor, at any sample rate (``sample_rate``
says which for arrays; 16 kHz when not given) and with any number of channels (channel 0 is
used, as everywhere in speakerlab). Everything is resampled to 16 kHz. Integer arrays are scaled
to [-1, 1]. Unreadable, empty and too-short audio raise :class:`AudioError`.

The model is a registry id (downloaded with ``modelscope``), a checkpoint file (ours or a
released one) or an exported ``.onnx`` file (run with ONNX Runtime). The decision threshold is
the registry's for released models and the one stored in an ONNX file exported from them; for
other checkpoints no threshold is known and :meth:`SpeakerVerifier.verify` needs one. A checkpoint
that carries a calibration (``speakerlab calibrate --model-out``) decides on the calibrated
log-likelihood ratio instead, at the calibration's p_target, unless a threshold is given.

Recordings longer than ``window_seconds`` (60 s by default) are embedded in windows whose
embeddings are averaged (see :mod:`speakerlab.embedder`), so memory does not grow with the length
of a recording beyond its samples. Audio that is not finite, and an embedding that is not finite,
raise :class:`AudioError` naming the input: nothing non-finite is ever returned.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from speakerlab.audio import SAMPLE_RATE, audio_info, check_finite, complete_audio_info, read_audio
from speakerlab.calibration import Calibration, read_model_calibration
from speakerlab.embedder import (
    DEFAULT_MAX_BATCH_FRAMES,
    DEFAULT_WINDOW_SECONDS,
    Embedder,
    Windows,
    check_window,
    embed_windowed,
    load_embedder,
    nonfinite_rows,
    window_frames_for,
    window_shape,
)
from speakerlab.errors import AudioError, ConfigError
from speakerlab.features import FRAME_LENGTH_MS, FRAME_SHIFT_MS, num_frames
from speakerlab.fileio import file_digest
from speakerlab.resample import resample

__all__ = [
    "DEFAULT_MODEL",
    "SpeakerVerifier",
    "Verification",
    "embed",
    "load_embedder",
    "prepare_waveform",
    "verify",
]

AudioInput = str | Path | np.ndarray | torch.Tensor
DEFAULT_MODEL = "iic/speech_eres2net_base_sv_zh-cn_3dspeaker_16k"


# --------------------------------------------------------------------------- audio


def require_file(path: str | Path) -> None:
    """Say plainly when an input file is missing (the audio library says "System error")."""
    path = Path(path)
    if not path.exists():
        raise AudioError(f"{path}: file not found")
    if path.is_dir():
        raise AudioError(f"{path}: is a directory, not an audio file")


def _describe(audio: AudioInput, position: int | None) -> str:
    if isinstance(audio, (str, Path)):
        return str(audio)
    return "audio array" if position is None else f"audio array #{position}"


def _mono(samples: np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
    """Channel 0 of a 1-D or 2-D (channels along the shorter axis) array, as float32 in [-1, 1]."""
    if isinstance(samples, np.ndarray):
        samples = torch.from_numpy(np.ascontiguousarray(samples))
    wav = samples.detach().cpu()
    if wav.numel() == 0:
        raise AudioError(f"{name}: audio is empty")
    if wav.dim() == 2:
        # (channels, samples) or (samples, channels): recordings have far more samples.
        wav = wav[0] if wav.shape[0] <= wav.shape[1] else wav[:, 0]
    elif wav.dim() != 1:
        raise AudioError(
            f"{name}: expected 1-D (samples) or 2-D (channels x samples) audio, got "
            f"shape {tuple(wav.shape)}"
        )
    if wav.dtype in (torch.int16, torch.int32, torch.int64):
        wav = wav.double() / float(2 ** (8 * wav.element_size() - 1))
    elif wav.dtype == torch.uint8:
        wav = (wav.double() - 128.0) / 128.0
    elif not wav.is_floating_point():
        raise AudioError(f"{name}: unsupported sample type {wav.dtype}")
    return wav.float().contiguous()


def prepare_waveform(
    audio: AudioInput, sample_rate: int | None = None, position: int | None = None
) -> torch.Tensor:
    """A 1-D float32 16 kHz waveform from a path, array or tensor (see the module docstring).

    The one check of audio for every command that embeds (verify, embed, extract): empty audio and
    audio holding NaN or infinite samples raise :class:`AudioError`.
    """
    name = _describe(audio, position)
    if isinstance(audio, (str, Path)):
        require_file(audio)
        samples, rate = read_audio(audio)  # files carry their own rate; sample_rate is for arrays
        wav = torch.from_numpy(np.ascontiguousarray(samples))
    elif isinstance(audio, (np.ndarray, torch.Tensor)):
        rate = SAMPLE_RATE if sample_rate is None else int(sample_rate)
        if rate <= 0:
            raise ConfigError(f"{name}: sample rate must be positive, got {sample_rate}")
        wav = _mono(audio, name)
    else:
        raise AudioError(
            f"{name!r}: expected a file path, numpy array or torch tensor, got "
            f"{type(audio).__name__}"
        )
    if wav.numel() == 0:
        raise AudioError(f"{name}: audio is empty")
    check_finite(wav, name)  # files are checked on reading; arrays and tensors here
    if rate != SAMPLE_RATE:
        wav = resample(wav, rate, SAMPLE_RATE)
    return wav


def min_seconds(min_frames: int) -> float:
    """Shortest duration (16 kHz) that yields ``min_frames`` fbank frames."""
    return (FRAME_LENGTH_MS + (min_frames - 1) * FRAME_SHIFT_MS) / 1000.0


def too_short(name: str, num_samples: int, min_frames: int) -> str | None:
    """The complaint about ``num_samples`` 16 kHz samples if the model needs more, else None."""
    if num_frames(num_samples) >= min_frames:
        return None
    return (
        f"{name}: {num_samples / SAMPLE_RATE:.3f} s of audio is too short; the model needs at "
        f"least {min_seconds(min_frames):.3f} s ({min_frames} frames)"
    )


# --------------------------------------------------------------------------- verification


@dataclass(frozen=True)
class Verification:
    """Cosine score of a pair and the decision at ``threshold`` (same speaker when >=). With a
    calibration, ``llr`` is the pair's log-likelihood ratio, which decides, and ``threshold`` the
    score at which it would reach the calibration's threshold."""

    score: float
    threshold: float
    same_speaker: bool
    llr: float | None = None


class SpeakerVerifier:
    """Embeds recordings and compares them by cosine similarity.

    ``window_seconds``: recordings longer than this are embedded in windows (see the module
    docstring); ``max_batch_frames``: the most fbank frames given to the model at once (memory).
    """

    def __init__(
        self,
        embedder: Embedder,
        threshold: float | None = None,
        source: str = "model",
        calibration: Calibration | None = None,
        *,
        window_seconds: float = DEFAULT_WINDOW_SECONDS,
        max_batch_frames: int = DEFAULT_MAX_BATCH_FRAMES,
    ) -> None:
        if max_batch_frames < 1:
            raise ConfigError(f"max_batch_frames must be at least 1, got {max_batch_frames}")
        self.embedder = embedder
        self.threshold = threshold
        self.source = source
        self.calibration = calibration
        self.window_frames = window_frames_for(window_seconds)
        self.max_batch_frames = max_batch_frames

    @classmethod
    def load(
        cls,
        source: str | Path = DEFAULT_MODEL,
        *,
        threshold: float | None = None,
        device: str = "cpu",
        window_seconds: float = DEFAULT_WINDOW_SECONDS,
        max_batch_frames: int = DEFAULT_MAX_BATCH_FRAMES,
        precision: str = "fp32",
    ) -> SpeakerVerifier:
        """Load a registry id, checkpoint or ONNX file (an int8 one included); ``threshold``
        overrides the model's threshold and calibration; ``precision="bf16"`` runs a checkpoint
        or id in bfloat16 on the CPU (:func:`speakerlab.embedder.load_embedder`)."""
        embedder, known_threshold = load_embedder(source, device, precision=precision)
        windows = {"window_seconds": window_seconds, "max_batch_frames": max_batch_frames}
        if threshold is not None:
            return cls(embedder, threshold, str(source), **windows)
        calibration = read_model_calibration(source)
        return cls(embedder, known_threshold, str(source), calibration, **windows)

    # ----------------------------------------------------------------- embeddings

    @property
    def min_frames(self) -> int:
        """The shortest input the model accepts, in fbank frames (checked against the window)."""
        needed = self.embedder.min_frames
        check_window(self.window_frames, needed)
        return needed

    def check_files(self, paths: Sequence[str | Path]) -> None:
        """Check every file from its header (present, readable, long enough) and raise one
        :class:`AudioError` listing all the problems: nothing is embedded before that."""
        problems = []
        for path in paths:
            try:
                require_file(path)
                info = audio_info(path)
            except AudioError as err:
                problems.append(str(err))
                continue
            samples_16k = math.ceil(info.frames * SAMPLE_RATE / info.samplerate)
            complaint = (
                f"{path}: audio is empty"
                if info.frames == 0
                else too_short(str(path), samples_16k, self.min_frames)
            )
            if complaint:
                problems.append(complaint)
        if problems:
            raise AudioError(f"{len(problems)} unusable recording(s): " + "; ".join(problems))

    def window_features(
        self, audio: AudioInput, sample_rate: int | None = None, position: int | None = None
    ) -> Windows:
        """The windows of one input (one window unless it is longer than the window length),
        checked to be long enough for the model. A 16 kHz file longer than one window is read one
        window at a time when it is embedded; other inputs are loaded (and resampled) first."""
        name = _describe(audio, position)
        num_samples = self._streamed_length(audio)
        if num_samples is None:
            wav = prepare_waveform(audio, sample_rate, position)
            source, num_samples = wav, wav.numel()
        else:
            source = audio  # a 16 kHz file, read when embedded
        complaint = too_short(name, num_samples, self.min_frames)
        if complaint:
            raise AudioError(complaint)
        return Windows(source, num_samples, self.window_frames, self.embedder.feat_dim)

    def _streamed_length(self, audio: AudioInput) -> int | None:
        """The sample count of a 16 kHz file of more than one window (read as it is embedded,
        so its length costs no memory); None for anything else. A truncated file is an error."""
        if not isinstance(audio, (str, Path)):
            return None
        require_file(audio)
        info = complete_audio_info(audio)
        if info.samplerate != SAMPLE_RATE or window_shape(info.frames, self.window_frames)[0] == 1:
            return None
        return info.frames

    def embed(
        self, audio: AudioInput, sample_rate: int | None = None, normalize: bool = False
    ) -> np.ndarray:
        """Embedding ``(dim,)`` of one recording (unit length when ``normalize``)."""
        return self.embed_many([audio], sample_rate, normalize)[0]

    def embed_many(
        self, audios: Sequence[AudioInput], sample_rate: int | None = None, normalize: bool = False
    ) -> np.ndarray:
        """Embeddings ``(n, dim)`` of several recordings, batched by equal frame count (so each
        equals its one-at-a-time embedding)."""
        if len(audios) == 0:
            raise ConfigError("no audio given")
        items = [
            self.window_features(a, sample_rate, i if len(audios) > 1 else None)
            for i, a in enumerate(audios)
        ]
        matrix = embed_windowed(self.embedder, items, self.max_batch_frames)
        bad = nonfinite_rows(matrix)
        if bad:
            names = ", ".join(_describe(audios[i], i if len(audios) > 1 else None) for i in bad)
            raise AudioError(f"{names}: the model gave a non-finite embedding")
        if normalize:
            matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
        return matrix

    # ----------------------------------------------------------------- verification

    def _threshold(self, threshold: float | None) -> float:
        if threshold is not None:
            return float(threshold)
        if self.threshold is None:
            raise ConfigError(
                f"no decision threshold is known for {self.source}; pass one "
                "(e.g. the EER threshold on your development trials)"
            )
        return float(self.threshold)

    def score(self, enrol: AudioInput, test: AudioInput, sample_rate: int | None = None) -> float:
        """Cosine similarity of two recordings."""
        return self.score_pairs([(enrol, test)], sample_rate)[0]

    def score_pairs(
        self, pairs: Sequence[tuple[AudioInput, AudioInput]], sample_rate: int | None = None
    ) -> list[float]:
        """Cosine similarity of each pair; a file named in several pairs is embedded once."""
        if len(pairs) == 0:
            raise ConfigError("no pairs given")
        unique: list[AudioInput] = []
        slots: dict[object, int] = {}
        rows = []
        for pair in pairs:
            if len(pair) != 2:
                raise ConfigError(f"a pair needs two recordings, got {len(pair)}")
            for audio in pair:
                key = str(audio) if isinstance(audio, (str, Path)) else id(audio)
                if key not in slots:
                    slots[key] = len(unique)
                    unique.append(audio)
                rows.append(slots[key])
        matrix = self.embed_many(unique, sample_rate, normalize=True)
        rows_array = np.asarray(rows).reshape(-1, 2)
        scores = np.sum(matrix[rows_array[:, 0]] * matrix[rows_array[:, 1]], axis=1)
        return [float(s) for s in scores]

    def verify(
        self,
        enrol: AudioInput,
        test: AudioInput,
        sample_rate: int | None = None,
        threshold: float | None = None,
    ) -> Verification:
        """Score a pair and decide (same speaker when score >= threshold)."""
        return self.verify_pairs([(enrol, test)], sample_rate, threshold)[0]

    def verify_pairs(
        self,
        pairs: Sequence[tuple[AudioInput, AudioInput]],
        sample_rate: int | None = None,
        threshold: float | None = None,
    ) -> list[Verification]:
        """:meth:`verify` for many pairs at once."""
        if threshold is None and self.calibration is not None:
            return self._verify_calibrated(pairs, sample_rate)
        limit = self._threshold(threshold)
        return [
            Verification(score, limit, score >= limit)
            for score in self.score_pairs(pairs, sample_rate)
        ]

    def _verify_calibrated(
        self, pairs: Sequence[tuple[AudioInput, AudioInput]], sample_rate: int | None
    ) -> list[Verification]:
        scores = self.score_pairs(pairs, sample_rate)
        seconds = [None, None]
        if self.calibration.uses_durations:
            seconds = [
                np.array([prepare_waveform(pair[side], sample_rate).numel() for pair in pairs])
                / SAMPLE_RATE
                for side in (0, 1)
            ]
        llrs, limits, same = self.calibration.decide(scores, *seconds)
        return [
            Verification(score, limit, decision, llr)
            for score, limit, decision, llr in zip(
                scores, limits.tolist(), same.tolist(), llrs.tolist()
            )
        ]


@lru_cache(maxsize=4)
def _cached_verifier(source: str, device: str, precision: str, content: str) -> SpeakerVerifier:
    del content  # part of the cache key only
    return SpeakerVerifier.load(source, device=device, precision=precision)


def _verifier(model: str | Path, device: str, precision: str = "fp32") -> SpeakerVerifier:
    """The verifier of ``model``, loaded once per content: a file rewritten with other weights
    (a retrained model exported to the same path) is loaded again."""
    path = Path(model)
    content = file_digest(path) if path.is_file() else str(model)
    return _cached_verifier(str(model), device, precision, content)


def embed(
    audio: AudioInput | Sequence[AudioInput],
    model: str | Path = DEFAULT_MODEL,
    sample_rate: int | None = None,
    device: str = "cpu",
    precision: str = "fp32",
) -> np.ndarray:
    """Embedding of one recording ``(dim,)``, or ``(n, dim)`` for a list of recordings
    (``precision``: see :meth:`SpeakerVerifier.load`)."""
    verifier = _verifier(model, device, precision)
    if isinstance(audio, (list, tuple)):
        return verifier.embed_many(audio, sample_rate)
    return verifier.embed(audio, sample_rate)


def verify(
    enrol: AudioInput,
    test: AudioInput,
    model: str | Path = DEFAULT_MODEL,
    threshold: float | None = None,
    sample_rate: int | None = None,
    device: str = "cpu",
    precision: str = "fp32",
) -> Verification:
    """Score and decision for one pair with ``model`` (loaded once per content and cached)."""
    return _verifier(model, device, precision).verify(enrol, test, sample_rate, threshold)
