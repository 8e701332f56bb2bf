"""End-to-end training on the mini corpus: learning, exact resume after SIGKILL, fine-tuning,
export, non-finite losses, two gloo processes and the clear errors of a wrong environment.

Runs go through the real command (``speakerlab train`` with Hydra overrides), in this process
where the test allows it (start-up of a fresh Python costs seconds) and in subprocesses where the
test needs one (SIGKILL, torchrun).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torchrun_train import with_nan_on_call
from training_runs import (
    ERES2NET,
    LEARNING,
    LEARNING_EPOCHS,
    REPO,
    TORCHRUN_VARIABLES,
    clean_environment,
    final_checkpoint,
    history,
    index_rows,
    overrides,
    run_two_ranks,
    torchrun,
    train_in_process,
)

from speakerlab.cli import main as cli_main
from speakerlab.data.index import load_train_index
from speakerlab.data.sampler import DistributedResumableSampler
from speakerlab.models.checkpoint import load_embedding_model
from speakerlab.training import builders
from speakerlab.training.checkpointing import list_checkpoints


@pytest.fixture(scope="module")
def learned_run(mini_data, tmp_path_factory) -> Path:
    exp_dir = tmp_path_factory.mktemp("learned")
    assert train_in_process(overrides(mini_data, exp_dir, *LEARNING)) == 0
    return exp_dir


@pytest.fixture(scope="module")
def eres2net_run(mini_data, tmp_path_factory) -> Path:
    """Uninterrupted reference run, data loaded in the main process."""
    exp_dir = tmp_path_factory.mktemp("eres2net")
    assert train_in_process(overrides(mini_data, exp_dir, *ERES2NET)) == 0
    return exp_dir


def same_parameters(a: dict, b: dict) -> bool:
    """Equal learnable weights (batch-norm statistics move even at learning rate 0)."""
    keys = [k for k in a if "running_" not in k and "num_batches_tracked" not in k]
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in keys)


# ------------------------------------------------------------------------------ learning, logs


@pytest.mark.slow
def test_short_run_learns_and_reports(learned_run):
    epochs = history(learned_run)
    assert [e["epoch"] for e in epochs] == list(range(1, LEARNING_EPOCHS + 1))
    first, last = epochs[0], epochs[-1]
    assert last["loss"] < 0.5 * first["loss"], epochs
    assert last["accuracy"] >= first["accuracy"] + 0.1, epochs
    assert last["accuracy"] > 2 / 12  # well above chance over 12 speakers
    items = index_rows(learned_run) // 8 * 8  # full batches of 8
    assert all(e["items"] == items and e["skipped_batches"] == 0 for e in epochs)

    log_text = (learned_run / "train.log").read_text()
    assert f"epoch {LEARNING_EPOCHS}/{LEARNING_EPOCHS} done" in log_text
    assert "12 classes" in log_text and "samples/s" in log_text
    events = EventAccumulator(str(learned_run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {
        "train/loss",
        "train/accuracy",
        "train/lr",
        "train/margin",
        "train/samples_per_second",
        "train/data_wait_fraction",
        "epoch/loss",
    } <= tags
    saved = (learned_run / "config.yaml").read_text()
    assert "name: ecapa_tdnn" in saved and "- 64" in saved and "lr: 0.1" in saved

    checkpoints = list_checkpoints(learned_run / "checkpoints")
    assert len(checkpoints) == 3  # trainer.keep_last
    state = torch.load(checkpoints[-1], weights_only=True)
    assert state["epoch"] == LEARNING_EPOCHS and state["step"] == 0
    assert state["model_name"] == "ecapa_tdnn" and state["model_kwargs"]["embedding_size"] == 32
    assert state["classifier"]["weight"].shape == (12, 32)
    assert not any(k.startswith("module.") for k in state["model"])
    assert len(state["rank_states"]) == 1 and state["config"]["optim"]["lr"] == 0.1


@pytest.mark.slow
def test_export_writes_the_released_layout(learned_run, tmp_path, monkeypatch):
    out = tmp_path / "model.ckpt"
    monkeypatch.setattr(
        sys, "argv", ["speakerlab", "export", "--checkpoint", str(learned_run), "--out", str(out)]
    )
    cli_main()
    plain = torch.load(out, weights_only=True)
    trained = final_checkpoint(learned_run)["model"]
    assert set(plain) == set(trained) and all(torch.equal(plain[k], trained[k]) for k in plain)
    # inference infers the architecture from the plain file and matches the checkpoint's model
    ours, theirs = (
        load_embedding_model(out),
        load_embedding_model(list_checkpoints(learned_run / "checkpoints")[-1]),
    )
    features = torch.randn(2, 120, 80)
    with torch.no_grad():
        assert torch.equal(ours(features), theirs(features))


# ------------------------------------------------------------------------------ exact resume


@pytest.mark.slow
def test_kill_at_any_moment_and_restart_gives_identical_weights(mini_data, eres2net_run, tmp_path):
    exp_dir = tmp_path / "killed"
    steps_per_epoch = index_rows(eres2net_run) // 8
    # The same command both times; checkpoints every 3 iterations, data from a worker process.
    args = overrides(
        mini_data, exp_dir, *ERES2NET, "trainer.save_every_steps=3", "data.num_workers=1"
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "speakerlab", "train", *args],
        cwd=REPO,
        env=clean_environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None:
            steps = [int(p.stem.split("_")[1]) for p in list_checkpoints(exp_dir / "checkpoints")]
            if any(step % steps_per_epoch for step in steps):  # a checkpoint inside an epoch
                break
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    interrupted_at = max(
        int(p.stem.split("_")[1]) for p in list_checkpoints(exp_dir / "checkpoints")
    )
    assert interrupted_at < 2 * steps_per_epoch

    assert train_in_process(args) == 0
    assert "resumed from" in (exp_dir / "train.log").read_text()
    resumed, reference = final_checkpoint(exp_dir), final_checkpoint(eres2net_run)
    assert resumed["global_step"] == reference["global_step"] == 2 * steps_per_epoch
    for part in ("model", "classifier"):
        assert all(torch.equal(resumed[part][k], reference[part][k]) for k in reference[part]), part
    momentum = [s["momentum_buffer"] for s in reference["optimizer"]["state"].values()]
    assert all(
        torch.equal(a["momentum_buffer"], b)
        for a, b in zip(resumed["optimizer"]["state"].values(), momentum)
    )
    assert history(exp_dir) == history(eres2net_run)


# ------------------------------------------------------------------------------ fine-tuning


def frozen(*extra: str) -> list[str]:
    """One iteration at learning rate 0: the weights stay those the run started from."""
    return [
        "trainer.epochs=1",
        "trainer.max_steps_per_epoch=1",
        "optim.lr=0",
        "optim.min_lr=0",
        "optim.weight_decay=0",
        *extra,
    ]


@pytest.mark.slow
def test_finetune_from_an_experiment_keeps_model_and_classifier(mini_data, learned_run, tmp_path):
    exp_dir = tmp_path / "ft"
    args = overrides(mini_data, exp_dir, *LEARNING, *frozen(f"trainer.init_from={learned_run}"))
    assert train_in_process(args) == 0
    assert (
        "initialised embedding model and classifier (12 classes)"
        in (exp_dir / "train.log").read_text()
    )
    source, tuned = final_checkpoint(learned_run), final_checkpoint(exp_dir)
    assert same_parameters(source["model"], tuned["model"])
    assert torch.equal(source["classifier"]["weight"], tuned["classifier"]["weight"])
    assert tuned["epoch"] == 1  # a new run: its own epochs, optimizer and schedule


@pytest.mark.slow
def test_large_margin_finetune_keeps_the_3n_classes(mini_data, eres2net_run, tmp_path):
    exp_dir = tmp_path / "lm"
    args = overrides(
        mini_data,
        exp_dir,
        "experiment=eres2net_lm",
        "model.m_channels=4",
        "model.embedding_size=16",
        "data.crop_seconds=0.5",
        *frozen(f"trainer.init_from={eres2net_run}"),
    )
    assert train_in_process(args) == 0
    source, tuned = final_checkpoint(eres2net_run), final_checkpoint(exp_dir)
    assert source["classifier"]["weight"].shape == (36, 16)  # 12 speakers x 3 speeds
    assert torch.equal(tuned["classifier"]["weight"], source["classifier"]["weight"])
    assert same_parameters(source["model"], tuned["model"])
    assert (
        tuned["config"]["data"]["speeds"] == [1.0]
        and tuned["config"]["data"]["crop_seconds"] == 0.5
    )
    assert "margin 0.500" in (exp_dir / "train.log").read_text()


@pytest.mark.slow
def test_finetune_from_a_released_checkpoint_initialises_the_classifier(
    mini_data, learned_run, tmp_path, monkeypatch
):
    released = tmp_path / "released.ckpt"
    monkeypatch.setattr(
        sys,
        "argv",
        ["speakerlab", "export", "--checkpoint", str(learned_run), "--out", str(released)],
    )
    cli_main()
    exp_dir = tmp_path / "ft"
    assert (
        train_in_process(
            overrides(mini_data, exp_dir, *LEARNING, *frozen(f"trainer.init_from={released}"))
        )
        == 0
    )
    assert (
        "it has no classifier, so the classifier (12 classes) is newly initialised"
        in (exp_dir / "train.log").read_text()
    )
    assert same_parameters(
        torch.load(released, weights_only=True), final_checkpoint(exp_dir)["model"]
    )


@pytest.mark.slow
def test_finetune_with_another_class_count_reinitialises_the_classifier(
    mini_data, eres2net_run, tmp_path
):
    exp_dir = tmp_path / "ft"
    args = overrides(
        mini_data,
        exp_dir,
        *ERES2NET,
        "data.speeds=[1.0]",
        *frozen(f"trainer.init_from={eres2net_run}"),
    )
    assert train_in_process(args) == 0
    assert (
        "its classifier has 36 classes but this run needs 12, so the classifier is "
        "re-initialised" in (exp_dir / "train.log").read_text()
    )
    tuned = final_checkpoint(exp_dir)
    assert tuned["classifier"]["weight"].shape == (12, 16)
    assert same_parameters(final_checkpoint(eres2net_run)["model"], tuned["model"])


@pytest.mark.slow
def test_finetune_takes_the_architecture_of_its_checkpoint(mini_data, eres2net_run, tmp_path):
    """Stage 6 after the mini recipe: the large-margin experiment states the full-size ERes2Net
    (m_channels 32, embedding 192) but starts from a narrow one; the run trains the narrow one."""
    exp_dir = tmp_path / "lm"
    args = overrides(
        mini_data,
        exp_dir,
        "experiment=eres2net_lm",
        "data.crop_seconds=0.5",
        *frozen(f"trainer.init_from={eres2net_run}"),
    )
    assert train_in_process(args) == 0
    log_text = (exp_dir / "train.log").read_text()
    assert "configured model values replaced: embedding_size 192 -> 16, m_channels 32 -> 4" in (
        log_text
    )
    tuned = final_checkpoint(exp_dir)
    assert tuned["model_kwargs"]["m_channels"] == 4 and tuned["config"]["model"]["m_channels"] == 4
    assert same_parameters(final_checkpoint(eres2net_run)["model"], tuned["model"])


@pytest.mark.slow
def test_finetune_with_a_command_line_model_that_does_not_fit_is_a_clear_error(
    mini_data, learned_run, tmp_path, capsys
):
    args = overrides(mini_data, tmp_path / "ft", *ERES2NET, f"trainer.init_from={learned_run}")
    assert train_in_process(args) == 1
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith(f"speakerlab train: error: {final_path(learned_run)}: the run starts ")
    assert (
        "a ecapa_tdnn model that the command line changes (model.embedding_size=16 on the "
        "command line, 32 in the checkpoint; model.m_channels=4 on the command line, no "
        "m_channels in ecapa_tdnn)" in err
    )


def final_path(exp_dir: Path) -> Path:
    return list_checkpoints(exp_dir / "checkpoints")[-1]


# ------------------------------------------------------------------------------ non-finite loss


@pytest.fixture
def nan_on_second_batch(monkeypatch):
    monkeypatch.setattr(builders, "build_model", with_nan_on_call(builders.build_model, "0"))


@pytest.mark.slow
def test_nonfinite_loss_stops_naming_step_and_batch(
    mini_data, tmp_path, nan_on_second_batch, capsys
):
    exp_dir = tmp_path / "nan"
    args = overrides(
        mini_data, exp_dir, *ERES2NET, "trainer.epochs=1", "trainer.max_steps_per_epoch=3"
    )
    assert train_in_process(args) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    # warm-up from 5e-5 to 0.2 over one epoch of 3 steps: a third of the way at step 2
    assert err.startswith(
        "speakerlab train: error: non-finite loss at epoch 1, iteration 2/3 "
        "(global step 2, learning rate 0.0667): rank 0: loss nan on items "
    )
    assert "the last finite loss was " in err and "(global step 1)" in err
    assert "No checkpoint was written yet: lower optim.lr and start again" in err
    # the items named are those of the second batch of epoch 0
    utts = load_train_index(exp_dir / "train_index.tsv").utts
    sampler = DistributedResumableSampler(len(utts), seed=42)
    assert ", ".join(utts[i] for i in sampler.epoch_indices()[8:16]) in err
    assert "trainer.skip_nonfinite=true" in err


@pytest.mark.slow
def test_nonfinite_loss_can_skip_the_batch(mini_data, tmp_path, nan_on_second_batch):
    exp_dir = tmp_path / "nan"
    args = overrides(
        mini_data,
        exp_dir,
        *ERES2NET,
        "trainer.epochs=1",
        "trainer.max_steps_per_epoch=3",
        "trainer.skip_nonfinite=true",
    )
    assert train_in_process(args) == 0
    assert history(exp_dir)[0]["skipped_batches"] == 1 and history(exp_dir)[0]["items"] == 16
    assert "non-finite loss at epoch 1, iteration 2/3" in (exp_dir / "train.log").read_text()
    state = final_checkpoint(exp_dir)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


# ------------------------------------------------------------------------------ distributed


@pytest.mark.slow
def test_two_gloo_processes_train_together(mini_data, tmp_path):
    exp_dir = tmp_path / "ddp"
    result = torchrun(overrides(mini_data, exp_dir, *ERES2NET, "trainer.max_steps_per_epoch=3"))
    assert result.returncode == 0, result.stderr[-3000:]
    log_text = (exp_dir / "train.log").read_text()
    assert "2 process(es) on cpu (gloo), 4 items per process" in log_text
    assert log_text.count("epoch 1/2 done") == 1  # rank 0 logs alone
    # each rank trains 3 batches of 4 per epoch: the epoch statistics cover both ranks
    assert [e["items"] for e in history(exp_dir)] == [24, 24]
    state = final_checkpoint(exp_dir)
    assert state["layout"] == {
        "world_size": 2,
        "micro_batch": 4,
        "accumulate_steps": 1,
        "global_batch": 8,
    }
    assert len(state["rank_states"]) == 2
    assert state["global_step"] == 6


@pytest.mark.slow
def test_batch_that_does_not_divide_is_one_message_from_two_ranks(mini_data, tmp_path):
    args = overrides(mini_data, tmp_path / "ddp", *ERES2NET, "trainer.batch_size=9")
    assert run_two_ranks(args, tmp_path) == [1, 1]
    # only local rank 0 prints the error both ranks met
    assert (tmp_path / "0.err").read_text().splitlines() == [
        "speakerlab train: error: trainer.batch_size=9 (the global batch) does not divide over 2 "
        "processes x 1 accumulation step(s); choose a multiple of 2 or change --nproc_per_node / "
        "trainer.accumulate_steps"
    ]
    assert (tmp_path / "1.err").read_text() == ""  # no second copy, no traceback


def test_partial_rank_environment_is_one_clear_line(mini_data, tmp_path, monkeypatch, capsys):
    for name in TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "0")
    assert train_in_process(overrides(mini_data, tmp_path / "x", *ERES2NET)) == 1
    assert capsys.readouterr().err == (
        "speakerlab train: error: incomplete distributed environment: RANK set but WORLD_SIZE, "
        "LOCAL_RANK, MASTER_ADDR, MASTER_PORT missing. Launch multi-process training with torchrun "
        "(torchrun --nproc_per_node=N -m speakerlab train ...), or unset RANK to train in one "
        "process.\n"
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_gpu_asked_for_without_one_is_one_clear_line(mini_data, tmp_path, capsys):
    args = overrides(mini_data, tmp_path / "x", *ERES2NET, "trainer.device=cuda")
    assert train_in_process(args) == 1
    assert capsys.readouterr().err == (
        "speakerlab train: error: trainer.device=cuda but no GPU is visible to PyTorch "
        "(torch.cuda.is_available() is False); use trainer.device=cpu or auto\n"
    )


def test_missing_train_dir_is_one_clear_line(tmp_path, capsys):
    assert train_in_process([f"exp_dir={tmp_path}", "experiment=eres2net"]) == 1
    assert capsys.readouterr().err == (
        "speakerlab train: error: data.train_dir must be set "
        "(add data.train_dir=... to the command)\n"
    )


# ------------------------------------------------------------------------------ options


@pytest.mark.slow
def test_bf16_autocast_on_cpu_and_checkpoints_by_the_minute(mini_data, tmp_path):
    exp_dir = tmp_path / "bf16"
    # a tiny minute interval: the clock asks for a checkpoint at every log line (each 2 steps)
    # and at the end of the epoch
    args = overrides(
        mini_data,
        exp_dir,
        *ERES2NET,
        "trainer.epochs=1",
        "trainer.max_steps_per_epoch=5",
        "trainer.log_every_steps=2",
        "trainer.precision=bf16",
        "trainer.save_every_minutes=1e-6",
        "trainer.save_every_epochs=0",
        "trainer.keep_last=10",
    )
    assert train_in_process(args) == 0
    assert [p.name for p in list_checkpoints(exp_dir / "checkpoints")] == [
        "ckpt_000000002.pt",
        "ckpt_000000004.pt",
        "ckpt_000000005.pt",
    ]
    assert "precision bf16" in (exp_dir / "train.log").read_text()
    assert torch.isfinite(torch.tensor(history(exp_dir)[0]["loss"]))


def test_fp16_without_gpu_is_a_clear_error(mini_data, tmp_path, capsys):
    args = overrides(mini_data, tmp_path / "x", *ERES2NET, "trainer.precision=fp16")
    assert train_in_process(args) == 1
    assert capsys.readouterr().err.endswith(
        "speakerlab train: error: trainer.precision=fp16 needs a GPU; use bf16 or fp32 on CPU\n"
    )


@pytest.mark.slow
def test_finished_run_started_again_does_nothing(mini_data, learned_run, tmp_path, capsys):
    exp_dir = tmp_path / "again"  # a copy: the shared run stays as its fixture made it
    shutil.copytree(learned_run, exp_dir)
    before = list_checkpoints(exp_dir / "checkpoints")
    assert train_in_process(overrides(mini_data, exp_dir, *LEARNING)) == 0
    assert list_checkpoints(exp_dir / "checkpoints") == before
    assert (
        f"training was already complete ({LEARNING_EPOCHS} epochs)"
        in (exp_dir / "train.log").read_text()
    )
    # not resuming must not mix a new run into the old one's checkpoints
    assert train_in_process(overrides(mini_data, exp_dir, *LEARNING, "trainer.resume=false")) == 1
    assert "holds checkpoints of an earlier run and trainer.resume=false" in capsys.readouterr().err
    assert list_checkpoints(exp_dir / "checkpoints") == before


@pytest.mark.slow
@pytest.mark.parametrize("skip", [False, True])
def test_nonfinite_loss_on_one_rank_stops_or_skips_both(mini_data, tmp_path, skip):
    exp_dir = tmp_path / "ddp"
    args = overrides(
        mini_data,
        exp_dir,
        *ERES2NET,
        "trainer.epochs=1",
        "trainer.max_steps_per_epoch=3",
        f"trainer.skip_nonfinite={str(skip).lower()}",
    )
    codes = run_two_ranks(args, tmp_path, nan_rank="1")
    rank0, rank1 = (tmp_path / "0.err").read_text(), (tmp_path / "1.err").read_text()
    assert rank1 == ""
    if skip:  # both ranks skipped the same iteration and went on in step
        assert codes == [0, 0]
        assert history(exp_dir)[0]["skipped_batches"] == 1 and history(exp_dir)[0]["items"] == 16
        assert (
            "non-finite loss at epoch 1, iteration 2/3 (global step 2), batch skipped (rank 1: "
            in rank0
        )
    else:
        assert codes == [1, 1]
        assert rank0.splitlines()[-1].startswith(
            "speakerlab train: error: non-finite loss at epoch 1, iteration 2/3 (global step 2, "
            "learning rate 0.0667): rank 1: loss nan on items "
        )
