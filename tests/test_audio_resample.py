"""Resampling: what a band-limited resampler must do, and (marked ``oracle``) equality with
torchaudio's default resampler (Hann-windowed sinc, width 6, rolloff 0.99)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import soundfile
import torch

from speakerlab.audio import load_audio
from speakerlab.errors import AudioError
from speakerlab.resample import Resampler, reduced_ratio, resample

RATE_PAIRS = [(8000, 16000), (16000, 8000), (44100, 16000), (48000, 16000), (22050, 16000)]
RATE_PAIRS += [(11025, 16000), (32000, 16000), (9, 10), (11, 10), (3, 4)]  # speed perturbation
PARITY = 1e-4  # against torchaudio's float32 resamplers, whose long float32 sums differ by 2e-5
EXACT = 1e-6  # against torchaudio's resampler run in float64


def sine(freq: float, rate: int, seconds: float, phase: float = 0.3) -> torch.Tensor:
    t = torch.arange(int(rate * seconds), dtype=torch.float64) / rate
    return torch.sin(2 * math.pi * freq * t + phase).float()


@pytest.mark.parametrize("orig,new", [(8000, 16000), (44100, 16000), (48000, 16000)])
def test_a_tone_in_the_passband_comes_out_as_the_same_tone(orig, new):
    out = resample(sine(1000.0, orig, 1.0), orig, new)
    assert out.shape == (math.ceil(orig * 1.0 * new / orig),) and out.dtype == torch.float32
    expected = sine(1000.0, new, 1.0)
    middle = slice(new // 10, -new // 10)  # away from the zero-padded edges
    assert (out[middle] - expected[middle]).abs().max() < 2e-3


def test_content_above_the_new_nyquist_frequency_is_removed():
    out = resample(sine(6000.0, 16000, 1.0), 16000, 8000)  # 6 kHz does not exist at 8 kHz
    assert out[800:-800].abs().max() < 1e-2  # instead of aliasing to 2 kHz at full level


@pytest.mark.parametrize("length", [1, 7, 1000, 40_001])
@pytest.mark.parametrize("orig,new", [(9, 10), (11, 10), (1, 2), (3, 1)])
def test_lengths_and_linearity(orig, new, length):
    a = torch.from_numpy(np.random.default_rng(length).standard_normal(length).astype(np.float32))
    b = torch.flip(a, [0])
    out = resample(a, orig, new)
    assert out.shape == (-(-length * new // orig),)
    assert torch.allclose(
        resample(2 * a - b, orig, new), 2 * out - resample(b, orig, new), atol=1e-5
    )


def test_same_rate_empty_input_and_bad_arguments():
    wav = torch.randn(100)
    assert resample(wav, 16000, 16000) is wav
    assert resample(torch.zeros(0), 8000, 16000).shape == (0,)
    assert reduced_ratio(44100, 16000) == (441, 160)
    with pytest.raises(ValueError, match="1-D"):
        resample(torch.zeros(2, 100), 8000, 16000)
    with pytest.raises(ValueError, match="positive integers"):
        resample(wav, 0, 16000)
    with pytest.raises(AudioError, match="convert the audio to a common rate first"):
        resample(wav, 16001, 16000)  # a 16001:16000 filter would take gigabytes


def test_load_audio_resamples_on_request_and_refuses_otherwise(tmp_path):
    path = tmp_path / "tone_8k.wav"
    soundfile.write(path, sine(440.0, 8000, 0.5).numpy(), 8000, subtype="FLOAT")
    with pytest.raises(AudioError, match="sample rate is 8000 Hz, expected 16000 Hz"):
        load_audio(path)
    wav = load_audio(path, resample=True)
    assert torch.equal(wav, resample(sine(440.0, 8000, 0.5), 8000, 16000))
    odd = tmp_path / "odd.wav"
    soundfile.write(odd, np.zeros(1000, dtype=np.float32), 16001)
    with pytest.raises(AudioError, match=r"odd\.wav: cannot resample"):
        load_audio(odd, resample=True)


# ------------------------------------------------------------------------- oracle: torchaudio


@pytest.mark.oracle
@pytest.mark.parametrize("orig,new", RATE_PAIRS)
def test_resample_equals_torchaudio(torchaudio, orig, new):
    import torchaudio.functional
    import torchaudio.transforms

    for length in (1, 23, 1000, 40_001):
        wav = torch.from_numpy(
            np.random.default_rng(length).standard_normal(length).astype(np.float32) * 0.3
        )
        ours = resample(wav, orig, new)
        functional = torchaudio.functional.resample(wav, orig, new)
        transform = torchaudio.transforms.Resample(orig, new)(wav)
        exact = torchaudio.functional.resample(wav.double(), orig, new)
        assert ours.shape == functional.shape == transform.shape == exact.shape
        assert (ours - functional).abs().max() < PARITY
        assert (ours - transform).abs().max() < PARITY
        assert (ours - exact).abs().max() < EXACT


@pytest.mark.oracle
def test_resampler_kernel_equals_torchaudio(torchaudio):
    import torchaudio.transforms

    for orig, new in ((9, 10), (11, 10), (441, 160), (1, 2)):
        theirs = torchaudio.transforms.Resample(orig, new)
        ours = Resampler(orig, new)
        assert ours.width == theirs.width
        kernel = ours.weights.T
        # Theirs computes the output phases j / new in float32, ours in float64.
        assert np.abs(kernel - theirs.kernel[:, 0, :].numpy()).max() < 1e-5
