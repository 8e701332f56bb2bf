"""Kaldi log-mel filterbank (fbank) features: the one implementation for training and evaluation.

The numbers are Kaldi's ``compute-fbank-feats`` with these options (those of
``torchaudio.compliance.kaldi.fbank`` with ``dither=0``): 25 ms frames every 10 ms, only frames
that fit entirely ("snip edges"); per frame, DC removal, pre-emphasis 0.97 (the first sample is
its own predecessor), a Povey window (Hann raised to 0.85), zero-padding to 512 points, power
spectrum, triangular filters equally spaced on the mel scale from 20 Hz to Nyquist, natural log
floored at float32 epsilon. No dither, so features are the same on every run. Then the mean over
time is subtracted from each bin.

Bins that hold almost no energy (a band above the content of upsampled audio, far from a pure
tone) are FFT rounding noise, and their log depends on the exact float32 rounding of the frame
before the FFT. The frame is therefore computed with the same float32 operations, in the same
order, as torchaudio's implementation, which makes those bins agree too: the features equal
torchaudio's to a few 1e-6, whereas a float64 computation of the same definition differs from
either by up to a few 1e-3 in such bins.

The window and the filterbank are built once per configuration, the framing is one ``unfold``,
and the mel product is a sparse matrix product (each FFT bin feeds at most two filters).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import scipy.sparse
import torch

NUM_MEL_BINS = 80
FRAME_SHIFT_MS = 10.0
FRAME_LENGTH_MS = 25.0
PREEMPHASIS = 0.97
POVEY_EXPONENT = 0.85  # Kaldi's "povey" window: a Hann window raised to this power
LOW_FREQ_HZ = 20.0
LOG_FLOOR = torch.finfo(torch.float32).eps  # Kaldi floors energies at float epsilon before log


def mel(freq_hz: torch.Tensor | float) -> torch.Tensor | float:
    """Kaldi's mel scale: ``1127 ln(1 + f / 700)``."""
    if isinstance(freq_hz, torch.Tensor):
        return 1127.0 * torch.log(1.0 + freq_hz / 700.0)
    return 1127.0 * math.log(1.0 + freq_hz / 700.0)


