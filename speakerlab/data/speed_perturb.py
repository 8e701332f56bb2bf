"""Speed perturbation that reads and resamples only the part of a file a crop needs.

Changing the speed by a factor ``s`` is resampling by ``1/s``: 0.9 turns every 9 samples into 10
(slower, lower pitch, a longer file), 1.1 turns 11 into 10. The resampler
(:mod:`speakerlab.resample`) works in blocks of ``orig`` input samples that give ``new`` output
samples, each output using only input within ``width`` samples of its block. So resampling a
stretch that starts on a block boundary and has ``width`` spare samples on each side gives exactly
the samples that perturbing the whole file would give there, at a fraction of the reading and
computing cost.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import torch

from speakerlab.audio import read_audio
from speakerlab.errors import AudioError
from speakerlab.resample import Resampler


def speed_ratio(speed: float) -> tuple[int, int]:
    """``(orig, new)``: resampling ``orig`` samples to ``new`` plays the audio at ``speed``."""
    if speed <= 0:
        raise ValueError(f"speed must be positive, got {speed}")
    ratio = Fraction(speed).limit_denominator(100)
    return ratio.numerator, ratio.denominator


class SpeedPerturbation:
    """Reads crops of files as if each whole file had been speed-perturbed first."""

    def __init__(self, speeds: tuple[float, ...]):
        self.speeds = tuple(float(s) for s in speeds)
        self.ratios = {s: speed_ratio(s) for s in self.speeds if s != 1.0}
        self.resamplers = {s: Resampler(orig, new) for s, (orig, new) in self.ratios.items()}

    def perturbed_length(self, num_samples: int, speed: float) -> int:
        """Length of the whole file after perturbation."""
        if speed == 1.0:
            return int(num_samples)
        return self.resamplers[speed].output_length(num_samples)

    def perturb(self, wav: torch.Tensor, speed: float) -> torch.Tensor:
        """The whole waveform at ``speed`` (what :meth:`read_crop` reproduces piece by piece)."""
        if speed == 1.0:
            return wav
        return torch.from_numpy(self.resamplers[speed](wav.float().numpy()))

    def read_crop(
        self, path: str, num_samples: int, speed: float, start: int, length: int
    ) -> np.ndarray:
        """Samples ``[start, start + length)`` of the file at ``speed``; zeros past its end.

        ``num_samples`` is the file's length (from the index), so no header is read here.
        """
        if speed == 1.0:
            return _read_padded(path, start, min(length, num_samples - start), length)
        orig, new = self.ratios[speed]
        resampler = self.resamplers[speed]
        margin = -(-resampler.width // orig) + 1  # input reach of a block beyond itself, in blocks
        first_block = max(0, start // new - margin)
        last_block = (start + length - 1) // new + margin + 1
        in_start = first_block * orig
        in_stop = min(num_samples, last_block * orig)
        chunk = _read_padded(path, in_start, in_stop - in_start, in_stop - in_start)
        out = resampler(chunk)
        offset = start - first_block * new
        piece = out[offset : offset + length]
        # Beyond the end of the perturbed file there is nothing: pad with zeros.
        valid = max(0, min(length, self.perturbed_length(num_samples, speed) - start, len(piece)))
        result = np.zeros(length, dtype=np.float32)
        result[:valid] = piece[:valid]
        return result


def _read_padded(path: str, start: int, frames: int, length: int) -> np.ndarray:
    """``frames`` samples from ``start`` (inside the file by its indexed length), zero-padded to
    ``length``; a file shorter than its index entry is an error, not a silently padded crop."""
    if frames <= 0:
        return np.zeros(length, dtype=np.float32)
    samples, _ = read_audio(path, start, frames)
    if len(samples) < frames:
        raise AudioError(
            f"{path}: holds {start + len(samples)} samples, its index entry promises at least "
            f"{start + frames}: the file changed after the index was built (rebuild the index)"
        )
    return np.pad(samples, (0, length - frames)) if length > frames else samples
