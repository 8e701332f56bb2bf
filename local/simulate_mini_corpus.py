#!/usr/bin/env python3
"""Simulate a small corpus in exactly the 3D-Speaker layout, with MUSAN- and RIRS_NOISES-like sets.

The corpus is made so that the real preparation code runs on it unchanged and so that a model has
something real to learn:

* **speaker identity** (what must be learnt): source-filter speech with a per-speaker pitch and
  pitch range, vocal-tract length (all formants scaled), idiosyncratic formant offsets, formant
  bandwidths, spectral tilt and static head resonances, glottal open quotient, breathiness,
  jitter/shimmer and speaking rate;
* **dialect** (nuisance): each dialect has its own vowel and fricative inventory, tone contours,
  syllable structure, tempo, pitch register and declination; speakers talk Standard Mandarin in
  some sessions and their native dialect in others;
* **distance** (nuisance): a synthetic room response whose direct-to-reverberant ratio falls and
  whose background noise grows with the distance to the microphone;
* **device** (nuisance): a fixed frequency response, band limit, non-linearity and self-noise per
  device (Device01..Device09, named as in the corpus).

As in the real corpus, one session (``NNN``) is a single spoken text recorded at once by several
devices at several distances, so an utterance id ``<SPK>_<NNN>_DeviceXX_DistanceYY_DialectZZ``
names one rendering of a session. Everything is deterministic for a given seed and size.

Layout written under ``--out_dir``::

    3dspeaker/{train,test}/<SPK>/<SPK>_<NNN>_DeviceXX_DistanceYY_DialectZZ.wav
    3dspeaker/files/{train,test}_wav.scp, {train,test}_utt2spk, {train,test}_utt2info.csv,
                    trials_cross_device, trials_cross_distance, trials_cross_dialect
    musan/noise/free-sound/noise-free-sound-NNNN.wav
    RIRS_NOISES/real_rirs_isotropic_noises/{sim_rir_NN.wav, sim_isotropic_noise_NN.wav, rir_list}
"""

from __future__ import annotations

import argparse
import csv
import math
import multiprocessing
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.fft
import scipy.ndimage
import scipy.signal
import soundfile

SAMPLE_RATE = 16000
HOP = 128  # STFT hop of the source-filter synthesis (8 ms)
NFFT = 512
TRAIN_SPEAKER_OFFSET = 0  # train speakers are 3D_SPK_00001...; test speakers follow them

DEVICE_NAMES = {
    "01": "ANDROID",
    "02": "IPAD",
    "03": "DIRECTIONAL",
    "04": "RP",
    "05": "ARRAY-CH1",
    "06": "PC",
    "07": "PHONE",
    "08": "IPHONE",
    "09": "ARRAY",
}
DIALECT_NAMES = [
    "Standard Mandarin",
    "Xiang",
    "Wu",
    "Southwestern Mandarin",
    "JiangHuai Mandarin",
    "Hakka",
    "Central Plains Mandarin",
    "Yue",
    "Gan",
    "Jin",
    "Min",
    "LiaoJiao Mandarin",
    "JiLu Mandarin",
    "Northern Mandarin",
]
# Distance codes of the simulation and the microphone distance each stands for (metres).
DISTANCES_M = {"00": 0.1, "01": 0.25, "02": 0.5, "03": 1.0, "04": 2.0, "05": 4.0}
TRIAL_CONDITIONS = ("device", "distance", "dialect")
UTT2INFO_HEADER = ["Utt-id", "Spk-id", "Seg-id", "Device", "Distance", "Dialect"]

