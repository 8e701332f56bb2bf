"""Augmentation sets in the layout of MUSAN (``noise/free-sound``) and RIRS_NOISES
(``real_rirs_isotropic_noises`` with its ``rir_list``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile

from local.simulate.recording import room_impulse_response, shaped_noise
from local.simulate.speech import synthesize_speech
from local.simulate.voices import Dialect, sample_voice
from speakerlab.audio import SAMPLE_RATE


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
            noise = shaped_noise(n, rng.uniform(0.0, 2.0), rng) * (
                1 + 0.5 * np.sin(2 * np.pi * rng.uniform(0.1, 1.0) * t)
            )
        elif kind == 1:  # mains hum with harmonics over pink noise
            base = rng.choice([50.0, 60.0])
            noise = sum(np.sin(2 * np.pi * base * h * t) / h for h in range(1, 6))
            noise = noise + 0.3 * shaped_noise(n, 1.0, rng)
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
        noise = shaped_noise(4 * SAMPLE_RATE, 1.0, rng) * 0.1
        soundfile.write(
            out_dir / f"sim_isotropic_noise_{k:02d}.wav",
            noise.astype(np.float32),
            SAMPLE_RATE,
            subtype="PCM_16",
        )
    (out_dir / "rir_list").write_text("".join(lines), encoding="utf-8")
    return paths
