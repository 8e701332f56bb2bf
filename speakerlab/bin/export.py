"""``speakerlab export``: turn a training checkpoint into a plain embedding-model state_dict.

The output has the released 3D-Speaker checkpoint layout (only the embedding model's weights, no
``module.`` prefix, no classifier or training state), so inference code loads our models and the
released ones alike. With ``--average N`` it holds the mean weights of the run's last N epoch-end
checkpoints (``speakerlab.training.averaging``); without it, the run's own
``trainer.export_average`` decides (1, the newest checkpoint, when the run does not set it).

    speakerlab export --checkpoint exp/eres2net --out exp/eres2net/model.ckpt
    speakerlab export --checkpoint exp/eres2net --out exp/eres2net/model_avg10.ckpt --average 10
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from speakerlab.bin import exits_on_error


def export_embedding_model(
    checkpoint: str | Path, out: str | Path, average: int | None = None
) -> tuple[str, dict, str]:
    """Write the embedding model of ``checkpoint`` (a file, an experiment folder, whose newest
    checkpoint is used, or a released model id) to ``out``, averaged over the last ``average``
    epoch-end checkpoints (None: the run's ``trainer.export_average``, else 1).

    Returns the model name, its constructor kwargs and a description of the weights' origin.
    """
    from speakerlab.models import build_model
    from speakerlab.models.checkpoint import (
        load_embedding_model_spec,
        load_state_into,
        save_embedding_model,
    )
    from speakerlab.training.averaging import average_checkpoints, check_retention
    from speakerlab.training.finetune import resolve_init_path

    path = resolve_init_path(checkpoint)
    if average is None:
        average, keep_last = run_settings(path)
        check_retention(keep_last, average)
    if average == 1:
        model, name, kwargs = load_embedding_model_spec(path)
        origin = f"from {path}"
    else:
        averaged = average_checkpoints(checkpoint if Path(checkpoint).is_dir() else path, average)
        name, kwargs = averaged.model_name, averaged.model_kwargs
        model = build_model(name, **kwargs)
        load_state_into(model, averaged.state, averaged.sources[-1])
        epochs = ", ".join(map(str, averaged.epochs))
        origin = f"the average of {average} epoch-end checkpoints (epochs {epochs})"
    save_embedding_model(model, out)  # refuses weights that are not finite
    return name, kwargs, origin


def run_settings(path: Path) -> tuple[int, int]:
    """``trainer.export_average`` and ``trainer.keep_last`` of the run that wrote ``path`` (1 and
    1 for a file without a training config, such as a released model). Memory-mapped: only the
    small config is read; a file that cannot be mapped is left to the loader to report."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return 1, 1
    config = state.get("config") if isinstance(state, dict) else None
    trainer = config.get("trainer", {}) if isinstance(config, dict) else {}
    return int(trainer.get("export_average", 1)), int(trainer.get("keep_last", 1))


@exits_on_error("export")
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="speakerlab export",
        description="Export the embedding model of a training checkpoint as a plain state_dict "
        "(the released checkpoint layout), optionally averaged over the last epochs.",
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="training checkpoint file, or an experiment folder (newest checkpoint)",
    )
    parser.add_argument("--out", required=True, help="output file, e.g. exp/eres2net/model.ckpt")
    parser.add_argument(
        "--average",
        type=int,
        default=None,
        metavar="N",
        help="average the weights of the last N epoch-end checkpoints (batch-norm statistics "
        "included); 1: the newest checkpoint as it is. Default: the run's "
        "trainer.export_average, else 1",
    )
    args = parser.parse_args(argv)
    name, kwargs, origin = export_embedding_model(args.checkpoint, args.out, args.average)
    print(f"wrote {args.out}: {name} {kwargs}, {origin}")


if __name__ == "__main__":
    main()
