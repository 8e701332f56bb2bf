"""``speakerlab train [overrides]``: train a model with the Hydra config tree in ``conf/``.

Examples::

    speakerlab train experiment=eres2net data.train_dir=data/3dspeaker/train exp_dir=exp/eres2net
    speakerlab train experiment=eres2net optim.lr=0.1 model.embedding_size=512 trainer.epochs=3
    torchrun --nproc_per_node=8 -m speakerlab train experiment=eres2net data.train_dir=...
    torchrun --nnodes=2 --node_rank=0 --master_addr=HOST --master_port=29500 \\
        --nproc_per_node=8 -m speakerlab train experiment=eres2net data.train_dir=...

The config tree is the repository's top-level ``conf/`` (the package is installed editable).
``--config-dir DIR`` adds a folder of further configs, e.g. ``DIR/experiment/mine.yaml`` for
``experiment=mine``; ``--config-path DIR`` replaces the tree by a copy in ``DIR`` (an installed
package without the repository). ``--help`` lists the groups, ``--cfg job`` prints the merged
config without training.

Under torchrun use the module form (``-m speakerlab train``); every process reads the same
overrides. With several nodes, ``exp_dir`` (and ``data.index``) must be on a filesystem all nodes
share: rank 0 writes the index and the checkpoints, every rank reads them. A process that waits
for the others says so every minute and stops after ``trainer.rendezvous_timeout_minutes``.
Errors print as one message, once per node, without tracebacks.

``trainer.batch_size`` is the global batch of one optimizer step; ``trainer.accumulate_steps``
splits each process's share into micro-batches, so the same global batch (and the same run) fits
fewer GPUs. The learning rates are stated for ``optim.reference_batch`` and scale linearly with
the global batch. A run started again with the same command resumes from its newest checkpoint,
also on another number of processes if the global batch is the same; after a non-finite loss,
``optim.lr_factor=0.5`` resumes it with half the learning rate::

    torchrun --nproc_per_node=2 -m speakerlab train experiment=eres2net trainer.accumulate_steps=4
    speakerlab train experiment=eres2net ... optim.lr_factor=0.5

With ``trainer.init_from`` the run trains the architecture of the checkpoint it starts from;
``model.*`` values given on the command line must agree with it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from speakerlab.errors import SpeakerlabError

REPO_CONF = Path(__file__).resolve().parents[2] / "conf"


def command_line_model_keys(overrides: list[str]) -> set[str]:
    """The ``model`` keys set by command-line overrides (``name`` for ``model=NAME``)."""
    keys = set()
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key == "model":
            keys.add("name")
        elif key.startswith("model."):
            keys.add(key.removeprefix("model.").split(".", 1)[0])
    return keys


def run(cfg: DictConfig) -> None:
    """Hydra task: train, printing a SpeakerlabError as one clean message (exit status 1)."""
    # Imported here so that `--help` and `--cfg` answer without loading torch's training stack.
    from hydra.core.hydra_config import HydraConfig

    from speakerlab.distributed import error_report
    from speakerlab.training.trainer import train

    try:
        train(cfg, command_line_model_keys(list(HydraConfig.get().overrides.task)))
    except SpeakerlabError as err:
        report = error_report(err)
        if report is not None:
            print(f"speakerlab train: error: {report}", file=sys.stderr)
        sys.exit(1)


def main() -> None:
    """Entry point of ``speakerlab train`` and ``python -m speakerlab train``."""
    config_path = str(REPO_CONF) if REPO_CONF.is_dir() else None
    hydra.main(version_base="1.3", config_path=config_path, config_name="config")(run)()


if __name__ == "__main__":
    main()
