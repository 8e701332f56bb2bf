"""From the merged configuration to the objects of a run: options checked, data loader, model,
optimizer, schedules and the process settings (threads, determinism, kernels).

Each builder reads one group of the Hydra tree (``conf/``) and reports a bad value as a
:class:`~speakerlab.errors.ConfigError` naming the option.
"""

from __future__ import annotations

import inspect
import logging
import os
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException
from torch.utils.data import DataLoader, Dataset, Sampler

from speakerlab.data.dataset import init_data_worker
from speakerlab.errors import ConfigError
from speakerlab.models import build_model
from speakerlab.models import model_spec as registered_model
from speakerlab.training.batching import BatchLayout
from speakerlab.training.losses import MarginSoftmaxLoss
from speakerlab.training.schedules import MarginSchedule, WarmupCosineLR, batch_lr_factor

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
OPTIMIZERS = ("sgd", "adamw")
# optim.step_kernel: how the optimizer updates the parameters (PyTorch's own implementations).
STEP_KERNELS = ("default", "foreach", "fused", "for_loop")


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


# ----------------------------------------------------------------------------- model


def model_spec(model_cfg: DictConfig) -> tuple[str, dict[str, Any]]:
    """Model name and constructor kwargs (plain Python values) from the ``model`` group."""
    spec = OmegaConf.to_container(model_cfg, resolve=True)
    name = spec.pop("name")
    return name, spec


