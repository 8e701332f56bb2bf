"""``speakerlab score``: cosine-score trial lists, optionally AS-normalised, and report EER/minDCF.

With ``--calibration`` (a file of ``speakerlab calibrate``) the scores are turned into calibrated
log-likelihood ratios, and the table adds Cllr, min Cllr and the actual DCF at each p_target.
Writes ``<out_dir>/<trial_name>.score``, ``results.md``, ``results.json`` and ``det.png`` and prints
the results table.
"""

from __future__ import annotations

import argparse

import numpy as np

from speakerlab.bin import exits_on_error
from speakerlab.calibration import Calibration, durations_from_wav_scp, read_utt2dur
from speakerlab.errors import ConfigError
from speakerlab.scoring import (
    DEFAULT_TOP_K,
    ScoringSetup,
    load_cohort,
    results_markdown,
    score_trials,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="speakerlab score",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--embeddings",
        nargs="+",
        required=True,
        metavar="SCP",
        help="embedding scp file(s) holding every enrol and test utterance",
    )
    parser.add_argument(
        "--trials",
        nargs="+",
        required=True,
        metavar="FILE",
        help="trial lists ('enrol test target|nontarget|1|0' per line)",
    )
    parser.add_argument("--out-dir", required=True, help="where score files and results go")
    add_cohort_options(parser)
    parser.add_argument(
        "--p-target",
        type=float,
        nargs="+",
        default=[0.01],
        help="prior(s) of a target trial for minDCF (default 0.01)",
    )
    add_duration_options(parser)
    parser.add_argument(
        "--calibration",
        metavar="FILE",
        help="calibration of speakerlab calibrate: write calibrated log-likelihood ratios",
    )
    parser.add_argument("--no-plot", action="store_true", help="do not draw det.png")
    return parser.parse_args(argv)


def add_cohort_options(parser: argparse.ArgumentParser) -> None:
    """AS-Norm: the cohort and how many of its closest embeddings count."""
    parser.add_argument(
        "--cohort", nargs="+", metavar="SCP", help="cohort embedding scp file(s): turns on AS-Norm"
    )
    parser.add_argument(
        "--cohort-utt2spk",
        metavar="FILE",
        help="utt2spk of the cohort: use one mean embedding per speaker",
    )
    parser.add_argument(
        "--top-k",
        type=int,
        default=DEFAULT_TOP_K,
        help="AS-Norm: cohort scores kept per utterance (default %(default)s)",
    )


def cohort_from_args(args: argparse.Namespace) -> np.ndarray | None:
    """The AS-Norm cohort of --cohort (None without one); checks --top-k first."""
    if args.top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {args.top_k}")
    return load_cohort(args.cohort, args.cohort_utt2spk) if args.cohort else None


def add_duration_options(parser: argparse.ArgumentParser) -> None:
    """Where the durations of the utterances come from, for calibrations that use them."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--utt2dur", metavar="FILE", help="'utt seconds' per line: durations for the calibration"
    )
    group.add_argument(
        "--wav-scp",
        metavar="FILE",
        help="wav.scp of the utterances: durations for the calibration, from the audio headers",
    )


def read_durations(args: argparse.Namespace) -> dict[str, float] | None:
    """Durations from --utt2dur or --wav-scp, None when neither is given."""
    if args.utt2dur:
        return read_utt2dur(args.utt2dur)
    if args.wav_scp:
        return durations_from_wav_scp(args.wav_scp)
    return None


def run(args: argparse.Namespace) -> None:
    bad_priors = [p for p in args.p_target if not 0.0 < p < 1.0]
    if bad_priors:
        raise ConfigError(f"--p-target values must lie strictly between 0 and 1, got {bad_priors}")
    calibration = Calibration.load(args.calibration) if args.calibration else None
    setup = ScoringSetup(
        cohort=cohort_from_args(args),
        top_k=args.top_k,
        calibration=calibration,
        durations=read_durations(args) if calibration and calibration.uses_durations else None,
        p_targets=args.p_target,
        det_plot=not args.no_plot,
    )
    results = score_trials(args.embeddings, args.trials, args.out_dir, setup)
    print(results_markdown(results), end="")


@exits_on_error("score")
def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
