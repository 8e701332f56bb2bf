"""Torchrun environment checks, device choice, batch split and the one-message error policy."""

import pytest
import torch

from speakerlab.distributed import (
    DistContext,
    EveryRankError,
    RankEnv,
    all_gather_tensor,
    barrier,
    choose_device,
    error_report,
    init_distributed,
    read_rank_env,
    run_on_every_rank,
    single_process,
)
from speakerlab.errors import ConfigError, DataError

FULL_ENV = {
    "RANK": "3",
    "WORLD_SIZE": "8",
    "LOCAL_RANK": "1",
    "LOCAL_WORLD_SIZE": "2",
    "MASTER_ADDR": "node0",
    "MASTER_PORT": "29500",
}


def test_no_torchrun_variables_means_one_process():
    assert read_rank_env({}) == RankEnv(rank=0, world_size=1, local_rank=0, local_world_size=1)


def test_full_torchrun_environment_is_read():
    assert read_rank_env(FULL_ENV) == RankEnv(
        rank=3, world_size=8, local_rank=1, local_world_size=2
    )


def test_partial_environment_names_what_is_missing():
    with pytest.raises(ConfigError) as err:
        read_rank_env({"RANK": "0", "WORLD_SIZE": "2"})
    message = str(err.value)
    assert "LOCAL_RANK, MASTER_ADDR, MASTER_PORT missing" in message and "torchrun" in message


@pytest.mark.parametrize(
    "change, match",
    [
        ({"RANK": "x"}, "RANK='x' is not an integer"),
        ({"RANK": "8"}, "outside the job"),
        ({"LOCAL_RANK": "2"}, "LOCAL_RANK=2 is outside"),
    ],
)
def test_inconsistent_environment(change, match):
    with pytest.raises(ConfigError, match=match):
        read_rank_env({**FULL_ENV, **change})


def test_device_choice():
    one = RankEnv()
    assert choose_device("cpu", one, gpu_count=4) == torch.device("cpu")
    assert choose_device("auto", one, gpu_count=0) == torch.device("cpu")
    assert choose_device("auto", read_rank_env(FULL_ENV), gpu_count=2) == torch.device("cuda", 1)
    assert choose_device("cuda:1", one, gpu_count=2) == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="device=cuda but no GPU is visible"):
        choose_device("cuda", one, gpu_count=0)
    with pytest.raises(ConfigError, match="--nproc_per_node=2"):
        choose_device("cuda", RankEnv(0, 4, 0, 4), gpu_count=2)
    with pytest.raises(ConfigError, match="device='tpu': choose one of auto, cpu, cuda or cuda:N"):
        choose_device("tpu", one)
    with pytest.raises(ConfigError, match="only 2 GPU"):
        choose_device("cuda:2", one, gpu_count=2)
    with pytest.raises(ConfigError, match="names one GPU, but 4 processes run"):
        choose_device("cuda:0", RankEnv(0, 4, 0, 4), gpu_count=4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_missing_gpu_is_one_error_for_every_rank():
    env = {**FULL_ENV, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    with pytest.raises(EveryRankError, match="no GPU is visible"):
        init_distributed("cuda", environ=env)
    with pytest.raises(ConfigError, match="no GPU is visible"):
        init_distributed("cuda", environ={})


def test_single_process_context():
    ctx = init_distributed("cpu", environ={})
    assert ctx.is_main and not ctx.distributed and ctx.backend is None
    assert single_process("cpu") == ctx


def test_collectives_in_one_process():
    ctx = single_process("cpu")
    values = torch.tensor([1.0, 2.0])
    assert torch.equal(all_gather_tensor(ctx, values), values[None])
    barrier(ctx)  # nothing to wait for


def test_run_on_every_rank_single_process_keeps_the_error():
    ctx = DistContext(0, 1, 0, torch.device("cpu"))
    assert run_on_every_rank(ctx, lambda: 7) == 7
    with pytest.raises(DataError, match="bad list"):
        run_on_every_rank(ctx, lambda: (_ for _ in ()).throw(DataError("bad list")))


def test_error_report_once_per_node_or_by_the_failing_rank():
    every = EveryRankError("trainer.batch_size=9 does not divide")
    assert (
        error_report(every, {**FULL_ENV, "LOCAL_RANK": "0"})
        == "trainer.batch_size=9 does not divide"
    )
    assert error_report(every, FULL_ENV) is None  # local rank 1 stays quiet
    assert error_report(DataError("a.wav: empty"), FULL_ENV) == "[rank 3] a.wav: empty"
    assert error_report(DataError("a.wav: empty"), {}) == "a.wav: empty"
    wrapped = DataError(
        "Caught DataError in DataLoader worker process 0.\nOriginal Traceback "
        '(most recent call last):\n  File "x.py", line 1\n'
        "speakerlab.errors.DataError: a.wav: empty\n"
    )
    assert error_report(wrapped, {}) == "a.wav: empty"
