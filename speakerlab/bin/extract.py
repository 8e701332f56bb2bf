"""``speakerlab extract``: embed each utterance of a wav.scp into ``<out-dir>/embedding.scp``.

Utterances are embedded whole (recordings longer than --window-seconds in windows whose embeddings
are averaged), batched by equal frame count. A run resumes what an earlier run of the same model
left in --out-dir; what another model made, or what was made from files that changed since, is
embedded again (the log says how many). Only one run writes a folder at a time. Utterances that
turn out unusable while they are embedded (e.g. NaN samples) are skipped and listed in
<out-dir>/skipped.txt. Run under ``torchrun --nproc_per_node N`` to split the work over N processes
(GPUs when present); rank 0 merges the parts.
"""

from __future__ import annotations

import argparse
import logging

from speakerlab.bin import add_embedding_options, exits_on_error
from speakerlab.distributed import init_distributed
from speakerlab.embedder import BACKENDS
from speakerlab.errors import ConfigError
from speakerlab.extract import extract_with_model

DIST_TIMEOUT_MINUTES = 30.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="speakerlab extract",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model",
        required=True,
        help="registry id, checkpoint file (ours or released) or .onnx file",
    )
    parser.add_argument("--wav-scp", required=True, help="'utt path' list of 16 kHz recordings")
    parser.add_argument("--out-dir", required=True, help="where embedding.scp and its files go")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="most utterances (of equal length) per batch (default %(default)s)",
    )
    parser.add_argument(
        "--num-workers",
        type=int,
        default=1,
        help="processes reading audio and computing fbank (default %(default)s)",
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="onnx: ONNX Runtime on the CPU, the model exported to <out-dir>/model.onnx first "
        "(again only when the model changed); torch: PyTorch; auto (default): onnx on the CPU "
        "and for .onnx files, torch on a GPU",
    )
    parser.add_argument(
        "--device",
        default="auto",
        help="auto (this rank's GPU if any, else CPU), cpu, cuda, cuda:N",
    )
    parser.add_argument(
        "--lock-wait-seconds",
        type=float,
        default=0.0,
        help="if another run is writing --out-dir, wait this long for it before giving up "
        "(default %(default)s: give up at once)",
    )
    parser.add_argument(
        "--dist-timeout-minutes",
        type=float,
        default=DIST_TIMEOUT_MINUTES,
        help="under torchrun: how long a rank waits for the others, at the start and at each "
        "synchronisation point, before the run stops (default %(default)s)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_embedding_options(parser)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    if args.num_workers < 0:
        raise ConfigError(f"--num-workers must be >= 0, got {args.num_workers}")
    if not args.dist_timeout_minutes > 0:
        raise ConfigError(
            f"--dist-timeout-minutes must be positive, got {args.dist_timeout_minutes}"
        )
    logging.basicConfig(level=logging.INFO, format="speakerlab extract: %(message)s")
    ranks = init_distributed(
        args.device,
        args.dist_timeout_minutes,
        backend="gloo",
        option="--device",
        rendezvous_minutes=args.dist_timeout_minutes,
        rendezvous_option="--dist-timeout-minutes",
    )
    scp = extract_with_model(
        args.model,
        args.wav_scp,
        args.out_dir,
        backend=args.backend,
        precision=args.precision,
        ranks=ranks,
        lock_wait_seconds=args.lock_wait_seconds,
        batch_size=args.batch_size,
        max_batch_frames=args.max_batch_frames,
        window_seconds=args.window_seconds,
        num_workers=args.num_workers,
        progress=not args.no_progress,
    )
    if ranks.is_main:
        print(f"embeddings: {scp}")


@exits_on_error("extract")
def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
