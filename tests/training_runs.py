"""Helpers of the training tests: the ``speakerlab train`` command in this process, under
torchrun, and what a run leaves behind."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from processes import run_bounded

from speakerlab.cli import main as cli_main
from speakerlab.data.index import load_train_index
from speakerlab.distributed import single_process
from speakerlab.training.builders import plain_config
from speakerlab.training.checkpointing import list_checkpoints
from speakerlab.training.progress import TrainingMonitor
from speakerlab.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
TORCHRUN_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "GROUP_RANK",
    "ROLE_RANK",
    "TORCHELASTIC_RUN_ID",
)

# A tiny ECAPA-TDNN learns the 12 mini-corpus speakers within a few epochs.
LEARNING = [
    "model=ecapa_tdnn",
    "model.embedding_size=32",
    "model.channels=[64,64,64,64,192]",
    "model.attention_channels=16",
    "model.se_channels=16",
    "data.crop_seconds=1.5",
    "data.speeds=[1.0]",
    "data.augment_prob=0",
    "trainer.epochs=6",
    "optim.lr=0.1",
]
LEARNING_EPOCHS = 6
# A tiny ERes2Net with the full data pipeline (speed perturbation: 36 classes, augmentation).
ERES2NET = [
    "experiment=eres2net",
    "model.m_channels=4",
    "model.embedding_size=16",
    "data.crop_seconds=0.5",
    "trainer.epochs=2",
]


def overrides(mini_data, exp_dir: Path, *extra: str) -> list[str]:
    """Data, a deterministic single-thread CPU run, batch 8, quiet console; then ``extra``."""
    return [
        f"data.train_dir={mini_data.train_dir}",
        f"data.noise_list={mini_data.noise_list}",
        f"data.rir_list={mini_data.rir_list}",
        f"exp_dir={exp_dir}",
        "data.num_workers=0",
        "trainer.batch_size=8",
        "optim.warmup_epochs=1",
        "trainer.device=cpu",
        "trainer.num_threads=1",
        "trainer.deterministic=true",
        "trainer.progress_bar=false",
        "optim.reference_batch=8",  # the learning rates below are meant for this batch
        *extra,
    ]


def train_in_process(args: list[str]) -> int:
    """Run ``speakerlab train ARGS`` in this process; returns the exit status."""
    saved_argv = sys.argv
    try:
        cli_main(["train", *args])
    except SystemExit as exit_:
        return int(exit_.code or 0)
    finally:
        sys.argv = saved_argv
    return 0


def final_checkpoint(exp_dir: Path) -> dict:
    """The newest checkpoint of a run."""
    return torch.load(list_checkpoints(exp_dir / "checkpoints")[-1], weights_only=True)


def history(exp_dir: Path) -> list[dict]:
    """The per-epoch summaries of a run."""
    return json.loads((exp_dir / "history.json").read_text())


def index_rows(exp_dir: Path) -> int:
    """Rows of a run's training index."""
    return len(load_train_index(exp_dir / "train_index.tsv"))


def clean_environment() -> dict[str, str]:
    """This environment without torchrun variables (a test may run under a launcher)."""
    return {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES}


def torchrun(
    args: list[str],
    target: tuple[str, ...] = ("-m", "speakerlab", "train"),
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """``TARGET ARGS`` as two torchrun processes, run from the repository."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        *target,
        *args,
    ]
    return run_bounded(command, timeout=300, cwd=REPO, env=env or clean_environment())


def run_two_ranks(args: list[str], output: Path, nan_rank: str | None = None) -> list[int | None]:
    """Run ``speakerlab train ARGS`` as two torchrun ranks (fresh interpreters, as in real use),
    with NaN on the second batch of rank ``nan_rank`` if given. Each rank's stderr goes to
    ``output/<rank>.err``. Returns each rank's exit status, None for a rank that did not end by
    itself (torchrun stopped it when the other failed)."""
    env = {**clean_environment(), "RANK_OUTPUT": str(output), "OMP_NUM_THREADS": "1"}
    if nan_rank is not None:
        env["NAN_RANK"] = nan_rank
    torchrun(args, target=(str(REPO / "tests" / "torchrun_train.py"),), env=env)
    statuses = [output / f"{rank}.status" for rank in range(2)]
    return [int(path.read_text()) if path.exists() else None for path in statuses]


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """One CPU thread for in-process trainers (as the runs' trainer.num_threads=1), restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def make_trainer(
    mini_data, index: Path, exp_dir: Path, *extra: str, base: list[str] = ERES2NET
) -> Trainer:
    """A trainer of ``base`` (a tiny ERes2Net) built in this process, as ``speakerlab train``
    would, reading the training index ``index``."""
    args = [*overrides(mini_data, exp_dir, *base, *extra), f"data.index={index}"]
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = plain_config(compose("config", overrides=args))
    monitor = TrainingMonitor(exp_dir, enabled=False)
    try:
        return Trainer.create(cfg, single_process("cpu"), monitor)
    finally:
        monitor.close()


def first_items(trainer: Trainer, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``size`` items of a trainer's dataset as one batch."""
    items = [trainer.run.dataset[i] for i in range(size)]
    return torch.stack([f for f, _ in items]), torch.tensor([label for _, label in items])
