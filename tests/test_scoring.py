"""Cosine scoring, AS-Norm, score files, results table, DET plot and the CLI."""

import json
import math

import kaldiio
import matplotlib.image
import numpy as np
import pytest

from speakerlab.bin import score as score_cli
from speakerlab.errors import DataError
from speakerlab.scoring import (
    AsNorm,
    EmbeddingTable,
    ScoringSetup,
    cohort_statistics,
    cosine_scores,
    load_cohort,
    load_embeddings,
    score_trials,
    trial_rows,
)
from speakerlab.trials import read_trials

VECTORS = {
    "a1": [1.0, 0.0, 0.0],
    "a2": [2.0, 2.0, 0.0],  # 45 degrees from a1
    "b1": [0.0, 0.0, 3.0],  # orthogonal to a1 and a2
    "b2": [-1.0, 0.0, 1.0],  # 135 degrees from a1, 120 from a2, 45 from b1
}
HAND_COSINES = {
    ("a1", "a2"): 1 / math.sqrt(2),
    ("a1", "b1"): 0.0,
    ("a2", "b2"): -0.5,
    ("b1", "b2"): 1 / math.sqrt(2),
    ("a1", "b2"): -1 / math.sqrt(2),
}


def write_scp(directory, vectors, name="embedding"):
    directory.mkdir(parents=True, exist_ok=True)
    ark, scp = directory / f"{name}.ark", directory / f"{name}.scp"
    kaldiio.save_ark(
        str(ark), {k: np.asarray(v, dtype=np.float32) for k, v in vectors.items()}, scp=str(scp)
    )
    return scp


def write_trials(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_unknown_utterance_names_the_line(tmp_path):
    table = load_embeddings(write_scp(tmp_path, VECTORS))
    trials = read_trials(write_trials(tmp_path / "trials", ["a1 a2 1", "a1 b1 0", "zz b1 0"]))
    with pytest.raises(DataError, match=r"trials:3: enrol utterance 'zz' has no embedding"):
        trial_rows(table, trials)
    trials = read_trials(write_trials(tmp_path / "trials", ["a1 a2 1", "a1 qq 0"]))
    with pytest.raises(DataError, match=r"trials:2: test utterance 'qq' has no embedding"):
        trial_rows(table, trials)


def test_cosine_scores_match_hand_computed_values(tmp_path):
    table = load_embeddings(write_scp(tmp_path, VECTORS))
    pairs = list(HAND_COSINES)
    trials = read_trials(write_trials(tmp_path / "trials", [f"{e} {t} 0" for e, t in pairs]))
    scores = cosine_scores(table.matrix, *trial_rows(table, trials))
    np.testing.assert_allclose(scores, [HAND_COSINES[p] for p in pairs], atol=1e-6)


@pytest.mark.parametrize("num_trials", [5000, 250_000])  # one thread; several threads
def test_cosine_scores_over_many_chunks_equal_direct_computation(num_trials):
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((50, 16)).astype(np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    enrol, test = rng.integers(0, 50, num_trials), rng.integers(0, 50, num_trials)
    expected = np.sum(matrix[enrol] * matrix[test], axis=1)
    np.testing.assert_allclose(cosine_scores(matrix, enrol, test), expected, atol=1e-6)


def test_embedding_errors(tmp_path):
    with pytest.raises(DataError, match="embedding scp not found"):
        load_embeddings(tmp_path / "missing.scp")
    zero = write_scp(tmp_path / "zero", {"x": [0.0, 0.0], "y": [1.0, 0.0]})
    with pytest.raises(DataError, match="embedding of 'x' is zero"):
        load_embeddings(zero)
    first = write_scp(tmp_path / "one", {"x": [1.0, 0.0]})
    second = write_scp(tmp_path / "two", {"x": [0.0, 1.0]})
    with pytest.raises(DataError, match="'x' already has an embedding"):
        load_embeddings([first, second])
    ragged = write_scp(tmp_path / "three", {"z": [1.0, 0.0, 1.0]})
    with pytest.raises(DataError, match="'z' has 3 dimensions, but 'x' has 2"):
        load_embeddings([first, ragged])


def test_as_norm_known_answer():
    # enrol e = (1, 0), test t = (0, 1), cosine 0. Cohort cosines: e -> [1, 0, -1, 0.6],
    # t -> [0, 1, 0, 0.8]. Top 2: e {1, 0.6}: mean 0.8, std 0.2; t {1, 0.8}: mean 0.9, std 0.1.
    # AS-Norm = 0.5 * ((0 - 0.8) / 0.2 + (0 - 0.9) / 0.1) = 0.5 * (-4 - 9) = -6.5.
    # Trial e vs e (cosine 1): 0.5 * ((1 - 0.8) / 0.2 + (1 - 0.8) / 0.2) = 1.0.
    matrix = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    cohort = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.6, 0.8]], dtype=np.float32)
    means, stds = cohort_statistics(matrix, cohort, top_k=2)
    np.testing.assert_allclose(means, [0.8, 0.9], atol=1e-6)
    np.testing.assert_allclose(stds, [0.2, 0.1], atol=1e-6)
    enrol, test = np.array([0, 0]), np.array([1, 0])
    raw = cosine_scores(matrix, enrol, test)
    norm = AsNorm.for_rows(matrix, np.array([0, 1]), cohort, top_k=2)
    np.testing.assert_allclose(norm(raw, enrol, test), [-6.5, 1.0], atol=1e-5)
    # Statistics exist only for the rows asked for.
    only_first = AsNorm.for_rows(matrix, np.array([0, 0]), cohort, top_k=2)
    assert only_first.means[0] == pytest.approx(0.8) and np.isnan(only_first.means[1])
    # top_k larger than the cohort uses all of it: e {1, 0, -1, 0.6} has mean 0.15.
    means, _ = cohort_statistics(matrix, cohort, top_k=100)
    np.testing.assert_allclose(means, [0.15, 0.45], atol=1e-6)


