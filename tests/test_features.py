"""Kaldi fbank: the reference fixture, an independent float64 computation of the definition, and
(marked ``oracle``) equality with torchaudio's Kaldi fbank within 1e-4 on varied inputs."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch

from speakerlab.features import KaldiFbank, fbank, mel_banks, num_frames
from speakerlab.resample import resample

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "reference" / "fbank.pt"
PARITY = 1e-4  # max abs difference allowed against torchaudio, log-mel after mean normalisation


@cache
def varied_inputs() -> dict[str, torch.Tensor]:
    """Waveforms that stress different parts of fbank: lengths, levels, silence, empty bands."""
    g = torch.Generator().manual_seed(0)
    t = torch.arange(48000) / 16000
    cases = {f"noise_{n}": torch.randn(n, generator=g) * 0.2 for n in (400, 401, 16000, 33333)}
    cases["noise_8s"] = torch.randn(128000, generator=g) * 0.2
    cases["quiet"] = torch.randn(48000, generator=g) * 1e-4
    cases["int16_quiet"] = torch.round(torch.randn(48000, generator=g) * 3) / 32768
    cases["clipped"] = torch.randn(48000, generator=g).clamp(-1, 1)
    cases["digital_silence"] = torch.zeros(48000)
    gap = torch.randn(48000, generator=g) * 0.3
    gap[10000:30000] = 0  # frames of exact zeros: every mel energy at the log floor
    cases["silence_gap"] = gap
    hiss = torch.randn(48000, generator=g) * 0.3
    hiss[10000:30000] = 1e-6 * torch.randn(20000, generator=g)
    cases["near_silence"] = hiss
    cases["tone_440hz"] = 0.5 * torch.sin(2 * torch.pi * 440 * t)
    cases["dc_offset"] = 0.3 + 0.1 * torch.randn(48000, generator=g)
    # Audio upsampled from 8 kHz: nothing above 4 kHz, those bins hold rounding noise only.
    cases["upsampled_8k"] = resample(torch.randn(24000, generator=g) * 0.2, 8000, 16000)
    return cases


def fbank_float64(wav: np.ndarray, num_bins: int = 80, rate: int = 16000) -> np.ndarray:
    """Kaldi's fbank written from its definition in float64 numpy, mean-normalised."""
    width, shift = rate * 25 // 1000, rate * 10 // 1000
    size = 1 << (width - 1).bit_length()
    x = wav.astype(np.float64)
    frames = np.stack([x[i : i + width] for i in range(0, len(x) - width + 1, shift)])
    frames = frames - frames.mean(axis=1, keepdims=True)
    emphasised = frames - 0.97 * np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
    window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(width) / (width - 1))) ** 0.85
    power = np.abs(np.fft.rfft(emphasised * window, size)) ** 2

    def mel(f):
        return 1127.0 * np.log(1.0 + np.asarray(f) / 700.0)

    edges = np.linspace(mel(20.0), mel(rate / 2), num_bins + 2)[:, None]
    at = mel(np.arange(size // 2 + 1) * rate / size)[None, :]
    rising = (at - edges[:-2]) / (edges[1:-1] - edges[:-2])
    falling = (edges[2:] - at) / (edges[2:] - edges[1:-1])
    weights = np.maximum(0.0, np.minimum(rising, falling))
    feats = np.log(np.maximum(power @ weights.T, np.finfo(np.float32).eps))
    return feats - feats.mean(axis=0)


def test_fbank_equals_the_reference_fixture():
    """The stored reference features (Kaldi fbank of a 1.5 s waveform, mean-normalised)."""
    ref = torch.load(FIXTURE, weights_only=True)
    feats = fbank(ref["wav"].flatten(), sample_rate=int(ref["sample_rate"]))
    assert feats.shape == ref["fbank"].shape
    assert (feats - ref["fbank"]).abs().max() < PARITY


@pytest.mark.parametrize("name", ["noise_16000", "noise_8s", "clipped", "dc_offset"])
def test_fbank_follows_its_definition(name):
    """Against a float64 computation of the definition: float32 rounding aside, the same."""
    wav = varied_inputs()[name]
    expected = fbank_float64(wav.numpy())
    diff = np.abs(fbank(wav).double().numpy() - expected)
    # Most values agree to float32 precision; the few bins that hold little energy carry the
    # FFT's float32 rounding noise (see speakerlab/features.py), a few 1e-3 at most.
    assert np.median(diff) < 1e-5 and diff.max() < 5e-3


def test_fbank_of_other_rates_and_bin_counts_follows_its_definition():
    wav = varied_inputs()["noise_33333"]
    for rate, bins in ((16000, 40), (8000, 64)):
        diff = np.abs(
            fbank(wav, sample_rate=rate, num_mel_bins=bins).numpy()
            - fbank_float64(wav.numpy(), bins, rate)
        )
        assert np.median(diff) < 1e-5 and diff.max() < 5e-3


def test_one_implementation_for_training_and_evaluation():
    wav = varied_inputs()["noise_16000"]
    assert torch.equal(fbank(wav), KaldiFbank()(wav))
    raw = KaldiFbank(num_mel_bins=40, mean_norm=False)(wav)
    assert torch.equal(fbank(wav, num_mel_bins=40, mean_norm=False), raw)
    assert torch.allclose(raw - raw.mean(dim=0), fbank(wav, num_mel_bins=40), atol=1e-6)


def test_shapes_frames_and_floor():
    assert fbank(torch.zeros(48000) + 0.1 * torch.randn(48000)).shape == (298, 80)
    for n in (400, 401, 559, 560, 48000, 33333):
        assert fbank(torch.randn(n)).shape[0] == num_frames(n) == 1 + (n - 400) // 160
    assert num_frames(399) == 0
    silent = fbank(torch.zeros(16000), mean_norm=False)
    assert torch.all(silent == torch.log(torch.tensor(torch.finfo(torch.float32).eps)))
    assert fbank(torch.randn(16000, dtype=torch.float64)).dtype == torch.float32


def test_bad_waveforms_are_refused():
    with pytest.raises(ValueError, match="1-D"):
        fbank(torch.zeros(2, 16000))
    with pytest.raises(ValueError, match="shorter than one frame"):
        fbank(torch.zeros(399))


def test_mel_banks_by_hand():
    """Filter k rises from edge k to its centre k + 1 and falls to edge k + 2, edges equally
    spaced in mel from 20 Hz to Nyquist; weights of FFT bins 0..255 (no Nyquist bin)."""
    banks = mel_banks(80, 512, 16000)
    assert banks.shape == (80, 256) and banks.dtype == torch.float32
    mel = 1127.0 * np.log(1.0 + np.arange(256) * 31.25 / 700.0)
    edges = np.linspace(1127.0 * np.log(1 + 20 / 700), 1127.0 * np.log(1 + 8000 / 700), 82)
    for k in (0, 1, 40, 79):
        left, centre, right = edges[k : k + 3]
        expected = np.clip(
            np.minimum((mel - left) / (centre - left), (right - mel) / (right - centre)), 0, None
        )
        # float32 mel values near 2840 round to ~1e-4 mel: weights to a few 1e-5.
        np.testing.assert_allclose(banks[k].double().numpy(), expected, atol=5e-5)
    assert banks[0, 0] == 0 and banks[:, 1:].sum(0).max() <= 1.0 + 1e-5  # bins feed two filters
    with pytest.raises(ValueError, match="bad mel filterbank"):
        mel_banks(3, 512, 16000)


# ------------------------------------------------------------------------- oracle: torchaudio


def torchaudio_fbank(kaldi, wav, rate=16000, bins=80, mean_norm=True):
    feats = kaldi.fbank(wav.unsqueeze(0), num_mel_bins=bins, sample_frequency=rate, dither=0.0)
    return feats - feats.mean(dim=0, keepdim=True) if mean_norm else feats


@pytest.mark.oracle
def test_fbank_equals_torchaudio_on_the_fixture_and_varied_inputs(torchaudio):
    from torchaudio.compliance import kaldi

    fixture = torch.load(FIXTURE, weights_only=True)["wav"].flatten()
    cases = {**varied_inputs(), "fixture": fixture}
    worst = {}
    for name, wav in cases.items():
        for mean_norm in (True, False):
            ours = fbank(wav, mean_norm=mean_norm)
            theirs = torchaudio_fbank(kaldi, wav, mean_norm=mean_norm)
            assert ours.shape == theirs.shape, name
            worst[name, mean_norm] = float((ours - theirs).abs().max())
    assert max(worst.values()) < PARITY, sorted(worst.items(), key=lambda kv: -kv[1])[:3]


@pytest.mark.oracle
def test_fbank_equals_torchaudio_at_other_rates_and_bin_counts(torchaudio):
    from torchaudio.compliance import kaldi

    wav = varied_inputs()["noise_33333"]
    for rate, bins in ((16000, 40), (16000, 64), (8000, 80), (8000, 23)):
        ours = fbank(wav, sample_rate=rate, num_mel_bins=bins)
        assert (ours - torchaudio_fbank(kaldi, wav, rate, bins)).abs().max() < PARITY


@pytest.mark.oracle
def test_mel_banks_equal_torchaudio(torchaudio):
    from torchaudio.compliance import kaldi

    for bins, size, rate in ((80, 512, 16000), (40, 512, 16000), (64, 256, 8000), (23, 512, 16000)):
        theirs, _ = kaldi.get_mel_banks(bins, size, float(rate), 20.0, 0.0, 100.0, -500.0, 1.0)
        assert torch.equal(mel_banks(bins, size, rate), theirs)
