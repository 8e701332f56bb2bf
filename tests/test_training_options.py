"""Throughput options (issue 12) keep the result: the optimizer's step kernel, torch.compile,
and the finiteness check deferred to the log lines instead of every step (channels_last is
checked on the GPU by tools/gpu_check.sh)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from training_runs import (
    ERES2NET,
    LEARNING,
    final_checkpoint,
    history,
    overrides,
    train_in_process,
)

from speakerlab.errors import ConfigError
from speakerlab.training.builders import loader_workers
from speakerlab.training.trainer import compile_backend

ONE_STEP = ["trainer.epochs=1", "trainer.max_steps_per_epoch=1"]


def learned_weights(exp_dir: Path) -> dict[str, torch.Tensor]:
    state = final_checkpoint(exp_dir)
    return {
        f"{part}.{key}": value
        for part in ("model", "classifier")
        for key, value in state[part].items()
        if value.is_floating_point()
    }


def assert_same_up_to_rounding(a: dict, b: dict) -> None:
    """One optimizer step apart only by the order of float sums: each tensor agrees to 1e-6 of
    its norm (a wrong kernel or layout would be off by far more)."""
    assert a.keys() == b.keys()
    for key in a:
        error, scale = (a[key] - b[key]).norm().item(), a[key].norm().item()
        assert error <= 1e-6 * scale + 1e-9, f"{key}: off by {error} at norm {scale}"


@pytest.mark.slow
def test_step_kernels_give_the_same_step(mini_data, tmp_path):
    reference = tmp_path / "default"
    assert train_in_process(overrides(mini_data, reference, *ERES2NET, *ONE_STEP)) == 0
    for option in (
        "optim.step_kernel=fused",
        "optim.step_kernel=foreach",
        "optim.step_kernel=for_loop",
    ):
        exp_dir = tmp_path / option.replace("=", "_")
        assert train_in_process(overrides(mini_data, exp_dir, *ERES2NET, *ONE_STEP, option)) == 0
        assert_same_up_to_rounding(learned_weights(reference), learned_weights(exp_dir))


@pytest.mark.slow
def test_compiled_model_gives_the_same_step(mini_data, tmp_path):
    """torch.compile through the AOT-autograd tracing (code generation by inductor, the
    ``trainer.compile=true`` backend, takes minutes on a CPU; the GPU check runs it)."""
    reference, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert train_in_process(overrides(mini_data, reference, *LEARNING, *ONE_STEP)) == 0
    args = overrides(mini_data, compiled, *LEARNING, *ONE_STEP, "trainer.compile=aot_eager")
    assert train_in_process(args) == 0
    assert_same_up_to_rounding(learned_weights(reference), learned_weights(compiled))


@pytest.mark.slow
def test_deferred_finiteness_check_is_identical_to_the_per_step_check(mini_data, tmp_path):
    """The default run reads its statistics and finiteness flags once per log line; with
    trainer.skip_nonfinite=true it waits for the check at every step and keeps a copy of the
    batch-norm buffers. Without a bad batch both give bit-identical weights and statistics."""
    runs = {}
    for skip in ("false", "true"):
        exp_dir = tmp_path / f"skip_{skip}"
        args = overrides(
            mini_data,
            exp_dir,
            *ERES2NET,
            "trainer.epochs=1",
            "trainer.max_steps_per_epoch=4",
            f"trainer.skip_nonfinite={skip}",
        )
        assert train_in_process(args) == 0
        runs[skip] = exp_dir
    a, b = final_checkpoint(runs["false"]), final_checkpoint(runs["true"])
    for part in ("model", "classifier"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert history(runs["false"]) == history(runs["true"])


def test_channels_last_is_refused_on_the_cpu(mini_data, tmp_path, capsys):
    """On the CPU a strided 1x1 convolution's backward pass in channels_last crashes PyTorch
    2.11 (a segmentation fault): the option is for GPUs and stops with one line elsewhere."""
    args = overrides(mini_data, tmp_path / "x", *ERES2NET, "trainer.channels_last=true")
    assert train_in_process(args) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "speakerlab train: error: trainer.channels_last=true is for GPUs; leave it off on the CPU"
    )


def test_option_values(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    assert loader_workers("auto", 1) == 15  # 16 cores, one left to the training process
    assert loader_workers("auto", 8) == 1
    assert loader_workers(4, 1) == 4
    with pytest.raises(ConfigError, match="data.num_workers='many': a number or auto"):
        loader_workers("many", 1)
    assert compile_backend(False) is None and compile_backend(True) == "inductor"
    assert compile_backend("aot_eager") == "aot_eager"
    with pytest.raises(ConfigError, match="trainer.compile='fast': false, true or one of "):
        compile_backend("fast")
