"""How a recording is made: the room and the distance to the microphone, then the device.

* **distance**: a synthetic room response whose direct-to-reverberant ratio falls, and background
  noise that grows, with the distance to the microphone;
* **device**: a fixed frequency response, band limit, non-linearity and self-noise per device
  (Device01..Device09, named as in the corpus).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.fft
import scipy.signal

from speakerlab.audio import SAMPLE_RATE
from speakerlab.data.augment import mix_at_snr

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


# Distance codes of the simulation and the microphone distance each stands for (metres).
DISTANCES_M = {"00": 0.1, "01": 0.25, "02": 0.5, "03": 1.0, "04": 2.0, "05": 4.0}


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


def filter_spectrally(signal: np.ndarray, gain_of_freq) -> np.ndarray:
    """Zero-phase filtering by ``gain_of_freq(freqs_hz)`` on an FFT of fast length (no wrap-around
    worth caring about for these smooth responses)."""
    size = scipy.fft.next_fast_len(len(signal), real=True)
    spec = scipy.fft.rfft(signal, size)
    spec *= gain_of_freq(scipy.fft.rfftfreq(size, 1.0 / SAMPLE_RATE))
    return scipy.fft.irfft(spec, size)[: len(signal)]


def shaped_noise(n: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """Noise with power spectrum ~ 1/f**exponent (0 white, 1 pink, 2 brown), unit RMS."""
    noise = filter_spectrally(
        rng.standard_normal(n), lambda f: np.maximum(f, 20.0) ** (-exponent / 2.0)
    )
    return noise / (np.sqrt(np.mean(noise**2)) + 1e-12)


def render_distance(
    speech: np.ndarray, distance_m: float, room: dict, rng: np.random.Generator
) -> np.ndarray:
    """The speech as heard ``distance_m`` away: less direct sound, more reverberation and noise."""
    drr_db = 20.0 * math.log10(room["critical_distance"] / distance_m)
    rir = room_impulse_response(room["rt60"], drr_db, rng)
    wet = scipy.signal.fftconvolve(speech, rir)[: len(speech)]
    snr_db = room["snr_close"] - 17.0 * math.log10(distance_m / 0.1) + rng.normal(0.0, 1.5)
    noise = shaped_noise(len(speech), room["noise_exponent"], rng)
    t = np.arange(len(speech)) / SAMPLE_RATE
    noise += room["hum"] * np.sin(2 * np.pi * 50.0 * t) + room["hum"] * 0.5 * np.sin(
        2 * np.pi * 150.0 * t
    )
    return mix_at_snr(wet, noise, snr_db)


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
    filtered = filter_spectrally(signal, lambda f: np.interp(f, grid, response))
    peak = np.abs(filtered).max() + 1e-12
    out = filtered / peak
    if device.drive > 0:
        out = np.tanh(device.drive * out) / math.tanh(device.drive)
    out = mix_at_snr(out, rng.standard_normal(len(out)), -device.noise_db)
    return out / (np.abs(out).max() + 1e-12) * rng.uniform(0.25, 0.7)
