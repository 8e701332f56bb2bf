"""The training loop: one experiment from its merged Hydra config to its final checkpoint.

Each optimizer step sets the learning rate and the AAM margin from the position ``epoch + step /
steps_per_epoch``, runs the embedding model and cosine classifier over the step's micro-batches
(``trainer.accumulate_steps``, under autocast if asked), and steps the optimizer (the ``optim``
group). The running statistics and the finiteness of the loss and gradients stay on the device;
the host reads them once per logging window (``trainer.log_every_steps``) and before every
checkpoint, so a step never waits for the GPU. A non-finite loss therefore stops the run at the
end of its window (naming the step, its learning rate and the last finite loss), before any
checkpoint could hold it. With ``trainer.skip_nonfinite=true`` each step instead waits for one
all-ranks finiteness check, and a bad step is skipped on every rank, its batch-norm statistics
restored (:mod:`speakerlab.training.nonfinite`).

Checkpoints are taken at step boundaries (every N epochs, every S steps, and at the first log line
after M minutes; always at the end) and hold everything the run depends on, so a run killed at
any moment and started again with the same command continues exactly where its newest checkpoint
left it:

* the data order is a pure function of (seed, epoch) and the sampler skips the steps done;
* data augmentation of item ``i`` depends only on (seed, epoch, i), whatever the worker count;
* LR and margin are functions of the position; optimizer, gradient scaler, model and classifier
  states, the random-number generators of every rank and the running epoch statistics are saved.

A deterministic CPU run (``trainer.deterministic=true``, fixed ``trainer.num_threads``) therefore
ends with the same weights whether or not it was interrupted. Set-up: :mod:`.builders`; what a
checkpoint holds and when a run may resume from it: :mod:`.checkpointing`.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel

from speakerlab.distributed import (
    DistContext,
    all_gather,
    all_gather_tensor,
    init_distributed,
    run_on_every_rank,
    shutdown_distributed,
)
from speakerlab.errors import ConfigError
from speakerlab.fileio import exclusive_lock, write_json_atomic, write_text_atomic
from speakerlab.models import count_parameters
from speakerlab.training import builders
from speakerlab.training.checkpointing import (
    capture_rng_state,
    checkpoint_dir,
    checkpoint_path,
    prune_checkpoints,
    save_checkpoint,
    training_state,
)
from speakerlab.training.nonfinite import (
    NAMED_ITEMS,
    BadStep,
    BufferSnapshot,
    NonFiniteLossError,
    skip_message,
    stop_message,
)
from speakerlab.training.progress import TrainingMonitor
from speakerlab.training.schedules import training_position
from speakerlab.training.setup import Run, build_run
from speakerlab.training.stats import (
    FIRST_BAD_LOSS,
    FIRST_BAD_STEP,
    LAST_GOOD_LOSS,
    LAST_GOOD_STEP,
    GatheredStats,
    RunningStats,
    gather_stats,
)

log = logging.getLogger(__name__)

LOCK_FILE = ".train.lock"
# A run killed with SIGKILL leaves its DataLoader workers, which share its lock, for up to ~5 s.
LOCK_WAIT_SECONDS = 15.0


@dataclass
class Position:
    """Where training stands: the next step to train is step ``step`` of ``epoch`` (from 0)."""

    epoch: int = 0
    step: int = 0
    global_step: int = 0


@dataclass
class Window:
    """Rank 0's host-side measures between two log lines."""

    epoch_sums: np.ndarray  # global epoch sums (loss, correct, count) at the window's start
    started: float = field(default_factory=time.perf_counter)
    data_seconds: float = 0.0
    lr: float = 0.0
    margin: float = 0.0


