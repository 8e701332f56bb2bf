"""Metrics: EER and minDCF against the reference fixtures and hand-worked cases; Cllr, min Cllr
and actual DCF against hand computation and an independent implementation of the BOSARIS
definitions written here."""

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest

from speakerlab.metrics import (
    act_dcf,
    bayes_threshold,
    cllr,
    compute_metrics,
    min_cllr,
    pav_llrs,
)

FIXTURE = Path(__file__).parent / "fixtures" / "reference" / "metrics.json"
LN2 = math.log(2.0)


@pytest.fixture(scope="module")
def reference_sets():
    return json.loads(FIXTURE.read_text())


# --------------------------------------------------------------------------- EER and minDCF


def test_metrics_equal_reference_values(reference_sets):
    assert len(reference_sets) == 3
    for case in reference_sets:
        metrics = compute_metrics(case["scores"], case["labels"], p_targets=(0.01, 0.05))
        assert metrics.eer == pytest.approx(case["eer"], abs=1e-12)
        assert metrics.min_dcf[0.01] == pytest.approx(case["min_dcf_p0.01"], abs=1e-12)
        assert metrics.min_dcf[0.05] == pytest.approx(case["min_dcf_p0.05"], abs=1e-12)
        assert metrics.num_targets == sum(case["labels"])
        assert metrics.num_targets + metrics.num_nontargets == len(case["scores"])
        assert metrics.cllr is None and metrics.act_dcf is None  # not LLRs: not judged


def test_metrics_do_not_depend_on_trial_order(reference_sets):
    case = reference_sets[1]
    order = np.random.default_rng(0).permutation(len(case["scores"]))
    scores = np.asarray(case["scores"])[order]
    labels = np.asarray(case["labels"])[order]
    metrics = compute_metrics(scores, labels, (0.05,))
    assert metrics.eer == pytest.approx(case["eer"], abs=1e-12)
    assert metrics.min_dcf[0.05] == pytest.approx(case["min_dcf_p0.05"], abs=1e-12)


def test_eer_interpolates_between_operating_points():
    # Sorted: n(0.1) t(0.2) n(0.3) t(0.4) t(0.5). Thresholds give (miss, fa):
    # accept all (0, 1); <=0.1 (0, 1/2); <=0.2 (1/3, 1/2); <=0.3 (1/3, 0); ...
    # The crossing lies on the segment (1/3, 1/2) -> (1/3, 0): miss = fa = 1/3.
    metrics = compute_metrics([0.1, 0.2, 0.3, 0.4, 0.5], [0, 1, 0, 1, 1], (0.5, 0.01))
    assert metrics.eer == pytest.approx(1 / 3)
    # minDCF(p=0.5): min over points of 0.5*miss + 0.5*fa, normalised by 0.5 -> min(miss+fa) = 1/3.
    assert metrics.min_dcf[0.5] == pytest.approx(1 / 3)
    # p=0.01: best is rejecting everything below 0.3 (miss 1/3, fa 0): 0.01/3 / 0.01 = 1/3.
    assert metrics.min_dcf[0.01] == pytest.approx(1 / 3)


def test_separable_and_tied_scores():
    separable = compute_metrics([0.0, 0.1, 0.8, 0.9], [0, 0, 1, 1])
    assert separable.eer == 0.0 and separable.min_dcf[0.01] == 0.0
    assert separable.min_cllr == 0.0  # PAV maps the classes to -inf and +inf
    # Identical scores cannot be split by any threshold: EER 0.5 whatever the label order, and
    # the best monotone map is the prior itself (LLR 0 for all): min Cllr 1.
    for labels in ([0, 1, 0, 1], [1, 1, 0, 0], [0, 0, 1, 1]):
        tied = compute_metrics([0.3] * 4, labels, (0.01,))
        assert tied.eer == pytest.approx(0.5)
        assert tied.min_dcf[0.01] == pytest.approx(1.0)
        assert tied.min_cllr == pytest.approx(1.0, abs=1e-12)


