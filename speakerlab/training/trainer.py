"""The training loop: one experiment from its merged Hydra config to its final checkpoint.

Each iteration sets the learning rate and the AAM margin from the position ``epoch + step /
steps_per_epoch``, runs the embedding model and cosine classifier (under autocast if asked),
checks that the loss is finite on every rank, and takes an optimizer step (SGD or AdamW, the
``optim`` group). Checkpoints are taken at iteration boundaries (every N epochs, every M minutes,
every S iterations; always at the end) and hold everything the run depends on, so a run killed at
any moment and started again with the same command continues exactly where its newest checkpoint
left it:

* the data order is a pure function of (seed, epoch) and the sampler skips the batches consumed;
* data augmentation of item ``i`` depends only on (seed, epoch, i), whatever the worker count;
* LR and margin are functions of the position; optimizer, gradient scaler, model and classifier
  states, the random-number generators of every rank and the running epoch statistics are saved.

A deterministic CPU run (``trainer.deterministic=true``, fixed ``trainer.num_threads``) therefore
ends with the same weights whether or not it was interrupted.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from speakerlab.data.dataset import TrainDataset, build_train_dataset, init_data_worker
from speakerlab.data.index import build_train_index
from speakerlab.data.sampler import DistributedResumableSampler
from speakerlab.distributed import (
    DistContext,
    EveryRankError,
    all_gather,
    all_reduce_max,
    all_reduce_sum,
    init_distributed,
    local_batch_size,
    run_on_every_rank,
    shutdown_distributed,
)
from speakerlab.errors import CheckpointError, ConfigError
from speakerlab.fileio import write_json_atomic, write_text_atomic
from speakerlab.models import build_model
from speakerlab.models.checkpoint import load_state_into
from speakerlab.training.checkpointing import (
    FORMAT_VERSION,
    capture_rng_state,
    checkpoint_dir,
    checkpoint_path,
    list_checkpoints,
    load_latest_checkpoint,
    prune_checkpoints,
    restore_rng_state,
    save_checkpoint,
)
from speakerlab.training.finetune import apply_init_source, classifier_width, read_init_source
from speakerlab.training.losses import CosineClassifier, MarginSoftmaxLoss, SpeakerClassifierNet
from speakerlab.training.progress import TrainingMonitor
from speakerlab.training.schedules import MarginSchedule, WarmupCosineLR, training_position

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Items of a bad batch named in the non-finite-loss message.
_NAMED_ITEMS = 8


class NonFiniteLossError(EveryRankError):
    """The loss became NaN or infinite (every rank learns of it and stops together)."""


@dataclass
class Position:
    """Where training stands: the next batch to train is batch ``step`` of ``epoch`` (from 0)."""

    epoch: int = 0
    step: int = 0
    global_step: int = 0


@dataclass
class EpochStats:
    """Running sums of one rank over the current epoch."""

    loss_sum: float = 0.0
    correct: int = 0
    count: int = 0
    skipped: int = 0

    def as_list(self) -> list[float]:
        return [self.loss_sum, float(self.correct), float(self.count), float(self.skipped)]

    @classmethod
    def from_list(cls, values: list[float]) -> EpochStats:
        loss_sum, correct, count, skipped = values
        return cls(float(loss_sum), int(correct), int(count), int(skipped))


def plain_config(cfg: DictConfig) -> DictConfig:
    """``cfg`` with every interpolation resolved; a missing mandatory value is a ConfigError."""
    try:
        return OmegaConf.create(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True))
    except MissingMandatoryValue as err:
        raise ConfigError(
            f"{err.full_key} must be set (add {err.full_key}=... to the command)"
        ) from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"invalid configuration: {err}") from None


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``trainer.precision``; fp16 needs a GPU (bf16 also runs on CPU)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision={precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("trainer.precision=fp16 needs a GPU; use bf16 or fp32 on CPU")
    return PRECISIONS[precision]


def model_spec(model_cfg: DictConfig) -> tuple[str, dict[str, Any]]:
    """Model name and constructor kwargs (plain Python values) from the ``model`` group."""
    spec = OmegaConf.to_container(model_cfg, resolve=True)
    name = spec.pop("name")
    return name, spec


OPTIMIZERS = ("sgd", "adamw")


def build_optimizer(
    parameters: Iterable[torch.nn.Parameter], optim_cfg: DictConfig, lr: float
) -> torch.optim.Optimizer:
    """The optimizer of the ``optim`` group (conf/optim/): SGD with momentum, or AdamW."""
    name = optim_cfg.get("name", "sgd")
    if name == "sgd":
        return torch.optim.SGD(
            parameters,
            lr=lr,
            momentum=float(optim_cfg.momentum),
            nesterov=bool(optim_cfg.nesterov),
            weight_decay=float(optim_cfg.weight_decay),
        )
    if name == "adamw":
        return torch.optim.AdamW(
            parameters,
            lr=lr,
            betas=tuple(float(b) for b in optim_cfg.betas),
            weight_decay=float(optim_cfg.weight_decay),
        )
    raise ConfigError(f"optim.name={name!r}: choose one of {', '.join(OPTIMIZERS)}")


def build_embedding_model(name: str, kwargs: dict[str, Any]) -> torch.nn.Module:
    """``build_model`` with bad options reported as a ConfigError."""
    try:
        return build_model(name, **kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model.name={name} with {kwargs}: {err}") from None


def configure_determinism(deterministic: bool, num_threads: int | None) -> None:
    """Deterministic kernels and a fixed CPU thread count, as the config asks."""
    if num_threads:
        torch.set_num_threads(int(num_threads))
    if deterministic:
        # cuBLAS needs a fixed workspace to be deterministic; set before the first CUDA matmul.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and Python's generators (the model starts identical on all ranks)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


class Trainer:
    """One training run on one rank. Build it with :meth:`create`, then call :meth:`fit`."""

    def __init__(self, cfg: DictConfig, ctx: DistContext, monitor: TrainingMonitor) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.monitor = monitor
        self.exp_dir = Path(cfg.exp_dir)
        self.ckpt_dir = checkpoint_dir(self.exp_dir)
        self.epochs = int(cfg.trainer.epochs)
        if self.epochs < 1:
            raise ConfigError(f"trainer.epochs={self.epochs} must be at least 1")
        self.local_batch = local_batch_size(int(cfg.trainer.batch_size), ctx.world_size)
        self.amp_dtype = autocast_dtype(cfg.trainer.precision, ctx.device)
        if int(cfg.trainer.keep_last) < 1:
            raise ConfigError(f"trainer.keep_last={cfg.trainer.keep_last} must be at least 1")
        self.lr_schedule = WarmupCosineLR(
            float(cfg.optim.lr),
            float(cfg.optim.min_lr),
            float(cfg.optim.warmup_epochs),
            float(self.epochs),
        )
        margin = cfg.loss.margin
        self.margin_schedule = MarginSchedule(
            float(margin.initial),
            float(margin.final),
            float(margin.increase_start_epoch),
            float(margin.fix_epoch),
        )
        self.loss_fn = MarginSoftmaxLoss(
            cfg.loss.margin_type, float(cfg.loss.scale), easy_margin=bool(cfg.loss.easy_margin)
        )
        self.model_name, self.model_kwargs = model_spec(cfg.model)
        if "embedding_size" not in self.model_kwargs:
            raise ConfigError("model.embedding_size must be set (the classifier's input width)")
        self.position = Position()
        self.stats = EpochStats()
        self.history: list[dict[str, float]] = []
        self.resumed_from: Path | None = None
        self.epoch_end_save_due = False
        self.index_path = (
            Path(cfg.data.index) if cfg.data.index else self.exp_dir / "train_index.tsv"
        )

    @classmethod
    def create(cls, cfg: DictConfig, ctx: DistContext, monitor: TrainingMonitor) -> Trainer:
        """Validate the config and build data, model and optimizer, resuming when a checkpoint
        exists. Failures on any rank stop every rank with one message."""
        trainer = run_on_every_rank(ctx, lambda: cls(cfg, ctx, monitor))
        if ctx.is_main:
            log.info("merged configuration saved to %s", save_merged_config(cfg, trainer.exp_dir))
        run_on_every_rank(ctx, trainer._prepare_index)
        run_on_every_rank(ctx, trainer._build)
        trainer._wrap_for_distributed()
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
        seed_everything(int(cfg.seed))
        self.dataset: TrainDataset = build_train_dataset(
            cfg.data, self.index_path, seed=int(cfg.seed)
        )
        self.sampler = DistributedResumableSampler(
            len(self.dataset),
            num_replicas=ctx.world_size,
            rank=ctx.rank,
            seed=int(cfg.seed),
            shuffle=True,
            drop_last=True,
        )
        self.sampler.set_epoch(0)
        self.steps_per_epoch = len(self.sampler) // self.local_batch
        if cfg.trainer.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, int(cfg.trainer.max_steps_per_epoch))
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"{self.index_path}: {len(self.dataset)} training items give no full batch of "
                f"{self.local_batch} per process (trainer.batch_size={cfg.trainer.batch_size} over "
                f"{ctx.world_size} processes); lower trainer.batch_size"
            )
        workers = int(cfg.data.num_workers)
        self.loader_generator = torch.Generator()
        self.loader = DataLoader(
            self.dataset,
            batch_size=self.local_batch,
            sampler=self.sampler,
            num_workers=workers,
            drop_last=True,
            pin_memory=ctx.device.type == "cuda",
            prefetch_factor=int(cfg.data.prefetch_factor) if workers > 0 else None,
            # The dataset's epoch lives in shared memory, so workers can outlive an epoch.
            persistent_workers=workers > 0,
            worker_init_fn=init_data_worker,
            # The loader draws its worker seeds from its own generator, not the global one.
            generator=self.loader_generator,
        )

        self.model = build_embedding_model(self.model_name, self.model_kwargs)
        if not cfg.trainer.resume and list_checkpoints(self.ckpt_dir):
            raise ConfigError(
                f"{self.ckpt_dir} holds checkpoints of an earlier run and "
                "trainer.resume=false; use a new exp_dir (or remove them)"
            )
        resume = load_latest_checkpoint(self.ckpt_dir) if cfg.trainer.resume else None
        init = None
        if resume is None and cfg.trainer.init_from:
            init = read_init_source(cfg.trainer.init_from)
        if resume is not None:
            width = self._resumed_classifier_width(*resume)
        else:
            width = classifier_width(cfg.loss.num_classes, self.dataset.num_classes, init)
        self.classifier = CosineClassifier(int(self.model_kwargs["embedding_size"]), width)
        self.net = SpeakerClassifierNet(self.model, self.classifier).to(ctx.device)
        self.optimizer = build_optimizer(self.net.parameters(), cfg.optim, self.lr_schedule(0.0))
        self.scaler = (
            torch.amp.GradScaler(ctx.device.type) if self.amp_dtype == torch.float16 else None
        )

        if resume is not None:
            self._restore(*resume)
        elif init is not None:
            apply_init_source(init, self.model_name, self.model, self.classifier)

    def _resumed_classifier_width(self, path: Path, state: dict[str, Any]) -> int:
        """Classifier width of the checkpoint resumed from, checked against this run's data."""
        width = int(state["classifier"]["weight"].shape[0])
        setting = self.cfg.loss.num_classes
        expected = self.dataset.num_classes if setting == "auto" else setting
        if isinstance(expected, int) and width != expected:
            raise CheckpointError(
                f"{path}: the run in {self.exp_dir} has a {width}-class classifier but this "
                f"configuration needs {expected}; the data or loss.num_classes changed since it "
                "started; use a new exp_dir"
            )
        return classifier_width(width, self.dataset.num_classes, None)

    def _restore(self, path: Path, state: dict[str, Any]) -> None:
        """Continue the run saved in ``state`` exactly where it stopped."""
        if state.get("model_name") != self.model_name:
            raise CheckpointError(
                f"{path}: holds a {state.get('model_name')} run but model.name is "
                f"{self.model_name}; use a new exp_dir"
            )
        load_state_into(self.model, state["model"], path)
        load_state_into(self.classifier, state["classifier"], path)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.position = Position(int(state["epoch"]), int(state["step"]), int(state["global_step"]))
        self.history = list(state.get("history", []))
        sampler = state["sampler"]
        same_layout = (
            sampler["world_size"] == self.ctx.world_size
            and sampler["local_batch"] == self.local_batch
        )
        if self.position.step > 0 and sampler["dataset_size"] != len(self.dataset):
            raise CheckpointError(
                f"{path}: saved in the middle of epoch {self.position.epoch + 1} of a "
                f"{sampler['dataset_size']}-item training index, but {self.index_path} now has "
                f"{len(self.dataset)} items; the data changed since the run started"
            )
        if self.position.step > 0 and not same_layout:
            raise CheckpointError(
                f"{path}: saved in the middle of epoch {self.position.epoch + 1} by "
                f"{sampler['world_size']} processes with {sampler['local_batch']} items each; "
                f"resume it with the same process count and trainer.batch_size (now "
                f"{self.ctx.world_size} x {self.local_batch})"
            )
        if same_layout:
            rank_state = state["rank_states"][self.ctx.rank]
            restore_rng_state(rank_state["rng"], self.ctx.device)
            self.stats = EpochStats.from_list(rank_state["epoch_stats"])
        else:
            log.warning(
                "%s was saved by %d processes, this run has %d: random-number states are "
                "not restored",
                path,
                sampler["world_size"],
                self.ctx.world_size,
            )
        self.resumed_from = path

    def _wrap_for_distributed(self) -> None:
        """DDP over model and classifier together (after loading, as DDP broadcasts rank 0's)."""
        self.train_net: torch.nn.Module = self.net
        if self.ctx.distributed:
            device_ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
            self.train_net = DistributedDataParallel(self.net, device_ids=device_ids)

    def release_distributed(self) -> None:
        """Drop the DDP wrapper, so that the process group is freed by ``destroy_process_group``.

        If DDP's C++ reducer held the last reference, the group would be destroyed whenever the
        trainer is (e.g. with an error's traceback), holding the GIL while it joins gloo threads
        that may still need the GIL to free the tensors of the last collective: a deadlock.
        """
        self.train_net = self.net
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
        params = sum(p.numel() for p in self.model.parameters())
        log.info(
            "experiment %s: %s %s (%d parameters), %d classes, %d items, %d iterations per "
            "epoch, %d epochs",
            self.exp_dir,
            self.model_name,
            self.model_kwargs,
            params,
            self.classifier.num_classes,
            len(self.dataset),
            self.steps_per_epoch,
            self.epochs,
        )
        log.info(
            "%d process(es) on %s (%s), %d items per process, precision %s",
            ctx.world_size,
            ctx.device,
            ctx.backend or "no process group",
            self.local_batch,
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
        self.sampler.set_epoch(epoch, start=start * self.local_batch)
        self.loader_generator.manual_seed(int(self.cfg.seed) * 1_000_003 + epoch)
        # This rank's remaining items in order, to name the items of a bad batch.
        self.epoch_items = list(self.sampler)
        self.epoch_start_step = start
        self.train_net.train()
        self.epoch_end_save_due = False
        bar = self.monitor.progress_bar(
            f"epoch {epoch + 1}/{self.epochs}", self.steps_per_epoch, start
        )
        window = _Window()
        batches = iter(self.loader)
        try:
            for step in range(start, self.steps_per_epoch):
                fetch_start = time.perf_counter()
                features, labels = next(batches)
                window.data_seconds += time.perf_counter() - fetch_start
                saved_mid_epoch = self._train_step(epoch, step, features, labels, window)
                window.seconds += time.perf_counter() - fetch_start
                bar.update(1)
                if window.steps and (
                    self.position.global_step % int(self.cfg.trainer.log_every_steps) == 0
                    or saved_mid_epoch
                ):
                    self._log_window(window, bar)
                    window = _Window()
        finally:
            bar.close()
        if window.steps:
            self._log_window(window, bar)
        return self._finish_epoch(epoch)

    def _train_step(
        self, epoch: int, step: int, features: torch.Tensor, labels: torch.Tensor, window: _Window
    ) -> bool:
        """One iteration; returns whether a mid-epoch checkpoint was written after it."""
        ctx, cfg = self.ctx, self.cfg
        t = training_position(epoch, step, self.steps_per_epoch)
        lr, margin = self.lr_schedule(t), self.margin_schedule(t)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.loss_fn.margin = margin
        features = features.to(ctx.device, non_blocking=True)
        labels = labels.to(ctx.device, non_blocking=True)

        autocast = (
            torch.autocast(ctx.device.type, dtype=self.amp_dtype)
            if self.amp_dtype is not None
            else contextlib.nullcontext()
        )
        with autocast:
            cosines = self.train_net(features)
        loss = self.loss_fn(cosines, labels)

        time_due = (
            ctx.is_main
            and float(cfg.trainer.save_every_minutes) > 0
            and time.monotonic() - self.last_save_time >= 60 * float(cfg.trainer.save_every_minutes)
        )
        local_bad = not bool(torch.isfinite(loss))
        any_bad, time_due = all_reduce_max(ctx, [float(local_bad), float(time_due)])
        self.optimizer.zero_grad(set_to_none=True)
        if any_bad:
            self._handle_nonfinite(epoch, step, float(loss.detach()) if local_bad else None)
        else:
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                loss.backward()
                self.optimizer.step()
            loss_value = float(loss.detach())
            correct = int((cosines.detach().argmax(dim=1) == labels).sum())
            self.stats.loss_sum += loss_value * len(labels)
            self.stats.correct += correct
            self.stats.count += len(labels)
            window.add(loss_value * len(labels), correct, len(labels))
        window.steps += 1
        window.lr, window.margin = lr, margin

        self.position = Position(epoch, step + 1, self.position.global_step + 1)
        every_steps = int(cfg.trainer.save_every_steps)
        step_due = every_steps > 0 and self.position.global_step % every_steps == 0
        if step + 1 < self.steps_per_epoch and (step_due or time_due):
            self._save()
            return True
        self.epoch_end_save_due = step_due or bool(time_due)
        return False

    def _handle_nonfinite(self, epoch: int, step: int, local_loss: float | None) -> None:
        """Skip the batch on every rank, or stop with the step and the offending items named."""
        first = (step - self.epoch_start_step) * self.local_batch
        items = self.epoch_items[first : first + self.local_batch]
        report = None if local_loss is None else (local_loss, self._describe_items(items))
        reports = [
            (rank, r) for rank, r in enumerate(all_gather(self.ctx, report)) if r is not None
        ]
        where = (
            f"epoch {epoch + 1}, iteration {step + 1}/{self.steps_per_epoch} "
            f"(global step {self.position.global_step + 1})"
        )
        batches = "; ".join(
            f"rank {rank}: loss {value} on items {names}" for rank, (value, names) in reports
        )
        if bool(self.cfg.trainer.skip_nonfinite):
            self.stats.skipped += 1
            log.warning("non-finite loss at %s, batch skipped (%s)", where, batches)
            return
        raise NonFiniteLossError(
            f"non-finite loss at {where}: {batches}. Lower optim.lr, check those items, or set "
            "trainer.skip_nonfinite=true to skip such batches"
        )

    def _describe_items(self, items: list[int]) -> str:
        """Utterance ids of dataset rows (the first few), for messages."""
        names = [self.dataset.index.utts[i] for i in items[:_NAMED_ITEMS]]
        more = f" and {len(items) - _NAMED_ITEMS} more" if len(items) > _NAMED_ITEMS else ""
        return ", ".join(names) + more

    def _log_window(self, window: _Window, bar: Any) -> None:
        """Report the iterations since the last report (rank 0's batches)."""
        if not self.ctx.is_main:
            return
        samples_per_second = window.samples * self.ctx.world_size / max(window.seconds, 1e-9)
        values = {
            "loss": window.mean_loss,
            "accuracy": window.accuracy,
            "lr": window.lr,
            "margin": window.margin,
            "samples_per_second": samples_per_second,
            "data_wait_fraction": window.data_seconds / max(window.seconds, 1e-9),
        }
        self.monitor.scalars(self.position.global_step, values)
        bar.set_postfix(
            {
                "loss": f"{window.mean_loss:.3f}",
                "acc": f"{100 * window.accuracy:.1f}%",
                "lr": f"{window.lr:.2e}",
            },
            refresh=False,
        )
        log.info(
            "epoch %d iteration %d/%d: loss %.4f accuracy %.2f%% lr %.3g margin %.3f "
            "%.1f samples/s data wait %.1f%%",
            self.position.epoch + 1,
            self.position.step,
            self.steps_per_epoch,
            window.mean_loss,
            100 * window.accuracy,
            window.lr,
            window.margin,
            samples_per_second,
            100 * values["data_wait_fraction"],
        )

    def _finish_epoch(self, epoch: int) -> Path | None:
        """Epoch summary over all ranks, history, and the epoch-end checkpoint."""
        loss_sum, correct, count, _ = all_reduce_sum(self.ctx, self.stats.as_list())
        skipped = self.stats.skipped  # every rank skips the same batches
        summary = {
            "epoch": epoch + 1,
            "loss": loss_sum / count if count else math.nan,
            "accuracy": correct / count if count else math.nan,
            "lr": self.lr_schedule(epoch + 1.0),
            "margin": self.margin_schedule(epoch + 1.0),
            "items": int(count),
            "skipped_batches": int(skipped),
        }
        self.history.append(summary)
        self.stats = EpochStats()
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
        every_epochs = int(self.cfg.trainer.save_every_epochs)
        last = epoch + 1 == self.epochs
        if (
            last
            or self.epoch_end_save_due
            or (every_epochs > 0 and (epoch + 1) % every_epochs == 0)
        ):
            return self._save()
        return None

    # ----------------------------------------------------------------------------- checkpoints

    def _save(self) -> Path:
        """Checkpoint the current position (collective: every rank contributes its RNG state)."""
        rank_state = {
            "rng": capture_rng_state(self.ctx.device),
            "epoch_stats": self.stats.as_list(),
        }
        rank_states = all_gather(self.ctx, rank_state)
        path = checkpoint_path(self.ckpt_dir, self.position.global_step)
        if self.ctx.is_main:
            save_checkpoint(self._checkpoint_state(rank_states), path)
            prune_checkpoints(self.ckpt_dir, int(self.cfg.trainer.keep_last))
            write_history(self.exp_dir / "history.json", self.history)
            log.info("saved checkpoint %s", path)
        self.last_save_time = time.monotonic()
        return path

    def _checkpoint_state(self, rank_states: list[dict[str, Any]]) -> dict[str, Any]:
        pos = self.position
        return {
            "format_version": FORMAT_VERSION,
            "model": self.model.state_dict(),
            "model_name": self.model_name,
            "model_kwargs": dict(self.model_kwargs),
            "classifier": self.classifier.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": pos.epoch,
            "step": pos.step,
            "global_step": pos.global_step,
            "sampler": {
                "epoch": pos.epoch,
                "start": pos.step * self.local_batch,
                "local_batch": self.local_batch,
                "world_size": self.ctx.world_size,
                "dataset_size": len(self.dataset),
                "seed": int(self.cfg.seed),
            },
            "rank_states": [_cpu_tensors(state) for state in rank_states],
            "history": list(self.history),
            "config": OmegaConf.to_container(self.cfg, resolve=True),
        }


@dataclass
class _Window:
    """Rank-local sums between two log lines."""

    steps: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    samples: int = 0
    seconds: float = 0.0
    data_seconds: float = 0.0
    lr: float = 0.0
    margin: float = 0.0

    def add(self, loss_sum: float, correct: int, samples: int) -> None:
        self.loss_sum += loss_sum
        self.correct += correct
        self.samples += samples

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / self.samples if self.samples else math.nan

    @property
    def accuracy(self) -> float:
        return self.correct / self.samples if self.samples else math.nan


def _cpu_tensors(state: Any) -> Any:
    """``state`` with every tensor on the CPU (gathered RNG states may arrive on a GPU)."""
    if isinstance(state, torch.Tensor):
        return state.cpu()
    if isinstance(state, dict):
        return {k: _cpu_tensors(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_cpu_tensors(v) for v in state)
    return state


def write_history(path: Path, history: list[dict[str, float]]) -> None:
    """Per-epoch summaries as JSON (atomic), for plots and for scripts that check a run."""
    write_json_atomic(path, history)


def save_merged_config(cfg: DictConfig, exp_dir: Path) -> Path:
    """Write the merged, resolved config to ``<exp_dir>/config.yaml`` (atomic)."""
    return write_text_atomic(exp_dir / "config.yaml", OmegaConf.to_yaml(cfg))


def train(cfg: DictConfig) -> Path:
    """Run the experiment ``cfg`` (the merged Hydra config) on this rank; returns the final
    checkpoint. Joins the torchrun process group if there is one."""
    cfg = plain_config(cfg)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    cudnn = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    try:
        configure_determinism(bool(cfg.trainer.deterministic), cfg.trainer.num_threads)
        ctx = init_distributed(
            cfg.trainer.device, float(cfg.trainer.dist_timeout_minutes), option="trainer.device"
        )
        monitor = TrainingMonitor(
            cfg.exp_dir, enabled=ctx.is_main, progress_bar=bool(cfg.trainer.progress_bar)
        )
        trainer = None
        try:
            trainer = Trainer.create(cfg, ctx, monitor)
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
