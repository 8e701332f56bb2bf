"""``speakerlab make-trials``: a balanced trial list from a Kaldi data dir, optionally on speakers
held out of it (the calibration set of the recipe).

With ``--speakers N`` it picks N speakers of ``--data-dir`` at random (``--seed``), writes their
utterances as a Kaldi dir in ``--out-dir`` (``wav.scp``, ``utt2spk``, ``spk2utt``, and ``utt2info``
when the source has one) and, with ``--rest-dir``, the other speakers' utterances as another one
(train on that, and the picked speakers stay unseen). ``<out-dir>/trials`` gets up to ``--targets``
target trials (distinct pairs of utterances of one speaker, drawn uniformly) and as many
non-target trials (pairs of utterances of different speakers). Without ``--speakers`` every
speaker is used. The same inputs and seed always give the same outputs.

    speakerlab make-trials --data-dir data/3dspeaker/train --speakers 200 \\
        --out-dir data/3dspeaker/calibration --rest-dir data/3dspeaker/train_fit
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Collection
from pathlib import Path

import numpy as np

from speakerlab.bin import exits_on_error
from speakerlab.data.kaldi_dir import read_table, read_utt2spk, spk2utt_from_utt2spk, write_table
from speakerlab.errors import ConfigError, DataError
from speakerlab.trials import balanced_trials, write_trials

UTT_TABLES = ("wav.scp", "utt2spk", "utt2info", "utt2dur")  # per-utterance tables carried over
# Fewer speakers give too few speaker pairs: non-target scores bunch up and a small list is often
# perfectly separable, with no finite calibration.
MIN_SPEAKERS = 4


def pick_speakers(speakers: Collection[str], count: int, seed: int) -> set[str]:
    """``count`` of ``speakers`` drawn at random; the same for the same set and seed."""
    ordered = sorted(speakers)
    if not 2 <= count <= len(ordered):
        raise ConfigError(f"cannot pick {count} of {len(ordered)} speakers (need 2 or more)")
    chosen = np.random.default_rng(seed).choice(len(ordered), size=count, replace=False)
    return {ordered[i] for i in chosen.tolist()}


def write_subset(data_dir: Path, out_dir: Path, utt2spk: dict[str, str], keep: set[str]) -> None:
    """The utterances of speakers ``keep`` as a Kaldi dir."""
    utts = {utt for utt, spk in utt2spk.items() if spk in keep}
    for name in UTT_TABLES:
        if (data_dir / name).is_file():
            table = read_table(data_dir / name)
            write_table(out_dir / name, ((u, v) for u, v in table.items() if u in utts))
    spk2utt = spk2utt_from_utt2spk({u: utt2spk[u] for u in utts})
    write_table(out_dir / "spk2utt", ((spk, " ".join(us)) for spk, us in spk2utt.items()))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="speakerlab make-trials",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data-dir", required=True, help="Kaldi dir with wav.scp and utt2spk")
    parser.add_argument("--out-dir", required=True, help="where trials (and the subset) go")
    parser.add_argument("--speakers", type=int, help="hold out this many speakers (default: all)")
    parser.add_argument(
        "--max-fraction",
        type=float,
        default=0.1,
        help=f"hold out at most this fraction of the speakers, but at least {MIN_SPEAKERS} "
        "(default %(default)s)",
    )
    parser.add_argument("--rest-dir", help="write the speakers not held out here")
    parser.add_argument(
        "--targets", type=int, default=20000, help="target trials (default %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    data_dir, out_dir = Path(args.data_dir), Path(args.out_dir)
    if args.targets < 1:
        raise ConfigError(f"--targets must be at least 1, got {args.targets}")
    if args.rest_dir is not None and args.speakers is None:
        raise ConfigError("--rest-dir needs --speakers")
    if args.rest_dir is not None and Path(args.rest_dir).resolve() == data_dir.resolve():
        raise ConfigError("--rest-dir must not be --data-dir")
    utt2spk = read_utt2spk(data_dir / "utt2spk")
    if not utt2spk:
        raise DataError(f"{data_dir / 'utt2spk'}: no utterances")
    speakers = set(utt2spk.values())
    keep = speakers
    if args.speakers is not None:
        count = min(args.speakers, max(MIN_SPEAKERS, int(args.max_fraction * len(speakers))))
        keep = pick_speakers(speakers, count, args.seed)
    held = {utt: spk for utt, spk in utt2spk.items() if spk in keep}
    trials = balanced_trials(held, args.targets, args.seed)
    if args.speakers is not None:
        write_subset(data_dir, out_dir, utt2spk, keep)
        if args.rest_dir is not None:
            write_subset(data_dir, Path(args.rest_dir), utt2spk, speakers - keep)
    write_trials(out_dir / "trials", trials)
    print(
        f"{out_dir}: {len(keep)} of {len(speakers)} speakers, {len(held)} utterances, "
        f"{len(trials)} trials ({trials.num_targets} targets)",
        file=sys.stderr,
    )


@exits_on_error("make-trials")
def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
