"""Reading audio with soundfile: float32 in [-1, 1], channel 0 of multi-channel files.

torchaudio >= 2.9 hands ``load`` to torchcodec/ffmpeg, so all audio goes through soundfile here.
Every failure is an :class:`AudioError` that names the file and what is wrong with it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import soundfile

from speakerlab.errors import AudioError

if TYPE_CHECKING:  # torch is imported where needed: header scans (make-index) run without it
    import torch

SAMPLE_RATE = 16000


def audio_info(path: str | Path) -> soundfile._SoundFileInfo:
    """Header of ``path`` (rate, frames, channels) without reading samples."""
    try:
        return soundfile.info(str(path))
    except Exception as err:  # soundfile raises RuntimeError/LibsndfileError/FileNotFoundError
        raise AudioError(f"{path}: cannot read audio header ({err})") from None


def read_audio(path: str | Path, start: int = 0, frames: int = -1) -> tuple[np.ndarray, int]:
    """``frames`` samples from ``start`` (all by default): (float32 channel-0 samples, rate)."""
    try:
        data, rate = soundfile.read(
            str(path), start=start, frames=frames, dtype="float32", always_2d=True
        )
    except Exception as err:
        raise AudioError(f"{path}: cannot read audio ({err})") from None
    samples = data[:, 0]
    if samples.size == 0 and frames != 0:
        raise AudioError(f"{path}: audio is empty (0 samples from offset {start})")
    return samples, rate


def load_audio(
    path: str | Path, sample_rate: int = SAMPLE_RATE, resample: bool = False
) -> torch.Tensor:
    """Whole file as a 1-D float32 tensor at ``sample_rate``.

    A file at another rate is an error unless ``resample`` is set (training and test data must
    already be 16 kHz; the inference API resamples whatever people give it).
    """
    import torch
    import torchaudio.functional

    samples, rate = read_audio(path)
    wav = torch.from_numpy(np.ascontiguousarray(samples))
    if rate != sample_rate:
        if not resample:
            raise AudioError(f"{path}: sample rate is {rate} Hz, expected {sample_rate} Hz")
        wav = torchaudio.functional.resample(wav, rate, sample_rate)
    return wav
