"""Gradient accumulation and the number of processes (issue 14: schedules that follow the global
batch): the gradient of micro-batches equals the big batch's; two gloo processes accumulating
train like one process accumulating twice as many micro-batches; a run resumes on another number
of processes with the same global batch and continues the same data order."""

from __future__ import annotations

import shutil

import pytest
import torch
from training_runs import (
    LEARNING,
    final_checkpoint,
    first_items,
    history,
    make_trainer,
    one_thread,
    overrides,
    torchrun,
    train_in_process,
)

from speakerlab.data.index import build_train_index
from speakerlab.training.checkpointing import checkpoint_step, list_checkpoints

# Global batch 16 in micro-batches of 4: 2 processes x 2 steps, or 1 process x 4 steps; two
# optimizer steps. Float rounding (the order in which gradients are summed) is amplified by every
# step: with batch norm over micro-batches of 4, a 1e-7 change of the weights changes the next
# gradient by 1e-5 to 1e-2 (more for a fresh ERes2Net than for the tiny ECAPA-TDNN used here,
# more at later steps), so the comparison is made where rounding alone stays near 1e-7 and a
# wrong gradient (a missing or doubled micro-batch, other items) would show at 1e-2.
GLOBAL_16 = [
    *LEARNING,
    "optim.lr=0.01",
    "trainer.batch_size=16",
    "optim.reference_batch=16",
    "trainer.epochs=1",
    "trainer.max_steps_per_epoch=2",
    "trainer.save_every_steps=1",
    "trainer.keep_last=10",
]
# Each tensor agrees to this fraction of its norm (float32 resolves about 1e-7).
TOLERANCE = 1e-5


def assert_close_tensor(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    scale, error = expected.norm().item(), (actual - expected).norm().item()
    assert error <= TOLERANCE * scale + 1e-8, f"{name}: off by {error} at norm {scale}"


def assert_close_weights(a: dict, b: dict) -> None:
    """Learned weights agree (batch-norm running statistics are not compared: under DDP they
    are rank 0's, updated by its own micro-batches only)."""
    for part in ("model", "classifier"):
        assert a[part].keys() == b[part].keys()
        for key, value in a[part].items():
            if value.is_floating_point() and ".running_" not in key:
                assert_close_tensor(value, b[part][key], f"{part}.{key}")


@pytest.mark.slow
def test_accumulated_gradient_equals_the_big_batch_gradient(mini_data, tmp_path):
    """Batch norm in eval mode (batch-independent): the gradient summed over two micro-batches
    of 4 equals that of the batch of 8 within float tolerance."""
    index = tmp_path / "index.tsv"
    build_train_index(mini_data.train_dir, index)
    trainer = make_trainer(mini_data, index, tmp_path / "exp", "trainer.accumulate_steps=2")
    features, labels = first_items(trainer)
    trainer.run.net.eval()

    def gradients(micro_batches):
        trainer.run.optimizer.zero_grad(set_to_none=True)
        trainer._forward_backward(micro_batches)
        return {n: p.grad.clone() for n, p in trainer.run.net.named_parameters()}

    with one_thread():
        big = gradients([(features, labels)])
        accumulated = gradients([(features[:4], labels[:4]), (features[4:], labels[4:])])
    assert big.keys() == accumulated.keys()
    for name, grad in big.items():
        assert_close_tensor(accumulated[name], grad, name)
    assert any(g.abs().sum() > 0 for g in big.values())


@pytest.fixture(scope="module")
def two_processes(mini_data, tmp_path_factory):
    """Two gloo processes, each accumulating 2 micro-batches of 4 (read only)."""
    exp_dir = tmp_path_factory.mktemp("two")
    args = overrides(mini_data, exp_dir, *GLOBAL_16, "trainer.accumulate_steps=2")
    result = torchrun(args)
    assert result.returncode == 0, result.stderr[-3000:]
    return exp_dir


@pytest.mark.slow
def test_two_processes_accumulating_equal_one_process_with_the_double_batch(
    mini_data, two_processes, tmp_path
):
    """One process takes the double per-process batch (16 items per step, 4 micro-batches):
    the weights after 2 steps equal those of the two processes within float tolerance."""
    one = tmp_path / "one"
    args = overrides(mini_data, one, *GLOBAL_16, "trainer.accumulate_steps=4")
    assert train_in_process(args) == 0
    assert "global batch 16 (2 process(es) x 4 items x 2 accumulation step(s))" in (
        (two_processes / "train.log").read_text()
    )
    assert history(one)[0]["items"] == history(two_processes)[0]["items"] == 32  # 2 steps of 16
    assert history(one)[0]["loss"] == pytest.approx(history(two_processes)[0]["loss"], rel=1e-5)
    assert_close_weights(final_checkpoint(one), final_checkpoint(two_processes))


@pytest.mark.slow
def test_resume_on_one_process_continues_a_two_process_run(mini_data, two_processes, tmp_path):
    """Killed after step 1 on two processes, resumed on one accumulating twice as many
    micro-batches: the same items per step in the same order, the same weights at the end."""
    exp_dir = tmp_path / "resumed"
    shutil.copytree(two_processes, exp_dir)
    for path in list_checkpoints(exp_dir / "checkpoints"):
        if checkpoint_step(path) > 1:  # as if the run had been killed after step 1
            path.unlink()
    (exp_dir / "history.json").unlink()
    args = overrides(mini_data, exp_dir, *GLOBAL_16, "trainer.accumulate_steps=4")
    assert train_in_process(args) == 0
    log_text = (exp_dir / "train.log").read_text()
    assert (
        "was saved with a global batch of 16 (2 process(es) x 4 items x 2 accumulation step(s)); "
        "continuing with 16 (1 process(es) x 4 items x 4 accumulation step(s)): the same items "
        "per step, in the same order" in log_text
    )
    resumed, reference = final_checkpoint(exp_dir), final_checkpoint(two_processes)
    assert resumed["global_step"] == reference["global_step"] == 2
    assert history(exp_dir)[0]["items"] == 32
    assert history(exp_dir)[0]["loss"] == pytest.approx(history(two_processes)[0]["loss"], rel=1e-5)
    assert_close_weights(resumed, reference)
