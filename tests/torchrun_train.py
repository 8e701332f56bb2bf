"""``speakerlab train ARGS`` as a torchrun target of the tests, one fresh interpreter per rank.

Each rank writes its stderr to ``$RANK_OUTPUT/<rank>.err`` and, when it ends by itself, its exit
status to ``$RANK_OUTPUT/<rank>.status`` (a rank that torchrun had to kill writes none). With
``NAN_RANK`` set, the model of that rank returns NaN on its second forward pass.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn


class NaNOnCall(nn.Module):
    """Wraps an embedding model; its forward pass number ``call`` returns NaN (only on rank
    ``rank`` of a multi-process run)."""

    def __init__(self, inner: nn.Module, rank: str = "0", call: int = 2) -> None:
        super().__init__()
        self.inner = inner
        self.rank = rank
        self.call = call
        self.calls = 0

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = self.inner(features)
        if self.calls == self.call and os.environ.get("RANK", "0") == self.rank:
            return out * float("nan")
        return out


def with_nan_on_call(
    build_model: Callable[..., nn.Module], rank: str, call: int = 2
) -> Callable[..., nn.Module]:
    """``build_model`` whose models return NaN on forward pass ``call`` on rank ``rank``."""
    return lambda *args, **kwargs: NaNOnCall(build_model(*args, **kwargs), rank, call)


def main() -> int:
    from speakerlab.cli import main as cli_main
    from speakerlab.training import builders

    if "NAN_RANK" in os.environ:
        builders.build_model = with_nan_on_call(builders.build_model, os.environ["NAN_RANK"])
    output = Path(os.environ["RANK_OUTPUT"])
    sys.stderr = open(output / f"{os.environ['RANK']}.err", "w")
    try:
        cli_main(["train", *sys.argv[1:]])
        status = 0
    except SystemExit as exit_:
        status = int(exit_.code or 0)
    sys.stderr.flush()
    (output / f"{os.environ['RANK']}.status").write_text(str(status))
    return status


if __name__ == "__main__":
    sys.exit(main())
