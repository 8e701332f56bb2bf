"""Source-filter speech synthesis: glottal pulses and noise through moving formants.

An utterance is planned as phones (syllables of an optional fricative, a vowel and an optional
nasal, grouped in words with pauses), turned into a pitch track and spectral envelopes per 8 ms
frame, and filtered frame by frame in the STFT domain.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.ndimage
import scipy.signal

from local.simulate.voices import Dialect, Voice
from speakerlab.audio import SAMPLE_RATE

HOP = 128  # STFT hop of the synthesis (8 ms)
NFFT = 512


_NASAL_FORMANTS = np.array([[250, 1000, 2300], [250, 1500, 2400], [250, 2000, 2600]], dtype=float)
_PAUSE, _VOWEL, _FRICATIVE, _NASAL = 0, 1, 2, 3


def _plan_segments(
    voice: Voice, dialect: Dialect, seconds: float, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Phone segments filling ``seconds``: kind, end time, formant/fricative targets, tones.

    Syllables are (fricative) vowel (nasal), grouped in words of 1-3 syllables with optional
    pauses between words. A short Python loop over phones (tens per utterance); all the
    per-sample work is vectorised later.
    """
    scale = dialect.tempo / voice.rate
    rows: list[tuple] = []  # (kind, end, formants, fricative, tone, syllable start, end, gain)

    def pause(start: float, stop: float, formants: np.ndarray) -> None:
        rows.append((_PAUSE, stop, formants, dialect.fricatives[0], np.zeros(3), start, stop, 0.0))

    t = rng.uniform(0.1, 0.3)
    pause(0.0, t, dialect.vowels[0])
    end_speech = seconds - rng.uniform(0.1, 0.3)
    syllables_left = rng.integers(1, 4)
    while t < end_speech - 0.15:
        vowel = dialect.vowels[rng.integers(len(dialect.vowels))] * (1 + rng.normal(0, 0.02, 5))
        nasal = np.concatenate([_NASAL_FORMANTS[rng.integers(3)], vowel[3:]])
        fricative = dialect.fricatives[rng.integers(len(dialect.fricatives))]
        tone = dialect.tones[rng.integers(len(dialect.tones))] + rng.normal(0, 0.5)
        phones = [(_VOWEL, rng.uniform(0.11, 0.22) * scale, 1.0, vowel)]
        if rng.random() < dialect.onset_prob:
            phones.insert(0, (_FRICATIVE, rng.uniform(0.06, 0.11) * scale, 0.35, vowel))
        if rng.random() < dialect.coda_prob:
            phones.append((_NASAL, rng.uniform(0.05, 0.09) * scale, 0.4, nasal))
        start = t
        stop = min(t + sum(p[1] for p in phones), end_speech)
        for kind, duration, gain, formants in phones:
            t = min(t + duration, stop)
            rows.append((kind, t, formants, fricative, tone, start, stop, gain))
        syllables_left -= 1
        if syllables_left == 0 and t < end_speech - 0.3:  # a word boundary
            syllables_left = rng.integers(1, 4)
            if rng.random() < 0.5:
                gap = rng.uniform(0.08, 0.25) * scale
                pause(t, t + gap, vowel)
                t += gap
    pause(t, seconds + 1.0, rows[-1][2])
    columns = list(zip(*rows))
    names = ("kind", "end", "formants", "fric", "tone", "syl_start", "syl_end", "gain")
    return {name: np.array(column) for name, column in zip(names, columns)}


def _resonance_gain(freqs: np.ndarray, centres: np.ndarray, bandwidths: np.ndarray) -> np.ndarray:
    """Product over formants of the magnitudes of 2-pole resonators (unit gain at 0 Hz).

    freqs (F,), centres/bandwidths (T, K) -> (T, F). float32 is plenty for an envelope.
    """
    f = freqs.astype(np.float32)[None, :]
    gain = np.ones((len(centres), len(freqs)), dtype=np.float32)
    for k in range(centres.shape[1]):  # a handful of formants; each step is a (T, F) array op
        c = centres[:, k : k + 1].astype(np.float32)
        b2 = (bandwidths[:, k : k + 1].astype(np.float32) / 2.0) ** 2
        gain *= (c * c + b2) / np.sqrt(((f - c) ** 2 + b2) * ((f + c) ** 2 + b2))
    return gain


