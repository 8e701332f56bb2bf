"""``speakerlab export``: turn a training checkpoint into a plain embedding-model state_dict.

The output has the released 3D-Speaker checkpoint layout (only the embedding model's weights, no
``module.`` prefix, no classifier or training state), so inference code loads our models and the
released ones alike.

    speakerlab export --checkpoint exp/eres2net --out exp/eres2net/eres2net.ckpt
"""

from __future__ import annotations

import argparse
from pathlib import Path

from speakerlab.bin import exits_on_error


def export_embedding_model(checkpoint: str | Path, out: str | Path) -> tuple[str, dict]:
    """Write the embedding model of ``checkpoint`` (a file or an experiment folder, whose newest
    checkpoint is used) to ``out``; returns the model name and constructor kwargs."""
    from speakerlab.models.checkpoint import load_embedding_model_spec, save_embedding_model
    from speakerlab.training.finetune import resolve_init_path

    model, name, kwargs = load_embedding_model_spec(resolve_init_path(checkpoint))
    save_embedding_model(model, out)
    return name, kwargs


@exits_on_error("export")
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="speakerlab export",
        description="Export the embedding model of a training checkpoint as a plain state_dict "
        "(the released checkpoint layout).",
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="training checkpoint file, or an experiment folder (newest checkpoint)",
    )
    parser.add_argument("--out", required=True, help="output file, e.g. exp/eres2net/model.ckpt")
    args = parser.parse_args(argv)
    name, kwargs = export_embedding_model(args.checkpoint, args.out)
    print(f"wrote {args.out}: {name} {kwargs}")


if __name__ == "__main__":
    main()
