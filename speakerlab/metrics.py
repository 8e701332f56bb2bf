"""Verification metrics: equal error rate, minimum detection cost and DET curve points.

All three come from one pass over the scores sorted once (O(n log n)). A threshold ``t`` rejects
every trial scoring ``<= t``; the candidate thresholds are the distinct scores, so trials with
equal scores always fall on the same side. The EER is interpolated linearly between the two
operating points where the miss rate crosses the false-alarm rate; minDCF uses c_miss = c_fa = 1
and is normalised by the cost of the best trivial system, min(p_target, 1 - p_target).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_P_TARGETS: tuple[float, ...] = (0.01,)


@dataclass(frozen=True)
class ErrorRates:
    """Miss and false-alarm rates at each operating point, thresholds in ascending order.

    Point 0 accepts everything (miss 0, false alarm 1); point ``i >= 1`` rejects the scores
    ``<= thresholds[i - 1]``; the last point rejects everything (miss 1, false alarm 0).
    """

    miss: np.ndarray
    false_alarm: np.ndarray
    thresholds: np.ndarray


def error_rates(scores: np.ndarray, labels: np.ndarray) -> ErrorRates:
    """Miss and false-alarm rates for every distinct threshold (labels: 1 target, 0 non-target)."""
    scores = np.asarray(scores).ravel()
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    labels = np.asarray(labels).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"{scores.size} scores but {labels.size} labels")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores contain NaN or infinite values")
    is_target = labels.astype(bool)
    num_targets = int(is_target.sum())
    num_nontargets = is_target.size - num_targets
    if num_targets == 0 or num_nontargets == 0:
        raise ValueError(
            f"need both target and non-target trials, got {num_targets} targets and "
            f"{num_nontargets} non-targets"
        )

    # Equal scores are merged below, so their order does not matter: no stable sort needed.
    order = np.argsort(scores)
    sorted_scores = scores[order]
    sorted_targets = is_target[order]
    # Only the last position of each run of equal scores is a threshold a system can realise.
    last_of_run = np.append(sorted_scores[1:] != sorted_scores[:-1], True)
    targets_rejected = np.cumsum(sorted_targets)[last_of_run]
    nontargets_rejected = np.cumsum(~sorted_targets)[last_of_run]

    miss = np.concatenate(([0.0], targets_rejected / num_targets))
    false_alarm = np.concatenate(([1.0], 1.0 - nontargets_rejected / num_nontargets))
    return ErrorRates(miss=miss, false_alarm=false_alarm, thresholds=sorted_scores[last_of_run])


def eer_from_rates(rates: ErrorRates) -> float:
    """Equal error rate (a fraction): where the straight line between the last point with
    miss < false alarm and the next one crosses miss == false alarm."""
    gap = rates.miss - rates.false_alarm  # non-decreasing from -1 (accept all) to +1 (reject all)
    after = int(np.argmax(gap >= 0))
    before = after - 1
    miss_step = rates.miss[after] - rates.miss[before]
    fa_step = rates.false_alarm[after] - rates.false_alarm[before]
    # Walking back from `after` by a fraction `a` of the segment, miss - fa falls linearly from
    # gap[after] >= 0 to gap[before] < 0, reaching zero at
    # a = gap[after] / (gap[after] - gap[before]).
    fraction = gap[after] / (miss_step - fa_step)
    return float(rates.miss[after] - fraction * miss_step)


def min_dcf_from_rates(rates: ErrorRates, p_target: float = 0.01) -> float:
    """Normalised minimum detection cost with c_miss = c_fa = 1."""
    if not 0.0 < p_target < 1.0:
        raise ValueError(f"p_target must be in (0, 1), got {p_target}")
    cost = p_target * rates.miss + (1.0 - p_target) * rates.false_alarm
    return float(cost.min() / min(p_target, 1.0 - p_target))


def compute_eer(scores: np.ndarray, labels: np.ndarray) -> float:
    """Equal error rate (fraction) of ``scores`` with ``labels`` (1 target, 0 non-target)."""
    return eer_from_rates(error_rates(scores, labels))


def compute_min_dcf(scores: np.ndarray, labels: np.ndarray, p_target: float = 0.01) -> float:
    """Normalised minDCF at ``p_target`` (c_miss = c_fa = 1)."""
    return min_dcf_from_rates(error_rates(scores, labels), p_target)


@dataclass(frozen=True)
class Metrics:
    """EER (fraction) and minDCF per p_target, plus the trial counts they came from."""

    eer: float
    min_dcf: dict[float, float]
    num_targets: int
    num_nontargets: int


def compute_metrics(
    scores: np.ndarray, labels: np.ndarray, p_targets: Sequence[float] = DEFAULT_P_TARGETS
) -> Metrics:
    """EER and minDCF at each of ``p_targets`` from a single sort of the scores."""
    rates = error_rates(scores, labels)
    num_targets = int(np.count_nonzero(labels))
    return Metrics(
        eer=eer_from_rates(rates),
        min_dcf={float(p): min_dcf_from_rates(rates, p) for p in p_targets},
        num_targets=num_targets,
        num_nontargets=int(np.size(labels)) - num_targets,
    )


def det_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Points of the DET curve: (false-alarm rates, miss rates), false alarms decreasing."""
    rates = error_rates(scores, labels)
    return rates.false_alarm, rates.miss
