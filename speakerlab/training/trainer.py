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

from speakerlab.data.dataset import TrainDataset, build_train_dataset
from speakerlab.data.index import build_train_index
from speakerlab.distributed import (
    DistContext,
    all_gather,
    all_gather_tensor,
    init_distributed,
    read_rank_env,
    run_on_every_rank,
    shutdown_distributed,
)
from speakerlab.errors import ConfigError
from speakerlab.fileio import exclusive_lock, write_json_atomic, write_text_atomic
from speakerlab.models import count_parameters
from speakerlab.models.checkpoint import load_state_into
from speakerlab.training import builders
from speakerlab.training.batching import MicroBatchSampler, batch_layout
from speakerlab.training.checkpointing import (
    RunIdentity,
    capture_rng_state,
    check_resumable,
    checkpoint_dir,
    checkpoint_path,
    data_digest,
    list_checkpoints,
    load_latest_checkpoint,
    prune_checkpoints,
    restore_rng_state,
    save_checkpoint,
    saved_layout,
    training_state,
)
from speakerlab.training.finetune import (
    InitSource,
    apply_init_source,
    classifier_width,
    read_init_source,
    resolve_model_spec,
)
from speakerlab.training.losses import CosineClassifier, SpeakerClassifierNet
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
    """One training run on one rank. Build it with :meth:`create`, then call :meth:`fit`."""

    def __init__(
        self, cfg: DictConfig, ctx: DistContext, monitor: TrainingMonitor, explicit: set[str]
    ) -> None:
        self.cfg, self.ctx, self.monitor = cfg, ctx, monitor
        self.explicit_model_keys = explicit
        trainer = cfg.trainer
        self.exp_dir = Path(cfg.exp_dir)
        self.ckpt_dir = checkpoint_dir(self.exp_dir)
        self.epochs = int(trainer.epochs)
        if self.epochs < 1:
            raise ConfigError(f"trainer.epochs={self.epochs} must be at least 1")
        if int(trainer.keep_last) < 1:
            raise ConfigError(f"trainer.keep_last={trainer.keep_last} must be at least 1")
        self.layout = batch_layout(
            int(trainer.batch_size), ctx.world_size, int(trainer.accumulate_steps)
        )
        self.amp_dtype = builders.autocast_dtype(trainer.precision, ctx.device)
        self.skip_nonfinite = bool(trainer.skip_nonfinite)
        self.margin_schedule = builders.margin_schedule(cfg.loss)
        self.loss_fn = builders.build_loss(cfg.loss)
        self.base_lr_schedule = builders.base_lr_schedule(cfg.optim, self.epochs, self.layout)
        self.index_path = builders.index_path(cfg)
        self.position = Position()
        self.history: list[dict[str, float]] = []
        self.resumed_from: Path | None = None
        self.written: list[Path] = []  # checkpoints this run wrote (the ones pruning counts)
        self.last_checkpoint: Path | None = None
        self.stats = RunningStats(ctx.device)
        self.flushed_sums = np.zeros(3)
        self.ddp: DistributedDataParallel | None = None

    @classmethod
    def create(
        cls,
        cfg: DictConfig,
        ctx: DistContext,
        monitor: TrainingMonitor,
        explicit_model_keys: Iterable[str] = (),
    ) -> Trainer:
        """Validate the config and build data, model and optimizer, resuming when a checkpoint
        exists. Failures on any rank stop every rank with one message."""
        explicit = set(explicit_model_keys)
        trainer = run_on_every_rank(ctx, lambda: cls(cfg, ctx, monitor, explicit))
        run_on_every_rank(ctx, trainer._prepare_index)
        run_on_every_rank(ctx, trainer._build)
        sources = set(all_gather(ctx, str(trainer.resumed_from)))
        if len(sources) > 1:
            raise ConfigError(f"the ranks resumed from different checkpoints: {sorted(sources)}")
        if ctx.is_main:
            log.info("merged configuration saved to %s", save_merged_config(cfg, trainer.exp_dir))
        trainer._wrap()
        return trainer

    # ----------------------------------------------------------------------------- set-up

    def _prepare_index(self) -> None:
        """Build (or reuse) the training index on rank 0 (exp_dir is shared by all nodes: every
        rank reads the index, and the checkpoints rank 0 writes, from there)."""
        if self.ctx.is_main:
            data = self.cfg.data
            build_train_index(
                data.train_dir,
                self.index_path,
                segment_seconds=float(data.segment_seconds),
                max_bad_fraction=float(data.max_bad_fraction),
            )

    def _build(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        builders.seed_everything(int(cfg.seed))
        self.dataset: TrainDataset = build_train_dataset(
            cfg.data, self.index_path, seed=int(cfg.seed)
        )
        self._build_data()
        if not cfg.trainer.resume and list_checkpoints(self.ckpt_dir):
            raise ConfigError(
                f"{self.ckpt_dir} holds checkpoints of an earlier run and "
                "trainer.resume=false; use a new exp_dir (or remove them)"
            )
        resume = None
        if cfg.trainer.resume:
            resume = load_latest_checkpoint(self.ckpt_dir, move_bad_aside=ctx.is_main)
        init = read_init_source(cfg.trainer.init_from) if resume is None and self._init else None
        self.identity = self._run_identity(resume, init)
        name, kwargs = self.identity.model_name, self.identity.model_kwargs
        self.model = builders.build_embedding_model(name, kwargs)
        width = self.identity.classifier_width
        self.classifier = CosineClassifier(int(kwargs["embedding_size"]), width)
        self.net = SpeakerClassifierNet(self.model, self.classifier).to(ctx.device)
        if cfg.trainer.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.optimizer = builders.build_optimizer(self.net.parameters(), cfg.optim, 0.0)
        self.scaler = (
            torch.amp.GradScaler(ctx.device.type) if self.amp_dtype == torch.float16 else None
        )
        self.snapshot = BufferSnapshot(self.net) if self.skip_nonfinite else None
        lr_factor = self._restore(*resume) if resume is not None else self._start(init)
        self.lr_factor = lr_factor
        self.lr_schedule = self.base_lr_schedule.scaled(lr_factor)

    @property
    def _init(self) -> bool:
        return bool(self.cfg.trainer.init_from)

    def _build_data(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        self.sampler = MicroBatchSampler(
            len(self.dataset), self.layout, ctx.rank, seed=int(cfg.seed)
        )
        self.steps_per_epoch = self.sampler.steps
        if cfg.trainer.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, int(cfg.trainer.max_steps_per_epoch))
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"{self.index_path}: {len(self.dataset)} training items give no full global "
                f"batch of {self.layout.describe()}; lower trainer.batch_size"
            )
        self.loader, self.loader_generator = builders.build_loader(
            self.dataset,
            self.sampler,
            self.layout.micro_batch,
            cfg.data,
            ctx.device,
            read_rank_env().local_world_size,
        )

    def _run_identity(
        self, resume: tuple[Path, dict[str, Any]] | None, init: InitSource | None
    ) -> RunIdentity:
        """What this configuration trains: the architecture (from the checkpoint the run starts
        or resumed from when it began with init_from), classifier width, data and batch."""
        cfg = self.cfg
        source, source_path = None, None
        if resume is not None and self._init:
            source_path, state = resume
            source = (state["model_name"], state["model_kwargs"])
        elif init is not None:
            source, source_path = init.architecture(), init.path
        name, kwargs = resolve_model_spec(
            builders.model_spec(cfg.model), source, source_path, self.explicit_model_keys
        )
        if int(kwargs.get("feat_dim", cfg.data.num_mel_bins)) != int(cfg.data.num_mel_bins):
            raise ConfigError(
                f"the {name} model reads {kwargs['feat_dim']}-bin fbank (feat_dim) but "
                f"data.num_mel_bins={cfg.data.num_mel_bins}"
            )
        cfg.model = OmegaConf.create({"name": name, **kwargs})  # saved with the run
        setting, data_classes = cfg.loss.num_classes, self.dataset.num_classes
        if resume is not None and setting == "init":  # the run's width came from init_from
            width = int(resume[1]["classifier"]["weight"].shape[0])
        else:
            width = classifier_width(setting, data_classes, init)
        index = self.dataset.index
        return RunIdentity(
            model_name=name,
            model_kwargs=kwargs,
            classifier_width=width,
            data_items=len(self.dataset),
            data_digest=data_digest(index.utts, index.speaker_ids, index.num_samples),
            seed=int(cfg.seed),
            layout=self.layout,
        )

    def _start(self, init: InitSource | None) -> float:
        """A new run: initial weights from ``init`` if given; returns the LR factor."""
        if init is not None:
            apply_init_source(init, self.identity.model_name, self.model, self.classifier)
        factor = self.cfg.optim.lr_factor
        return self._checked_lr_factor(1.0 if factor is None else float(factor), 1.0)

    def _restore(self, path: Path, state: dict[str, Any]) -> float:
        """Continue the run saved in ``state`` exactly where it stopped; returns the LR factor."""
        check_resumable(path, state, self.identity)
        load_state_into(self.model, state["model"], path)
        load_state_into(self.classifier, state["classifier"], path)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.position = Position(int(state["epoch"]), int(state["step"]), int(state["global_step"]))
        self.history = list(state.get("history", []))
        self.resumed_from = self.last_checkpoint = path
        self._restore_rank_state(path, state)
        self._check_schedule(state)
        saved = state.get("lr_factor", 1.0)
        factor = self.cfg.optim.lr_factor
        return self._checked_lr_factor(saved if factor is None else float(factor), saved)

    def _restore_rank_state(self, path: Path, state: dict[str, Any]) -> None:
        """Epoch statistics and random states: per rank when the process count is the same;
        otherwise the statistics move to rank 0 (they are summed over ranks anyway)."""
        layout, rank_states = saved_layout(state), state["rank_states"]
        epoch_rows = np.array([s["epoch_stats"] for s in rank_states], dtype=np.float64)
        if layout != self.layout:
            log.warning(
                "%s was saved with a global batch of %s; continuing with %s: the same items per "
                "step, in the same order (batch-norm statistics over micro-batches of %d)",
                path,
                layout.describe(),
                self.layout.describe(),
                self.layout.micro_batch,
            )
        if layout.world_size == self.ctx.world_size:
            restore_rng_state(rank_states[self.ctx.rank]["rng"], self.ctx.device)
            mine = epoch_rows[self.ctx.rank]
        else:
            mine = epoch_rows.sum(axis=0) if self.ctx.is_main else np.zeros(epoch_rows.shape[1])
        mine[3] = epoch_rows[0, 3]  # skipped steps: every rank counts the same
        self.stats.start_epoch(mine.tolist())
        self.flushed_sums = epoch_rows[:, :3].sum(axis=0)

    def _check_schedule(self, state: dict[str, Any]) -> None:
        saved = state.get("lr_schedule")
        now = {"lr": self.base_lr_schedule.lr, "min_lr": self.base_lr_schedule.min_lr}
        if saved and not all(math.isclose(saved[k], now[k], rel_tol=1e-9) for k in now):
            log.warning(
                "the learning-rate schedule changed since the run started (peak %.4g -> %.4g, "
                "final %.4g -> %.4g); to lower the learning rate of a run use optim.lr_factor",
                saved["lr"],
                now["lr"],
                saved["min_lr"],
                now["min_lr"],
            )

    def _checked_lr_factor(self, factor: float, previous: float) -> float:
        if not factor > 0:
            raise ConfigError(f"optim.lr_factor={factor} must be positive")
        if factor != 1.0 or previous != 1.0:
            log.info(
                "learning-rate factor %g (optim.lr_factor; it was %g): peak %.4g, final %.4g",
                factor,
                previous,
                self.base_lr_schedule.lr * factor,
                self.base_lr_schedule.min_lr * factor,
            )
        return factor

    def _wrap(self) -> None:
        """torch.compile (``trainer.compile``), then DDP over model and classifier together
        (after loading, as DDP broadcasts rank 0's weights)."""
        net: torch.nn.Module = self.net
        if self.cfg.trainer.compile:
            net = torch.compile(net)
        if self.ctx.distributed:
            device_ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(net, device_ids=device_ids)
            net = self.ddp
        self.train_net = net

    def release_distributed(self) -> None:
        """Drop the DDP wrapper, so that the process group is freed by ``destroy_process_group``.

        If DDP's C++ reducer held the last reference, the group would be destroyed whenever the
        trainer is (e.g. with an error's traceback), holding the GIL while it joins gloo threads
        that may still need the GIL to free the tensors of the last collective: a deadlock.
        """
        self.train_net, self.ddp = self.net, None
        gc.collect()  # DDP sits in reference cycles: without a collection it would linger

    # ----------------------------------------------------------------------------- training

    def fit(self) -> Path:
        """Train to the last epoch; returns the final checkpoint."""
        if self.cfg.trainer.tensorboard:
            self.monitor.start_tensorboard(purge_step=self.position.global_step)
        self._log_start()
        self.last_save_time = time.monotonic()
        final = None
        while self.position.epoch < self.epochs:
            final = self._train_epoch()
        if final is None:
            log.info("training was already complete (%d epochs)", self.epochs)
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
            self.exp_dir,
            self.identity.model_name,
            self.identity.model_kwargs,
            count_parameters(self.model),
            self.classifier.num_classes,
            len(self.dataset),
            self.steps_per_epoch,
            self.epochs,
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
        self.dataset.set_epoch(epoch)
        self.sampler.set_epoch(epoch, start)
        self.loader_generator.manual_seed(int(self.cfg.seed) * 1_000_003 + epoch)
        if start == 0:
            self.stats.start_epoch()
            self.flushed_sums = np.zeros(3)
        self.train_net.train()
        bar = self.monitor.progress_bar(
            f"epoch {epoch + 1}/{self.epochs}", self.steps_per_epoch, start
        )
        window = Window(self.flushed_sums)
        batches = iter(self.loader)
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
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum, correct, bad = self._forward_backward(micro_batches)
        number, count = self.position.global_step + 1, self.layout.items_per_rank_step
        if self.skip_nonfinite and self._skip_if_bad(epoch, step, loss_sum / count, bad):
            self.stats.add_step(number, loss_sum, correct, count, torch.ones_like(bad))
            return lr, margin
        self._optimizer_step()
        self.stats.add_step(number, loss_sum, correct, count, bad)
        return lr, margin

    def _set_schedule(self, epoch: int, step: int) -> tuple[float, float]:
        t = training_position(epoch, step, self.steps_per_epoch)
        lr, margin = self.lr_schedule(t), self.margin_schedule(t)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.loss_fn.margin = margin
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
                loss = self.loss_fn(cosines, labels)
                share = loss / parts if parts > 1 else loss
                (self.scaler.scale(share) if self.scaler is not None else share).backward()
            loss_sum += loss.detach().double() * len(labels)
            correct += (cosines.detach().argmax(dim=1) == labels).sum()
        bad = ~torch.isfinite(loss_sum)
        if self.scaler is None:  # with fp16 the scaler skips steps of overflowing gradients
            grads = [p.grad for p in self.net.parameters() if p.grad is not None]
            bad |= ~torch.isfinite(torch.nn.utils.get_total_norm(grads))
        return loss_sum, correct, bad

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.ctx.device.type, dtype=self.amp_dtype)

    def _optimizer_step(self) -> None:
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

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
        self.optimizer.zero_grad(set_to_none=True)
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
        if not self.skip_nonfinite:
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
        items = self.sampler.step_items(rank, iteration)
        names = [self.dataset.index.utts[i] for i in items[:NAMED_ITEMS]]
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
        self.monitor.scalars(self.position.global_step, values)
        bar.set_postfix(
            {"loss": f"{loss:.3f}", "acc": f"{100 * accuracy:.1f}%", "lr": f"{window.lr:.2e}"},
            refresh=False,
        )
        log.info(
            "epoch %d iteration %d/%d: loss %.4f accuracy %.2f%% lr %.3g margin %.3f "
            "%.1f samples/s data wait %.1f%%",
            self.position.epoch + 1,
            self.position.step,
            self.steps_per_epoch,
            loss,
            100 * accuracy,
            window.lr,
            window.margin,
            values["samples_per_second"],
            100 * values["data_wait_fraction"],
        )

    def _finish_epoch(self, epoch: int, gathered: GatheredStats) -> Path | None:
        """Epoch summary over all ranks, history, and the epoch-end checkpoint."""
        loss_sum, correct, count = gathered.sums.tolist()
        summary = {
            "epoch": epoch + 1,
            "loss": loss_sum / count if count else math.nan,
            "accuracy": correct / count if count else math.nan,
            "lr": self.lr_schedule(epoch + 1.0),
            "margin": self.margin_schedule(epoch + 1.0),
            "items": int(count),
            "skipped_batches": gathered.skipped,
        }
        self.history.append(summary)
        self.position = Position(epoch + 1, 0, self.position.global_step)
        log.info(
            "epoch %d/%d done: loss %.4f accuracy %.2f%% (%d batches skipped)",
            epoch + 1,
            self.epochs,
            summary["loss"],
            100 * summary["accuracy"],
            summary["skipped_batches"],
        )
        self.monitor.scalars(
            self.position.global_step, {k: summary[k] for k in ("loss", "accuracy")}, prefix="epoch"
        )
        every = int(self.cfg.trainer.save_every_epochs)
        if (
            epoch + 1 == self.epochs
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
            prune_checkpoints(self.ckpt_dir, int(self.cfg.trainer.keep_last), known)
            write_json_atomic(self.exp_dir / "history.json", self.history)
            log.info("saved checkpoint %s", path)

        run_on_every_rank(self.ctx, write)
        self.last_checkpoint = path
        self.last_save_time = time.monotonic()
        return path

    def _checkpoint_state(self, rank_states: list[dict[str, Any]]) -> dict[str, Any]:
        pos = self.position
        return training_state(
            self.identity,
            model=self.model,
            classifier=self.classifier,
            optimizer=self.optimizer,
            scaler=self.scaler,
            position=(pos.epoch, pos.step, pos.global_step),
            rank_states=rank_states,
            lr_factor=self.lr_factor,
            lr_schedule={"lr": self.base_lr_schedule.lr, "min_lr": self.base_lr_schedule.min_lr},
            history=self.history,
            config=OmegaConf.to_container(self.cfg, resolve=True),
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
