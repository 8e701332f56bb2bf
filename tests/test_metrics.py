"""EER, minDCF and DET points: parity with the reference fixtures and hand-worked cases."""

import json
from pathlib import Path

import numpy as np
import pytest

from speakerlab.metrics import compute_eer, compute_metrics, compute_min_dcf, det_curve, error_rates

FIXTURE = Path(__file__).parent / "fixtures" / "reference" / "metrics.json"


@pytest.fixture(scope="module")
def reference_sets():
    return json.loads(FIXTURE.read_text())


def test_metrics_equal_reference_values(reference_sets):
    assert len(reference_sets) == 3
    for case in reference_sets:
        metrics = compute_metrics(case["scores"], case["labels"], p_targets=(0.01, 0.05))
        assert metrics.eer == pytest.approx(case["eer"], abs=1e-12)
        assert metrics.min_dcf[0.01] == pytest.approx(case["min_dcf_p0.01"], abs=1e-12)
        assert metrics.min_dcf[0.05] == pytest.approx(case["min_dcf_p0.05"], abs=1e-12)
        assert metrics.num_targets + metrics.num_nontargets == len(case["scores"])


def test_metrics_do_not_depend_on_trial_order(reference_sets):
    case = reference_sets[1]
    order = np.random.default_rng(0).permutation(len(case["scores"]))
    scores = np.asarray(case["scores"])[order]
    labels = np.asarray(case["labels"])[order]
    assert compute_eer(scores, labels) == pytest.approx(case["eer"], abs=1e-12)
    assert compute_min_dcf(scores, labels, 0.05) == pytest.approx(case["min_dcf_p0.05"], abs=1e-12)


def test_eer_interpolates_between_operating_points():
    # Sorted: n(0.1) t(0.2) n(0.3) t(0.4) t(0.5). Thresholds give (miss, fa):
    # accept all (0, 1); <=0.1 (0, 1/2); <=0.2 (1/3, 1/2); <=0.3 (1/3, 0); ...
    # The crossing lies on the segment (1/3, 1/2) -> (1/3, 0): miss = fa = 1/3.
    scores = [0.1, 0.2, 0.3, 0.4, 0.5]
    labels = [0, 1, 0, 1, 1]
    assert compute_eer(scores, labels) == pytest.approx(1 / 3)
    # minDCF(p=0.5): min over points of 0.5*miss + 0.5*fa, normalised by 0.5 -> min(miss+fa) = 1/3.
    assert compute_min_dcf(scores, labels, 0.5) == pytest.approx(1 / 3)
    # p=0.01: best is rejecting everything below 0.3 (miss 1/3, fa 0): 0.01/3 / 0.01 = 1/3.
    assert compute_min_dcf(scores, labels, 0.01) == pytest.approx(1 / 3)


def test_separable_and_tied_scores():
    assert compute_eer([0.0, 0.1, 0.8, 0.9], [0, 0, 1, 1]) == 0.0
    assert compute_min_dcf([0.0, 0.1, 0.8, 0.9], [0, 0, 1, 1]) == 0.0
    # Identical scores cannot be split by any threshold: EER 0.5 whatever the label order.
    for labels in ([0, 1, 0, 1], [1, 1, 0, 0], [0, 0, 1, 1]):
        assert compute_eer([0.3] * 4, labels) == pytest.approx(0.5)
        assert compute_min_dcf([0.3] * 4, labels, 0.01) == pytest.approx(1.0)


def test_det_curve_points_are_monotone(reference_sets):
    case = reference_sets[0]
    false_alarm, miss = det_curve(case["scores"], case["labels"])
    assert false_alarm[0] == 1.0 and miss[0] == 0.0
    assert false_alarm[-1] == 0.0 and miss[-1] == 1.0
    assert np.all(np.diff(false_alarm) <= 0) and np.all(np.diff(miss) >= 0)
    rates = error_rates(case["scores"], case["labels"])
    assert len(rates.thresholds) == len(np.unique(case["scores"]))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="both target and non-target"):
        compute_eer([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="2 scores but 3 labels"):
        compute_eer([0.1, 0.2], [1, 0, 1])
    with pytest.raises(ValueError, match="NaN"):
        compute_eer([0.1, float("nan")], [1, 0])
    with pytest.raises(ValueError, match="p_target"):
        compute_min_dcf([0.1, 0.2], [1, 0], p_target=1.5)
