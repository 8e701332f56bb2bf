"""Fault injection for training (the reliability classes of issue 10): each case states the
failing behaviour it guards against and asserts the correct one.

Classes: a skipped non-finite batch must leave no trace; no checkpoint may hold a non-finite
tensor; pruning must never lose the last good checkpoint nor keep unreadable ones in its place;
a missing peer process must be reported within a minute and end with a clear message; a resume
must never silently continue a different run; two runs must not share an experiment folder.
"""

from __future__ import annotations

import copy
import logging
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from torchrun_train import with_nan_on_call
from training_runs import (
    ERES2NET,
    REPO,
    clean_environment,
    final_checkpoint,
    first_items,
    history,
    index_rows,
    make_trainer,
    one_thread,
    overrides,
    train_in_process,
)

from speakerlab.data.dataset import TrainDataset
from speakerlab.data.index import build_train_index, load_train_index
from speakerlab.data.sampler import DistributedResumableSampler
from speakerlab.distributed import (
    WaitTimeoutError,
    init_distributed,
)
from speakerlab.errors import CheckpointError, SpeakerlabError
from speakerlab.fileio import exclusive_lock
from speakerlab.training import builders
from speakerlab.training import trainer as trainer_module
from speakerlab.training.checkpointing import (
    checkpoint_path,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from speakerlab.training.stats import BAD_STEPS
from speakerlab.training.trainer import Trainer

SHORT = ["trainer.epochs=1", "trainer.max_steps_per_epoch=4"]


@pytest.fixture(scope="module")
def shared_index(mini_data, tmp_path_factory):
    """One training index for the in-process trainers of this module (read only)."""
    path = tmp_path_factory.mktemp("index") / "train_index.tsv"
    build_train_index(mini_data.train_dir, path, segment_seconds=4.0)
    return path


def full_state(trainer: Trainer) -> dict:
    """Every parameter, buffer and optimizer value of a trainer (copied)."""
    return copy.deepcopy(
        {
            "net": trainer.run.net.state_dict(),
            "optimizer": trainer.run.optimizer.state_dict()["state"],
        }
    )


def same_values(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_values(a[k], b[k]) for k in a)
    return a == b


# ------------------------------------------------------------------ 3. skipped batches, no trace


@pytest.mark.slow
def test_skipped_batch_leaves_no_trace_in_parameters_buffers_or_optimizer(
    mini_data, shared_index, tmp_path
):
    """Failing case: with trainer.skip_nonfinite=true a batch of NaN features was skipped after
    the train-mode forward pass had written NaN into the batch-norm running statistics, so every
    later checkpoint was unusable. Now every parameter, buffer and optimizer value is exactly as
    before the skipped step."""
    trainer = make_trainer(mini_data, shared_index, tmp_path, "trainer.skip_nonfinite=true")
    features, labels = first_items(trainer)
    trainer.run.net.train()
    with one_thread():
        trainer._train_step(0, 0, [(features, labels)])  # a real step: momentum buffers exist
        before = full_state(trainer)
        poisoned = features.clone()
        poisoned[3] = float("nan")
        trainer._train_step(0, 1, [(poisoned, labels)])
        assert same_values(before, full_state(trainer))
        assert trainer.stats.values[BAD_STEPS] == 1
        # the failing behaviour itself: the forward pass alone poisons the running statistics
        trainer.run.net(poisoned)
    assert not all(torch.isfinite(b).all() for b in trainer.run.net.buffers())


@pytest.mark.slow
def test_nan_input_batch_skipped_end_to_end_leaves_finite_checkpoints(
    mini_data, tmp_path, monkeypatch
):
    """Failing case: the run reported success while its checkpoints held NaN batch-norm
    statistics. Now the run skips the batch and every tensor it saves is finite."""
    exp_dir = tmp_path / "nan"
    build_train_index(mini_data.train_dir, exp_dir / "train_index.tsv")
    rows = len(load_train_index(exp_dir / "train_index.tsv"))
    poisoned = DistributedResumableSampler(rows, seed=42).epoch_indices()[10]  # second batch
    real_getitem = TrainDataset.__getitem__

    def getitem(self, index):
        features, label = real_getitem(self, index)
        return (features * float("nan") if index == poisoned else features), label

    monkeypatch.setattr(TrainDataset, "__getitem__", getitem)
    args = overrides(mini_data, exp_dir, *ERES2NET, *SHORT, "trainer.skip_nonfinite=true")
    assert train_in_process(args) == 0
    assert history(exp_dir)[0]["skipped_batches"] == 1 and history(exp_dir)[0]["items"] == 24
    state = final_checkpoint(exp_dir)
    for part in ("model", "classifier"):
        assert all(torch.isfinite(v).all() for v in state[part].values() if v.is_floating_point())
    momentum = [s["momentum_buffer"] for s in state["optimizer"]["state"].values()]
    assert all(torch.isfinite(m).all() for m in momentum)


# ------------------------------------------------------------ no non-finite tensor in a checkpoint


def test_checkpoint_holding_a_nonfinite_tensor_is_refused(tmp_path):
    """Failing case: a checkpoint whose weights held NaN was written like any other, and the run
    went on from it. Now the save is refused with the tensor named, and nothing is written."""
    good = {"model": {"w": torch.ones(3)}, "step": 1}
    save_checkpoint(good, checkpoint_path(tmp_path, 1))
    bad = {"model": {"w": torch.ones(3), "bn.running_var": torch.tensor([1.0, float("inf")])}}
    with pytest.raises(CheckpointError, match=r"refusing to write .*ckpt_000000002.pt: "):
        save_checkpoint(bad, checkpoint_path(tmp_path, 2))
    with pytest.raises(CheckpointError, match=r"model\.bn\.running_var holds NaN or infinite"):
        save_checkpoint(bad, checkpoint_path(tmp_path, 2))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt_000000001.pt"]
    assert torch.equal(load_checkpoint(checkpoint_path(tmp_path, 1))["model"]["w"], torch.ones(3))


@pytest.mark.slow
def test_nonfinite_loss_stops_before_any_checkpoint_holds_it(
    mini_data, tmp_path, monkeypatch, capsys
):
    """Failing case: checking finiteness once per logging window could let a checkpoint be
    written after a NaN step. Now the window is read before every save: the run stops naming
    the step, its learning rate and the last finite loss, and the newest checkpoint is the one
    before the bad step, which the error names with the override to go on."""
    real_build = builders.build_model
    monkeypatch.setattr(builders, "build_model", with_nan_on_call(real_build, "0", call=5))
    exp_dir = tmp_path / "run"
    args = overrides(
        mini_data,
        exp_dir,
        *ERES2NET,
        "trainer.epochs=1",
        "trainer.max_steps_per_epoch=6",
        "trainer.save_every_steps=3",
    )
    assert train_in_process(args) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "non-finite loss at epoch 1, iteration 5/6 (global step 5, learning rate " in err
    assert "the last finite loss was " in err and "(global step 4)" in err
    assert f"{checkpoint_path(exp_dir / 'checkpoints', 3)}, holds no non-finite value" in err
    assert "run the same command with optim.lr_factor=0.5" in err
    assert [p.name for p in list_checkpoints(exp_dir / "checkpoints")] == ["ckpt_000000003.pt"]

    # the same command with the override goes on from step 3 with half the learning rate
    # (the same wrapped model, whose NaN call now never comes)
    monkeypatch.setattr(builders, "build_model", with_nan_on_call(real_build, "0", call=10**9))
    assert train_in_process([*args, "optim.lr_factor=0.5"]) == 0
    log_text = (exp_dir / "train.log").read_text()
    assert "resumed from" in log_text and "learning-rate factor 0.5" in log_text
    state = final_checkpoint(exp_dir)
    assert state["global_step"] == 6 and state["lr_factor"] == 0.5
    # the schedule ends at min_lr (5e-5) after the last epoch: halved
    assert history(exp_dir)[0]["lr"] == pytest.approx(2.5e-5)


# ------------------------------------------------------------------------- 6. checkpoint pruning


def test_pruning_keeps_the_newest_verified_checkpoints_only(tmp_path):
    """Failing case: pruning kept the newest K files by number, whatever they held, and deleted
    older good ones. Now only files this run wrote or verified count; older files go once K newer
    verified ones exist; newer files of unknown state are left alone."""
    for step in range(1, 7):
        save_checkpoint({"step": step}, checkpoint_path(tmp_path, step))
    verified = [checkpoint_path(tmp_path, s) for s in (2, 3)]
    removed = prune_checkpoints(tmp_path, keep_last=1, known_good=verified)
    assert [p.name for p in removed] == ["ckpt_000000001.pt", "ckpt_000000002.pt"]
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        f"ckpt_00000000{s}.pt" for s in (3, 4, 5, 6)
    ]
    assert prune_checkpoints(tmp_path, keep_last=2, known_good=[]) == []