def full_model_kwargs(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` completed with the constructor's defaults, sequences as lists: two specs build
    the same architecture exactly when these are equal."""
    try:
        parameters = inspect.signature(registered_model(name).build).parameters.values()
    except ValueError as err:
        raise ConfigError(f"model.name={name}: {err}") from None
    full = {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}
    full.update(kwargs)
    return {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in sorted(full.items())}


def build_embedding_model(name: str, kwargs: dict[str, Any]) -> torch.nn.Module:
    """``build_model`` with bad options reported as a ConfigError."""
    try:
        return build_model(name, **kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model.name={name} with {kwargs}: {err}") from None


# ----------------------------------------------------------------------------- optimization


def build_optimizer(
    parameters: Iterable[torch.nn.Parameter], optim_cfg: DictConfig, lr: float
) -> torch.optim.Optimizer:
    """The optimizer of the ``optim`` group (conf/optim/): SGD with momentum, or AdamW, with the
    parameter update of ``optim.step_kernel``."""
    name = optim_cfg.get("name", "sgd")
    kernel = optim_cfg.get("step_kernel", "default")
    if kernel not in STEP_KERNELS:
        raise ConfigError(f"optim.step_kernel={kernel!r}: choose one of {', '.join(STEP_KERNELS)}")
    # default: PyTorch's choice (foreach on GPUs); for_loop: one parameter at a time.
    implementation = {
        "default": {},
        "foreach": {"foreach": True},
        "fused": {"fused": True},
        "for_loop": {"foreach": False},
    }[kernel]
    if name == "sgd":
        return torch.optim.SGD(
            parameters,
            lr=lr,
            momentum=float(optim_cfg.momentum),
            nesterov=bool(optim_cfg.nesterov),
            weight_decay=float(optim_cfg.weight_decay),
            **implementation,
        )
    if name == "adamw":
        return torch.optim.AdamW(
            parameters,
            lr=lr,
            betas=tuple(float(b) for b in optim_cfg.betas),
            weight_decay=float(optim_cfg.weight_decay),
            **implementation,
        )
    raise ConfigError(f"optim.name={name!r}: choose one of {', '.join(OPTIMIZERS)}")


def base_lr_schedule(optim_cfg: DictConfig, epochs: int, layout: BatchLayout) -> WarmupCosineLR:
    """The configured schedule scaled for the run's global batch: ``optim.lr`` and
    ``optim.min_lr`` are stated for ``optim.reference_batch`` items per step and, with
    ``optim.scale_lr_with_batch``, scale linearly with the global batch (logged)."""
    schedule = WarmupCosineLR(
        float(optim_cfg.lr),
        float(optim_cfg.min_lr),
        float(optim_cfg.warmup_epochs),
        float(epochs),
    )
    reference = optim_cfg.get("reference_batch")
    reference = None if reference is None else int(reference)
    factor = batch_lr_factor(layout.global_batch, reference)
    if reference is None:
        log.info(
            "learning rate %.3g used as given for the global batch %s (no optim.reference_batch)",
            schedule.lr,
            layout.describe(),
        )
        return schedule
    if factor == 1.0:
        return schedule
    if not bool(optim_cfg.get("scale_lr_with_batch", True)):
        log.warning(
            "global batch %s differs from the reference batch %d of optim.lr=%.3g, which is used "
            "unscaled (optim.scale_lr_with_batch=false)",
            layout.describe(),
            reference,
            schedule.lr,
        )
        return schedule
    log.info(
        "global batch %s is %.4g x the reference batch %d (optim.reference_batch): learning "
        "rates scaled to %.4g (peak) and %.4g (final) from %.4g and %.4g "
        "(optim.scale_lr_with_batch=true)",
        layout.describe(),
        factor,
        reference,
        schedule.lr * factor,
        schedule.min_lr * factor,
        schedule.lr,
        schedule.min_lr,
    )
    return schedule.scaled(factor)


def margin_schedule(loss_cfg: DictConfig) -> MarginSchedule:
    margin = loss_cfg.margin
    return MarginSchedule(
        float(margin.initial),
        float(margin.final),
        float(margin.increase_start_epoch),
        float(margin.fix_epoch),
    )


def build_loss(loss_cfg: DictConfig) -> MarginSoftmaxLoss:
    return MarginSoftmaxLoss(
        loss_cfg.margin_type, float(loss_cfg.scale), easy_margin=bool(loss_cfg.easy_margin)
    )


# ----------------------------------------------------------------------------- data


def loader_workers(setting: Any, local_world_size: int) -> int:
    """``data.num_workers``: a count, or ``auto`` = this node's CPU cores shared by its
    processes, one core each left to the training process itself."""
    if setting == "auto":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return max(0, (cores or 1) // max(1, local_world_size) - 1)
    try:
        workers = int(setting)
    except (TypeError, ValueError):
        raise ConfigError(f"data.num_workers={setting!r}: a number or auto") from None
    if workers < 0:
        raise ConfigError(f"data.num_workers={workers} must not be negative")
    return workers


def build_loader(
    dataset: Dataset,
    sampler: Sampler[int],
    micro_batch: int,
    data_cfg: DictConfig,
    device: torch.device,
    local_world_size: int,
) -> tuple[DataLoader, torch.Generator]:
    """The training DataLoader (micro-batches) and the generator that seeds its workers."""
    workers = loader_workers(data_cfg.num_workers, local_world_size)
    generator = torch.Generator()
    loader = DataLoader(
        dataset,
        batch_size=micro_batch,
        sampler=sampler,
        num_workers=workers,
        drop_last=True,
        pin_memory=device.type == "cuda",
        prefetch_factor=int(data_cfg.prefetch_factor) if workers > 0 else None,
        # The dataset's epoch lives in shared memory, so workers can outlive an epoch.
        persistent_workers=workers > 0,
        worker_init_fn=init_data_worker,
        # The loader draws its worker seeds from its own generator, not the global one.
        generator=generator,
    )
    return loader, generator


# ----------------------------------------------------------------------------- process


def configure_backends(trainer_cfg: DictConfig) -> None:
    """Threads, deterministic kernels and cuDNN autotuning as ``trainer.*`` asks."""
    if trainer_cfg.num_threads:
        torch.set_num_threads(int(trainer_cfg.num_threads))
    deterministic = bool(trainer_cfg.deterministic)
    if deterministic:
        # cuBLAS needs a fixed workspace to be deterministic; set before the first CUDA matmul.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    # Autotuning picks the fastest kernels for the (fixed) crop shape; it is not deterministic.
    torch.backends.cudnn.benchmark = bool(trainer_cfg.cudnn_benchmark) and not deterministic


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and Python's generators (the model starts identical on all ranks)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def index_path(cfg: DictConfig) -> Path:
    """The training index: ``data.index``, else ``<exp_dir>/train_index.tsv``."""
    return Path(cfg.data.index) if cfg.data.index else Path(cfg.exp_dir) / "train_index.tsv"