# Universal vowel table: F1..F3 (Hz) of an adult male tract; dialects pick and shift subsets.
_VOWELS = np.array(
    [
        [280, 2250, 2900],
        [280, 1900, 2300],
        [320, 1500, 2500],
        [310, 870, 2250],
        [400, 2000, 2600],
        [400, 1600, 2300],
        [500, 1400, 2500],
        [450, 850, 2600],
        [550, 1800, 2500],
        [600, 950, 2500],
        [750, 1300, 2500],
        [680, 1700, 2450],
        [720, 1100, 2550],
        [350, 1300, 2400],
    ],
    dtype=float,
)
_MANDARIN_VOWELS = [10, 7, 6, 0, 3, 1, 2]  # a o e i u y and the apical vowel
# Fricatives: noise centre (Hz) and width (octaves): s, sh, alveolo-palatal, f, velar, h.
_FRICATIVES = np.array(
    [[6500, 0.45], [3800, 0.5], [4800, 0.45], [5000, 1.2], [1800, 0.6], [1500, 1.5]], dtype=float
)
# Mandarin tones as pitch contours (semitones at start, middle, end of the syllable).
_MANDARIN_TONES = np.array([[2, 2, 2], [-2, 0, 3], [-2, -5, -1], [4, 0, -5]], dtype=float)
_NASAL_FORMANTS = np.array([[250, 1000, 2300], [250, 1500, 2400], [250, 2000, 2600]], dtype=float)
_PAUSE, _VOWEL, _FRICATIVE, _NASAL = 0, 1, 2, 3


@dataclass(frozen=True)
class SimulationConfig:
    """Sizes and seed of a simulated corpus (defaults: the mini corpus of the recipe)."""

    num_train_speakers: int = 160
    num_test_speakers: int = 20
    utts_per_speaker: int = 8
    renders_per_session: int = 2  # devices/distances recording each spoken text at once
    min_seconds: float = 3.0
    max_seconds: float = 8.0
    num_noises: int = 8
    num_rirs: int = 8
    nontarget_ratio: float = 3.0  # nontarget trials per target trial in each list
    seed: int = 0


@dataclass(frozen=True)
class Voice:
    """What makes a speaker recognisable."""

    f0_hz: float  # median pitch
    f0_range: float  # scale of tone excursions (1 = the dialect's nominal range)
    vtl_scale: float  # formant scale: shorter vocal tract -> higher formants
    formant_offsets: np.ndarray  # (5,) personal multiplicative offsets of F1..F5
    bandwidth_scale: float  # formant damping
    tilt_db_per_octave: float  # extra spectral tilt on top of the glottal pulse
    timbre: np.ndarray  # (2, 3) static resonances/dips of the head and neck:
    # centre (octaves above 100 Hz), width (octaves), gain (dB)
    open_quotient: float  # glottal open phase (larger: softer, fewer high harmonics)
    breathiness: float  # aspiration noise relative to the voiced excitation
    jitter: float  # random pitch-period variation (fraction)
    shimmer: float  # random pulse-amplitude variation (fraction)
    rate: float  # speaking-rate factor (> 1: faster)
    native_dialect: int


@dataclass(frozen=True)
class Dialect:
    """A sound inventory and a prosody."""

    code: str
    name: str
    vowels: np.ndarray  # (V, 5) formant targets of a reference tract (Hz)
    fricatives: np.ndarray  # (C, 2) noise centre (Hz), width (octaves)
    tones: np.ndarray  # (K, 3) pitch contours (semitones)
    onset_prob: float  # probability that a syllable starts with a fricative
    coda_prob: float  # probability that it ends with a nasal
    tempo: float  # duration factor of the dialect
    declination: float  # pitch fall over an utterance (semitones)
    register: float  # pitch level relative to the speaker's usual one (semitones)


@dataclass(frozen=True)
class DeviceProfile:
    """A recording device: frequency response, band limit, non-linearity and self-noise."""

    code: str
    highpass_hz: float
    lowpass_hz: float
    slope_order: int  # steepness of the band edges
    bumps: np.ndarray  # (B, 3) response bumps: centre (octaves above 100 Hz), width, dB
    drive: float  # tanh saturation drive (0: linear)
    noise_db: float  # self-noise level relative to the signal RMS


@dataclass
class UttRecord:
    """One simulated recording and its metadata."""

    utt: str
    speaker: str
    session: str
    device: str
    distance: str
    dialect: str
    relpath: str
    num_samples: int = 0