def test_speaker_mean_cohort(tmp_path):
    scp = write_scp(tmp_path, {"s1_a": [1.0, 0.0], "s1_b": [0.0, 5.0], "s2_a": [-2.0, 0.0]})
    (tmp_path / "utt2spk").write_text("s1_a s1\ns1_b s1\ns2_a s2\n")
    cohort = load_cohort(scp, tmp_path / "utt2spk")
    np.testing.assert_allclose(
        cohort, [[1 / math.sqrt(2), 1 / math.sqrt(2)], [-1.0, 0.0]], atol=1e-6
    )
    assert load_cohort(scp).shape == (3, 2)


def brute_force_points(scores, labels):
    """(miss, false alarm) of accepting everything, then of rejecting scores <= each distinct
    score in turn, counted trial by trial."""
    targets = [s for s, y in zip(scores, labels) if y]
    nontargets = [s for s, y in zip(scores, labels) if not y]
    points = [(0.0, 1.0)]
    for t in sorted(set(scores)):
        miss = sum(s <= t for s in targets) / len(targets)
        false_alarm = sum(s > t for s in nontargets) / len(nontargets)
        points.append((miss, false_alarm))
    return points


def brute_force_eer(scores, labels):
    """Where miss - false alarm turns from negative to non-negative, on the straight segment."""
    points = brute_force_points(scores, labels)
    for (m0, f0), (m1, f1) in zip(points, points[1:]):
        if m0 - f0 < 0 <= m1 - f1:
            a = (m1 - f1) / ((m1 - f1) - (m0 - f0))
            return m1 - a * (m1 - m0)
    raise AssertionError("no crossing")


def brute_force_min_dcf(scores, labels, p):
    costs = [p * m + (1 - p) * f for m, f in brute_force_points(scores, labels)]
    return min(costs) / min(p, 1 - p)


def make_scoring_case(tmp_path):
    """20 utterances of 5 well-separated speakers in 8 dimensions, two trial lists."""
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((5, 8))
    vectors = {
        f"s{s}_u{u}": centres[s] + 0.6 * rng.standard_normal(8) for s in range(5) for u in range(4)
    }
    scp = write_scp(tmp_path / "emb", vectors)
    utts = list(vectors)
    lists = {}
    for name, seed in (("trials_a", 2), ("trials_b", 3)):
        pick = np.random.default_rng(seed).integers(0, len(utts), (200, 2))
        lines = [
            f"{utts[i]} {utts[j]} {'target' if utts[i][:2] == utts[j][:2] else 'nontarget'}"
            for i, j in pick
        ]
        lines += ["s0_u0 s0_u1 target", "s0_u0 s1_u0 nontarget"]  # both classes for sure
        lists[name] = write_trials(tmp_path / name, lines)
    return scp, vectors, lists


