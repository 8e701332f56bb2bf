#!/usr/bin/env python3
"""Simulate a small corpus in exactly the 3D-Speaker layout, with MUSAN- and RIRS_NOISES-like sets.

The corpus is made so that the real preparation code runs on it unchanged and so that a model has
something real to learn: speaker identity (voice) against three nuisances, dialect, distance and
device (the package ``local/simulate`` says how each is made). Everything is deterministic for a
given seed and size.

Layout written under ``--out_dir``::

    3dspeaker/{train,test}/<SPK>/<SPK>_<NNN>_DeviceXX_DistanceYY_DialectZZ.wav
    3dspeaker/files/{train,test}_wav.scp, {train,test}_utt2spk, {train,test}_utt2info.csv,
                    trials_cross_device, trials_cross_distance, trials_cross_dialect
    musan/noise/free-sound/noise-free-sound-NNNN.wav
    RIRS_NOISES/real_rirs_isotropic_noises/{sim_rir_NN.wav, sim_isotropic_noise_NN.wav, rir_list}
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from local.simulate.corpus import SimulationConfig, simulate_corpus  # noqa: E402

__all__ = ["SimulationConfig", "simulate_corpus", "main"]


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