@dataclass
class SimulatedCorpus:
    """Where the simulation wrote its parts."""

    corpus_dir: Path
    musan_dir: Path
    rirs_dir: Path
    train: list[UttRecord] = field(default_factory=list)
    test: list[UttRecord] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Voices, dialects, devices


def make_dialects(seed: int) -> list[Dialect]:
    """The 14 dialects of the corpus: Standard Mandarin fixed, the others drawn from ``seed``."""
    rng = np.random.default_rng([seed, 1001])
    dialects = []
    for number, name in enumerate(DIALECT_NAMES):
        if number == 0:
            vowel_ids, tones = _MANDARIN_VOWELS, _MANDARIN_TONES
            fric_ids = [0, 1, 2, 3, 4]
            shift = np.ones((len(vowel_ids), 3))
            onset, coda, tempo, decl, register = 0.6, 0.35, 1.0, -1.5, 0.0
        else:
            vowel_ids = rng.choice(len(_VOWELS), size=rng.integers(6, 10), replace=False)
            shift = 1.0 + rng.normal(0.0, 0.07, size=(len(vowel_ids), 3))
            fric_ids = rng.choice(len(_FRICATIVES), size=rng.integers(3, 6), replace=False)
            tones = rng.uniform(-5.0, 5.0, size=(rng.integers(3, 8), 3))
            onset, coda = rng.uniform(0.4, 0.75), rng.uniform(0.1, 0.45)
            tempo, decl = rng.uniform(0.9, 1.12), rng.uniform(-3.0, -0.5)
            register = rng.uniform(-2.5, 2.5)
        f123 = _VOWELS[vowel_ids] * shift
        f45 = np.stack(
            [rng.uniform(3300, 3600, len(vowel_ids)), rng.uniform(4200, 4600, len(vowel_ids))],
            axis=1,
        )
        dialects.append(
            Dialect(
                code=f"{number:02d}",
                name=name,
                vowels=np.concatenate([f123, f45], axis=1),
                fricatives=_FRICATIVES[fric_ids],
                tones=np.asarray(tones, float),
                onset_prob=float(onset),
                coda_prob=float(coda),
                tempo=float(tempo),
                declination=float(decl),
                register=float(register),
            )
        )
    return dialects


def sample_voice(rng: np.random.Generator, native_dialect: int) -> Voice:
    """Draw a speaker: sex-dependent pitch and tract length plus individual voice quality."""
    female = rng.random() < 0.5
    f0 = math.exp(rng.normal(math.log(205.0 if female else 115.0), 0.2))
    return Voice(
        f0_hz=f0,
        f0_range=float(rng.uniform(0.6, 1.5)),
        vtl_scale=float(rng.normal(1.16 if female else 1.0, 0.08)),
        formant_offsets=1.0 + rng.normal(0.0, [0.09, 0.09, 0.08, 0.07, 0.07]),
        bandwidth_scale=float(rng.uniform(0.7, 1.6)),
        tilt_db_per_octave=float(rng.uniform(-8.0, 4.0)),
        timbre=np.stack(
            [rng.uniform(3.0, 6.0, 2), rng.uniform(0.2, 0.6, 2), rng.uniform(-12.0, 12.0, 2)],
            axis=1,
        ),
        open_quotient=float(rng.uniform(0.4, 0.8)),
        breathiness=float(rng.uniform(0.02, 0.35)),
        jitter=float(rng.uniform(0.005, 0.03)),
        shimmer=float(rng.uniform(0.03, 0.15)),
        rate=float(rng.uniform(0.8, 1.25)),
        native_dialect=native_dialect,
    )


