#!/usr/bin/env python3
"""Speed and parity of fbank and resampling: speakerlab against torchaudio and kaldi-native-fbank.

Each implementation turns the same 3 s and 8 s waveforms (16 kHz noise) into mean-normalised
80-bin Kaldi fbank on one thread (as in a DataLoader worker); resampling is timed for the rate
changes speakerlab makes (speed perturbation of a 3 s crop, 8 kHz and 44.1 kHz input to 16 kHz).
The implementations take turns in one run, and each one's output is compared with
torchaudio's (``max_abs_diff``). torchaudio and kaldi-native-fbank are optional: an
implementation whose package is missing is reported as such. Prints JSON (and writes it to
``--out`` if given).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from speakerlab.data.dataset import limit_worker_threads  # noqa: E402
from speakerlab.features import fbank  # noqa: E402
from speakerlab.resample import resample  # noqa: E402

RATE = 16000


def median_ms(functions: dict, argument, repeats: int) -> dict[str, dict[str, float]]:
    """Median wall-clock and CPU time of each function on ``argument``, in ms. The functions take
    turns, so that a change in the machine's load affects them alike; the CPU time (of this
    process, on one thread) is the steadier figure when other jobs share the cores."""
    times = {name: [] for name in functions}
    for function in functions.values():
        function(argument)  # warm-up: caches, allocator
    for _ in range(repeats):
        for name, function in functions.items():
            wall, cpu = time.perf_counter(), time.process_time()
            function(argument)
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return {
        name: {
            "wall_ms": round(1000 * float(np.median([w for w, _ in t])), 3),
            "cpu_ms": round(1000 * float(np.median([c for _, c in t])), 3),
        }
        for name, t in times.items()
    }


def mean_normalised(feats: torch.Tensor) -> torch.Tensor:
    return feats - feats.mean(dim=0, keepdim=True)


def fbank_implementations() -> dict:
    """name -> wav (1-D float32 tensor) -> mean-normalised fbank; missing packages left out."""
    found = {"speakerlab": fbank}
    if importlib.util.find_spec("torchaudio"):
        from torchaudio.compliance import kaldi

        def torchaudio_fbank(wav):
            feats = kaldi.fbank(wav.unsqueeze(0), num_mel_bins=80, dither=0.0)
            return mean_normalised(feats)

        found["torchaudio"] = torchaudio_fbank
    if importlib.util.find_spec("kaldi_native_fbank"):
        import kaldi_native_fbank as knf

        options = knf.FbankOptions()
        options.frame_opts.dither = 0.0
        options.mel_opts.num_bins = 80

        def knf_compute(wav):
            extractor = knf.OnlineFbank(options)
            extractor.accept_waveform(RATE, wav.numpy())  # computes every frame
            extractor.input_finished()
            return extractor

        def knf_fbank(wav):
            extractor = knf_compute(wav)
            frames = [extractor.get_frame(i) for i in range(extractor.num_frames_ready)]
            return mean_normalised(torch.from_numpy(np.stack(frames)))

        found["kaldi-native-fbank"] = knf_fbank
        found["kaldi-native-fbank (compute only)"] = knf_compute
    return found


def resamplers() -> dict:
    found = {"speakerlab": resample}
    if importlib.util.find_spec("torchaudio"):
        import torchaudio.functional

        found["torchaudio"] = torchaudio.functional.resample
    return found


def run(repeats: int) -> dict:
    limit_worker_threads()  # one torch and one BLAS thread, as in a DataLoader worker
    generator = torch.Generator().manual_seed(0)
    results = []
    features = fbank_implementations()
    for seconds in (3, 8):
        wav = torch.randn(seconds * RATE, generator=generator) * 0.2
        reference = features["torchaudio"](wav) if "torchaudio" in features else None
        timings = median_ms(features, wav, repeats)
        for name, function in features.items():
            row = {"task": f"fbank {seconds} s", "implementation": name, **timings[name]}
            output = function(wav)
            if reference is not None and isinstance(output, torch.Tensor):
                row["max_abs_diff"] = float((output.float() - reference).abs().max())
            results.append(row)
    cases = [("speed 0.9, 3 s crop", 9, 10, 3), ("speed 1.1, 3 s crop", 11, 10, 3)]
    cases += [("8 kHz -> 16 kHz, 8 s", 8000, RATE, 8), ("44.1 kHz -> 16 kHz, 8 s", 44100, RATE, 8)]
    found = resamplers()
    for task, orig, new, seconds in cases:
        wav = torch.randn(seconds * (orig if orig > 100 else RATE), generator=generator) * 0.2
        reference = found["torchaudio"](wav, orig, new) if "torchaudio" in found else None
        bound = {n: (lambda w, f=f, o=orig, r=new: f(w, o, r)) for n, f in found.items()}
        timings = median_ms(bound, wav, repeats)
        for name, function in found.items():
            row = {"task": f"resample {task}", "implementation": name, **timings[name]}
            if reference is not None:
                row["max_abs_diff"] = float((function(wav, orig, new) - reference).abs().max())
            results.append(row)
    missing = [p for p in ("torchaudio", "kaldi_native_fbank") if not importlib.util.find_spec(p)]
    return {
        "repeats": repeats,
        "threads": 1,
        "not_installed": missing,
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "load_average_1min": round(os.getloadavg()[0], 2),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "results": results,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=200, help="timed calls per measurement")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    text = json.dumps(run(args.repeats), indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
