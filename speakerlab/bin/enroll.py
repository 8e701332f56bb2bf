"""``speakerlab enroll``: add a speaker's recordings to a speaker database.

The speaker's entry is the mean of the unit-length embeddings of all recordings enrolled for it:
enrolling an existing speaker again adds the new recordings (``--replace`` starts it afresh). The
database is created on first use and records the model; enrolling with another model is refused.
Several enroll commands may run on one database at once: each waits for the others' writes.

    speakerlab enroll --db speakers.db --speaker alice --model exp/eres2net/model.ckpt a1.wav a2.wav
"""

from __future__ import annotations

import argparse
from pathlib import Path

from speakerlab.bin import exits_on_error
from speakerlab.identification import SpeakerDB, check_name, model_identity, updating
from speakerlab.inference import DEFAULT_MODEL, SpeakerVerifier


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="speakerlab enroll",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("wavs", nargs="+", metavar="WAV", help="recordings of the speaker")
    parser.add_argument("--db", required=True, help="speaker database file (created if missing)")
    parser.add_argument("--speaker", required=True, help="the speaker's name")
    parser.add_argument(
        "--model",
        help="registry id, checkpoint or .onnx file (default: the database's model, or "
        f"{DEFAULT_MODEL} for a new database)",
    )
    parser.add_argument(
        "--replace", action="store_true", help="forget the speaker's earlier recordings"
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    return parser.parse_args(argv)


def model_source(model: str) -> str:
    """How the database names the model: files by absolute path, ids as they are."""
    return str(Path(model).resolve()) if Path(model).is_file() else model


def run(args: argparse.Namespace) -> None:
    check_name(args.speaker)
    existing = SpeakerDB.load(args.db) if Path(args.db).exists() else None
    model = args.model or (existing.model_source if existing else DEFAULT_MODEL)
    identity = model_identity(model)
    if existing is not None:  # refuse before the (slow) embedding
        existing.check_model(identity, model)
    verifier = SpeakerVerifier.load(model, device=args.device)
    embeddings = verifier.embed_many(args.wavs, normalize=True)
    with updating(args.db, identity, embeddings.shape[1], model_source(model)) as db:
        is_new = args.speaker not in db
        db.enroll(args.speaker, embeddings, replace=args.replace)
        count = int(db.counts[db.names.index(args.speaker)])
        total = len(db)
    action = "enrolled" if is_new else ("re-enrolled" if args.replace else "updated")
    print(f"{action} {args.speaker}: {count} recording(s); {args.db} holds {total} speaker(s)")


@exits_on_error("enroll")
def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
