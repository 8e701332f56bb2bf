"""``speakerlab verify``: are two recordings the same speaker?

Prints the cosine score and the decision (same speaker when the score reaches the threshold).
The threshold is the model's (0.249 for the released 3D-Speaker models, or the one stored in an
ONNX file exported from them); ``--threshold`` overrides it and is required for checkpoints whose
threshold is unknown (e.g. your own: use the EER threshold of your development trials). A model
that carries a calibration (``speakerlab calibrate --model-out``; the recipe's
``model_calibrated.ckpt``) also prints the log-likelihood ratio, which decides at the Bayes
threshold of the calibration's p_target unless ``--threshold`` is given.
Recordings longer than --window-seconds are embedded in windows whose embeddings are averaged, so
the model's memory does not grow with the length of a recording.
"""

from __future__ import annotations

import argparse

from speakerlab.bin import add_embedding_options, exits_on_error
from speakerlab.inference import DEFAULT_MODEL, SpeakerVerifier


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="speakerlab verify",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("enrol", help="first recording (any sample rate, channel 0 is used)")
    parser.add_argument("test", help="second recording")
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="registry id, checkpoint file or .onnx file (default %(default)s)",
    )
    parser.add_argument("--threshold", type=float, help="decision threshold on the cosine score")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    add_embedding_options(parser)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    verifier = SpeakerVerifier.load(
        args.model,
        threshold=args.threshold,
        device=args.device,
        window_seconds=args.window_seconds,
        max_batch_frames=args.max_batch_frames,
        precision=args.precision,
    )
    result = verifier.verify(args.enrol, args.test)
    decision = "same speaker" if result.same_speaker else "different speakers"
    print(f"score: {result.score:.4f}")
    if result.llr is not None:
        calibration = verifier.calibration
        print(
            f"llr: {result.llr:.4f} (calibrated; same speaker when llr >= "
            f"{calibration.threshold_for():.4f}, the Bayes threshold at p_target "
            f"{calibration.p_target:g})"
        )
    print(f"decision: {decision} (threshold {result.threshold:g})")


@exits_on_error("verify")
def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