def test_score_trials_writes_scores_results_and_plot(tmp_path):
    scp, vectors, lists = make_scoring_case(tmp_path)
    out = tmp_path / "scores"
    results = score_trials(scp, list(lists.values()), out, ScoringSetup(p_targets=(0.01, 0.05)))
    assert [r.name for r in results] == ["trials_a", "trials_b"]

    for result, path in zip(results, lists.values()):
        lines = (out / f"{result.name}.score").read_text().splitlines()
        trial_lines = path.read_text().splitlines()
        assert len(lines) == len(trial_lines) == 202
        fields = [line.split() for line in lines]
        assert [f[:3] for f in fields] == [t.split() for t in trial_lines]
        scores = np.array([float(f[3]) for f in fields])
        for (enrol, test, _, _), value in zip(fields[:5], scores[:5]):
            a, b = vectors[enrol], vectors[test]
            assert value == pytest.approx(a @ b / np.linalg.norm(a) / np.linalg.norm(b), abs=1e-5)
        labels = np.array([f[2] == "target" for f in fields])
        assert result.metrics.eer == pytest.approx(brute_force_eer(scores, labels), abs=1e-5)
        assert result.metrics.min_dcf[0.05] == pytest.approx(
            brute_force_min_dcf(scores, labels, 0.05), abs=1e-5
        )

    table = (out / "results.md").read_text().splitlines()
    assert table[0] == "| trials | trials count | EER (%) | minDCF (p=0.01) | minDCF (p=0.05) |"
    assert table[2].startswith(f"| trials_a | 202 | {100 * results[0].metrics.eer:.2f} |")
    assert table[3].startswith("| trials_b | 202 |")
    payload = json.loads((out / "results.json").read_text())
    assert payload["settings"]["normalisation"] == "none"
    assert [row["trials"] for row in payload["results"]] == ["trials_a", "trials_b"]
    assert payload["results"][1]["min_dcf"]["0.05"] == pytest.approx(
        results[1].metrics.min_dcf[0.05]
    )
    assert "cllr" not in payload["results"][0]  # uncalibrated scores: not judged as LLRs

    image = matplotlib.image.imread(out / "det.png")
    assert image.shape[:2] == (600, 600)
    assert image[..., :3].std() > 0.05  # not a blank canvas


def test_as_norm_run_records_settings(tmp_path):
    scp, vectors, lists = make_scoring_case(tmp_path)
    cohort_scp = write_scp(
        tmp_path / "cohort",
        {f"c{i}": v for i, v in enumerate(np.random.default_rng(5).standard_normal((30, 8)))},
    )
    setup = ScoringSetup(cohort=load_cohort(cohort_scp), top_k=10, det_plot=False)
    results = score_trials(scp, [lists["trials_a"]], tmp_path / "out", setup)
    payload = json.loads((tmp_path / "out" / "results.json").read_text())
    assert payload["settings"]["normalisation"] == "as-norm"
    assert payload["settings"]["top_k"] == 10 and payload["settings"]["cohort_size"] == 30
    assert not (tmp_path / "out" / "det.png").exists()
    # Scores in the file are the normalised ones.
    first = (tmp_path / "out" / "trials_a.score").read_text().split("\n")[0].split()
    table = load_embeddings(scp)
    # Independently: the top 10 cohort cosines of each side, their mean and population std.
    e, t = (table.matrix[table.index[u]] for u in first[:2])
    cosine = float(e @ t)
    terms = []
    for side in (e, t):
        top = np.sort(setup.cohort @ side)[-10:].astype(np.float64)
        terms.append((cosine - top.mean()) / top.std())
    assert float(first[3]) == pytest.approx(0.5 * sum(terms), abs=1e-4)
    assert results[0].metrics.num_targets + results[0].metrics.num_nontargets == 202


def test_score_cli(tmp_path, capsys):
    scp, _, lists = make_scoring_case(tmp_path)
    score_cli.main(
        [
            "--embeddings",
            str(scp),
            "--trials",
            *map(str, lists.values()),
            "--out-dir",
            str(tmp_path / "cli"),
            "--p-target",
            "0.01",
            "0.05",
        ]
    )
    printed = capsys.readouterr().out
    assert "| trials_a | 202 |" in printed and "minDCF (p=0.05)" in printed
    assert (tmp_path / "cli" / "det.png").is_file()


def test_score_cli_reports_bad_trials_without_traceback(tmp_path, capsys):
    scp, _, _ = make_scoring_case(tmp_path)
    bad = write_trials(tmp_path / "bad_trials", ["s0_u0 s0_u1 target", "s0_u0 s9_u9 nontarget"])
    with pytest.raises(SystemExit) as exit_info:
        score_cli.main(
            ["--embeddings", str(scp), "--trials", str(bad), "--out-dir", str(tmp_path / "cli")]
        )
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == (
        f"speakerlab score: error: {bad}:2: test utterance 's9_u9' has no embedding\n"
    )
    with pytest.raises(SystemExit):
        score_cli.main(
            [
                "--embeddings",
                str(scp),
                "--trials",
                str(bad),
                "--out-dir",
                str(tmp_path / "cli"),
                "--top-k",
                "0",
            ]
        )


def test_embedding_table_rows():
    table = EmbeddingTable(keys=["x", "y"], matrix=np.eye(2, dtype=np.float32))
    assert table.rows(["y", "x", "y"]).tolist() == [1, 0, 1]
