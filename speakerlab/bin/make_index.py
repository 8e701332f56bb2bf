"""``speakerlab make-index``: build the training index (one row per segment of audio)."""

from __future__ import annotations

import argparse
import logging

from speakerlab.bin import exits_on_error
from speakerlab.data.index import build_train_index, load_train_index


@exits_on_error("make-index")
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="speakerlab make-index",
        description="Index a Kaldi training directory (wav.scp + utt2spk) from audio headers: one "
        "row per --segment_seconds of audio. Unusable files are reported and skipped.",
    )
    parser.add_argument("--data_dir", required=True, help="Kaldi dir with wav.scp and utt2spk")
    parser.add_argument("--out", required=True, help="index file to write (TSV)")
    parser.add_argument(
        "--segment_seconds",
        type=float,
        default=4.0,
        help="seconds of audio per index row (default: 4.0)",
    )
    parser.add_argument(
        "--max_bad_fraction",
        type=float,
        default=0.1,
        help="fail if more than this fraction of files is unusable (default: 0.1)",
    )
    parser.add_argument(
        "--num_workers", type=int, default=8, help="threads reading audio headers (default: 8)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = build_train_index(
        args.data_dir, args.out, args.segment_seconds, args.max_bad_fraction, args.num_workers
    )
    index = load_train_index(path)
    print(
        f"{path}: {len(index)} rows, {len(set(index.utts))} utterances, "
        f"{index.num_speakers} speakers"
    )


if __name__ == "__main__":
    main()
