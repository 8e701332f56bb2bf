"""Additive-noise and reverberation augmentation from prepared noise and room-response lists.

As in the reference recipe: with probability ``prob`` an item gets one of reverberation, noise, or
reverberation then noise, chosen uniformly; the room response is scaled to unit energy, convolved
and cut to the input length; noise is mixed at an SNR drawn uniformly from ``snr_db``; the result
is peak-normalised after each step. All random choices come from the caller's generator, so an
item's augmentation is reproducible.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import scipy.fft

from speakerlab.audio import SAMPLE_RATE, complete_audio_info, read_audio
from speakerlab.data.kaldi_dir import read_wav_scp
from speakerlab.errors import AudioError, DataError

logger = logging.getLogger(__name__)

REVERB, NOISE, REVERB_NOISE = "reverb", "noise", "reverb+noise"


def energy(wav: np.ndarray) -> float:
    """Sum of squares, accumulated in float64.

    Not ``np.dot``: BLAS would start threads for long vectors, which costs milliseconds in a
    DataLoader worker on a busy machine.
    """
    return float(np.einsum("i,i->", wav, wav, dtype=np.float64))


def peak_normalise(wav: np.ndarray) -> np.ndarray:
    """Scale to a peak magnitude of 1 (silence stays silence)."""
    peak = max(float(wav.max(initial=0.0)), -float(wav.min(initial=0.0)))
    return wav / peak if peak > 0 else wav


def fft_size(length: int) -> int:
    """An FFT length >= ``length`` that is quick to transform: a power of two unless a smooth
    length is much shorter (pocketfft is fastest on powers of two)."""
    power_of_two = 1 << (length - 1).bit_length()
    smooth = scipy.fft.next_fast_len(length, real=True)
    return power_of_two if power_of_two <= 1.2 * smooth else smooth


def add_reverb(wav: np.ndarray, rir: np.ndarray) -> np.ndarray:
    """Convolve with ``rir`` (scaled to unit energy), keep the input length, peak-normalise."""
    rir_energy = energy(rir)
    if rir_energy <= 0:
        raise ValueError("room impulse response is all zeros")
    # Response samples past the input length cannot reach the kept output: leave them out.
    rir = rir[: len(wav)]
    size = fft_size(len(wav) + len(rir) - 1)  # linear, not circular, convolution
    spectrum = scipy.fft.rfft(wav, size) * scipy.fft.rfft(rir, size)
    wet = scipy.fft.irfft(spectrum, size)[: len(wav)] / math.sqrt(rir_energy)
    return peak_normalise(wet.astype(np.float32, copy=False))


def mix_at_snr(wav: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """``wav + g * noise``, with the gain ``g`` that makes the ratio of the mean powers of ``wav``
    and ``g * noise`` equal to ``snr_db`` decibels.

    ``wav`` and ``noise`` are 1-D and of the same length; the result is a new array of ``wav``'s
    dtype (float32 in training, float64 in the simulator). If either input is all zeros there is
    no such gain: the result is a copy of ``wav``.
    """
    if wav.shape != noise.shape or wav.ndim != 1:
        raise ValueError(
            f"mix_at_snr needs 1-D arrays of one length, got {wav.shape} and {noise.shape}"
        )
    speech_power = energy(wav) / len(wav)
    noise_power = energy(noise) / len(noise)
    if speech_power == 0 or noise_power == 0:
        return wav.copy()
    gain = math.sqrt(speech_power / (noise_power * 10.0 ** (snr_db / 10.0)))
    return (wav + gain * noise).astype(wav.dtype, copy=False)


def add_noise(wav: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """Mix at ``snr_db`` and peak-normalise."""
    return peak_normalise(mix_at_snr(wav, noise, snr_db))


class Augmenter:
    """Noise/reverb augmentation drawing files from ``noise_list`` and ``rir_list`` (wav.scp files).

    Either list may be None: then only the other kind is applied. Noise file lengths are read
    once from their headers (unusable files are reported and left out) so that only the needed
    stretch of a noise file is read per item; room responses are short and kept in memory after
    their first use.
    """

    def __init__(
        self,
        noise_list: str | Path | None = None,
        rir_list: str | Path | None = None,
        snr_db: tuple[float, float] = (0.0, 15.0),
        prob: float = 0.8,
    ):
        if not 0.0 <= prob <= 1.0:
            raise DataError(f"augmentation probability must be in [0, 1], got {prob}")
        if len(snr_db) != 2 or snr_db[0] > snr_db[1]:
            raise DataError(f"snr_db must be [low, high] with low <= high, got {list(snr_db)}")
        self.prob = float(prob)
        self.snr_db = (float(snr_db[0]), float(snr_db[1]))
        self.noise_paths, self.noise_lengths = self._usable(noise_list, "noise")
        self.rir_paths, _ = self._usable(rir_list, "room impulse response")
        self.kinds = ([REVERB] if self.rir_paths else []) + ([NOISE] if self.noise_paths else [])
        if len(self.kinds) == 2:
            self.kinds.append(REVERB_NOISE)
        self._rirs: dict[str, np.ndarray] = {}

    @staticmethod
    def _usable(list_path: str | Path | None, what: str) -> tuple[list[str], np.ndarray]:
        if list_path is None:
            return [], np.zeros(0, dtype=np.int64)
        paths, lengths = [], []
        for path in read_wav_scp(list_path).values():
            try:
                info = complete_audio_info(path)
            except AudioError as err:
                logger.warning("leaving out %s file: %s", what, err)
                continue
            if info.samplerate != SAMPLE_RATE or info.frames == 0:
                logger.warning(
                    "leaving out %s file %s: %d samples at %d Hz (need 16 kHz audio)",
                    what,
                    path,
                    info.frames,
                    info.samplerate,
                )
                continue
            paths.append(path)
            lengths.append(info.frames)
        if not paths:
            raise DataError(f"{list_path}: no usable {what} files")
        return paths, np.array(lengths, dtype=np.int64)

    @property
    def enabled(self) -> bool:
        return self.prob > 0 and bool(self.kinds)

    def room_response(self, path: str) -> np.ndarray:
        """The response of ``path`` (channel 0), cached."""
        if path not in self._rirs:
            rir, _ = read_audio(path)
            if not np.any(rir):
                raise AudioError(f"{path}: room impulse response is all zeros")
            self._rirs[path] = rir
        return self._rirs[path]

    def noise_segment(self, index: int, length: int, rng: np.random.Generator) -> np.ndarray:
        """A random stretch of ``length`` samples of noise file ``index`` (looped if shorter)."""
        path, total = self.noise_paths[index], int(self.noise_lengths[index])
        if total >= length:
            start = int(rng.integers(0, total - length + 1))
            noise, _ = read_audio(path, start, length)
        else:
            noise, _ = read_audio(path)
            noise = np.tile(noise, -(-length // len(noise)))
        if len(noise) < length:
            raise AudioError(
                f"{path}: holds fewer samples than the {total} its header gave when the noise "
                "list was read (the file changed since)"
            )
        return noise[:length]

    def __call__(self, wav: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Augment ``wav`` (float32, 1-D) or return it unchanged, as ``rng`` decides."""
        if not self.enabled or rng.random() >= self.prob:
            return wav
        kind = self.kinds[int(rng.integers(len(self.kinds)))]
        if kind in (REVERB, REVERB_NOISE):
            rir = self.room_response(self.rir_paths[int(rng.integers(len(self.rir_paths)))])
            wav = add_reverb(wav, rir)
        if kind in (NOISE, REVERB_NOISE):
            noise = self.noise_segment(int(rng.integers(len(self.noise_paths))), len(wav), rng)
            wav = add_noise(wav, noise, float(rng.uniform(*self.snr_db)))
        return wav
