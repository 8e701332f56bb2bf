"""Band-limited resampling by windowed-sinc interpolation (torchaudio's default method and numbers).

Resampling from rate ``a`` to rate ``b`` first reduces the ratio by its greatest common divisor to
``orig -> new`` (16 kHz -> 8 kHz is 2 -> 1). Input sample ``m`` sits at time ``m / orig``, output
sample ``n`` at time ``n / new``, and

    y[n] = sum_m x[m] * h((m / orig - n / new) * cutoff),   cutoff = ROLLOFF * min(orig, new)

    h(t) = sinc(t) * cos(pi t / (2 LOWPASS_WIDTH))^2 * cutoff / orig  if |t| < LOWPASS_WIDTH
    h(t) = 0                                                            otherwise

with ``sinc(t) = sin(pi t) / (pi t)``: an ideal low-pass at ``ROLLOFF`` of the lower Nyquist
frequency, cut after ``LOWPASS_WIDTH`` zero crossings on each side and tapered by a Hann window.
Samples outside the input count as zeros; the output has ``ceil(len * new / orig)`` samples. These
are the defaults of ``torchaudio.functional.resample`` (``sinc_interp_hann``, width 6, rolloff
0.99), whose outputs this reproduces to float32 rounding.

Output sample ``n`` only uses inputs within ``width = ceil(LOWPASS_WIDTH * orig / cutoff)`` samples
of ``n * orig / new``, and the weights repeat every ``new`` outputs (``orig`` inputs later). So
outputs come in blocks of ``new``: block ``b`` is the window of ``2 * width + orig`` inputs that
starts at input ``b * orig - width``, times one ``(taps, new)`` weight matrix built once per ratio.
All blocks are one matrix product.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

from speakerlab.errors import AudioError

LOWPASS_WIDTH = 6  # zero crossings of the sinc kept on each side
ROLLOFF = 0.99  # cutoff as a fraction of the lower of the two Nyquist frequencies
MAX_KERNEL_BYTES = 256 << 20  # ratios whose filter would need more memory are refused


def reduced_ratio(orig_rate: int, new_rate: int) -> tuple[int, int]:
    """``(orig, new)``: the two rates divided by their greatest common divisor."""
    if int(orig_rate) != orig_rate or int(new_rate) != new_rate or orig_rate <= 0 or new_rate <= 0:
        raise ValueError(f"sample rates must be positive integers, got {orig_rate} -> {new_rate}")
    gcd = math.gcd(int(orig_rate), int(new_rate))
    return int(orig_rate) // gcd, int(new_rate) // gcd


def filter_width(orig: int, new: int) -> int:
    """How many input samples an output sample reaches on each side."""
    return math.ceil(LOWPASS_WIDTH * orig / (ROLLOFF * min(orig, new)))


def sinc_kernel(orig: int, new: int) -> tuple[np.ndarray, int]:
    """``(kernel, width)``: float32 weights ``kernel[j, k]`` of input ``k - width`` (relative to the
    block start) for output phase ``j``, shape ``(new, 2 * width + orig)``; computed in float64."""
    cutoff = ROLLOFF * min(orig, new)
    width = filter_width(orig, new)
    inputs = np.arange(-width, width + orig) / orig
    outputs = np.arange(new)[:, None] / new
    t = (inputs - outputs) * cutoff
    taper = np.cos(np.pi * t / (2 * LOWPASS_WIDTH)) ** 2
    kernel = np.where(np.abs(t) < LOWPASS_WIDTH, np.sinc(t) * taper, 0.0) * (cutoff / orig)
    return kernel.astype(np.float32), width


class Resampler:
    """``orig -> new`` samples (a reduced ratio) of 1-D float32 numpy waveforms."""

    def __init__(self, orig: int, new: int):
        kernel_bytes = 8 * new * (2 * filter_width(orig, new) + orig)  # float64 while computed
        if kernel_bytes > MAX_KERNEL_BYTES:
            raise AudioError(
                f"cannot resample at the ratio {orig}:{new} (the rates divided by their common "
                f"factor): its filter would take {kernel_bytes >> 20} MB; convert the audio to a "
                "common rate first"
            )
        kernel, self.width = sinc_kernel(orig, new)
        self.orig, self.new = orig, new
        self.weights = np.ascontiguousarray(kernel.T)  # (taps, new)

    def output_length(self, num_samples: int) -> int:
        return -(-int(num_samples) * self.new // self.orig)

    def __call__(self, wav: np.ndarray) -> np.ndarray:
        out_length = self.output_length(len(wav))
        if out_length == 0:
            return np.zeros(0, dtype=np.float32)
        num_blocks = -(-out_length // self.new)
        taps = len(self.weights)
        # ``width`` zeros in front (the first block reaches that far back), zeros behind as far
        # as the last block reaches.
        padded = np.zeros((num_blocks - 1) * self.orig + taps, dtype=np.float32)
        kept = min(len(wav), len(padded) - self.width)
        padded[self.width : self.width + kept] = wav[:kept]
        windows = np.lib.stride_tricks.sliding_window_view(padded, taps)[:: self.orig]
        return (windows @ self.weights).reshape(-1)[:out_length]


@lru_cache(maxsize=16)
def resampler(orig_rate: int, new_rate: int) -> Resampler:
    """The (cached) resampler from ``orig_rate`` to ``new_rate``."""
    return Resampler(*reduced_ratio(orig_rate, new_rate))


def resample(wav: torch.Tensor, orig_rate: int, new_rate: int) -> torch.Tensor:
    """1-D ``wav`` at ``orig_rate`` resampled to ``new_rate``, as float32 (see the module doc)."""
    if wav.dim() != 1:
        raise ValueError(f"resample expects a 1-D waveform, got shape {tuple(wav.shape)}")
    if orig_rate == new_rate:
        return wav
    samples = wav.detach().to("cpu", torch.float32).numpy()
    return torch.from_numpy(resampler(int(orig_rate), int(new_rate))(samples))
