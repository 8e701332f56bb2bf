"""Ranks, devices and collectives: one home for training and extraction under ``torchrun``.

Without the torchrun variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``) a command runs as one plain process. With all of them it joins a process group:
NCCL for training on GPUs, gloo otherwise (extraction only exchanges barriers, so it always uses
gloo). A partial set is an error, as is a GPU asked for that is not there.

Device rule (``trainer.device``, ``speakerlab extract --device``, ...): ``auto`` is this process's
GPU (``cuda:LOCAL_RANK``) when PyTorch sees one, else the CPU; ``cuda`` is that GPU and an error
without one; ``cuda:N`` names one GPU (one process only); ``cpu`` is the CPU.

Waiting for other processes: every rank first meets the others in a key-value store (the one that
torchrun's agent serves, else one that rank 0 serves at ``MASTER_ADDR:MASTER_PORT``). A process
that waits says so within a minute (how many of the job's processes have arrived, where, and which
ranks are missing) and gives up with one clear message after a timeout: a few minutes to start the
job, a caller's choice for :func:`barrier` (extraction's last barrier may wait long for slow ranks).

Error reporting: a failure that every rank meets alike (a wrong option, a missing GPU on a node, a
set-up step that fails anywhere) is raised as :class:`EveryRankError`, which the entry point prints
once per node (local rank 0) instead of once per process; other errors are printed by the rank that
met them.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from speakerlab.errors import ConfigError, SpeakerlabError

RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
DEVICE_CHOICES = ("auto", "cpu", "cuda")
# How long a job waits for all of its processes to start before giving up.
DEFAULT_RENDEZVOUS_MINUTES = 5.0
# A process that waits for others says so (and for whom) this often.
REPORT_SECONDS = 60.0
# Polling of the store while waiting: quick at first (barriers are usually short), then relaxed.
_POLL_SECONDS = (0.001, 0.2)

log = logging.getLogger(__name__)

T = TypeVar("T")


class EveryRankError(SpeakerlabError):
    """A failure known to every rank alike: printed once per node, not once per process."""


class WaitTimeoutError(EveryRankError):
    """Processes of the job did not arrive in time (at the start, or at a barrier)."""


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


class Rendezvous:
    """The key-value store that all processes of a job share, with waits that report who is
    missing: :meth:`meet` returns once every rank has called it with the same name."""

    def __init__(
        self,
        store: dist.Store,
        address: str,
        rank: int,
        world_size: int,
        *,
        timeout_seconds: float,
        report_seconds: float = REPORT_SECONDS,
    ) -> None:
        self.store = store
        self.address = address
        self.rank = rank
        self.world_size = world_size
        self.timeout_seconds = timeout_seconds
        self.report_seconds = report_seconds
        self._barriers = itertools.count(1)

    def next_barrier_name(self) -> str:
        """A fresh name for a barrier (every rank passes its barriers in the same order)."""
        return f"barrier {next(self._barriers)}"

    def meet(self, name: str, timeout_seconds: float | None = None, hint: str = "") -> None:
        """Wait until all ranks have arrived at ``name``; log every ``report_seconds`` how many
        have and which ranks are missing; raise :class:`WaitTimeoutError` (with ``hint``) after
        ``timeout_seconds`` (default: the job's collective timeout)."""
        timeout = self.timeout_seconds if timeout_seconds is None else timeout_seconds
        key = name.replace(" ", "_")
        self.store.set(f"{key}/rank/{self.rank}", socket.gethostname())
        if self.store.add(f"{key}/count", 1) == self.world_size:
            self.store.set(f"{key}/done", "1")
        start = time.monotonic()
        next_report = start + self.report_seconds
        pause = _POLL_SECONDS[0]
        while not self.store.check([f"{key}/done"]):
            now = time.monotonic()
            if now - start >= timeout or now >= next_report:
                missing = self.missing_ranks(key)
                if now - start >= timeout:
                    raise WaitTimeoutError(self._timeout_message(name, missing, timeout, hint))
                if missing and self.rank == min(set(range(self.world_size)) - set(missing)):
                    log.warning(
                        "%s: %d of %d processes have arrived at %s after %.0f s; waiting for "
                        "rank(s) %s (giving up after %s)",
                        name,
                        self.world_size - len(missing),
                        self.world_size,
                        self.address,
                        now - start,
                        _ranks(missing),
                        _duration(timeout),
                    )
                next_report = now + self.report_seconds
            time.sleep(pause)
            pause = min(2 * pause, _POLL_SECONDS[1])

    def missing_ranks(self, key: str) -> list[int]:
        """Ranks that have not arrived at the wait ``key``."""
        return [r for r in range(self.world_size) if not self.store.check([f"{key}/rank/{r}"])]

    def _timeout_message(self, name: str, missing: list[int], timeout: float, hint: str) -> str:
        return (
            f"{name}: only {self.world_size - len(missing)} of {self.world_size} processes "
            f"arrived at {self.address} within {_duration(timeout)}; rank(s) {_ranks(missing)} "
            f"did not{'; ' + hint if hint else ''}"
        )


@dataclass(frozen=True)
class DistContext:
    """This process's rank, the job size, its device and the process group's backend."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None = None  # None: no process group (one process)
    # The store shared by the job's processes (None in one process or when set up elsewhere).
    rendezvous: Rendezvous | None = field(default=None, compare=False, repr=False)

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
    *,
    rendezvous_minutes: float = DEFAULT_RENDEZVOUS_MINUTES,
    rendezvous_option: str = "the rendezvous timeout",
    report_seconds: float = REPORT_SECONDS,
) -> DistContext:
    """Read the torchrun environment, choose the device and join the process group if there is one.

    ``backend`` None: NCCL on GPUs, gloo on the CPU. The processes first meet in the job's store
    (see the module docstring): a process waits at most ``rendezvous_minutes`` for the others,
    reporting every ``report_seconds``; ``rendezvous_option`` names the setting in the timeout
    message. ``timeout_minutes`` bounds each collective and is :func:`barrier`'s default. Errors
    that every rank of a multi-process job meets alike are raised as :class:`EveryRankError`.
    """
    environ = os.environ if environ is None else environ
    env = read_rank_env(environ)
    try:
        device = choose_device(device_preference, env, option=option)
    except ConfigError as err:
        if env.world_size > 1:
            raise EveryRankError(str(err)) from None
        raise
    if env.world_size == 1:
        return DistContext(env.rank, 1, env.local_rank, device, None)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.is_initialized():  # set up by the caller: use its process group as it is
        return DistContext(env.rank, env.world_size, env.local_rank, device, backend)
    rendezvous = join_rendezvous(
        env,
        environ,
        wait_seconds=60 * rendezvous_minutes,
        collective_seconds=60 * timeout_minutes,
        report_seconds=report_seconds,
    )
    rendezvous.meet(
        "starting the job",
        60 * rendezvous_minutes,
        hint="start every process of the job (on each node the same torchrun command, with "
        f"--nnodes, --nproc_per_node, --master_addr and --master_port alike) or raise "
        f"{rendezvous_option}",
    )
    dist.init_process_group(
        backend=backend,
        store=dist.PrefixStore("process_group", rendezvous.store),
        rank=env.rank,
        world_size=env.world_size,
        timeout=timedelta(minutes=timeout_minutes),
        device_id=device if backend == "nccl" else None,
    )
    return DistContext(env.rank, env.world_size, env.local_rank, device, backend, rendezvous)


def join_rendezvous(
    env: RankEnv,
    environ: Mapping[str, str],
    *,
    wait_seconds: float,
    collective_seconds: float,
    report_seconds: float = REPORT_SECONDS,
) -> Rendezvous:
    """Connect to the job's store at ``MASTER_ADDR:MASTER_PORT``: torchrun's agent serves it
    (``TORCHELASTIC_USE_AGENT_STORE``), else rank 0 does. A process that cannot reach it says so
    every ``report_seconds`` and gives up after ``wait_seconds``."""
    host = environ["MASTER_ADDR"]
    try:
        port = int(environ["MASTER_PORT"])
    except ValueError:
        raise EveryRankError(
            f"MASTER_PORT={environ['MASTER_PORT']!r} is not a port number"
        ) from None
    address = f"{host}:{port}"
    agent = environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    serve = env.rank == 0 and not agent
    timeout = timedelta(seconds=collective_seconds)
    if serve:
        try:
            store = dist.TCPStore(
                host, port, is_master=True, timeout=timeout, wait_for_workers=False
            )
        except (RuntimeError, OSError) as err:
            raise SpeakerlabError(
                f"rank 0 cannot serve the job's rendezvous at {address} ({_first_line(err)}); "
                "is another job using MASTER_PORT? Choose another port"
            ) from None
    else:
        _wait_until_reachable(host, port, env.rank, wait_seconds, report_seconds, agent)
        store = dist.TCPStore(host, port, is_master=False, timeout=timeout, wait_for_workers=False)
    # torchrun's store outlives restarts of the workers: keep each attempt's keys apart.
    attempt = environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return Rendezvous(
        dist.PrefixStore(f"speakerlab/attempt_{attempt}", store),
        address,
        env.rank,
        env.world_size,
        timeout_seconds=collective_seconds,
        report_seconds=report_seconds,
    )


def _wait_until_reachable(
    host: str, port: int, rank: int, wait_seconds: float, report_seconds: float, agent: bool
) -> None:
    """Return once ``host:port`` accepts connections (probed with plain sockets, which fail
    quietly, unlike the store's client); report while waiting; give up after ``wait_seconds``."""
    server = "torchrun on the first node" if agent else "rank 0"
    start = time.monotonic()
    next_report = start + report_seconds
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            pass
        now = time.monotonic()
        if now - start >= wait_seconds:
            raise SpeakerlabError(
                f"rank {rank}: nothing answered at {host}:{port} within "
                f"{_duration(wait_seconds)}: {server} is not running, or MASTER_ADDR/MASTER_PORT "
                "point elsewhere"
            )
        if now >= next_report:
            log.warning(
                "rank %d: waiting for %s to answer at %s:%d for %.0f s (giving up after %s)",
                rank,
                server,
                host,
                port,
                now - start,
                _duration(wait_seconds),
            )
            next_report = now + report_seconds
        time.sleep(min(0.5, report_seconds / 4))


def shutdown_distributed(ctx: DistContext) -> None:
    """Leave the process group (if any)."""
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(
    ctx: DistContext, timeout_minutes: float | None = None, name: str | None = None
) -> None:
    """Wait until every rank gets here (no-op in one process).

    Every minute of waiting is reported with the ranks still missing; after ``timeout_minutes``
    (default: the job's collective timeout) :class:`WaitTimeoutError` names them. ``name`` (e.g.
    "extraction finished") appears in those messages.
    """
    if not ctx.distributed:
        return
    if ctx.rendezvous is None:  # a process group set up elsewhere
        dist.barrier()
        return
    label = ctx.rendezvous.next_barrier_name()
    timeout = None if timeout_minutes is None else 60 * timeout_minutes
    ctx.rendezvous.meet(f"{label} ({name})" if name else label, timeout)


def all_gather(ctx: DistContext, obj: Any) -> list[Any]:
    """``obj`` from every rank, in rank order (picklable plain values only)."""
    if not ctx.distributed:
        return [obj]
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def all_gather_tensor(ctx: DistContext, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` of every rank stacked in rank order, shape ``(world_size, *tensor.shape)``: on
    the device for NCCL (no wait for the host), on the CPU for gloo."""
    if not ctx.distributed:
        return tensor.unsqueeze(0)
    device = ctx.device if ctx.backend == "nccl" else torch.device("cpu")
    local = tensor.to(device).contiguous()
    gathered = torch.empty(ctx.world_size * local.numel(), dtype=local.dtype, device=device)
    dist.all_gather_into_tensor(gathered, local.reshape(-1))
    return gathered.view(ctx.world_size, *local.shape)


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


def _ranks(ranks: list[int]) -> str:
    """``0, 3, 5`` (at most 16 listed)."""
    listed = ", ".join(map(str, ranks[:16]))
    return listed + (f" and {len(ranks) - 16} more" if len(ranks) > 16 else "")


def _duration(seconds: float) -> str:
    return f"{seconds / 60:g} min" if seconds >= 60 else f"{seconds:g} s"


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


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