@pytest.mark.slow
def test_resume_after_unreadable_checkpoints_never_ends_with_only_unreadable_ones(
    mini_data, tmp_path, caplog
):
    """Failing case (trainer.keep_last): after a resume that skipped unreadable newer files, the
    run pruned the good ones and ended holding only an unreadable file. Now unreadable files are
    moved aside as *.corrupt with a warning and the run ends with a good final checkpoint."""
    exp_dir = tmp_path / "run"
    first = overrides(
        mini_data, exp_dir, *ERES2NET, *SHORT, "trainer.save_every_steps=1", "trainer.keep_last=10"
    )
    assert train_in_process(first) == 0
    for step in (3, 4):  # damaged outside our atomic writes (e.g. a full disk, a bad copy)
        checkpoint_path(exp_dir / "checkpoints", step).write_bytes(b"torn file")
    again = [*first, "trainer.keep_last=1"]
    with caplog.at_level(logging.WARNING):
        assert train_in_process(again) == 0
    names = sorted(p.name for p in (exp_dir / "checkpoints").iterdir())
    assert names == ["ckpt_000000003.pt.corrupt", "ckpt_000000004.pt", "ckpt_000000004.pt.corrupt"]
    assert "moved aside to ckpt_000000004.pt.corrupt" in caplog.text
    assert load_checkpoint(checkpoint_path(exp_dir / "checkpoints", 4))["global_step"] == 4