def test_det_points_are_monotone(reference_sets):
    case = reference_sets[0]
    rates = compute_metrics(case["scores"], case["labels"]).rates
    assert rates.false_alarm[0] == 1.0 and rates.miss[0] == 0.0
    assert rates.false_alarm[-1] == 0.0 and rates.miss[-1] == 1.0
    assert np.all(np.diff(rates.false_alarm) <= 0) and np.all(np.diff(rates.miss) >= 0)
    assert len(rates.thresholds) == len(np.unique(case["scores"]))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="both target and non-target"):
        compute_metrics([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="2 scores but 3 labels"):
        compute_metrics([0.1, 0.2], [1, 0, 1])
    with pytest.raises(ValueError, match="NaN"):
        compute_metrics([0.1, float("nan")], [1, 0], llr=True)
    with pytest.raises(ValueError, match="p_target"):
        compute_metrics([0.1, 0.2], [1, 0], p_targets=(1.5,))
    with pytest.raises(ValueError, match="p_target"):
        bayes_threshold(0.0)


# --------------------------------------------------------------------------- Cllr, min Cllr, actDCF


def bosaris_cllr(llrs, labels):
    """Cllr by the BOSARIS definition, one trial at a time in plain Python."""
    targets = [s for s, y in zip(llrs, labels) if y == 1]
    nontargets = [s for s, y in zip(llrs, labels) if y == 0]
    target_cost = sum(math.log1p(math.exp(-s)) for s in targets) / len(targets)
    nontarget_cost = sum(math.log1p(math.exp(s)) for s in nontargets) / len(nontargets)
    return 0.5 / LN2 * (target_cost + nontarget_cost)


def bosaris_act_dcf(llrs, labels, p):
    threshold = math.log((1 - p) / p)
    targets = [s for s, y in zip(llrs, labels) if y == 1]
    nontargets = [s for s, y in zip(llrs, labels) if y == 0]
    p_miss = sum(s < threshold for s in targets) / len(targets)
    p_fa = sum(s >= threshold for s in nontargets) / len(nontargets)
    return (p * p_miss + (1 - p) * p_fa) / min(p, 1 - p)


def reference_pav(scores, labels):
    """Posterior of each trial by pool-adjacent-violators over the distinct scores (equal scores
    pooled first), written independently of the library: a list of [targets, trials] blocks
    merged while a block's rate is not above the one before it."""
    groups = {}
    for s, y in zip(scores, labels):
        groups.setdefault(s, [0, 0])
        groups[s][0] += y
        groups[s][1] += 1
    blocks = []  # [targets, trials, [scores]]
    for s in sorted(groups):
        blocks.append([groups[s][0], groups[s][1], [s]])
        while len(blocks) > 1 and blocks[-2][0] * blocks[-1][1] >= blocks[-1][0] * blocks[-2][1]:
            t, n, members = blocks.pop()
            blocks[-1][0] += t
            blocks[-1][1] += n
            blocks[-1][2] += members
    posterior = {s: t / n for t, n, members in blocks for s in members}
    return [posterior[s] for s in scores]


def reference_min_cllr(scores, labels):
    num_targets = sum(labels)
    prior_log_odds = math.log(num_targets / (len(labels) - num_targets))
    total_target = total_nontarget = 0.0
    for p, y in zip(reference_pav(scores, labels), labels):
        # A target's block always holds a target (p > 0), a non-target's a non-target (p < 1);
        # the cost of a target at p == 1 (or a non-target at p == 0) is log(1 + 0) = 0.
        if y == 1 and p < 1:
            llr = math.log(p / (1 - p)) - prior_log_odds
            total_target += math.log1p(math.exp(-llr))
        if y == 0 and p > 0:
            llr = math.log(p / (1 - p)) - prior_log_odds
            total_nontarget += math.log1p(math.exp(llr))
    return 0.5 / LN2 * (total_target / num_targets + total_nontarget / (len(labels) - num_targets))


def test_cllr_hand_computed():
    # targets 2, 0; non-targets -1, 1:
    # (mean(ln(1+e^-2), ln 2) + mean(ln(1+e^-1), ln(1+e))) / (2 ln 2)
    expected = (
        (math.log(1 + math.exp(-2)) + math.log(2)) / 2
        + (math.log(1 + math.exp(-1)) + math.log(1 + math.e)) / 2
    ) / (2 * math.log(2))
    assert expected == pytest.approx(0.882424, abs=1e-6)  # worked out on paper
    assert cllr([2.0, 0.0, -1.0, 1.0], [1, 1, 0, 0]) == pytest.approx(expected, abs=1e-12)
    # An uninformative calibrated system (LLR 0 for every trial) costs exactly 1 bit.
    assert cllr(np.zeros(7), [1, 0, 0, 1, 0, 0, 0]) == pytest.approx(1.0, abs=1e-12)
    # Very confident and right: nearly free; very confident and wrong: costly.
    assert cllr([50.0, -50.0], [1, 0]) < 1e-20
    assert cllr([-50.0, 50.0], [1, 0]) == pytest.approx(50 / math.log(2), rel=1e-12)


def test_min_cllr_hand_computed():
    # Sorted by score: n(0.1) t(0.2) n(0.3) t(0.4) t(0.5). PAV of the labels 0 1 0 1 1 pools the
    # violating pair (1, 0) into 0.5 0.5: posteriors 0, .5, .5, 1, 1. Prior odds 3/2, so the LLRs
    # are -inf, -ln 1.5, -ln 1.5, +inf, +inf. Cost: targets (ln(1 + 1.5) + 0 + 0) / 3,
    # non-targets (0 + ln(1 + 1/1.5)) / 2.
    scores, labels = [0.3, 0.1, 0.5, 0.2, 0.4], [0, 0, 1, 1, 1]
    expected = (math.log(2.5) / 3 + math.log(5 / 3) / 2) / (2 * math.log(2))
    assert min_cllr(scores, labels) == pytest.approx(expected, abs=1e-12)
    llrs = pav_llrs(scores, labels)
    np.testing.assert_allclose(
        llrs, [-math.log(1.5), -np.inf, np.inf, -math.log(1.5), np.inf], atol=1e-12
    )


def test_act_dcf_hand_computed():
    llrs, labels = [2.0, 0.0, -1.0, -2.0, 0.5], [1, 1, 1, 0, 0]
    # p = 0.5: threshold 0 (a trial at exactly 0 is accepted): miss 1/3, false alarm 1/2,
    # cost (1/3 + 1/2) / 2 = 5/12, normalised by 0.5: 5/6.
    assert act_dcf(llrs, labels, 0.5) == pytest.approx(5 / 6, abs=1e-12)
    # p = 0.01: threshold ln 99 = 4.595: everything rejected: miss 1, cost 0.01, normalised 1.
    assert bayes_threshold(0.01) == pytest.approx(math.log(99), abs=1e-12)
    assert act_dcf(llrs, labels, 0.01) == pytest.approx(1.0, abs=1e-12)


def test_calibration_metrics_equal_the_bosaris_definitions(reference_sets):
    rng = np.random.default_rng(3)
    labels = (rng.random(3000) < 0.3).astype(int)
    llrs = np.where(
        labels == 1, rng.normal(2.0, 2.0, labels.size), rng.normal(-3.0, 2.5, labels.size)
    )
    metrics = compute_metrics(llrs, labels, (0.01, 0.05, 0.5), llr=True)
    assert metrics.cllr == pytest.approx(bosaris_cllr(llrs.tolist(), labels.tolist()), abs=1e-6)
    for p in (0.01, 0.05, 0.5):
        assert metrics.act_dcf[p] == pytest.approx(bosaris_act_dcf(llrs, labels, p), abs=1e-6)
    # min Cllr against the independent PAV on these and on the reference sets (ties included:
    # rounding makes many equal scores).
    cases = [(llrs.round(1).tolist(), labels.tolist())]
    cases += [(c["scores"], c["labels"]) for c in reference_sets]
    for scores, case_labels in cases:
        assert min_cllr(scores, case_labels) == pytest.approx(
            reference_min_cllr(scores, case_labels), abs=1e-6
        )


def test_min_cllr_is_the_best_monotone_recalibration():
    """No affine recalibration with positive slope beats min Cllr, and the PAV LLRs are already
    calibrated: their Cllr is their own min Cllr."""
    rng = np.random.default_rng(4)
    labels = (rng.random(500) < 0.5).astype(int)
    scores = rng.normal(labels * 1.5, 1.0)
    best = min_cllr(scores, labels)
    assert 0.0 < best < 1.0
    for scale, offset in itertools.product([0.5, 1.0, 1.5, 2.5], [-2.0, -1.0, 0.0, 1.0]):
        assert cllr(scale * scores + offset, labels) >= best
    pav = pav_llrs(scores, labels)
    assert min_cllr(pav, labels) == pytest.approx(cllr(pav, labels), abs=1e-12)
    assert cllr(pav, labels) == pytest.approx(best, abs=1e-12)
