"""``speakerlab db``: list or remove the speakers of a speaker database.

speakerlab db list --db speakers.db
speakerlab db remove --db speakers.db alice bob
"""

from __future__ import annotations

import argparse

from speakerlab.bin import exits_on_error
from speakerlab.identification import SpeakerDB, updating


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="speakerlab db",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="the speakers and their recording counts")
    listing.add_argument("--db", required=True, help="speaker database file")
    removal = actions.add_parser("remove", help="remove speakers")
    removal.add_argument("--db", required=True, help="speaker database file")
    removal.add_argument("speakers", nargs="+", metavar="NAME", help="speakers to remove")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    db = SpeakerDB.load(args.db)
    if args.action == "list":
        print(
            f"{args.db}: {len(db)} speaker(s), {db.dim}-dimensional embeddings of "
            f"{db.model_source or 'an unnamed model'} ({db.model[:24]}...)"
        )
        for name, count in sorted(zip(db.names, db.counts.tolist())):
            print(f"{name}\t{count}")
        return
    with updating(args.db, db.model, db.dim, db.model_source, create=False) as locked:
        locked.remove(args.speakers)
        left = len(locked)
    print(f"removed {len(args.speakers)} speaker(s); {args.db} holds {left}")


@exits_on_error("db")
def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