class Trainer:
    """The loop of one run on one rank. Build it with :meth:`create`, then call :meth:`fit`."""

    def __init__(self, run: Run, monitor: TrainingMonitor) -> None:
        self.run, self.cfg, self.ctx, self.monitor = run, run.cfg, run.ctx, monitor
        self.options = run.options
        self.layout = run.options.layout
        self.ckpt_dir = checkpoint_dir(run.exp_dir)
        self.steps_per_epoch = run.steps_per_epoch
        self.lr_schedule = run.lr_schedule
        self.stats = RunningStats(self.ctx.device)
        self.position = Position()
        self.history: list[dict[str, float]] = []
        self.flushed_sums = np.zeros(3)  # the epoch sums over all ranks at the last log line
        self.resumed_from: Path | None = None
        self.last_checkpoint: Path | None = None
        self.written: list[Path] = []  # checkpoints this run wrote (the ones pruning counts)
        if run.resumed is not None:
            resumed = run.resumed
            self.position = Position(*resumed.position)
            self.history = list(resumed.history)
            self.stats.start_epoch(resumed.rank_epoch_sums)
            self.flushed_sums = resumed.epoch_sums
            self.resumed_from = self.last_checkpoint = resumed.path
        self.snapshot = BufferSnapshot(run.net) if self.options.skip_nonfinite else None
        self.ddp: DistributedDataParallel | None = None
        self.train_net = self._wrap(run.net)

    @classmethod
    def create(
        cls,
        cfg: DictConfig,
        ctx: DistContext,
        monitor: TrainingMonitor,
        explicit_model_keys: Iterable[str] = (),
    ) -> Trainer:
        """Set the run up (:func:`.setup.build_run`), save the merged config, wrap the model."""
        run = build_run(cfg, ctx, set(explicit_model_keys))
        if ctx.is_main:
            log.info("merged configuration saved to %s", save_merged_config(cfg, run.exp_dir))
        return cls(run, monitor)

    def _wrap(self, net: torch.nn.Module) -> torch.nn.Module:
        """torch.compile (``trainer.compile``), then DDP over model and classifier together
        (after loading, as DDP broadcasts rank 0's weights)."""
        backend = compile_backend(self.cfg.trainer.compile)
        if backend is not None:
            net = torch.compile(net, backend=backend)
        if self.ctx.distributed:
            device_ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(net, device_ids=device_ids)
            net = self.ddp
        return net

    def release_distributed(self) -> None:
        """Drop the DDP wrapper, so that the process group is freed by ``destroy_process_group``.

        If DDP's C++ reducer held the last reference, the group would be destroyed whenever the
        trainer is (e.g. with an error's traceback), holding the GIL while it joins gloo threads
        that may still need the GIL to free the tensors of the last collective: a deadlock.
        """
        self.train_net, self.ddp = self.run.net, None
        gc.collect()  # DDP sits in reference cycles: without a collection it would linger

    # ----------------------------------------------------------------------------- training

    def fit(self) -> Path:
        """Train to the last epoch; returns the final checkpoint."""
        if self.cfg.trainer.tensorboard:
            self.monitor.start_tensorboard(purge_step=self.position.global_step)
        self._log_start()
        self.last_save_time = time.monotonic()
        final = None
        while self.position.epoch < self.options.epochs:
            final = self._train_epoch()
        if final is None:
            log.info("training was already complete (%d epochs)", self.options.epochs)
            final = self.resumed_from
        log.info(
            "finished; final checkpoint %s (export the embedding model with: speakerlab "
            "export --checkpoint %s --out <model.ckpt>)",
            final,
            final,
        )
        return final

    def _log_start(self) -> None:
        ctx = self.ctx
        log.info(
            "experiment %s: %s %s (%d parameters), %d classes, %d items, %d iterations per "
            "epoch, %d epochs",
            self.run.exp_dir,
            self.run.identity.model_name,
            self.run.identity.model_kwargs,
            count_parameters(self.run.model),
            self.run.classifier.num_classes,
            len(self.run.dataset),
            self.steps_per_epoch,
            self.options.epochs,
        )
        log.info(
            "%d process(es) on %s (%s), %d items per process, global batch %s, precision %s",
            ctx.world_size,
            ctx.device,
            ctx.backend or "no process group",
            self.layout.items_per_rank_step,
            self.layout.describe(),
            self.cfg.trainer.precision,
        )
        if self.resumed_from is not None:
            log.info(
                "resumed from %s at epoch %d, iteration %d",
                self.resumed_from,
                self.position.epoch + 1,
                self.position.step,
            )

    def _train_epoch(self) -> Path | None:
        """Train from the current position to the end of its epoch; returns the checkpoint
        written at the end of the epoch, if one was."""
        epoch, start = self.position.epoch, self.position.step
        self.run.dataset.set_epoch(epoch)
        self.run.sampler.set_epoch(epoch, start)
        self.run.loader_generator.manual_seed(int(self.cfg.seed) * 1_000_003 + epoch)
        if start == 0:
            self.stats.start_epoch()
            self.flushed_sums = np.zeros(3)
        self.train_net.train()
        bar = self.monitor.progress_bar(
            f"epoch {epoch + 1}/{self.options.epochs}", self.steps_per_epoch, start
        )
        window = Window(self.flushed_sums)
        batches = iter(self.run.loader)
        try:
            for step in range(start, self.steps_per_epoch):
                fetch_start = time.perf_counter()
                micro_batches = [next(batches) for _ in range(self.layout.accumulate_steps)]
                window.data_seconds += time.perf_counter() - fetch_start
                window.lr, window.margin = self._train_step(epoch, step, micro_batches)
                self.position = Position(epoch, step + 1, self.position.global_step + 1)
                bar.update(1)
                if step + 1 < self.steps_per_epoch and self._flush_due():
                    gathered = self._flush(window, bar)
                    window = Window(self.flushed_sums)
                    if self._step_save_due() or gathered.flags[0]:
                        self._save(gathered.epoch_rows())
        finally:
            bar.close()
        return self._finish_epoch(epoch, self._flush(window, bar))

    def _train_step(
        self, epoch: int, step: int, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[float, float]:
        """One optimizer step over this rank's micro-batches; returns its LR and margin."""
        lr, margin = self._set_schedule(epoch, step)
        if self.snapshot is not None:
            self.snapshot.take()
        self.run.optimizer.zero_grad(set_to_none=True)
        loss_sum, correct, bad = self._forward_backward(micro_batches)
        number, count = self.position.global_step + 1, self.layout.items_per_rank_step
        if self.options.skip_nonfinite and self._skip_if_bad(epoch, step, loss_sum / count, bad):
            self.stats.add_step(number, loss_sum, correct, count, torch.ones_like(bad))
            return lr, margin
        self._optimizer_step()
        self.stats.add_step(number, loss_sum, correct, count, bad)
        return lr, margin

    def _set_schedule(self, epoch: int, step: int) -> tuple[float, float]:
        t = training_position(epoch, step, self.steps_per_epoch)
        lr, margin = self.lr_schedule(t), self.options.margin_schedule(t)
        for group in self.run.optimizer.param_groups:
            group["lr"] = lr
        self.options.loss_fn.margin = margin
        return lr, margin

    def _forward_backward(
        self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Forward and backward passes of every micro-batch, the gradients summed (synchronised
        over the ranks at the last one). Returns the summed loss, the correct predictions and
        whether the loss or the gradients are not finite, all on the device."""
        device, parts = self.ctx.device, len(micro_batches)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        for i, (features, labels) in enumerate(micro_batches):
            features = features.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            defer_sync = self.ddp is not None and i + 1 < parts
            with self.ddp.no_sync() if defer_sync else contextlib.nullcontext():
                with self._autocast():
                    cosines = self.train_net(features)
                loss = self.options.loss_fn(cosines, labels)
                share = loss / parts if parts > 1 else loss
                (self.run.scaler.scale(share) if self.run.scaler is not None else share).backward()
            loss_sum += loss.detach().double() * len(labels)
            correct += (cosines.detach().argmax(dim=1) == labels).sum()
        bad = ~torch.isfinite(loss_sum)
        if self.run.scaler is None:  # with fp16 the scaler skips steps of overflowing gradients
            grads = [p.grad for p in self.run.net.parameters() if p.grad is not None]
            bad |= ~torch.isfinite(torch.nn.utils.get_total_norm(grads))
        return loss_sum, correct, bad

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.options.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.ctx.device.type, dtype=self.options.amp_dtype)

    def _optimizer_step(self) -> None:
        if self.run.scaler is not None:
            self.run.scaler.step(self.run.optimizer)
            self.run.scaler.update()
        else:
            self.run.optimizer.step()

    def _skip_if_bad(
        self, epoch: int, step: int, mean_loss: torch.Tensor, bad: torch.Tensor
    ) -> bool:
        """``trainer.skip_nonfinite``: if any rank's step is not finite, undo its traces (the
        batch-norm statistics; the optimizer has not stepped) on every rank and report it. One
        collective and one wait for the device per step."""
        rows = all_gather_tensor(self.ctx, torch.stack((bad.double(), mean_loss))).cpu()
        losses = {rank: float(row[1]) for rank, row in enumerate(rows) if row[0] > 0}
        if not losses:
            return False
        self.snapshot.restore()
        self.run.optimizer.zero_grad(set_to_none=True)
        if self.ctx.is_main:
            bad_step = self._bad_step(epoch, step, self.position.global_step + 1, losses, None)
            log.warning(skip_message(bad_step, self._describe_items))
        return True

    # ----------------------------------------------------------------------------- windows

    def _flush_due(self) -> bool:
        return (
            self.position.global_step % int(self.cfg.trainer.log_every_steps) == 0
            or self._step_save_due()
        )

    def _step_save_due(self) -> bool:
        every = int(self.cfg.trainer.save_every_steps)
        return every > 0 and self.position.global_step % every == 0

    def _time_save_due(self) -> bool:
        minutes = float(self.cfg.trainer.save_every_minutes)
        return minutes > 0 and time.monotonic() - self.last_save_time >= 60 * minutes

    def _flush(self, window: Window, bar: Any) -> GatheredStats:
        """Read every rank's statistics (the one wait for the device per window), stop on a
        non-finite step, and report the window."""
        time_due = self.ctx.is_main and self._time_save_due()
        gathered = gather_stats(self.ctx, self.stats, [float(time_due)])
        if not self.options.skip_nonfinite:
            self._stop_if_bad(gathered)
        self._log_window(window, gathered, bar)
        self.flushed_sums = gathered.sums
        return gathered

    def _stop_if_bad(self, gathered: GatheredStats) -> None:
        first = gathered.first_bad_step()
        if first is None:
            return
        rows = gathered.rows
        losses = {
            rank: float(row[FIRST_BAD_LOSS])
            for rank, row in enumerate(rows)
            if row[FIRST_BAD_STEP] == first
        }
        good = rows[rows[:, LAST_GOOD_STEP] >= 0]
        last = None
        if len(good):
            last_step = good[:, LAST_GOOD_STEP].max()
            at_last = good[good[:, LAST_GOOD_STEP] == last_step]
            last = (float(at_last[:, LAST_GOOD_LOSS].mean()), int(last_step))
        epoch = self.position.epoch
        iteration = first - 1 - (self.position.global_step - self.position.step)
        bad = self._bad_step(epoch, iteration, first, losses, last)
        checkpoint = str(self.last_checkpoint) if self.last_checkpoint else None
        raise NonFiniteLossError(stop_message(bad, self._describe_items, checkpoint))

    def _bad_step(
        self,
        epoch: int,
        iteration: int,
        number: int,
        losses: dict[int, float],
        last: tuple[float, int] | None,
    ) -> BadStep:
        lr = self.lr_schedule(training_position(epoch, iteration, self.steps_per_epoch))
        return BadStep(epoch, iteration, self.steps_per_epoch, number, lr, losses, last)

    def _describe_items(self, rank: int, iteration: int) -> str:
        """Utterance ids of a rank's items in an iteration of this epoch (the first few)."""
        items = self.run.sampler.step_items(rank, iteration)
        names = [self.run.dataset.index.utts[i] for i in items[:NAMED_ITEMS]]
        more = f" and {len(items) - NAMED_ITEMS} more" if len(items) > NAMED_ITEMS else ""
        return ", ".join(names) + more

    def _log_window(self, window: Window, gathered: GatheredStats, bar: Any) -> None:
        """Report the steps since the last report (all ranks' batches)."""
        if not self.ctx.is_main:
            return
        loss_sum, correct, count = (gathered.sums - window.epoch_sums).tolist()
        seconds = max(time.perf_counter() - window.started, 1e-9)
        loss = loss_sum / count if count else math.nan
        accuracy = correct / count if count else math.nan
        values = {
            "loss": loss,
            "accuracy": accuracy,
            "lr": window.lr,
            "margin": window.margin,
            "samples_per_second": count / seconds,
            "data_wait_fraction": window.data_seconds / seconds,
        }
        memory = ""
        if self.ctx.device.type == "cuda":
            values["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.ctx.device) / 2**30
            memory = f" peak memory {values['peak_memory_gib']:.1f} GiB"
        self.monitor.scalars(self.position.global_step, values)
        bar.set_postfix(
            {"loss": f"{loss:.3f}", "acc": f"{100 * accuracy:.1f}%", "lr": f"{window.lr:.2e}"},
            refresh=False,
        )
        log.info(
            "epoch %d iteration %d/%d: loss %.4f accuracy %.2f%% lr %.3g margin %.3f "
            "%.1f samples/s data wait %.1f%%%s",
            self.position.epoch + 1,
            self.position.step,
            self.steps_per_epoch,
            loss,
            100 * accuracy,
            window.lr,
            window.margin,
            values["samples_per_second"],
            100 * values["data_wait_fraction"],
            memory,
        )

    def _finish_epoch(self, epoch: int, gathered: GatheredStats) -> Path | None:
        """Epoch summary over all ranks, history, and the epoch-end checkpoint."""
        loss_sum, correct, count = gathered.sums.tolist()
        summary = {
            "epoch": epoch + 1,
            "loss": loss_sum / count if count else math.nan,
            "accuracy": correct / count if count else math.nan,
            "lr": self.lr_schedule(epoch + 1.0),
            "margin": self.options.margin_schedule(epoch + 1.0),
            "items": int(count),
            "skipped_batches": gathered.skipped,
        }
        self.history.append(summary)
        self.position = Position(epoch + 1, 0, self.position.global_step)
        log.info(
            "epoch %d/%d done: loss %.4f accuracy %.2f%% (%d batches skipped)",
            epoch + 1,
            self.options.epochs,
            summary["loss"],
            100 * summary["accuracy"],
            summary["skipped_batches"],
        )
        self.monitor.scalars(
            self.position.global_step, {k: summary[k] for k in ("loss", "accuracy")}, prefix="epoch"
        )
        every = int(self.cfg.trainer.save_every_epochs)
        if (
            epoch + 1 == self.options.epochs
            or self._step_save_due()
            or gathered.flags[0]
            or (every > 0 and (epoch + 1) % every == 0)
        ):
            return self._save([[0.0] * 4 for _ in range(self.ctx.world_size)])
        return None

    # ----------------------------------------------------------------------------- checkpoints

    def _save(self, epoch_rows: list[list[float]]) -> Path:
        """Checkpoint the current position (collective: every rank contributes its RNG state).
        ``epoch_rows``: every rank's epoch sums, as the last window gathered them."""
        rngs = all_gather(self.ctx, capture_rng_state(self.ctx.device))
        path = checkpoint_path(self.ckpt_dir, self.position.global_step)

        def write() -> None:
            if not self.ctx.is_main:
                return
            states = [{"rng": rng, "epoch_stats": rows} for rng, rows in zip(rngs, epoch_rows)]
            save_checkpoint(self._checkpoint_state(states), path)
            self.written.append(path)
            known = self.written + ([self.resumed_from] if self.resumed_from else [])
            prune_checkpoints(self.ckpt_dir, self.options.keep_last, known)
            write_json_atomic(self.run.exp_dir / "history.json", self.history)
            log.info("saved checkpoint %s", path)

        run_on_every_rank(self.ctx, write)
        self.last_checkpoint = path
        self.last_save_time = time.monotonic()
        return path

    def _checkpoint_state(self, rank_states: list[dict[str, Any]]) -> dict[str, Any]:
        pos, base = self.position, self.options.base_lr_schedule
        return training_state(
            self.run.identity,
            model=self.run.model,
            classifier=self.run.classifier,
            optimizer=self.run.optimizer,
            scaler=self.run.scaler,
            position=(pos.epoch, pos.step, pos.global_step),
            rank_states=rank_states,
            lr_factor=self.run.lr_factor,
            lr_schedule={"lr": base.lr, "min_lr": base.min_lr},
            history=self.history,
            config=OmegaConf.to_container(self.cfg, resolve=True),
        )


def compile_backend(setting: Any) -> str | None:
    """``trainer.compile``: false, true (inductor) or a torch.compile backend by name."""
    if setting is None or setting is False:
        return None
    if setting is True:
        return "inductor"
    if isinstance(setting, str) and setting in torch._dynamo.list_backends(exclude_tags=()):
        return setting
    raise ConfigError(
        f"trainer.compile={setting!r}: false, true or one of "
        f"{', '.join(torch._dynamo.list_backends(exclude_tags=()))}"
    )


def save_merged_config(cfg: DictConfig, exp_dir: Path) -> Path:
    """Write the merged, resolved config to ``<exp_dir>/config.yaml`` (atomic)."""
    return write_text_atomic(exp_dir / "config.yaml", OmegaConf.to_yaml(cfg))


def train(cfg: DictConfig, explicit_model_keys: Iterable[str] = ()) -> Path:
    """Run the experiment ``cfg`` (the merged Hydra config) on this rank; returns the final
    checkpoint. Joins the torchrun process group if there is one. ``explicit_model_keys``: the
    ``model`` keys given on the command line (see :func:`.finetune.resolve_model_spec`)."""
    cfg = builders.plain_config(cfg)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    cudnn = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    try:
        builders.configure_backends(cfg.trainer)
        ctx = init_distributed(
            cfg.trainer.device,
            float(cfg.trainer.dist_timeout_minutes),
            option="trainer.device",
            rendezvous_minutes=float(cfg.trainer.rendezvous_timeout_minutes),
            rendezvous_option="trainer.rendezvous_timeout_minutes",
        )
        monitor = TrainingMonitor(
            cfg.exp_dir, enabled=ctx.is_main, progress_bar=bool(cfg.trainer.progress_bar)
        )
        trainer = None
        try:
            with contextlib.ExitStack() as stack:
                run_on_every_rank(ctx, lambda: _lock_experiment(ctx, cfg, stack))
                trainer = Trainer.create(cfg, ctx, monitor, explicit_model_keys)
                return trainer.fit()
        finally:
            if trainer is not None:
                trainer.release_distributed()
            monitor.close()
            shutdown_distributed(ctx)
    finally:
        # Leave the process as it was (runs may follow each other in one process, as in tests).
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn


def _lock_experiment(ctx: DistContext, cfg: DictConfig, stack: contextlib.ExitStack) -> None:
    """Rank 0 holds the experiment folder for the run: a second run there stops at once."""
    if ctx.is_main:
        exp_dir = Path(cfg.exp_dir)
        stack.enter_context(
            exclusive_lock(
                exp_dir / LOCK_FILE,
                what=f"the experiment folder {exp_dir}",
                wait_seconds=LOCK_WAIT_SECONDS,
            )
        )