def make_devices(seed: int) -> dict[str, DeviceProfile]:
    """Device01..Device09: band limits and non-linearities by kind, ripples from ``seed``."""
    # code: (highpass Hz, lowpass Hz, slope order, drive, self-noise dB)
    kinds = {
        "01": (90, 7000, 4, 0.8, -48),
        "02": (110, 7600, 4, 0.2, -55),
        "03": (160, 7800, 3, 0.0, -60),
        "04": (70, 5500, 3, 1.2, -40),
        "05": (50, 7800, 2, 0.0, -42),
        "06": (220, 5000, 5, 1.5, -38),
        "07": (320, 3400, 8, 2.0, -36),
        "08": (80, 7400, 4, 0.5, -52),
        "09": (50, 7900, 2, 0.0, -44),
    }
    devices = {}
    for code, (hp, lp, order, drive, noise) in kinds.items():
        rng = np.random.default_rng([seed, 2002, int(code)])
        bumps = np.stack(
            [rng.uniform(0.5, 6.2, 4), rng.uniform(0.3, 1.0, 4), rng.uniform(-3.0, 3.0, 4)], axis=1
        )
        devices[code] = DeviceProfile(
            code=code,
            highpass_hz=hp,
            lowpass_hz=lp,
            slope_order=order,
            bumps=bumps,
            drive=drive,
            noise_db=noise,
        )
    return devices


# --------------------------------------------------------------------------------------------
# Source-filter speech synthesis


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


# --------------------------------------------------------------------------------------------
# Rooms, distances and devices


def room_impulse_response(rt60: float, drr_db: float, rng: np.random.Generator) -> np.ndarray:
    """Direct path, a few early reflections and an exponential diffuse tail at ``drr_db``."""
    length = int(min(1.2 * rt60, 1.0) * SAMPLE_RATE)
    t = np.arange(length) / SAMPLE_RATE
    tail = rng.standard_normal(length) * np.exp(-6.9 * t / rt60)
    tail[: int(0.002 * SAMPLE_RATE)] = 0.0  # the diffuse field arrives after the direct sound
    early = rng.integers(int(0.002 * SAMPLE_RATE), int(0.02 * SAMPLE_RATE), 6)
    tail[early] += rng.uniform(-0.6, 0.6, 6) * np.abs(tail).max()
    tail *= math.sqrt(10.0 ** (-drr_db / 10.0) / np.sum(tail**2))
    tail[0] = 1.0
    return tail


def _filter_spectrally(signal: np.ndarray, gain_of_freq) -> np.ndarray:
    """Zero-phase filtering by ``gain_of_freq(freqs_hz)`` on an FFT of fast length (no wrap-around
    worth caring about for these smooth responses)."""
    size = scipy.fft.next_fast_len(len(signal), real=True)
    spec = scipy.fft.rfft(signal, size)
    spec *= gain_of_freq(scipy.fft.rfftfreq(size, 1.0 / SAMPLE_RATE))
    return scipy.fft.irfft(spec, size)[: len(signal)]


