"""The ``speakerlab`` command: ``speakerlab <subcommand> [args...]``.

Each subcommand lives in ``speakerlab/bin/<module>.py`` with a ``main()`` that reads ``sys.argv``
itself (the training command parses Hydra overrides), so this dispatcher only strips the
subcommand name and imports the module lazily to keep ``speakerlab --help`` instant.
"""

from __future__ import annotations

import importlib
import os
import sys

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "make-index": ("make_index", "build the training index (a row per segment of audio)"),
    "train": ("train", "train a model (Hydra config; overrides as key=value)"),
    "export": ("export", "export a training checkpoint as a plain embedding-model state_dict"),
    "extract": ("extract", "extract embeddings of a wav.scp into Kaldi ark/scp"),
    "score": ("score", "score trial lists; write score files, results table and DET plot"),
    "make-trials": ("make_trials", "a balanced trial list from a data dir (held-out speakers)"),
    "calibrate": ("calibrate", "fit a score-to-log-likelihood-ratio calibration"),
    "verify": ("verify", "are two recordings the same speaker?"),
    "embed": ("embed", "embed audio files or a wav.scp"),
    "export-onnx": ("export_onnx", "export a model to ONNX with dynamic batch and frame axes"),
    "enroll": ("enroll", "add a speaker's recordings to a speaker database"),
    "identify": ("identify", "who is speaking? the closest enrolled speakers of each recording"),
    "db": ("db", "list or remove the speakers of a speaker database"),
}

INFERENCE_COMMANDS = ("extract", "verify", "embed", "enroll", "identify")


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: speakerlab <command> [args...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "Run 'speakerlab <command> --help' for the options of one command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    name = argv[0]
    if name not in SUBCOMMANDS:
        print(f"speakerlab: unknown command '{name}'\n\n{usage()}", file=sys.stderr)
        sys.exit(2)
    if name in INFERENCE_COMMANDS:
        # Read once, when PyTorch is imported: idle threads sleep instead of spinning, which on
        # cores shared with other processes takes the core from the thread that has work.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    module = importlib.import_module(f"speakerlab.bin.{SUBCOMMANDS[name][0]}")
    sys.argv = [f"speakerlab {name}", *argv[1:]]
    module.main()
