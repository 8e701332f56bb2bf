"""Ranks, devices and collectives: one home for training and extraction under ``torchrun``.

Without the torchrun variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``) a command runs as one plain process. With all of them it joins a process group:
NCCL for training on GPUs, gloo otherwise (extraction only exchanges barriers, so it always uses
gloo). A partial set is an error, as is a GPU asked for that is not there.

Device rule (``trainer.device``, ``speakerlab extract --device``, ...): ``auto`` is this process's
GPU (``cuda:LOCAL_RANK``) when PyTorch sees one, else the CPU; ``cuda`` is that GPU and an error
without one; ``cuda:N`` names one GPU (one process only); ``cpu`` is the CPU.

Error reporting: a failure that every rank meets alike (a wrong option, a missing GPU on a node, a
set-up step that fails anywhere) is raised as :class:`EveryRankError`, which the entry point prints
once per node (local rank 0) instead of once per process; other errors are printed by the rank that
met them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from speakerlab.errors import ConfigError, SpeakerlabError

RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
DEVICE_CHOICES = ("auto", "cpu", "cuda")

T = TypeVar("T")


class EveryRankError(SpeakerlabError):
    """A failure known to every rank alike: printed once per node, not once per process."""


@dataclass(frozen=True)
class RankEnv:
    """Where this process sits in the job, as torchrun describes it."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1


def read_rank_env(environ: Mapping[str, str] | None = None) -> RankEnv:
    """The job layout from the torchrun variables; one process when none of them is set."""
    environ = os.environ if environ is None else environ
    present = [name for name in RANK_VARIABLES if name in environ]
    if not present:
        return RankEnv()
    missing = [name for name in RANK_VARIABLES if name not in environ]
    if missing:
        raise ConfigError(
            f"incomplete distributed environment: {', '.join(present)} set but "
            f"{', '.join(missing)} missing. Launch multi-process training with torchrun "
            "(torchrun --nproc_per_node=N -m speakerlab train ...), or unset "
            f"{', '.join(present)} to train in one process."
        )

    def integer(name: str, default: str | None = None) -> int:
        text = environ.get(name, default)
        try:
            return int(text)
        except (TypeError, ValueError):
            raise ConfigError(f"environment variable {name}={text!r} is not an integer") from None

    env = RankEnv(
        rank=integer("RANK"),
        world_size=integer("WORLD_SIZE"),
        local_rank=integer("LOCAL_RANK"),
        # torchrun sets LOCAL_WORLD_SIZE; other launchers may not.
        local_world_size=integer("LOCAL_WORLD_SIZE", environ["WORLD_SIZE"]),
    )
    if env.world_size < 1 or not 0 <= env.rank < env.world_size:
        raise ConfigError(f"RANK={env.rank} is outside the job of WORLD_SIZE={env.world_size}")
    if not 0 <= env.local_rank < env.local_world_size:
        raise ConfigError(
            f"LOCAL_RANK={env.local_rank} is outside the "
            f"{env.local_world_size} processes of this node (LOCAL_WORLD_SIZE)"
        )
    return env


def choose_device(
    preference: str, env: RankEnv, gpu_count: int | None = None, option: str = "device"
) -> torch.device:
    """The device of this process for ``preference`` (see the module docstring); ``option``
    names the setting in messages (``trainer.device``, ``--device``).

    With GPUs, every process of the node needs its own, so the check uses the node's process
    count and fails alike on every rank.
    """
    explicit = _gpu_number(preference)
    if preference not in DEVICE_CHOICES and explicit is None:
        raise ConfigError(
            f"{option}={preference!r}: choose one of {', '.join(DEVICE_CHOICES)} or cuda:N"
        )
    if gpu_count is None:
        gpu_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if preference == "cpu" or (preference == "auto" and gpu_count == 0):
        return torch.device("cpu")
    if gpu_count == 0:
        raise ConfigError(
            f"{option}={preference} but no GPU is visible to PyTorch "
            f"(torch.cuda.is_available() is False); use {option}=cpu or auto"
        )
    if explicit is not None:
        if env.world_size > 1:
            raise ConfigError(
                f"{option}={preference} names one GPU, but {env.world_size} processes run; use "
                "cuda (each process takes the GPU of its LOCAL_RANK) or CUDA_VISIBLE_DEVICES"
            )
        if explicit >= gpu_count:
            raise ConfigError(f"{option}={preference}: only {gpu_count} GPU(s) are visible")
        return torch.device("cuda", explicit)
    if env.local_world_size > gpu_count:
        raise ConfigError(
            f"{env.local_world_size} processes on this node need one GPU each, but only "
            f"{gpu_count} GPU(s) are visible; start torchrun with --nproc_per_node={gpu_count} or "
            "fewer, or use the CPU"
        )
    return torch.device("cuda", env.local_rank)


def resolve_device(preference: str, option: str = "device") -> torch.device:
    """:func:`choose_device` for this process as torchrun (or nothing) placed it."""
    return choose_device(preference, read_rank_env(), option=option)


def _gpu_number(preference: str) -> int | None:
    """N of ``cuda:N``, None for anything else."""
    prefix, _, number = preference.partition(":")
    return int(number) if prefix == "cuda" and number.isdigit() else None


