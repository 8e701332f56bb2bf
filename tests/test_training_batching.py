"""The global batch over processes and accumulation steps: layouts, the items of each step, and
the linear learning-rate scaling (expected values computed by hand)."""

import logging

import pytest
from omegaconf import OmegaConf

from speakerlab.data.sampler import DistributedResumableSampler
from speakerlab.errors import ConfigError
from speakerlab.training.batching import BatchLayout, MicroBatchSampler, batch_layout
from speakerlab.training.builders import base_lr_schedule
from speakerlab.training.schedules import batch_lr_factor

ITEMS, SEED, EPOCH = 53, 11, 2


def test_layout_splits_the_global_batch():
    assert batch_layout(256, 8, 1) == BatchLayout(8, 32, 1)
    assert batch_layout(256, 2, 4) == BatchLayout(2, 32, 4)
    assert batch_layout(256, 2, 4).describe() == (
        "256 (2 process(es) x 32 items x 4 accumulation step(s))"
    )
    with pytest.raises(ConfigError, match=r"batch_size=256 .* over 3 processes x 1 accumulation"):
        batch_layout(256, 3, 1)
    with pytest.raises(ConfigError, match="accumulate_steps=0 must be at least 1"):
        batch_layout(256, 1, 0)


def micro_batches(layout: BatchLayout) -> list[list[list[int]]]:
    """For each optimizer step, its micro-batches in slot order (rank-major within a micro-step,
    as the module docstring defines slots), read from every rank's sampler."""
    samplers = [MicroBatchSampler(ITEMS, layout, rank, SEED) for rank in range(layout.world_size)]
    for sampler in samplers:
        sampler.set_epoch(EPOCH)
    per_rank = [list(sampler) for sampler in samplers]
    b, steps = layout.micro_batch, samplers[0].steps
    return [
        [
            per_rank[rank][(step * layout.accumulate_steps + micro) * b :][:b]
            for micro in range(layout.accumulate_steps)
            for rank in range(layout.world_size)
        ]
        for step in range(steps)
    ]


def test_every_layout_of_a_global_batch_trains_the_same_micro_batches():
    """Two processes, or one accumulating two micro-batches: each step covers the next 8 items of
    the epoch's permutation, in the same groups of 4 (so batch norm sees the same batches)."""
    order = DistributedResumableSampler(ITEMS, seed=SEED)
    order.set_epoch(EPOCH)
    permutation = order.epoch_indices()
    expected = [
        [permutation[s * 8 : s * 8 + 4], permutation[s * 8 + 4 : s * 8 + 8]] for s in range(6)
    ]
    assert micro_batches(BatchLayout(2, 4, 1)) == expected
    assert micro_batches(BatchLayout(1, 4, 2)) == expected
    quarters = [
        [permutation[s * 8 + 2 * k : s * 8 + 2 * k + 2] for k in range(4)] for s in range(6)
    ]
    assert micro_batches(BatchLayout(2, 2, 2)) == quarters
    assert micro_batches(BatchLayout(1, 2, 4)) == quarters
    # one process without accumulation: the permutation in order, as before accumulation existed
    single = MicroBatchSampler(ITEMS, BatchLayout(1, 8, 1), 0, SEED)
    single.set_epoch(EPOCH)
    assert list(single) == permutation[:48]


def test_resume_skips_the_steps_done():
    layout = BatchLayout(2, 4, 1)
    sampler = MicroBatchSampler(ITEMS, layout, 1, SEED)
    sampler.set_epoch(EPOCH)
    full = list(sampler)
    sampler.set_epoch(EPOCH, start_step=4)
    assert list(sampler) == full[16:] and len(sampler) == 8
    assert sampler.step_items(1, 4) == full[16:20]
    with pytest.raises(ConfigError, match="resume step 7 is outside the 6 of an epoch"):
        sampler.set_epoch(EPOCH, start_step=7)


def optim(**values):
    base = {"lr": 0.2, "min_lr": 5e-5, "warmup_epochs": 5, "reference_batch": 256}
    return OmegaConf.create({**base, **values})


def test_learning_rate_scales_linearly_with_the_global_batch(caplog):
    assert batch_lr_factor(128, 256) == 0.5 and batch_lr_factor(1024, 256) == 4.0
    assert batch_lr_factor(64, None) == 1.0
    with caplog.at_level(logging.INFO):
        half = base_lr_schedule(optim(), 70, BatchLayout(1, 64, 2))
    # 0.2 x 128 / 256 = 0.1; 5e-5 x 0.5 = 2.5e-5
    assert half.lr == pytest.approx(0.1) and half.min_lr == pytest.approx(2.5e-5)
    assert (
        "global batch 128 (1 process(es) x 64 items x 2 accumulation step(s)) is 0.5 x the "
        "reference batch 256" in caplog.text
    )
    double = base_lr_schedule(optim(), 70, BatchLayout(4, 128, 1))
    assert double.lr == pytest.approx(0.4) and double(5.0) == pytest.approx(0.4)
    same = base_lr_schedule(optim(), 70, BatchLayout(8, 32, 1))
    assert (same.lr, same.min_lr) == (0.2, 5e-5)


def test_learning_rate_unscaled_when_asked_or_without_a_reference(caplog):
    with caplog.at_level(logging.WARNING):
        kept = base_lr_schedule(optim(scale_lr_with_batch=False), 70, BatchLayout(1, 32, 1))
    assert kept.lr == 0.2 and "used unscaled (optim.scale_lr_with_batch=false)" in caplog.text
    assert base_lr_schedule(optim(reference_batch=None), 70, BatchLayout(1, 32, 1)).lr == 0.2
    with pytest.raises(ConfigError, match="optim.reference_batch=0 must be a positive"):
        base_lr_schedule(optim(reference_batch=0), 70, BatchLayout(1, 32, 1))
