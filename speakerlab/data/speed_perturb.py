"""Speed perturbation that reads and resamples only the part of a file a crop needs.

Changing the speed by a factor ``s`` is resampling by ``1/s``: 0.9 turns every 9 samples into 10
(slower, lower pitch, a longer file), 1.1 turns 11 into 10. torchaudio's polyphase resampler
works in blocks of ``orig`` input samples that give ``new`` output samples, each output using
only input within ``width`` samples of its block. So resampling a stretch that starts on a block
boundary and has ``width`` spare samples on each side gives exactly the samples that perturbing
the whole file would give there, at a fraction of the reading and computing cost.

The resampling itself uses torchaudio's kernel but applies it as a polyphase filter: the input cut
into blocks of ``orig`` samples, each block of ``new`` outputs a sum of a few small matrix
products with slices of the kernel. That is the same arithmetic as torchaudio's strided
convolution (equal to float rounding) at about twice its speed on short crops.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import torch
import torchaudio.transforms

from speakerlab.audio import read_audio


def speed_ratio(speed: float) -> tuple[int, int]:
    """``(orig, new)``: resampling ``orig`` samples to ``new`` plays the audio at ``speed``."""
    if speed <= 0:
        raise ValueError(f"speed must be positive, got {speed}")
    ratio = Fraction(speed).limit_denominator(100)
    return ratio.numerator, ratio.denominator


class PolyphaseResampler:
    """``orig`` -> ``new`` samples with the kernel of ``torchaudio.transforms.Resample(orig, new)``.

    Gives what torchaudio's resampler gives for a 1-D float32 waveform (including its length,
    ``ceil(len * new / orig)``), within float32 rounding.
    """

    def __init__(self, orig: int, new: int):
        reference = torchaudio.transforms.Resample(orig, new)
        kernel = reference.kernel[:, 0, :].numpy()  # (new, taps): output phase x input offset
        self.orig, self.new, self.width = orig, new, int(reference.width)
        num_parts = -(-kernel.shape[1] // orig)
        weights = np.zeros((num_parts * orig, new), dtype=np.float32)
        weights[: kernel.shape[1]] = kernel.T
        # Part j multiplies the input block j places after the output block's own.
        self.parts = [weights[j * orig : (j + 1) * orig] for j in range(num_parts)]

    def output_length(self, num_samples: int) -> int:
        return -(-int(num_samples) * self.new // self.orig)

    def __call__(self, wav: np.ndarray) -> np.ndarray:
        out_length = self.output_length(len(wav))
        num_blocks = -(-out_length // self.new)
        # torchaudio pads ``width`` zeros in front; the zeros behind cover the last block's reach.
        padded = np.zeros((num_blocks + len(self.parts) - 1) * self.orig, dtype=np.float32)
        kept = min(len(wav), len(padded) - self.width)
        padded[self.width : self.width + kept] = wav[:kept]
        blocks = padded.reshape(-1, self.orig)
        out = blocks[:num_blocks] @ self.parts[0]
        for j, part in enumerate(self.parts[1:], start=1):
            out += blocks[j : j + num_blocks] @ part
        return out.reshape(-1)[:out_length]


class SpeedPerturbation:
    """Reads crops of files as if each whole file had been speed-perturbed first."""

    def __init__(self, speeds: tuple[float, ...]):
        self.speeds = tuple(float(s) for s in speeds)
        self.ratios = {s: speed_ratio(s) for s in self.speeds if s != 1.0}
        self.resamplers = {
            s: PolyphaseResampler(orig, new) for s, (orig, new) in self.ratios.items()
        }

    def perturbed_length(self, num_samples: int, speed: float) -> int:
        """Length of the whole file after perturbation (as torchaudio's resampler gives it)."""
        if speed == 1.0:
            return int(num_samples)
        return self.resamplers[speed].output_length(num_samples)

    def perturb(self, wav: torch.Tensor, speed: float) -> torch.Tensor:
        """The whole waveform at ``speed``, by torchaudio (what :meth:`read_crop` reproduces)."""
        if speed == 1.0:
            return wav
        orig, new = self.ratios[speed]
        return torchaudio.functional.resample(wav, orig, new)

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
        # Beyond the end of the perturbed file there is nothing (nor beyond what the file really
        # holds, should it be shorter than its indexed length): pad with zeros.
        valid = max(0, min(length, self.perturbed_length(num_samples, speed) - start, len(piece)))
        result = np.zeros(length, dtype=np.float32)
        result[:valid] = piece[:valid]
        return result


def _read_padded(path: str, start: int, frames: int, length: int) -> np.ndarray:
    """``frames`` samples from ``start``, zero-padded to ``length``."""
    if frames <= 0:
        return np.zeros(length, dtype=np.float32)
    samples, _ = read_audio(path, start, frames)
    if len(samples) >= length:
        return np.ascontiguousarray(samples[:length])
    return np.pad(samples, (0, length - len(samples)))
