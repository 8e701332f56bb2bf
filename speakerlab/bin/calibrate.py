"""``speakerlab calibrate``: fit a calibration from scores to log-likelihood ratios.

Scores a calibration trial list exactly as ``speakerlab score`` would (cosine, or AS-Norm with the
same cohort options), fits ``llr = scale * score + offset`` by prior-weighted logistic regression
(with ``--utt2dur`` or ``--wav-scp`` the log durations of the shorter and the longer recording of
each trial are extra inputs), and writes the calibration as JSON for ``speakerlab score
--calibration``. With ``--model``/``--model-out`` it also writes a copy of the model that carries
the calibration, which ``speakerlab verify`` then uses to print the LLR and decide at the
calibration's p_target.

    speakerlab calibrate --embeddings calib/embedding.scp --trials calib/trials \\
        --out exp/calibration.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from speakerlab.bin import exits_on_error
from speakerlab.bin.score import (
    add_cohort_options,
    add_duration_options,
    cohort_from_args,
    read_durations,
)
from speakerlab.calibration import (
    DEFAULT_P_TARGET,
    DEFAULT_PRIOR,
    Calibration,
    fit_calibration,
    trial_seconds,
    write_calibrated_model,
)
from speakerlab.errors import ConfigError
from speakerlab.metrics import Metrics, compute_metrics
from speakerlab.scoring import ScoringSetup, load_embeddings, score_lists
from speakerlab.trials import read_trials


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="speakerlab calibrate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--embeddings",
        nargs="+",
        required=True,
        metavar="SCP",
        help="embedding scp file(s) holding every utterance of the calibration trials",
    )
    parser.add_argument("--trials", required=True, metavar="FILE", help="calibration trial list")
    parser.add_argument("--out", required=True, metavar="FILE", help="calibration JSON to write")
    add_cohort_options(parser)
    add_duration_options(parser)
    parser.add_argument(
        "--prior",
        type=float,
        default=DEFAULT_PRIOR,
        help="effective target prior of the fit (default %(default)s: minimises Cllr)",
    )
    parser.add_argument(
        "--p-target",
        type=float,
        default=DEFAULT_P_TARGET,
        help="operating point whose Bayes threshold decides verification trials "
        "(default %(default)s)",
    )
    parser.add_argument("--model", metavar="FILE", help="checkpoint to write with the calibration")
    parser.add_argument(
        "--model-out", metavar="FILE", help="where the calibrated copy of --model goes"
    )
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> Calibration:
    for name in ("prior", "p_target"):
        value = getattr(args, name)
        if not 0.0 < value < 1.0:
            raise ConfigError(f"--{name.replace('_', '-')} must lie in (0, 1), got {value}")
    if (args.model is None) != (args.model_out is None):
        raise ConfigError("--model and --model-out go together")
    if args.model is not None and not Path(args.model).is_file():
        raise ConfigError(f"{args.model}: model file not found")

    trials = read_trials(args.trials)
    setup = ScoringSetup(cohort=cohort_from_args(args), top_k=args.top_k)
    scores = score_lists(load_embeddings(args.embeddings), [trials], setup)[0]
    durations = read_durations(args)
    seconds = (None, None)
    if durations is not None:
        seconds = tuple(
            trial_seconds(durations, ids, trials.line_numbers, str(trials.path))
            for ids in (trials.enrol, trials.test)
        )
    calibration = fit_calibration(
        scores,
        trials.labels,
        prior=args.prior,
        p_target=args.p_target,
        enrol_seconds=seconds[0],
        test_seconds=seconds[1],
        score_kind=setup.score_kind(),
        fitted_on={"trials": str(trials.path), "embeddings": list(map(str, args.embeddings))},
    )
    metrics = compute_metrics(
        calibration.apply(scores, *seconds), trials.labels, [args.p_target], llr=True
    )
    print(summary(calibration, metrics, len(trials)))
    if args.model is not None:
        write_calibrated_model(args.model, calibration, args.model_out)
        print(f"wrote {args.model_out}: {args.model} with this calibration")
    calibration.save(args.out)
    print(f"wrote {args.out}")
    return calibration


def summary(calibration: Calibration, metrics: Metrics, num_trials: int) -> str:
    """The fitted map and how well it does on its own list."""
    p = calibration.p_target
    lines = [
        f"fitted on {num_trials} trials ({metrics.num_targets} targets) at prior "
        f"{calibration.prior:g}:",
        f"  llr = {calibration.scale:.4f} * score {_signed(calibration.offset)}",
    ]
    if calibration.duration_weights is not None:
        short, long = calibration.duration_weights
        lines[-1] += f" {_signed(short)} * log(shorter s) {_signed(long)} * log(longer s)"
    lines.append(
        f"  on this list: Cllr {metrics.cllr:.4f}, min Cllr {metrics.min_cllr:.4f}, "
        f"actDCF(p={p:g}) {metrics.act_dcf[p]:.4f}, minDCF(p={p:g}) {metrics.min_dcf[p]:.4f}"
    )
    decision = f"  decisions at p_target {p:g}: llr >= {calibration.threshold_for():.4f}"
    if not calibration.uses_durations:
        decision += f" (score >= {calibration.score_threshold():.4f})"
    lines.append(decision)
    return "\n".join(lines)


def _signed(value: float) -> str:
    return f"{'-' if value < 0 else '+'} {abs(value):.4f}"


@exits_on_error("calibrate")
def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
