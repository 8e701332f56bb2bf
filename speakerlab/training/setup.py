"""Setting up a run: options checked, index and data, the architecture, model and optimizer, then
the newest checkpoint restored (after :func:`.checkpointing.check_resumable`) or the starting
weights of ``trainer.init_from`` loaded. The result, a :class:`Run`, is what the loop trains.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from speakerlab.data.dataset import TrainDataset, build_train_dataset
from speakerlab.data.index import build_train_index
from speakerlab.distributed import (
    DistContext,
    EveryRankError,
    all_gather,
    read_rank_env,
    run_on_every_rank,
)
from speakerlab.errors import ConfigError
from speakerlab.models.checkpoint import load_state_into
from speakerlab.training import builders
from speakerlab.training.averaging import check_retention
from speakerlab.training.batching import BatchLayout, MicroBatchSampler, batch_layout
from speakerlab.training.checkpointing import (
    RunIdentity,
    check_resumable,
    checkpoint_dir,
    data_digest,
    list_checkpoints,
    load_latest_checkpoint,
    restore_rng_state,
    saved_layout,
)
from speakerlab.training.finetune import (
    InitSource,
    apply_init_source,
    classifier_width,
    read_init_source,
    resolve_model_spec,
)
from speakerlab.training.losses import CosineClassifier, MarginSoftmaxLoss, SpeakerClassifierNet
from speakerlab.training.schedules import MarginSchedule, WarmupCosineLR
from speakerlab.training.stats import EPOCH_FIELDS

log = logging.getLogger(__name__)


@dataclass
class Options:
    """The scalar options of a run, checked before anything is built."""

    epochs: int
    keep_last: int
    layout: BatchLayout
    amp_dtype: torch.dtype | None
    skip_nonfinite: bool
    loss_fn: MarginSoftmaxLoss
    margin_schedule: MarginSchedule
    base_lr_schedule: WarmupCosineLR  # scaled for the global batch, before optim.lr_factor

    @classmethod
    def from_config(cls, cfg: DictConfig, ctx: DistContext) -> Options:
        trainer = cfg.trainer
        epochs = int(trainer.epochs)
        if epochs < 1:
            raise ConfigError(f"trainer.epochs={epochs} must be at least 1")
        if int(trainer.keep_last) < 1:
            raise ConfigError(f"trainer.keep_last={trainer.keep_last} must be at least 1")
        check_retention(int(trainer.keep_last), int(trainer.export_average))
        layout = batch_layout(
            int(trainer.batch_size), ctx.world_size, int(trainer.accumulate_steps)
        )
        return cls(
            epochs=epochs,
            keep_last=int(trainer.keep_last),
            layout=layout,
            amp_dtype=builders.autocast_dtype(trainer.precision, ctx.device),
            skip_nonfinite=bool(trainer.skip_nonfinite),
            loss_fn=builders.build_loss(cfg.loss),
            margin_schedule=builders.margin_schedule(cfg.loss),
            base_lr_schedule=builders.base_lr_schedule(cfg.optim, epochs, layout),
        )


@dataclass
class Resumed:
    """Where a resumed run stood: its checkpoint, position, history and epoch statistics."""

    path: Path
    position: tuple[int, int, int]  # epoch, step, global step
    history: list[dict[str, float]]
    rank_epoch_sums: list[float]  # this rank's share of the epoch sums
    epoch_sums: np.ndarray = field(default_factory=lambda: np.zeros(3))  # over all ranks


@dataclass
class Run:
    """Everything the training loop needs, built from the configuration."""

    cfg: DictConfig
    ctx: DistContext
    options: Options
    dataset: TrainDataset
    sampler: MicroBatchSampler
    loader: DataLoader
    loader_generator: torch.Generator
    steps_per_epoch: int
    identity: RunIdentity
    model: torch.nn.Module
    classifier: CosineClassifier
    net: SpeakerClassifierNet
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    lr_factor: float = 1.0
    resumed: Resumed | None = None

    @property
    def exp_dir(self) -> Path:
        return Path(self.cfg.exp_dir)

    @property
    def lr_schedule(self) -> WarmupCosineLR:
        """The schedule in use: batch-scaled, times ``optim.lr_factor``."""
        return self.options.base_lr_schedule.scaled(self.lr_factor)


def build_run(cfg: DictConfig, ctx: DistContext, explicit_model_keys: set[str]) -> Run:
    """Check the options, prepare the index (rank 0), build everything and restore the newest
    checkpoint or the starting weights. A failure on any rank stops every rank with one
    message."""
    options = run_on_every_rank(ctx, lambda: Options.from_config(cfg, ctx))
    run_on_every_rank(ctx, lambda: prepare_index(cfg, ctx))
    run = run_on_every_rank(ctx, lambda: _build(cfg, ctx, options, explicit_model_keys))
    sources = set(all_gather(ctx, str(run.resumed.path) if run.resumed else None))
    if len(sources) > 1:
        raise EveryRankError(f"the ranks resumed from different checkpoints: {sorted(sources)}")
    return run


def prepare_index(cfg: DictConfig, ctx: DistContext) -> None:
    """Build (or reuse) the training index on rank 0 (exp_dir is shared by all nodes: every
    rank reads the index, and the checkpoints rank 0 writes, from there)."""
    if ctx.is_main:
        data = cfg.data
        build_train_index(
            data.train_dir,
            builders.index_path(cfg),
            segment_seconds=float(data.segment_seconds),
            max_bad_fraction=float(data.max_bad_fraction),
        )


def _build(cfg: DictConfig, ctx: DistContext, options: Options, explicit: set[str]) -> Run:
    builders.seed_everything(int(cfg.seed))
    dataset = build_train_dataset(cfg.data, builders.index_path(cfg), seed=int(cfg.seed))
    sampler = MicroBatchSampler(len(dataset), options.layout, ctx.rank, seed=int(cfg.seed))
    steps = _steps_per_epoch(cfg, sampler, options.layout, len(dataset))
    loader, generator = builders.build_loader(
        dataset,
        sampler,
        options.layout.micro_batch,
        cfg.data,
        ctx.device,
        read_rank_env().local_world_size,
    )
    resume = _latest_checkpoint(cfg, ctx)
    init = None
    if resume is None and cfg.trainer.init_from:
        init = read_init_source(cfg.trainer.init_from)
    identity = run_identity(cfg, dataset, options.layout, resume, init, explicit)
    model = builders.build_embedding_model(identity.model_name, identity.model_kwargs)
    classifier = CosineClassifier(
        int(identity.model_kwargs["embedding_size"]), identity.classifier_width
    )
    net = SpeakerClassifierNet(model, classifier).to(ctx.device)
    if cfg.trainer.channels_last:
        net = net.to(memory_format=_channels_last(ctx.device))
    scaler = torch.amp.GradScaler(ctx.device.type) if options.amp_dtype == torch.float16 else None
    run = Run(
        cfg=cfg,
        ctx=ctx,
        options=options,
        dataset=dataset,
        sampler=sampler,
        loader=loader,
        loader_generator=generator,
        steps_per_epoch=steps,
        identity=identity,
        model=model,
        classifier=classifier,
        net=net,
        optimizer=builders.build_optimizer(net.parameters(), cfg.optim, 0.0),
        scaler=scaler,
    )
    if resume is not None:
        restore(run, *resume)
    else:
        start(run, init)
    return run


def _channels_last(device: torch.device) -> torch.memory_format:
    """``trainer.channels_last``: a layout for GPU convolutions. On the CPU the backward pass of
    a strided 1x1 convolution in this layout crashes the process (PyTorch 2.11), so it is
    refused there."""
    if device.type != "cuda":
        raise ConfigError("trainer.channels_last=true is for GPUs; leave it off on the CPU")
    return torch.channels_last


def _steps_per_epoch(
    cfg: DictConfig, sampler: MicroBatchSampler, layout: BatchLayout, items: int
) -> int:
    steps = sampler.steps
    if cfg.trainer.max_steps_per_epoch:
        steps = min(steps, int(cfg.trainer.max_steps_per_epoch))
    if steps < 1:
        raise ConfigError(
            f"{builders.index_path(cfg)}: {items} training items give no full global batch of "
            f"{layout.describe()}; lower trainer.batch_size"
        )
    return steps


def _latest_checkpoint(cfg: DictConfig, ctx: DistContext) -> tuple[Path, dict[str, Any]] | None:
    directory = checkpoint_dir(cfg.exp_dir)
    if not cfg.trainer.resume:
        if list_checkpoints(directory):
            raise ConfigError(
                f"{directory} holds checkpoints of an earlier run and trainer.resume=false; use "
                "a new exp_dir (or remove them)"
            )
        return None
    return load_latest_checkpoint(directory, move_bad_aside=ctx.is_main)


def run_identity(
    cfg: DictConfig,
    dataset: TrainDataset,
    layout: BatchLayout,
    resume: tuple[Path, dict[str, Any]] | None,
    init: InitSource | None,
    explicit: set[str],
) -> RunIdentity:
    """What this configuration trains: the architecture (that of the checkpoint the run starts
    from, or resumed from when it began with init_from), classifier width, data and batch. The
    resolved architecture replaces ``cfg.model``, so that the saved configuration shows it."""
    source, source_path = None, None
    if resume is not None and cfg.trainer.init_from:
        source_path, state = resume
        source = (state["model_name"], state["model_kwargs"])
    elif init is not None:
        source, source_path = init.architecture(), init.path
    configured = builders.model_spec(cfg.model)
    name, kwargs = resolve_model_spec(configured, source, source_path, explicit)
    if int(kwargs.get("feat_dim", cfg.data.num_mel_bins)) != int(cfg.data.num_mel_bins):
        raise ConfigError(
            f"the {name} model reads {kwargs['feat_dim']}-bin fbank (feat_dim) but "
            f"data.num_mel_bins={cfg.data.num_mel_bins}"
        )
    cfg.model = OmegaConf.create({"name": name, **kwargs})
    setting = cfg.loss.num_classes
    if resume is not None and setting == "init":  # the run took its width from init_from
        width = int(resume[1]["classifier"]["weight"].shape[0])
    else:
        width = classifier_width(setting, dataset.num_classes, init)
    index = dataset.index
    return RunIdentity(
        model_name=name,
        model_kwargs=kwargs,
        classifier_width=width,
        data_items=len(dataset),
        data_digest=data_digest(index.utts, index.speaker_ids, index.num_samples),
        seed=int(cfg.seed),
        layout=layout,
    )


def start(run: Run, init: InitSource | None) -> None:
    """A new run: the starting weights of ``init`` if given, and the LR factor."""
    if init is not None:
        apply_init_source(init, run.identity.model_name, run.model, run.classifier)
    factor = run.cfg.optim.lr_factor
    run.lr_factor = _lr_factor(run, 1.0 if factor is None else float(factor), 1.0)


def restore(run: Run, path: Path, state: dict[str, Any]) -> None:
    """Continue the run saved in ``state`` exactly where it stopped."""
    check_resumable(path, state, run.identity)
    load_state_into(run.model, state["model"], path)
    load_state_into(run.classifier, state["classifier"], path)
    run.optimizer.load_state_dict(state["optimizer"])
    if run.scaler is not None and state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    run.resumed = Resumed(
        path,
        (int(state["epoch"]), int(state["step"]), int(state["global_step"])),
        list(state.get("history", [])),
        *_restore_rank_state(run, path, state),
    )
    _warn_if_schedule_changed(run, state.get("lr_schedule"))
    saved = float(state.get("lr_factor", 1.0))
    factor = run.cfg.optim.lr_factor
    run.lr_factor = _lr_factor(run, saved if factor is None else float(factor), saved)


def _restore_rank_state(
    run: Run, path: Path, state: dict[str, Any]
) -> tuple[list[float], np.ndarray]:
    """Random states and this rank's epoch sums: per rank when the process count is the same;
    otherwise the sums move to rank 0 (they are summed over ranks anyway). Returns this rank's
    sums and the sums over all ranks."""
    ctx, layout, rank_states = run.ctx, saved_layout(state), state["rank_states"]
    rows = np.array([s["epoch_stats"] for s in rank_states], dtype=np.float64)
    if layout != run.options.layout:
        log.warning(
            "%s was saved with a global batch of %s; continuing with %s: the same items per "
            "step, in the same order (batch-norm statistics over micro-batches of %d)",
            path,
            layout.describe(),
            run.options.layout.describe(),
            run.options.layout.micro_batch,
        )
    if layout.world_size == ctx.world_size:
        restore_rng_state(rank_states[ctx.rank]["rng"], ctx.device)
        mine = rows[ctx.rank]
    else:
        mine = rows.sum(axis=0) if ctx.is_main else np.zeros(EPOCH_FIELDS)
        mine[EPOCH_FIELDS - 1] = rows[0, EPOCH_FIELDS - 1]  # skipped steps: the same on each rank
    return mine.tolist(), rows[:, : EPOCH_FIELDS - 1].sum(axis=0)


def _warn_if_schedule_changed(run: Run, saved: dict[str, float] | None) -> None:
    now = {"lr": run.options.base_lr_schedule.lr, "min_lr": run.options.base_lr_schedule.min_lr}
    if saved and not all(math.isclose(saved[k], now[k], rel_tol=1e-9) for k in now):
        log.warning(
            "the learning-rate schedule changed since the run started (peak %.4g -> %.4g, final "
            "%.4g -> %.4g); to lower the learning rate of a run use optim.lr_factor",
            saved["lr"],
            now["lr"],
            saved["min_lr"],
            now["min_lr"],
        )


def _lr_factor(run: Run, factor: float, previous: float) -> float:
    """``optim.lr_factor`` checked and logged (see conf/optim)."""
    if not factor > 0:
        raise ConfigError(f"optim.lr_factor={factor} must be positive")
    if factor != 1.0 or previous != 1.0:
        base = run.options.base_lr_schedule
        log.info(
            "learning-rate factor %g (optim.lr_factor; the run had %g): peak %.4g, final %.4g",
            factor,
            previous,
            base.lr * factor,
            base.min_lr * factor,
        )
    return factor