def _pitch_track(
    plan: dict[str, np.ndarray],
    seg: np.ndarray,
    frame_times: np.ndarray,
    voice: Voice,
    dialect: Dialect,
    seconds: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """f0 (Hz) per frame: syllable tone contours in the speaker's range and the dialect's
    register, declination over the utterance, and jitter."""
    span = np.maximum(plan["syl_end"][seg] - plan["syl_start"][seg], 1e-3)
    pos = np.clip((frame_times - plan["syl_start"][seg]) / span, 0.0, 1.0)
    tone = plan["tone"][seg]
    semitones = np.where(
        pos < 0.5,
        tone[:, 0] + (tone[:, 1] - tone[:, 0]) * 2 * pos,
        tone[:, 1] + (tone[:, 2] - tone[:, 1]) * (2 * pos - 1),
    )
    semitones = (
        semitones * voice.f0_range + dialect.register + dialect.declination * frame_times / seconds
    )
    semitones = scipy.ndimage.uniform_filter1d(semitones, 5)
    f0 = voice.f0_hz * 2.0 ** (semitones / 12.0)
    return f0 * (1.0 + voice.jitter * rng.standard_normal(len(f0)))


def _glottal_source(
    f0_frames: np.ndarray, num_samples: int, voice: Voice, rng: np.random.Generator
) -> np.ndarray:
    """Glottal flow derivative (KLGLOTT88-like pulses: open phase, abrupt closure) with shimmer."""
    f0 = np.interp(np.arange(num_samples), np.arange(len(f0_frames)) * HOP, f0_frames)
    phase = np.cumsum(f0 / SAMPLE_RATE)
    period = phase.astype(np.int64)
    cycle = phase - period
    amp = 1.0 + voice.shimmer * rng.standard_normal(period[-1] + 1)
    x = cycle / voice.open_quotient
    return np.where(cycle < voice.open_quotient, 2 * x - 3 * x**2, 0.0) * amp[period]


def _envelopes(
    plan: dict[str, np.ndarray], seg: np.ndarray, voice: Voice
) -> tuple[np.ndarray, np.ndarray]:
    """Magnitude envelopes (frames, bins) for the voiced and the noise source.

    Voiced: formants scaled by the speaker's tract, smoothed over ~50 ms (coarticulation), times
    tilt and static head resonances. Noise: aspiration through the same tract (breathiness) plus
    frication bands.
    """
    kind = plan["kind"][seg]
    formants = plan["formants"][seg] * voice.vtl_scale * voice.formant_offsets
    formants = scipy.ndimage.uniform_filter1d(formants, 7, axis=0)
    bandwidths = (
        np.array([70.0, 100.0, 140.0, 220.0, 300.0])
        * voice.bandwidth_scale
        * (1.0 + formants / 4000.0)
    )
    voiced = scipy.ndimage.uniform_filter1d(np.isin(kind, (_VOWEL, _NASAL)).astype(float), 3)
    fricative = scipy.ndimage.uniform_filter1d((kind == _FRICATIVE).astype(float), 3)
    gain = scipy.ndimage.uniform_filter1d(plan["gain"][seg], 5)

    freqs = np.fft.rfftfreq(NFFT, 1.0 / SAMPLE_RATE)
    octaves_above_100 = np.log2(np.maximum(freqs, 50.0) / 100.0)
    centre_oct, width_oct, gain_db = voice.timbre.T
    timbre_db = np.sum(
        gain_db * np.exp(-0.5 * ((octaves_above_100[:, None] - centre_oct) / width_oct) ** 2),
        axis=1,
    )
    tilt_db = voice.tilt_db_per_octave * np.log2(np.maximum(freqs, 100.0) / 500.0)
    colour = 10.0 ** ((tilt_db + timbre_db) / 20.0)
    voiced_env = _resonance_gain(freqs, formants, bandwidths) * colour * (voiced * gain)[:, None]
    fric = plan["fric"][seg]
    centre = fric[:, :1] * math.sqrt(voice.vtl_scale)
    fric_env = np.exp(
        -0.5 * (np.log2(np.maximum(freqs, 50.0)[None, :] / centre) / fric[:, 1:]) ** 2
    )
    noise_env = voice.breathiness * voiced_env + fric_env * (fricative * gain * 0.2)[:, None]
    return voiced_env, noise_env


def synthesize_speech(
    voice: Voice, dialect: Dialect, seconds: float, rng: np.random.Generator
) -> np.ndarray:
    """Clean speech of ``voice`` in ``dialect``: glottal pulses and noise through moving formants,
    filtered frame by frame in the STFT domain."""
    num_samples = int(seconds * SAMPLE_RATE)
    plan = _plan_segments(voice, dialect, seconds, rng)
    num_frames = num_samples // HOP + 1
    frame_times = np.arange(num_frames) * HOP / SAMPLE_RATE
    seg = np.minimum(np.searchsorted(plan["end"], frame_times, side="right"), len(plan["end"]) - 1)
    f0 = _pitch_track(plan, seg, frame_times, voice, dialect, seconds, rng)
    glottal = _glottal_source(f0, num_samples, voice, rng)
    _, _, spec_glottal = scipy.signal.stft(glottal, nperseg=NFFT, noverlap=NFFT - HOP)
    # White noise drawn directly as STFT coefficients: the aspiration and frication source.
    spec_noise = (
        rng.standard_normal(spec_glottal.shape) + 1j * rng.standard_normal(spec_glottal.shape)
    ) * (np.abs(spec_glottal).std() * 0.5)
    voiced_env, noise_env = _envelopes(plan, _pad_to(seg, spec_glottal.shape[1]), voice)
    spec = spec_glottal * voiced_env.T + spec_noise * noise_env.T
    _, speech = scipy.signal.istft(spec, nperseg=NFFT, noverlap=NFFT - HOP)
    speech = speech[:num_samples]
    return speech / (np.sqrt(np.mean(speech**2)) + 1e-9) * 0.05


def _pad_to(values: np.ndarray, length: int) -> np.ndarray:
    """Extend a frame track to ``length`` frames by repeating its last value."""
    if len(values) >= length:
        return values[:length]
    return np.concatenate([values, np.repeat(values[-1:], length - len(values))])
