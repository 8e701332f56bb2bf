"""The subcommands of ``speakerlab`` (see :mod:`speakerlab.cli`), one module each."""

from __future__ import annotations

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
