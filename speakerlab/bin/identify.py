"""``speakerlab identify``: who is speaking? The closest enrolled speakers of each recording.

Prints, for each recording, the answer (the best speaker, or ``unknown`` when its cosine score is
below the threshold) and the top-k speakers with their scores. The threshold is ``--threshold``,
else the model's: the model card's 0.249 for released models, or the score at which a calibrated
model's LLR reaches its decision threshold.

    speakerlab identify --db speakers.db who.wav
"""

from __future__ import annotations

import argparse

from speakerlab.bin import exits_on_error
from speakerlab.errors import ConfigError
from speakerlab.identification import DEFAULT_TOP_K, Identification, SpeakerDB, model_identity
from speakerlab.inference import SpeakerVerifier


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="speakerlab identify",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("wavs", nargs="+", metavar="WAV", help="recordings to identify")
    parser.add_argument("--db", required=True, help="speaker database file")
    parser.add_argument("--model", help="model (default: the one the database was made with)")
    parser.add_argument(
        "--top-k", type=int, default=DEFAULT_TOP_K, help="speakers listed (default %(default)s)"
    )
    parser.add_argument("--threshold", type=float, help="cosine score below which: unknown")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    return parser.parse_args(argv)


def decision_threshold(verifier: SpeakerVerifier) -> float:
    """The model's cosine threshold: its own, or its calibration's (score-only calibrations)."""
    calibration = verifier.calibration
    if calibration is not None and not calibration.uses_durations:
        return calibration.score_threshold()
    if verifier.threshold is None:
        raise ConfigError(f"no decision threshold is known for {verifier.source}; pass --threshold")
    return verifier.threshold


def format_identification(name: str, result: Identification) -> str:
    best = result.matches[0]
    if result.speaker is None:
        answer = f"unknown (best {best.speaker} {best.score:.4f} < threshold {result.threshold:g})"
    else:
        answer = f"{result.speaker} (score {best.score:.4f})"
    width = max(len(m.speaker) for m in result.matches)
    lines = [f"{name}: {answer}"]
    lines += [
        f"  {rank}. {m.speaker:<{width}}  {m.score:.4f}" for rank, m in enumerate(result.matches, 1)
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> None:
    if args.top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {args.top_k}")
    db = SpeakerDB.load(args.db)
    model = args.model or db.model_source
    db.check_model(model_identity(model), model)
    verifier = SpeakerVerifier.load(model, threshold=args.threshold, device=args.device)
    threshold = args.threshold if args.threshold is not None else decision_threshold(verifier)
    embeddings = verifier.embed_many(args.wavs, normalize=True)
    for wav, result in zip(args.wavs, db.identify(embeddings, args.top_k, threshold)):
        print(format_identification(wav, result))


@exits_on_error("identify")
def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