def local_batch_size(global_batch: int, world_size: int) -> int:
    """This rank's share of the global batch, which must split evenly over the ranks."""
    if global_batch < 1:
        raise ConfigError(f"trainer.batch_size={global_batch} must be positive")
    if global_batch % world_size:
        raise ConfigError(
            f"trainer.batch_size={global_batch} (the global batch) does not divide over "
            f"{world_size} processes; choose a multiple of {world_size} or change --nproc_per_node"
        )
    return global_batch // world_size


@dataclass(frozen=True)
class DistContext:
    """This process's rank, the job size, its device and the process group's backend."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None = None  # None: no process group (one process)

    @property
    def is_main(self) -> bool:
        """Rank 0 writes logs, checkpoints and merged outputs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def single_process(device: str | torch.device = "cpu") -> DistContext:
    """The context of a plain (not torchrun) process on ``device``."""
    return DistContext(0, 1, 0, torch.device(device))


def init_distributed(
    device_preference: str = "auto",
    timeout_minutes: float = 30.0,
    environ: Mapping[str, str] | None = None,
    backend: str | None = None,
    option: str = "device",
) -> DistContext:
    """Read the torchrun environment, choose the device and join the process group if there is one.

    ``backend`` None: NCCL on GPUs, gloo on the CPU. Errors that every rank of a multi-process job
    meets alike are raised as :class:`EveryRankError`.
    """
    env = read_rank_env(environ)
    try:
        device = choose_device(device_preference, env, option=option)
    except ConfigError as err:
        if env.world_size > 1:
            raise EveryRankError(str(err)) from None
        raise
    if env.world_size > 1:
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    else:
        backend = None
    ctx = DistContext(env.rank, env.world_size, env.local_rank, device, backend)
    if ctx.device.type == "cuda":
        torch.cuda.set_device(ctx.device)
    if ctx.distributed and not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            timeout=timedelta(minutes=timeout_minutes),
            device_id=ctx.device if backend == "nccl" else None,
        )
    return ctx


def shutdown_distributed(ctx: DistContext) -> None:
    """Leave the process group (if any)."""
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    """Wait until every rank gets here (no-op in one process)."""
    if ctx.distributed:
        dist.barrier()


def all_gather(ctx: DistContext, obj: Any) -> list[Any]:
    """``obj`` from every rank, in rank order (picklable plain values only)."""
    if not ctx.distributed:
        return [obj]
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def _all_reduce(ctx: DistContext, values: list[float], op: dist.ReduceOp) -> list[float]:
    if not ctx.distributed:
        return list(values)
    device = ctx.device if ctx.backend == "nccl" else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=op)
    return tensor.tolist()


def all_reduce_max(ctx: DistContext, values: list[float]) -> list[float]:
    """Element-wise maximum of ``values`` over the ranks (flags: any rank raised it)."""
    return _all_reduce(ctx, values, dist.ReduceOp.MAX)


def all_reduce_sum(ctx: DistContext, values: list[float]) -> list[float]:
    """Element-wise sum of ``values`` over the ranks."""
    return _all_reduce(ctx, values, dist.ReduceOp.SUM)


def run_on_every_rank(ctx: DistContext, step: Callable[[], T]) -> T:
    """Run ``step`` on every rank; if it fails with a :class:`SpeakerlabError` on any rank, every
    rank raises one :class:`EveryRankError` naming the failing ranks and their messages.

    ``step`` must not use collectives itself: a failing rank would leave the others waiting in one.
    """
    error: SpeakerlabError | None = None
    result = None
    try:
        result = step()
    except SpeakerlabError as err:
        error = err
    failures = [
        (rank, message)
        for rank, message in enumerate(all_gather(ctx, None if error is None else str(error)))
        if message is not None
    ]
    if not failures:
        return result  # type: ignore[return-value]
    if not ctx.distributed:
        raise error  # type: ignore[misc]
    messages: dict[str, list[int]] = {}
    for rank, message in failures:
        messages.setdefault(message, []).append(rank)
    if len(messages) == 1 and len(failures) == ctx.world_size:
        raise EveryRankError(failures[0][1]) from error
    lines = [f"rank {','.join(map(str, ranks))}: {message}" for message, ranks in messages.items()]
    raise EveryRankError("\n".join(lines)) from error


def error_report(error: SpeakerlabError, environ: Mapping[str, str] | None = None) -> str | None:
    """The text this process should print for ``error``, or None if another process prints it.

    An :class:`EveryRankError` is printed by local rank 0 only (one message per node, i.e. per
    torchrun console); other errors by the rank that met them, marked with its rank in a
    multi-process job. An error re-raised by a DataLoader worker is reduced to its own message.
    """
    environ = os.environ if environ is None else environ
    if isinstance(error, EveryRankError) and environ.get("LOCAL_RANK", "0") != "0":
        return None
    message = str(error)
    marker = "Original Traceback (most recent call last):"
    if marker in message:  # DataLoader workers wrap the original error with its traceback
        qualified = f"{type(error).__module__}.{type(error).__name__}: "
        message = message.rsplit(qualified, 1)[-1].strip() if qualified in message else message
    multi = environ.get("WORLD_SIZE", "1") not in ("", "1")
    if multi and not isinstance(error, EveryRankError):
        message = f"[rank {environ.get('RANK', '?')}] {message}"
    return message