def mel_banks(
    num_bins: int,
    fft_size: int,
    sample_rate: float,
    low_freq: float = LOW_FREQ_HZ,
    high_freq: float = 0.0,
) -> torch.Tensor:
    """Kaldi's triangular mel filters: float32 ``(num_bins, fft_size // 2)`` weights of FFT bins
    ``0 .. fft_size / 2 - 1`` (no Nyquist bin).

    ``high_freq <= 0`` counts down from Nyquist. The filters' edges are equally spaced on the mel
    scale, each filter rising from its left edge to its centre and falling to its right edge (the
    next filter's centre). Computed in float32 with the operations of torchaudio's version, whose
    weights these equal to the last bit.
    """
    nyquist = 0.5 * sample_rate
    high_freq = high_freq if high_freq > 0 else high_freq + nyquist
    if num_bins <= 3 or fft_size % 2 or not 0.0 <= low_freq < high_freq <= nyquist:
        raise ValueError(
            f"bad mel filterbank: {num_bins} bins, FFT size {fft_size}, "
            f"{low_freq}-{high_freq} Hz at {sample_rate} Hz"
        )
    low_mel, high_mel = mel(low_freq), mel(high_freq)
    step = (high_mel - low_mel) / (num_bins + 1)
    index = torch.arange(num_bins).unsqueeze(1)
    left = low_mel + index * step
    centre = low_mel + (index + 1.0) * step
    right = low_mel + (index + 2.0) * step
    bin_mel = mel(sample_rate / fft_size * torch.arange(fft_size // 2)).unsqueeze(0)
    rising = (bin_mel - left) / (centre - left)
    falling = (right - bin_mel) / (right - centre)
    return torch.minimum(rising, falling).clamp_min(0.0)


class KaldiFbank:
    """Callable ``wav (samples,) -> fbank (frames, num_mel_bins)``, float32, mean-normalised over
    time unless ``mean_norm`` is False. See the module docstring for the definition."""

    def __init__(
        self, num_mel_bins: int = NUM_MEL_BINS, sample_rate: int = 16000, mean_norm: bool = True
    ):
        self.window_length = int(sample_rate * FRAME_LENGTH_MS / 1000)
        self.shift = int(sample_rate * FRAME_SHIFT_MS / 1000)
        self.fft_size = 1 << (self.window_length - 1).bit_length()  # next power of two
        self.mean_norm = mean_norm
        self.window = torch.hann_window(self.window_length, periodic=False).pow(POVEY_EXPONENT)
        banks = mel_banks(num_mel_bins, self.fft_size, sample_rate)
        # Zero weight for the Nyquist bin so that the matrix fits the whole spectrum. Sparse:
        # quicker than a dense product at this size, and it starts no BLAS threads.
        self.mel_matrix = scipy.sparse.csr_matrix(torch.nn.functional.pad(banks, (0, 1)).numpy())

    def __call__(self, wav: torch.Tensor) -> torch.Tensor:
        if wav.dim() != 1:
            raise ValueError(f"fbank expects a 1-D waveform, got shape {tuple(wav.shape)}")
        if wav.numel() < self.window_length:
            raise ValueError(
                f"waveform of {wav.numel()} samples is shorter than one frame "
                f"({self.window_length})"
            )
        power = self.power_spectrum(wav.detach().to("cpu", torch.float32))
        energies = (self.mel_matrix @ power.numpy().T).T
        feats = torch.from_numpy(np.ascontiguousarray(energies)).clamp_min_(LOG_FLOOR).log_()
        if self.mean_norm:
            feats = feats - feats.mean(dim=0, keepdim=True)
        return feats

    def power_spectrum(self, wav: torch.Tensor) -> torch.Tensor:
        """Power spectra ``(frames, fft_size // 2 + 1)`` of the windowed frames of ``wav``."""
        frames = wav.unfold(0, self.window_length, self.shift)
        centred = frames - frames.mean(dim=1, keepdim=True)  # DC removal per frame
        buffer = torch.zeros(len(frames), self.fft_size)  # zeros beyond the window: FFT padding
        # Pre-emphasis as x[t] - (0.97 * x[t-1]) with x[-1] = x[0], rounded twice in float32 as
        # torchaudio does; a fused multiply-subtract rounds once and moves the near-empty bins by
        # up to 1e-3 (see above).
        emphasised = buffer[:, : self.window_length]
        torch.mul(centred[:, :-1], PREEMPHASIS, out=emphasised[:, 1:])
        torch.mul(centred[:, 0], PREEMPHASIS, out=emphasised[:, 0])
        torch.sub(centred, emphasised, out=emphasised)
        emphasised *= self.window
        spectrum = torch.fft.rfft(buffer)
        # re^2 + im^2, not |X|^2 (torchaudio's): equal to an ulp and four times quicker than abs.
        return spectrum.real.square() + spectrum.imag.square()


@lru_cache(maxsize=8)
def _extractor(sample_rate: int, num_mel_bins: int, mean_norm: bool) -> KaldiFbank:
    return KaldiFbank(num_mel_bins, sample_rate, mean_norm)


def fbank(
    wav: torch.Tensor,
    sample_rate: int = 16000,
    num_mel_bins: int = NUM_MEL_BINS,
    mean_norm: bool = True,
) -> torch.Tensor:
    """Log-mel fbank of a 1-D waveform in [-1, 1]: float32 ``(frames, num_mel_bins)``.

    25 ms windows every 10 ms, no dither, then (``mean_norm``) the mean over time is subtracted.
    3 s at 16 kHz gives 298 frames.
    """
    return _extractor(int(sample_rate), int(num_mel_bins), bool(mean_norm))(wav)


def num_frames(num_samples: int, sample_rate: int = 16000) -> int:
    """Number of fbank frames for ``num_samples`` samples (Kaldi's snip-edges framing)."""
    window = int(sample_rate * FRAME_LENGTH_MS / 1000)
    shift = int(sample_rate * FRAME_SHIFT_MS / 1000)
    return 0 if num_samples < window else 1 + (num_samples - window) // shift
