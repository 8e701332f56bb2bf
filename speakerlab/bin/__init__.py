"""The subcommands of ``speakerlab`` (see :mod:`speakerlab.cli`), one module each."""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable

from speakerlab.errors import SpeakerlabError


def exits_on_error(command: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Decorate a subcommand's ``main``: a :class:`SpeakerlabError` (bad input, missing file, ...)
    ends the command with one line ``speakerlab <command>: error: <message>`` and exit status 1
    instead of a traceback (see :func:`speakerlab.distributed.error_report` under torchrun)."""

    def decorate(main: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(main)
        def wrapped(*args, **kwargs) -> None:
            try:
                main(*args, **kwargs)
            except SpeakerlabError as err:
                from speakerlab.distributed import error_report

                report = error_report(err)  # under torchrun: once per node when all ranks fail
                if report is not None:
                    print(f"speakerlab {command}: error: {report}", file=sys.stderr)
                sys.exit(1)

        return wrapped

    return decorate


def add_embedding_options(parser: argparse.ArgumentParser) -> None:
    """The options every command that embeds recordings shares: precision, window length and the
    frames per model call."""
    from speakerlab.embedder import (
        DEFAULT_MAX_BATCH_FRAMES,
        DEFAULT_WINDOW_SECONDS,
        PRECISION_HELP,
        PRECISIONS,
    )

    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help=PRECISION_HELP)
    parser.add_argument(
        "--window-seconds",
        type=float,
        default=DEFAULT_WINDOW_SECONDS,
        help="recordings longer than this are embedded in windows of at most this length, "
        "their embeddings averaged (default %(default)s)",
    )
    parser.add_argument(
        "--max-batch-frames",
        type=int,
        default=DEFAULT_MAX_BATCH_FRAMES,
        help="most fbank frames given to the model at once; bounds its memory "
        "(default %(default)s = 60 s)",
    )