def _shaped_noise(n: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """Noise with power spectrum ~ 1/f**exponent (0 white, 1 pink, 2 brown), unit RMS."""
    noise = _filter_spectrally(
        rng.standard_normal(n), lambda f: np.maximum(f, 20.0) ** (-exponent / 2.0)
    )
    return noise / (np.sqrt(np.mean(noise**2)) + 1e-12)


def _add_at_snr(signal: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    power_s = np.mean(signal**2)
    power_n = np.mean(noise**2) + 1e-20
    return signal + noise * math.sqrt(power_s / (power_n * 10.0 ** (snr_db / 10.0)))


def render_distance(
    speech: np.ndarray, distance_m: float, room: dict, rng: np.random.Generator
) -> np.ndarray:
    """The speech as heard ``distance_m`` away: less direct sound, more reverberation and noise."""
    drr_db = 20.0 * math.log10(room["critical_distance"] / distance_m)
    rir = room_impulse_response(room["rt60"], drr_db, rng)
    wet = scipy.signal.fftconvolve(speech, rir)[: len(speech)]
    snr_db = room["snr_close"] - 17.0 * math.log10(distance_m / 0.1) + rng.normal(0.0, 1.5)
    noise = _shaped_noise(len(speech), room["noise_exponent"], rng)
    t = np.arange(len(speech)) / SAMPLE_RATE
    noise += room["hum"] * np.sin(2 * np.pi * 50.0 * t) + room["hum"] * 0.5 * np.sin(
        2 * np.pi * 150.0 * t
    )
    return _add_at_snr(wet, noise, snr_db)


def device_response(device: DeviceProfile, freqs: np.ndarray) -> np.ndarray:
    """Magnitude response: band edges of the given order times smooth bumps in log frequency."""
    f = np.maximum(freqs, 1.0)
    order = 2 * device.slope_order
    band = 1.0 / np.sqrt(
        (1.0 + (device.highpass_hz / f) ** order) * (1.0 + (f / device.lowpass_hz) ** order)
    )
    octaves = np.log2(f / 100.0)[:, None]
    centre, width, gain_db = device.bumps.T
    ripple_db = np.sum(gain_db * np.exp(-0.5 * ((octaves - centre) / width) ** 2), axis=1)
    return band * 10.0 ** (ripple_db / 20.0)


def render_device(
    signal: np.ndarray, device: DeviceProfile, rng: np.random.Generator
) -> np.ndarray:
    """Record ``signal`` with ``device``: filter, saturate, add self-noise, set a level."""
    # The response is smooth: evaluate it on a coarse grid and interpolate.
    grid = np.linspace(0.0, SAMPLE_RATE / 2, 2049)
    response = device_response(device, grid)
    filtered = _filter_spectrally(signal, lambda f: np.interp(f, grid, response))
    peak = np.abs(filtered).max() + 1e-12
    out = filtered / peak
    if device.drive > 0:
        out = np.tanh(device.drive * out) / math.tanh(device.drive)
    out = _add_at_snr(out, rng.standard_normal(len(out)), -device.noise_db)
    return out / (np.abs(out).max() + 1e-12) * rng.uniform(0.25, 0.7)


# --------------------------------------------------------------------------------------------
# Speakers, sessions and metadata


def _speaker_id(number: int) -> str:
    return f"3D_SPK_{number:05d}"


def _utt_id(speaker: str, session: int, device: str, distance: str, dialect: str) -> str:
    return f"{speaker}_{session:03d}_Device{device}_Distance{distance}_Dialect{dialect}"


def simulate_speaker(job: dict) -> list[UttRecord]:
    """Synthesise and write all recordings of one speaker (a unit of parallel work)."""
    config: SimulationConfig = job["config"]
    dialects: list[Dialect] = job["dialects"]
    devices: dict[str, DeviceProfile] = job["devices"]
    number, split, root = job["number"], job["split"], Path(job["corpus_dir"])
    speaker = _speaker_id(number)
    rng = np.random.default_rng([config.seed, 3003, number])
    # One speaker in five talks only Standard Mandarin; the others also their own dialect.
    native = 0 if rng.random() < 0.2 else int(rng.integers(1, len(dialects)))
    voice = sample_voice(rng, native)
    num_sessions = -(-config.utts_per_speaker // config.renders_per_session)
    first_dialect = int(rng.integers(2))
    spk_dir = root / split / speaker
    spk_dir.mkdir(parents=True, exist_ok=True)
    records, written = [], 0
    for session in range(1, num_sessions + 1):
        dialect = dialects[native if (session + first_dialect) % 2 else 0]
        seconds = rng.uniform(config.min_seconds, config.max_seconds)
        speech = synthesize_speech(voice, dialect, seconds, rng)
        room = {
            "rt60": rng.uniform(0.2, 0.6),
            "critical_distance": rng.uniform(1.0, 2.0),
            "snr_close": rng.uniform(40.0, 46.0),
            "noise_exponent": rng.uniform(0.0, 2.0),
            "hum": rng.uniform(0.0, 0.5),
        }
        renders = min(config.renders_per_session, config.utts_per_speaker - written)
        device_codes = list(rng.choice(sorted(devices), size=renders, replace=False))
        if job["force_device09"] and session == 1 and "09" not in device_codes:
            device_codes[0] = "09"  # so that every split exercises the Device09 removal
        for device_code in device_codes:
            distance = str(rng.choice(sorted(DISTANCES_M)))
            audio = render_device(
                render_distance(speech, DISTANCES_M[distance], room, rng),
                devices[str(device_code)],
                rng,
            )
            utt = _utt_id(speaker, session, str(device_code), distance, dialect.code)
            relpath = f"{split}/{speaker}/{utt}.wav"
            soundfile.write(root / relpath, audio.astype(np.float32), SAMPLE_RATE, subtype="PCM_16")
            records.append(
                UttRecord(
                    utt,
                    speaker,
                    f"{session:03d}",
                    str(device_code),
                    distance,
                    dialect.code,
                    relpath,
                    len(audio),
                )
            )
            written += 1
    return records


def make_trials(
    records: list[UttRecord], condition: str, rng: np.random.Generator, nontarget_ratio: float
) -> list[tuple[str, str, str]]:
    """Cross-``condition`` trials: enrolment and test differ in that condition.

    Targets are all same-speaker pairs from different sessions (different spoken texts) and
    different condition values; nontargets are sampled from the different-speaker pairs that
    differ in the condition, ``nontarget_ratio`` times as many as the targets.
    """
    records = sorted(records, key=lambda r: r.utt)
    utts = np.array([r.utt for r in records])
    spk = np.array([r.speaker for r in records])
    sess = np.array([r.speaker + r.session for r in records])
    cond = np.array([getattr(r, condition) for r in records])
    first, second = np.triu_indices(len(records), k=1)
    differs = cond[first] != cond[second]
    is_target = differs & (spk[first] == spk[second]) & (sess[first] != sess[second])
    nontarget_pool = np.flatnonzero(differs & (spk[first] != spk[second]))
    num_nontargets = min(len(nontarget_pool), int(round(nontarget_ratio * is_target.sum())))
    chosen = np.zeros(len(first), dtype=bool)
    chosen[rng.choice(nontarget_pool, size=num_nontargets, replace=False)] = True
    keep = np.flatnonzero(is_target | chosen)
    return [
        (str(utts[first[k]]), str(utts[second[k]]), "target" if is_target[k] else "nontarget")
        for k in keep
    ]


def write_metadata(
    corpus_dir: Path, split: str, records: list[UttRecord], dialects: list[Dialect]
) -> None:
    """``files/<split>_wav.scp``, ``<split>_utt2spk`` and ``<split>_utt2info.csv``."""
    files = corpus_dir / "files"
    files.mkdir(parents=True, exist_ok=True)
    records = sorted(records, key=lambda r: r.utt)
    with open(files / f"{split}_wav.scp", "w", encoding="utf-8") as f:
        f.writelines(f"{r.utt} {r.relpath}\n" for r in records)
    with open(files / f"{split}_utt2spk", "w", encoding="utf-8") as f:
        f.writelines(f"{r.utt} {r.speaker}\n" for r in records)
    with open(files / f"{split}_utt2info.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(UTT2INFO_HEADER)
        for r in records:
            writer.writerow(
                [
                    r.utt,
                    r.speaker,
                    r.session,
                    DEVICE_NAMES[r.device],
                    f"{DISTANCES_M[r.distance]}m",
                    dialects[int(r.dialect)].name,
                ]
            )


def simulate_noises(musan_dir: Path, count: int, dialects: list[Dialect], seed: int) -> list[Path]:
    """MUSAN-like ``noise/free-sound`` files: coloured, humming, babble-like, impulsive, tonal."""
    out_dir = musan_dir / "noise" / "free-sound"
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(count):
        rng = np.random.default_rng([seed, 4004, k])
        n = int(rng.uniform(4.0, 10.0) * SAMPLE_RATE)
        t = np.arange(n) / SAMPLE_RATE
        kind = k % 5
        if kind == 0:  # coloured noise with slow loudness changes
            noise = _shaped_noise(n, rng.uniform(0.0, 2.0), rng) * (
                1 + 0.5 * np.sin(2 * np.pi * rng.uniform(0.1, 1.0) * t)
            )
        elif kind == 1:  # mains hum with harmonics over pink noise
            base = rng.choice([50.0, 60.0])
            noise = sum(np.sin(2 * np.pi * base * h * t) / h for h in range(1, 6))
            noise = noise + 0.3 * _shaped_noise(n, 1.0, rng)
        elif kind == 2:  # babble-like: several distant voices
            noise = sum(
                synthesize_speech(sample_voice(rng, d), dialects[d], n / SAMPLE_RATE, rng)
                for d in rng.integers(0, len(dialects), 4)
            )
        elif kind == 3:  # clicks (typing, knocks) over faint noise
            noise = 0.05 * rng.standard_normal(n)
            clicks = rng.integers(0, n - 400, int(n / SAMPLE_RATE * 6))
            for start in clicks:
                noise[start : start + 400] += (
                    rng.uniform(0.5, 1.0)
                    * np.exp(-np.arange(400) / 60.0)
                    * rng.standard_normal(400)
                )
        else:  # tonal beeps and whistles
            freq = rng.uniform(300, 3000) * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(0.2, 2) * t))
            noise = np.sin(2 * np.pi * np.cumsum(freq) / SAMPLE_RATE) * (
                np.sin(2 * np.pi * rng.uniform(0.5, 3) * t) > 0
            ) + 0.1 * rng.standard_normal(n)
        path = out_dir / f"noise-free-sound-{k:04d}.wav"
        soundfile.write(
            path,
            (noise / (np.abs(noise).max() + 1e-12) * 0.5).astype(np.float32),
            SAMPLE_RATE,
            subtype="PCM_16",
        )
        paths.append(path)
    return paths


def simulate_rirs(rirs_dir: Path, count: int, seed: int) -> list[Path]:
    """RIRS_NOISES-like room responses with a ``rir_list`` (the first one two-channel, as some
    real ones are), plus two isotropic-noise files that the list leaves out, as in the real set."""
    out_dir = rirs_dir / "real_rirs_isotropic_noises"
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, lines = [], []
    for k in range(count):
        rng = np.random.default_rng([seed, 5005, k])
        rir = room_impulse_response(rng.uniform(0.15, 0.8), rng.uniform(-6.0, 10.0), rng)
        rir = np.roll(rir, int(rng.integers(0, 200)))  # real responses start after a delay
        rir = rir / np.abs(rir).max() * 0.9
        data = np.stack([rir, np.roll(rir, 3) * 0.8], axis=1) if k == 0 else rir
        name = f"sim_rir_{k:02d}"
        path = out_dir / f"{name}.wav"
        soundfile.write(path, data.astype(np.float32), SAMPLE_RATE, subtype="PCM_16")
        paths.append(path)
        lines.append(
            f"--rir-id {name} --room-id sim_room_{k:02d} "
            f"{rirs_dir.name}/real_rirs_isotropic_noises/{name}.wav\n"
        )
    for k in range(2):
        rng = np.random.default_rng([seed, 5006, k])
        noise = _shaped_noise(4 * SAMPLE_RATE, 1.0, rng) * 0.1
        soundfile.write(
            out_dir / f"sim_isotropic_noise_{k:02d}.wav",
            noise.astype(np.float32),
            SAMPLE_RATE,
            subtype="PCM_16",
        )
    (out_dir / "rir_list").write_text("".join(lines), encoding="utf-8")
    return paths


def simulate_corpus(
    out_dir: str | Path, config: SimulationConfig = SimulationConfig(), num_workers: int = 1
) -> SimulatedCorpus:
    """Write the corpus, its metadata and trials, and the noise and RIR sets under ``out_dir``."""
    if config.utts_per_speaker < 2 or config.renders_per_session < 1:
        raise ValueError("need at least 2 utterances per speaker and 1 render per session")
    if not 0 < config.min_seconds <= config.max_seconds:
        raise ValueError(f"bad duration range {config.min_seconds}..{config.max_seconds}")
    out_dir = Path(out_dir).resolve()
    corpus = SimulatedCorpus(
        corpus_dir=out_dir / "3dspeaker",
        musan_dir=out_dir / "musan",
        rirs_dir=out_dir / "RIRS_NOISES",
    )
    dialects, devices = make_dialects(config.seed), make_devices(config.seed)
    splits = {
        "train": range(1, config.num_train_speakers + 1),
        "test": range(
            config.num_train_speakers + 1, config.num_train_speakers + config.num_test_speakers + 1
        ),
    }
    jobs = [
        {
            "config": config,
            "dialects": dialects,
            "devices": devices,
            "number": number,
            "split": split,
            "corpus_dir": str(corpus.corpus_dir),
            "force_device09": number == numbers[0],
        }
        for split, numbers in splits.items()
        for number in numbers
    ]
    if num_workers > 1:
        with multiprocessing.get_context("fork").Pool(num_workers) as pool:
            results = pool.map(simulate_speaker, jobs, chunksize=1)
    else:
        results = [simulate_speaker(job) for job in jobs]
    for job, records in zip(jobs, results):
        getattr(corpus, job["split"]).extend(records)
    for split in splits:
        write_metadata(corpus.corpus_dir, split, getattr(corpus, split), dialects)
    testable = [r for r in corpus.test if r.device != "09"]  # Device09 is dropped at preparation
    for number, condition in enumerate(TRIAL_CONDITIONS):
        rng = np.random.default_rng([config.seed, 6006, number])
        trials = make_trials(testable, condition, rng, config.nontarget_ratio)
        with open(
            corpus.corpus_dir / "files" / f"trials_cross_{condition}", "w", encoding="utf-8"
        ) as f:
            f.writelines(f"{a} {b} {label}\n" for a, b, label in trials)
    simulate_noises(corpus.musan_dir, config.num_noises, dialects, config.seed)
    simulate_rirs(corpus.rirs_dir, config.num_rirs, config.seed)
    return corpus


def main(argv: list[str] | None = None) -> None:
    defaults = SimulationConfig()
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--out_dir", required=True, help="where 3dspeaker/, musan/ and RIRS_NOISES/ are written"
    )
    parser.add_argument("--num_train_speakers", type=int, default=defaults.num_train_speakers)
    parser.add_argument("--num_test_speakers", type=int, default=defaults.num_test_speakers)
    parser.add_argument("--utts_per_speaker", type=int, default=defaults.utts_per_speaker)
    parser.add_argument(
        "--renders_per_session",
        type=int,
        default=defaults.renders_per_session,
        help="devices/distances that record each spoken text at once",
    )
    parser.add_argument("--min_seconds", type=float, default=defaults.min_seconds)
    parser.add_argument("--max_seconds", type=float, default=defaults.max_seconds)
    parser.add_argument("--num_noises", type=int, default=defaults.num_noises)
    parser.add_argument("--num_rirs", type=int, default=defaults.num_rirs)
    parser.add_argument("--nontarget_ratio", type=float, default=defaults.nontarget_ratio)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--num_workers",
        type=int,
        default=os.cpu_count() or 1,
        help="parallel processes (one speaker per task)",
    )
    args = parser.parse_args(argv)
    config = SimulationConfig(
        **{k: v for k, v in vars(args).items() if k not in ("out_dir", "num_workers")}
    )
    start = time.time()
    corpus = simulate_corpus(args.out_dir, config, num_workers=args.num_workers)
    print(
        f"simulated {len(corpus.train)} train and {len(corpus.test)} test recordings in "
        f"{time.time() - start:.1f} s: corpus {corpus.corpus_dir}, noises {corpus.musan_dir}, "
        f"room responses {corpus.rirs_dir}"
    )


if __name__ == "__main__":
    main()
