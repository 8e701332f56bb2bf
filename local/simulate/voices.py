"""Who speaks, and how: speakers' voices (what a model must learn) and the dialects they speak.

* a **voice**: a per-speaker pitch and pitch range, vocal-tract length (all formants scaled),
  idiosyncratic formant offsets, formant bandwidths, spectral tilt and static head resonances,
  glottal open quotient, breathiness, jitter/shimmer and speaking rate;
* a **dialect** (a nuisance): its own vowel and fricative inventory, tone contours, syllable
  structure, tempo, pitch register and declination. The 14 dialects are named as in the corpus.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

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