# --------------------------------------------------------------------------- missing DDP peer


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank_environment(rank: int, port: int) -> dict[str, str]:
    return {
        "RANK": str(rank),
        "WORLD_SIZE": "2",
        "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }


def test_missing_peer_at_start_is_reported_then_times_out_with_one_message(caplog):
    """Failing case: with one process of the job missing, training waited 30 minutes in silence
    and ended in a raw traceback. Now the waiting process says how many of the job's processes
    arrived, where, and which ranks are missing, then stops after the rendezvous timeout."""
    port = free_port()
    with caplog.at_level(logging.WARNING), pytest.raises(WaitTimeoutError) as err:
        init_distributed(
            "cpu",
            environ=rank_environment(0, port),
            rendezvous_minutes=1.5 / 60,
            rendezvous_option="trainer.rendezvous_timeout_minutes",
            report_seconds=0.5,
        )
    assert f"1 of 2 processes have arrived at 127.0.0.1:{port}" in caplog.text
    assert "waiting for rank(s) 1" in caplog.text
    message = str(err.value)
    assert message.startswith(
        f"starting the job: only 1 of 2 processes arrived at 127.0.0.1:{port} within 1.5 s; "
        "rank(s) 1 did not; start every process of the job"
    )
    assert message.endswith("or raise trainer.rendezvous_timeout_minutes")


def test_peer_without_its_master_says_so_and_gives_up(caplog):
    """Failing case: a process whose rank 0 never started waited silently. Now it reports that
    nothing answers at MASTER_ADDR:MASTER_PORT and stops after the timeout."""
    port = free_port()
    with caplog.at_level(logging.WARNING), pytest.raises(SpeakerlabError) as err:
        init_distributed(
            "cpu", environ=rank_environment(1, port), rendezvous_minutes=1 / 60, report_seconds=0.3
        )
    assert f"rank 1: waiting for rank 0 to answer at 127.0.0.1:{port}" in caplog.text
    assert str(err.value) == (
        f"rank 1: nothing answered at 127.0.0.1:{port} within 1 s: rank 0 is not running, or "
        "MASTER_ADDR/MASTER_PORT point elsewhere"
    )


BARRIER_SCRIPT = """
import logging, sys, time
from speakerlab.distributed import barrier, init_distributed, shutdown_distributed
ctx = init_distributed("cpu", timeout_minutes=1, report_seconds=0.5)
if ctx.rank == 1:
    time.sleep(8)  # never arrives within rank 0's timeout
    sys.exit(0)
try:
    barrier(ctx, timeout_minutes=2 / 60, name="extraction finished")
except Exception as err:
    print(type(err).__name__, err, file=sys.stderr)
    sys.exit(3)
"""


@pytest.mark.slow
def test_barrier_reports_missing_ranks_then_times_out():
    """Failing case: extraction's final barrier waited up to 48 h in silence for a rank that
    never came. Now it names the missing ranks every report interval and ends with a clear error
    after its timeout (a parameter: extraction may wait long for slow ranks)."""
    port = free_port()
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", BARRIER_SCRIPT],
            cwd=REPO,
            env={**clean_environment(), **rank_environment(rank, port)},
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        stderr = processes[0].communicate(timeout=60)[1]
    finally:
        for process in processes:
            process.kill()
            process.wait()
    assert processes[0].returncode == 3, stderr
    assert "barrier 1 (extraction finished): 1 of 2 processes have arrived at" in stderr
    assert "waiting for rank(s) 1 (giving up after 2 s)" in stderr
    assert stderr.strip().splitlines()[-1] == (
        f"WaitTimeoutError barrier 1 (extraction finished): only 1 of 2 processes arrived at "
        f"127.0.0.1:{port} within 2 s; rank(s) 1 did not"
    )


def test_training_with_a_missing_process_ends_with_one_line(
    mini_data, tmp_path, monkeypatch, capsys
):
    """Failing case: ``speakerlab train`` with a process of the job missing hung for 30 minutes
    and ended with a traceback. Now it stops after trainer.rendezvous_timeout_minutes with one
    line naming the option."""
    port = free_port()
    for name, value in rank_environment(0, port).items():
        monkeypatch.setenv(name, value)
    args = overrides(
        mini_data, tmp_path / "x", *ERES2NET, "trainer.rendezvous_timeout_minutes=0.02"
    )
    assert train_in_process(args) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"speakerlab train: error: starting the job: only 1 of 2 processes arrived at "
        f"127.0.0.1:{port} within 1.2 s; rank(s) 1 did not; start every process of the job (on "
        "each node the same torchrun command, with --nnodes, --nproc_per_node, --master_addr and "
        "--master_port alike) or raise trainer.rendezvous_timeout_minutes"
    )


