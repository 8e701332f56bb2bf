"""Learning-rate and margin schedules as functions of the fractional epoch."""

import math

import pytest

from speakerlab.errors import ConfigError
from speakerlab.training.schedules import MarginSchedule, WarmupCosineLR, training_position


def test_warmup_then_cosine_with_reference_values():
    lr = WarmupCosineLR(lr=0.2, min_lr=5e-5, warmup_epochs=5, epochs=70)
    assert lr(0.0) == pytest.approx(5e-5)
    assert lr(2.5) == pytest.approx(5e-5 + (0.2 - 5e-5) / 2)
    assert lr(5.0) == pytest.approx(0.2)
    assert lr(37.5) == pytest.approx((0.2 + 5e-5) / 2)  # half-way through the cosine
    assert lr(70.0) == pytest.approx(5e-5)
    assert lr(75.0) == pytest.approx(5e-5)


def test_lr_changes_within_an_epoch_and_is_monotone_after_warmup():
    lr = WarmupCosineLR(lr=0.2, min_lr=5e-5, warmup_epochs=5, epochs=70)
    steps = 100
    values = [lr(training_position(e, s, steps)) for e in range(70) for s in range(steps)]
    assert values[1] > values[0]  # set per iteration, not per epoch
    warmup, decay = values[:500], values[500:]
    assert all(a < b for a, b in zip(warmup, warmup[1:]))
    assert all(a >= b for a, b in zip(decay, decay[1:]))


def test_run_shorter_than_its_warmup_only_warms_up():
    lr = WarmupCosineLR(lr=0.2, min_lr=0.0, warmup_epochs=5, epochs=3)
    assert lr(1.0) == pytest.approx(0.04) and lr(2.99) == pytest.approx(0.2 * 2.99 / 5)
    with pytest.raises(ConfigError, match="warmup_epochs=-1"):
        WarmupCosineLR(lr=0.1, min_lr=0.0, warmup_epochs=-1, epochs=7)


def test_margin_ramp_follows_reference_formula():
    margin = MarginSchedule(initial=0.0, final=0.3, increase_start_epoch=20, fix_epoch=50)
    assert margin(0.0) == 0.0 and margin(19.99) == 0.0
    assert margin(20.0) == pytest.approx(0.0)
    assert margin(35.0) == pytest.approx(0.3 * (1 - 0.001**0.5))
    assert margin(49.999) == pytest.approx(0.3 * 0.999, rel=1e-3)
    assert margin(50.0) == 0.3 and margin(70.0) == 0.3
    values = [margin(20 + i * 0.1) for i in range(300)]
    assert all(a < b for a, b in zip(values, values[1:]))


def test_fixed_margin_when_ramp_is_empty():
    margin = MarginSchedule(initial=0.5, final=0.5, increase_start_epoch=0, fix_epoch=0)
    assert margin(0.0) == 0.5 and margin(3.3) == 0.5
    jump = MarginSchedule(initial=0.0, final=0.2, increase_start_epoch=2, fix_epoch=2)
    assert jump(1.9) == 0.0 and jump(2.0) == 0.2


def test_training_position():
    assert training_position(3, 25, 100) == 3.25
    assert math.isclose(training_position(0, 1, 3), 1 / 3)
