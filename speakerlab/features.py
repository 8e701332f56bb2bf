"""Kaldi-compatible log-mel filterbank features with per-utterance mean normalisation."""

from __future__ import annotations

import torch
import torchaudio.compliance.kaldi as kaldi

NUM_MEL_BINS = 80
FRAME_SHIFT_MS = 10.0
FRAME_LENGTH_MS = 25.0


def fbank(
    wav: torch.Tensor,
    sample_rate: int = 16000,
    num_mel_bins: int = NUM_MEL_BINS,
    mean_norm: bool = True,
) -> torch.Tensor:
    """Log-mel fbank of a 1-D waveform in [-1, 1]: ``(frames, num_mel_bins)``.

    25 ms windows every 10 ms, no dither (so embeddings are the same on every run), then the mean
    over time is subtracted. 3 s at 16 kHz gives 298 frames.
    """
    if wav.dim() != 1:
        raise ValueError(f"fbank expects a 1-D waveform, got shape {tuple(wav.shape)}")
    feats = kaldi.fbank(
        wav.unsqueeze(0),
        num_mel_bins=num_mel_bins,
        sample_frequency=sample_rate,
        frame_length=FRAME_LENGTH_MS,
        frame_shift=FRAME_SHIFT_MS,
        dither=0.0,
    )
    if mean_norm:
        feats = feats - feats.mean(dim=0, keepdim=True)
    return feats


def num_frames(num_samples: int, sample_rate: int = 16000) -> int:
    """Number of fbank frames for ``num_samples`` samples (Kaldi's snip-edges framing)."""
    window = int(sample_rate * FRAME_LENGTH_MS / 1000)
    shift = int(sample_rate * FRAME_SHIFT_MS / 1000)
    return 0 if num_samples < window else 1 + (num_samples - window) // shift