# ------------------------------------------------------------------------- resume safety checks


@pytest.fixture(scope="module")
def base_run(mini_data, tmp_path_factory):
    """A finished two-step run (read only: each test resumes a copy of it)."""
    exp_dir = tmp_path_factory.mktemp("base")
    args = overrides(mini_data, exp_dir, *ERES2NET, "trainer.max_steps_per_epoch=2")
    assert train_in_process(args) == 0
    return exp_dir


def resume_copy(base_run, tmp_path):
    exp_dir = tmp_path / "copy"
    shutil.copytree(base_run, exp_dir)
    return exp_dir


def resume_error(mini_data, exp_dir, capsys, *changes: str) -> str:
    args = overrides(mini_data, exp_dir, *ERES2NET, "trainer.max_steps_per_epoch=2", *changes)
    assert train_in_process(args) == 1
    return capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize(
    "change, expected",
    [
        (
            "model.m_channels=8",
            "model: the run trains eres2net (embedding_size=16, feat_dim=80, m_channels=4, "
            "num_blocks=[3, 4, 6, 3]), this configuration builds eres2net (embedding_size=16, "
            "feat_dim=80, m_channels=8, num_blocks=[3, 4, 6, 3])",
        ),
        (
            "loss.num_classes=40",
            "classifier: the run has 36 classes, this configuration needs 40",
        ),
        (
            "trainer.batch_size=16",
            "global batch: the run takes 8 (1 process(es) x 8 items x 1 accumulation step(s)) "
            "per step, this configuration 16 (1 process(es) x 16 items x 1 accumulation step(s))",
        ),
        ("seed=7", "seed: the run uses 42, this configuration 7"),
    ],
)
def test_resume_with_another_configuration_names_both(
    mini_data, base_run, tmp_path, capsys, change, expected
):
    """Failing case: a changed model, classifier width, global batch (process count x batch) or
    seed went unnoticed at an epoch boundary, continuing a different run silently. Now the
    resume stops with one error naming both configurations."""
    exp_dir = resume_copy(base_run, tmp_path)
    before = sorted(p.name for p in (exp_dir / "checkpoints").iterdir())
    err = resume_error(mini_data, exp_dir, capsys, "trainer.epochs=3", change)
    assert "this configuration would not continue the run saved there:" in err
    assert expected in err and "Traceback" not in err
    assert sorted(p.name for p in (exp_dir / "checkpoints").iterdir()) == before


@pytest.mark.slow
def test_resume_on_changed_training_data_names_both(mini_data, base_run, tmp_path, capsys):
    """Failing case: resuming after the training data changed (another index) continued on the
    new data as if nothing happened. Now the resume stops naming both sizes."""
    exp_dir = resume_copy(base_run, tmp_path)
    smaller = tmp_path / "train"
    smaller.mkdir()
    for name in ("wav.scp", "utt2spk"):
        lines = (mini_data.train_dir / name).read_text().splitlines()
        (smaller / name).write_text("\n".join(lines[:-4]) + "\n")
    build_train_index(smaller, tmp_path / "smaller.tsv")
    before, after = index_rows(base_run), len(load_train_index(tmp_path / "smaller.tsv"))
    err = resume_error(mini_data, exp_dir, capsys, "trainer.epochs=3", f"data.train_dir={smaller}")
    assert f"training data: the run started on {before} index rows, the index now has {after}" in (
        err
    )


def test_second_run_in_the_same_experiment_folder_stops(mini_data, tmp_path, monkeypatch, capsys):
    """Failing case: two runs started in one exp_dir wrote into the same checkpoints. Now the
    second one stops at once naming the folder and the process that holds it."""
    monkeypatch.setattr(trainer_module, "LOCK_WAIT_SECONDS", 0.0)
    exp_dir = tmp_path / "busy"
    with exclusive_lock(exp_dir / trainer_module.LOCK_FILE, what="a test"):
        assert train_in_process(overrides(mini_data, exp_dir, *ERES2NET)) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"speakerlab train: error: the experiment folder {exp_dir} is in use by ")
    assert not (exp_dir / "checkpoints").exists()
