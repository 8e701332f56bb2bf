"""``speakerlab make-index``: build the training index (one row per segment of audio).

Examples::

    speakerlab make-index --data_dir data/3dspeaker/train --out exp/eres2net/train_index.tsv \\
        experiment=eres2net
    speakerlab make-index --data_dir data/3dspeaker/train --out index.tsv --segment_seconds 2

With Hydra overrides of the training configuration (``experiment=NAME key=value ...``, as given
to ``speakerlab train``), the segment length and the allowed fraction of bad files are those of
its ``data`` group, so that training finds the index up to date instead of building another.
"""

from __future__ import annotations

import argparse
import logging

from speakerlab.bin import exits_on_error
from speakerlab.data.index import build_train_index, load_train_index
from speakerlab.errors import ConfigError

DEFAULT_SEGMENT_SECONDS = 4.0
DEFAULT_MAX_BAD_FRACTION = 0.1


def training_data_values(overrides: list[str]) -> tuple[float, float]:
    """``data.segment_seconds`` and ``data.max_bad_fraction`` of the training configuration
    composed with ``overrides`` (the repository's ``conf/``, as ``speakerlab train`` reads it)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from speakerlab.bin.train import REPO_CONF

    try:
        with initialize_config_dir(config_dir=str(REPO_CONF), version_base="1.3"):
            data = compose("config", overrides=overrides).data
        return float(data.segment_seconds), float(data.max_bad_fraction)
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        first_line = str(err).strip().splitlines()[0]  # Hydra appends its search path
        raise ConfigError(f"training configuration {' '.join(overrides)}: {first_line}") from None


@exits_on_error("make-index")
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="speakerlab make-index",
        description="Index a Kaldi training directory (wav.scp + utt2spk) from audio headers: one "
        "row per segment_seconds of audio. Unusable files are reported and skipped. An index "
        "built from the same lists with the same values is reused.",
    )
    parser.add_argument("--data_dir", required=True, help="Kaldi dir with wav.scp and utt2spk")
    parser.add_argument("--out", required=True, help="index file to write (TSV)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="training configuration (e.g. experiment=eres2net data.segment_seconds=2.0) whose "
        "data.segment_seconds and data.max_bad_fraction to use",
    )
    parser.add_argument(
        "--segment_seconds",
        type=float,
        help=f"seconds of audio per index row (default: {DEFAULT_SEGMENT_SECONDS}; not with "
        "KEY=VALUE)",
    )
    parser.add_argument(
        "--max_bad_fraction",
        type=float,
        help="fail if more than this fraction of files is unusable (default: "
        f"{DEFAULT_MAX_BAD_FRACTION}; not with KEY=VALUE)",
    )
    parser.add_argument(
        "--num_workers", type=int, default=8, help="processes reading audio headers (default: 8)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.overrides:
        if args.segment_seconds is not None or args.max_bad_fraction is not None:
            raise ConfigError(
                "give --segment_seconds/--max_bad_fraction or a training configuration "
                f"({' '.join(args.overrides)}), not both"
            )
        segment_seconds, max_bad_fraction = training_data_values(args.overrides)
    else:
        segment_seconds, max_bad_fraction = (
            DEFAULT_SEGMENT_SECONDS if args.segment_seconds is None else args.segment_seconds,
            DEFAULT_MAX_BAD_FRACTION if args.max_bad_fraction is None else args.max_bad_fraction,
        )
    path = build_train_index(
        args.data_dir, args.out, segment_seconds, max_bad_fraction, args.num_workers
    )
    index = load_train_index(path)
    print(
        f"{path}: {len(index)} rows, {index.num_utterances} utterances, "
        f"{index.num_speakers} speakers ({segment_seconds:g} s per row)"
    )


if __name__ == "__main__":
    main()
