"""Reading audio with soundfile: float32 in [-1, 1], channel 0 of multi-channel files.

Every failure is an :class:`AudioError` of one line that names the file and what is wrong with
it: not found, not a readable audio file, truncated (its header promises more samples than it
holds), NaN or infinite samples, or a sample rate other than the one expected.

Truncation. libsndfile quietly shortens a WAV file whose data chunk claims more bytes than the
file has, and reports only what is there, so a cut-off file would be read short without a word.
The promise is therefore read from the RIFF header itself (:func:`audio_truncation`, a cheap check
for indexing) and compared with what a read gets (:func:`read_audio`). Compressed formats (FLAC,
Ogg) carry their length in their own headers, which libsndfile reports as is; a read that comes
short of it is reported the same way.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import soundfile

from speakerlab.errors import AudioError

if TYPE_CHECKING:  # torch is imported where needed: header scans (make-index) run without it
    import torch

SAMPLE_RATE = 16000
UNKNOWN_DATA_SIZE = 0xFFFFFFFF  # what streaming writers put in the data chunk's size field
MAX_WAV_CHUNKS = 64  # chunks looked at before the data chunk, at most


def audio_info(path: str | Path) -> soundfile._SoundFileInfo:
    """Header of ``path`` (rate, frames, channels) without reading samples."""
    try:
        return soundfile.info(str(path))
    except Exception as err:  # soundfile raises LibsndfileError, RuntimeError, TypeError...
        raise _unreadable(path, err) from None


def audio_truncation(path: str | Path) -> str | None:
    """Header-only check for a truncated file: the one-line message :func:`read_audio` would raise
    (naming the file), or None when the file holds what its header promises.

    Looks only at the header and the file size: it can tell for RIFF WAV files (the data chunk's
    size against the bytes that follow it); for other formats it answers None, and a short read
    is caught by :func:`read_audio`. A missing or unreadable file raises :class:`AudioError`.
    """
    try:
        layout = _wav_layout(path)
    except OSError as err:
        raise _unreadable(path, err) from None
    if layout is not None and layout[1] < layout[0]:
        return _truncated(path, *layout)
    return None


def complete_audio_info(path: str | Path) -> soundfile._SoundFileInfo:
    """:func:`audio_info` of a file that holds what its header promises: a truncated file (see
    :func:`audio_truncation`) raises :class:`AudioError` like an unreadable one."""
    info = audio_info(path)
    truncated = audio_truncation(path)
    if truncated is not None:
        raise AudioError(truncated)
    return info


def read_audio(path: str | Path, start: int = 0, frames: int = -1) -> tuple[np.ndarray, int]:
    """``frames`` samples from ``start`` (to the end by default): (float32 channel-0 samples, rate).

    A range that reaches past the end of the file gives what there is. Raises
    :class:`AudioError` if the file is truncated (it holds fewer samples than its header promises
    within the range asked for), if a sample is NaN or infinite, or if it cannot be read.
    """
    try:
        handle = soundfile.SoundFile(str(path))
    except Exception as err:
        raise _unreadable(path, err) from None
    with handle:
        rate, available = handle.samplerate, handle.frames
        try:
            if start:
                handle.seek(min(start, available))
            data = handle.read(frames, dtype="float32", always_2d=True)
        except Exception as err:
            reason = getattr(err, "error_string", None) or str(err)
            raise AudioError(
                f"{path}: cannot decode the samples from {start} on, the file is corrupt or "
                f"truncated ({reason.strip().rstrip('.')})"
            ) from None
    samples = np.ascontiguousarray(data[:, 0])
    if frames < 0 or len(samples) < frames:  # less than asked: was more promised?
        promised, holds = _wav_layout(path) or (available, start + len(samples))
        end = promised if frames < 0 else min(start + frames, promised)
        if start + len(samples) < end:
            raise AudioError(_truncated(path, promised, holds))
    if samples.size == 0 and frames != 0:
        raise AudioError(f"{path}: audio is empty (0 samples from offset {start})")
    check_finite(samples, path)
    return samples, rate


def check_finite(samples: np.ndarray | torch.Tensor, name: str | Path) -> None:
    """Raise :class:`AudioError` naming ``name`` if any sample is NaN or infinite."""
    if not isinstance(samples, np.ndarray):  # a torch.Tensor
        samples = samples.detach().cpu().numpy()
    finite = np.isfinite(samples)
    if not finite.all():
        bad = np.flatnonzero(~finite.reshape(-1))
        raise AudioError(
            f"{name}: audio contains {len(bad)} NaN or infinite sample(s), the first at "
            f"sample {bad[0]}"
        )


def load_audio(
    path: str | Path, sample_rate: int = SAMPLE_RATE, resample: bool = False
) -> torch.Tensor:
    """Whole file as a 1-D float32 tensor at ``sample_rate``.

    A file at another rate is an error unless ``resample`` is set (training and test data
    must already be 16 kHz; the inference API resamples whatever people give it).
    """
    import torch

    from speakerlab.resample import resample as resample_waveform

    samples, rate = read_audio(path)
    wav = torch.from_numpy(samples)
    if rate != sample_rate:
        if not resample:
            raise AudioError(f"{path}: sample rate is {rate} Hz, expected {sample_rate} Hz")
        try:
            wav = resample_waveform(wav, rate, sample_rate)
        except AudioError as err:
            raise AudioError(f"{path}: {err}") from None
    return wav


def _unreadable(path: str | Path, err: Exception) -> AudioError:
    """The one-line error for a file that cannot be opened, saying why in plain words."""
    file = Path(path)
    if not file.exists():
        return AudioError(f"{path}: file not found")
    if file.is_dir():
        return AudioError(f"{path}: is a directory, not an audio file")
    if not os.access(file, os.R_OK):
        return AudioError(f"{path}: permission denied")
    if file.stat().st_size == 0:
        return AudioError(f"{path}: not a readable audio file (the file is empty)")
    reason = getattr(err, "error_string", None) or str(err)
    return AudioError(f"{path}: not a readable audio file ({reason.strip().rstrip('.')})")


def _truncated(path: str | Path, promised: int, holds: int) -> str:
    return f"{path}: truncated: header promises {promised} samples, the file holds {holds}"


def _wav_layout(path: str | Path) -> tuple[int, int] | None:
    """``(frames the header promises, whole frames the file holds)`` of a RIFF WAV file, from its
    header and size alone; None for other formats and for sizes left open by streaming writers."""
    with open(path, "rb") as f:
        if f.read(4) != b"RIFF" or not f.read(4) or f.read(4) != b"WAVE":
            return None
        block_align = 0
        for _ in range(MAX_WAV_CHUNKS):
            header = f.read(8)
            if len(header) < 8:
                return None
            chunk_id, size = header[:4], struct.unpack("<I", header[4:])[0]
            if chunk_id == b"data":
                if block_align == 0 or size == UNKNOWN_DATA_SIZE:
                    return None
                held = min(size, os.fstat(f.fileno()).st_size - f.tell())
                return size // block_align, held // block_align
            if chunk_id == b"fmt " and size >= 14:
                block_align = struct.unpack("<H", f.read(14)[12:14])[0]
                size -= 14
            f.seek(size + (size & 1), os.SEEK_CUR)  # chunks are padded to an even size
    return None
