"""Verification metrics: discrimination (EER, minDCF, min Cllr) and, for scores that are
log-likelihood ratios, calibration (Cllr, actual DCF).

EER, minDCF and the DET curve come from one pass over the scores sorted once (O(n log n)). A
threshold ``t`` rejects every trial scoring ``<= t``; the candidate thresholds are the distinct
scores, so trials with equal scores always fall on the same side. The EER is interpolated linearly
between the two operating points where the miss rate crosses the false-alarm rate; minDCF and
actual DCF use c_miss = c_fa = 1 and are normalised by the cost of the best trivial system,
min(p_target, 1 - p_target).

Cllr (in bits) is the BOSARIS cost of log-likelihood-ratio scores ``s``:
``(mean over targets of log2(1 + e^-s) + mean over non-targets of log2(1 + e^s)) / 2``.
min Cllr is the Cllr of the best monotone recalibration of the scores: the pool-adjacent-violators
(PAV) fit of the target posterior, turned into log-likelihood ratios. Actual DCF applies the Bayes
decision of each p_target to the scores as they are: accept when ``s >= log((1 - p) / p)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import isotonic_regression

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


def bayes_threshold(p_target: float) -> float:
    """The log-likelihood ratio above which a target prior of ``p_target`` accepts (c_miss =
    c_fa = 1): ``-logit(p_target)``."""
    if not 0.0 < p_target < 1.0:
        raise ValueError(f"p_target must be in (0, 1), got {p_target}")
    return float(np.log1p(-p_target) - np.log(p_target))


def act_dcf(llrs: np.ndarray, labels: np.ndarray, p_target: float = 0.01) -> float:
    """Normalised actual DCF of log-likelihood ratios at their Bayes threshold for ``p_target``
    (a trial scoring exactly at the threshold is accepted)."""
    threshold = bayes_threshold(p_target)
    llrs, is_target = np.asarray(llrs), np.asarray(labels).astype(bool)
    miss = np.mean(llrs[is_target] < threshold)
    false_alarm = np.mean(llrs[~is_target] >= threshold)
    cost = p_target * miss + (1.0 - p_target) * false_alarm
    return float(cost / min(p_target, 1.0 - p_target))


def cllr(llrs: np.ndarray, labels: np.ndarray) -> float:
    """Cllr in bits of log-likelihood ratios (see the module docstring)."""
    llrs, is_target = np.asarray(llrs, dtype=np.float64), np.asarray(labels).astype(bool)
    # logaddexp(0, x) = log(1 + e^x) without overflow.
    target_cost = np.mean(np.logaddexp(0.0, -llrs[is_target]))
    nontarget_cost = np.mean(np.logaddexp(0.0, llrs[~is_target]))
    return float((target_cost + nontarget_cost) / (2.0 * np.log(2.0)))


def pav_llrs(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Log-likelihood ratios of the best monotone (non-decreasing) map of ``scores``: the
    target posterior fitted by PAV on the trials, divided by the list's prior odds.

    Trials with equal scores form one point of the fit, so they get one value. The lowest
    scores may map to -inf (only non-targets there) and the highest to +inf (only targets).
    PAV is scipy's (a maintained C++ implementation that takes weights).
    """
    scores, is_target = np.asarray(scores), np.asarray(labels).astype(bool)
    distinct, point = np.unique(scores, return_inverse=True)
    trials = np.bincount(point, minlength=distinct.size).astype(np.float64)
    targets = np.bincount(point, weights=is_target, minlength=distinct.size)
    posterior = isotonic_regression(targets / trials, weights=trials).x
    num_targets = int(is_target.sum())
    prior_log_odds = np.log(num_targets) - np.log(is_target.size - num_targets)
    with np.errstate(divide="ignore"):
        log_odds = np.log(posterior) - np.log1p(-posterior)
    return (log_odds - prior_log_odds)[point]


def min_cllr(scores: np.ndarray, labels: np.ndarray) -> float:
    """min Cllr in bits: the Cllr of :func:`pav_llrs` (depends only on the order of the scores)."""
    return cllr(pav_llrs(scores, labels), labels)


@dataclass(frozen=True)
class Metrics:
    """Metrics of one trial list. ``cllr`` and ``act_dcf`` are set only for scores that are
    log-likelihood ratios (calibrated scores)."""

    num_targets: int
    num_nontargets: int
    eer: float  # fraction
    min_dcf: dict[float, float]
    min_cllr: float
    rates: ErrorRates
    cllr: float | None = None
    act_dcf: dict[float, float] | None = None


def compute_metrics(
    scores: np.ndarray,
    labels: np.ndarray,
    p_targets: Sequence[float] = DEFAULT_P_TARGETS,
    llr: bool = False,
) -> Metrics:
    """Every metric of ``scores`` (1 target, 0 non-target labels); with ``llr`` the scores are
    log-likelihood ratios and their calibration is measured too. Raises ``ValueError`` for
    scores that are not finite or lists without both kinds of trial."""
    rates = error_rates(scores, labels)
    is_target = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores).ravel()
    return Metrics(
        num_targets=int(is_target.sum()),
        num_nontargets=int((~is_target).sum()),
        eer=eer_from_rates(rates),
        min_dcf={float(p): min_dcf_from_rates(rates, p) for p in p_targets},
        min_cllr=min_cllr(scores, is_target),
        rates=rates,
        cllr=cllr(scores, is_target) if llr else None,
        act_dcf={float(p): act_dcf(scores, is_target, p) for p in p_targets} if llr else None,
    )
