"""Calibration: known answers on synthetic lists, the file format, the calibrate command,
calibrated scoring, and models that carry their calibration into verify."""

import json
import math
import os
import re
import shutil
import sys
from pathlib import Path

import kaldiio
import numpy as np
import pytest
import soundfile
import torch

from speakerlab.bin import calibrate as calibrate_cli
from speakerlab.bin import score as score_cli
from speakerlab.bin import verify as verify_cli
from speakerlab.calibration import (
    Calibration,
    durations_from_wav_scp,
    fit_calibration,
    read_model_calibration,
    read_utt2dur,
    write_calibrated_model,
)
from speakerlab.data.kaldi_dir import read_table
from speakerlab.errors import ConfigError, DataError
from speakerlab.inference import SpeakerVerifier
from speakerlab.models import build_model
from speakerlab.models.checkpoint import load_embedding_model_spec, save_embedding_model
from tests.processes import run_bounded


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def sandwich_standard_errors(features, labels, prior, weights, offset):
    """Standard errors of the prior-weighted logistic fit (weights then offset), from the
    sandwich covariance H^-1 G H^-1 of its estimating equation sum w_i (p_i - y_i) x_i = 0."""
    design = np.hstack([features, np.ones((len(features), 1))])
    z = features @ weights + offset + math.log(prior / (1 - prior))
    p, y = sigmoid(z), labels.astype(float)
    w = np.where(labels == 1, prior / labels.sum(), (1 - prior) / (labels == 0).sum())
    h = design.T @ (design * (w * p * (1 - p))[:, None])
    g = design.T @ (design * (w**2 * (p - y) ** 2)[:, None])
    h_inv = np.linalg.inv(h)
    return np.sqrt(np.diag(h_inv @ g @ h_inv))


@pytest.mark.parametrize("prior", [0.5, 0.01])
def test_fit_recovers_the_llr_of_two_equal_variance_gaussians(prior):
    """Target scores N(mt, s^2) and non-target scores N(mn, s^2) have the exact LLR
    ((mt - mn) s - (mt^2 - mn^2) / 2) / s^2: affine with slope 40 and offset -12 here. The fit
    is the maximum-likelihood estimate of a correctly specified model at any prior, so it must
    land within 5 standard errors (a correct fit misses by more with probability < 1e-6)."""
    mt, mn, sd = 0.5, 0.1, 0.1
    slope, offset = (mt - mn) / sd**2, -(mt**2 - mn**2) / (2 * sd**2)
    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.normal(mt, sd, 40000), rng.normal(mn, sd, 120000)])
    labels = np.repeat([1, 0], [40000, 120000])
    calibration = fit_calibration(scores, labels, prior=prior)
    se = sandwich_standard_errors(
        scores[:, None], labels, prior, np.array([calibration.scale]), calibration.offset
    )
    # The test can tell a good fit from a bad one: the slope within a few percent, the offset
    # well within logit(0.01) = -4.6 (what forgetting the prior's shift would cost).
    assert se[0] < 0.02 * slope and se[1] < 0.3
    assert abs(calibration.scale - slope) < 5 * se[0]
    assert abs(calibration.offset - offset) < 5 * se[1]
    assert calibration.prior == prior and calibration.fitted_on["num_targets"] == 40000


def test_fit_with_durations_recovers_a_known_llr():
    """Trials drawn from a logistic model in (score, log shorter, log longer duration): the true
    LLR is that model's log-odds minus the log prior odds of the population."""
    a, c_short, c_long, b = 8.0, 0.8, -0.3, -3.0
    rng = np.random.default_rng(1)

    def draw(n):
        scores = rng.normal(0.3, 0.25, n)
        enrol, test = np.exp(rng.uniform(0, np.log(30), (2, n)))
        short, long = np.log(np.minimum(enrol, test)), np.log(np.maximum(enrol, test))
        return scores, enrol, test, a * scores + c_short * short + c_long * long + b

    population = sigmoid(draw(2_000_000)[3]).mean()
    scores, enrol, test, z = draw(60000)
    labels = (rng.random(z.size) < sigmoid(z)).astype(int)
    calibration = fit_calibration(scores, labels, enrol_seconds=enrol, test_seconds=test)
    features = np.stack(
        [scores, np.log(np.minimum(enrol, test)), np.log(np.maximum(enrol, test))], 1
    )
    fitted = np.array([calibration.scale, *calibration.duration_weights])
    se = sandwich_standard_errors(features, labels, 0.5, fitted, calibration.offset)
    np.testing.assert_array_less(np.abs(fitted - [a, c_short, c_long]), 5 * se[:3])
    true_offset = b - math.log(population / (1 - population))
    assert abs(calibration.offset - true_offset) < 5 * se[3] + 0.01  # + Monte Carlo error
    # The LLR does not depend on which side is called enrol.
    np.testing.assert_allclose(
        calibration.apply(scores[:50], enrol[:50], test[:50]),
        calibration.apply(scores[:50], test[:50], enrol[:50]),
    )
    with pytest.raises(ConfigError, match="durations of both recordings"):
        calibration.apply(scores[:5])


def test_thresholds_and_decisions_agree():
    calibration = Calibration(scale=10.0, offset=-3.0, p_target=0.01)
    assert calibration.threshold_for() == pytest.approx(math.log(99))
    assert calibration.threshold_for(0.5) == 0.0
    # score 0.3 -> llr 0; the score reaching llr ln 99 is (ln 99 + 3) / 10.
    assert calibration.score_threshold(0.5) == pytest.approx(0.3)
    assert calibration.score_threshold() == pytest.approx((math.log(99) + 3) / 10)
    llrs, limits, same = calibration.decide([0.2, 0.9])
    np.testing.assert_allclose(llrs, [-1.0, 6.0])
    np.testing.assert_allclose(limits, calibration.score_threshold())
    assert same.tolist() == [False, True]


def test_json_round_trip_and_validation(tmp_path):
    calibration = Calibration(
        scale=12.5,
        offset=-4.25,
        duration_weights=(0.5, -0.1),
        score_kind={"normalisation": "as-norm", "top_k": 300, "cohort_size": 10, "cohort": "ab"},
        prior=0.2,
        p_target=0.05,
        fitted_on={"trials": "x"},
    )
    path = calibration.save(tmp_path / "calibration.json")
    assert Calibration.load(path) == calibration
    value = json.loads(path.read_text())
    assert value["llr_threshold"] == pytest.approx(math.log(19))
    for change, message in [
        ({"format": "other"}, "not a speakerlab-calibration"),
        ({"llr": {"offset": 0.0}}, "missing 'scale'"),
        ({"llr": {"scale": -1.0, "offset": 0.0}}, "scale must be positive"),
        ({"llr": {"scale": float("nan"), "offset": 0.0}}, "not finite"),
        ({"p_target": 1.0}, "p_target must lie in"),
    ]:
        (tmp_path / "bad.json").write_text(json.dumps({**value, **change}))
        with pytest.raises(ConfigError, match=message):
            Calibration.load(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ConfigError, match="broken.json: not a readable calibration file"):
        Calibration.load(tmp_path / "broken.json")
    with pytest.raises(ConfigError, match="calibration file not found"):
        Calibration.load(tmp_path / "missing.json")


def test_fit_refuses_lists_it_cannot_fit():
    with pytest.raises(DataError, match="perfectly separated"):
        fit_calibration([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1])
    with pytest.raises(DataError, match="do not mean 'same speaker'"):
        fit_calibration([0.1, 0.3, 0.2, 0.8, 0.9, 0.7], [1, 1, 0, 0, 0, 1])
    with pytest.raises(DataError, match="both target and non-target"):
        fit_calibration([0.1, 0.2], [1, 1])
    with pytest.raises(DataError, match="constant"):
        fit_calibration(
            [0.1, 0.3, 0.2, 0.4], [0, 0, 1, 1], enrol_seconds=[2] * 4, test_seconds=[2] * 4
        )
    with pytest.raises(DataError, match="NaN"):
        fit_calibration([0.1, float("nan")], [0, 1])


def test_durations_from_files(tmp_path):
    soundfile.write(tmp_path / "a.wav", np.zeros(24000, np.float32), 16000)
    soundfile.write(tmp_path / "b.wav", np.zeros(8000, np.float32), 8000)
    (tmp_path / "wav.scp").write_text(f"a {tmp_path / 'a.wav'}\nb {tmp_path / 'b.wav'}\n")
    assert durations_from_wav_scp(tmp_path / "wav.scp") == {"a": 1.5, "b": 1.0}
    (tmp_path / "utt2dur").write_text("a 1.5\nb 0\n")
    with pytest.raises(DataError, match="duration of 'b' must be a positive number"):
        read_utt2dur(tmp_path / "utt2dur")


# --------------------------------------------------------------------------- commands


def write_scp(directory, vectors):
    directory.mkdir(parents=True, exist_ok=True)
    scp = directory / "embedding.scp"
    kaldiio.save_ark(
        str(directory / "embedding.ark"),
        {k: np.asarray(v, dtype=np.float32) for k, v in vectors.items()},
        scp=str(scp),
    )
    return scp


@pytest.fixture()
def embedded_lists(tmp_path):
    """Embeddings of 12 speakers x 6 utterances with speaker-dependent noise, a calibration
    list on speakers 0-5 and a test list on speakers 6-11."""
    rng = np.random.default_rng(2)
    centres = rng.standard_normal((12, 16))
    vectors = {
        f"s{s:02d}_u{u}": centres[s] + 1.2 * rng.standard_normal(16)
        for s in range(12)
        for u in range(6)
    }
    scp = write_scp(tmp_path / "emb", vectors)
    lists = {}
    for name, speakers in (("calib", range(0, 6)), ("test", range(6, 12))):
        utts = [u for u in vectors if int(u[1:3]) in speakers]
        lines = [
            f"{a} {b} {'target' if a[:3] == b[:3] else 'nontarget'}"
            for i, a in enumerate(utts)
            for b in utts[i + 1 :]
        ]
        (tmp_path / name).write_text("\n".join(lines) + "\n")
        lists[name] = tmp_path / name
    return scp, vectors, lists


def test_calibrate_then_score_with_the_calibration(embedded_lists, tmp_path, capsys):
    scp, vectors, lists = embedded_lists
    out = tmp_path / "calibration.json"
    calibrate_cli.main(
        ["--embeddings", str(scp), "--trials", str(lists["calib"]), "--out", str(out)]
    )
    printed = capsys.readouterr().out
    assert "llr = " in printed and "decisions at p_target 0.01" in printed
    calibration = Calibration.load(out)
    assert calibration.score_kind == {"normalisation": "none"} and calibration.scale > 0

    score_cli.main(
        [
            "--embeddings",
            str(scp),
            "--trials",
            str(lists["test"]),
            "--out-dir",
            str(tmp_path / "scores"),
            "--calibration",
            str(out),
            "--p-target",
            "0.01",
            "0.5",
            "--no-plot",
        ]
    )
    table = capsys.readouterr().out
    assert "| Cllr | min Cllr | actDCF (p=0.01) | actDCF (p=0.5) |" in table
    lines = [line.split() for line in (tmp_path / "scores" / "test.score").read_text().splitlines()]
    llrs = np.array([float(f[3]) for f in lines])
    labels = np.array([f[2] == "target" for f in lines])
    for enrol, test, _, value in lines[:10]:
        a, b = vectors[enrol], vectors[test]
        cosine = a @ b / np.linalg.norm(a) / np.linalg.norm(b)
        expected = calibration.scale * cosine + calibration.offset
        assert float(value) == pytest.approx(expected, abs=2e-6)
    row = json.loads((tmp_path / "scores" / "results.json").read_text())["results"][0]
    cllr = np.mean(np.log1p(np.exp(-llrs[labels]))) + np.mean(np.log1p(np.exp(llrs[~labels])))
    assert row["cllr"] == pytest.approx(cllr / (2 * math.log(2)), abs=1e-5)  # 6-digit file
    assert 0 < row["min_cllr"] <= row["cllr"] < 1  # held-out speakers: calibrated, not perfect
    assert set(row["act_dcf"]) == {"0.01", "0.5"}


def test_a_calibration_applies_only_to_its_kind_of_scores(embedded_lists, tmp_path, capsys):
    scp, _, lists = embedded_lists
    cohort = write_scp(tmp_path / "cohort", {f"c{i}": v for i, v in enumerate(np.eye(16))})
    out = tmp_path / "asnorm.json"
    calibrate_cli.main(
        ["--embeddings", str(scp), "--trials", str(lists["calib"]), "--out", str(out)]
        + ["--cohort", str(cohort), "--top-k", "5"]
    )
    kind = Calibration.load(out).score_kind
    assert kind["normalisation"] == "as-norm" and kind["top_k"] == 5
    base = ["--embeddings", str(scp), "--trials", str(lists["test"]), "--calibration", str(out)]
    for extra, message in [
        ([], "fitted on scores made with AS-Norm .* but these scores are made with no norm"),
        (["--cohort", str(cohort), "--top-k", "6"], "AS-Norm \\(top-k 5.* AS-Norm \\(top-k 6"),
    ]:
        with pytest.raises(SystemExit):
            score_cli.main([*base, *extra, "--out-dir", str(tmp_path / "bad")])
        error = capsys.readouterr().err
        assert error.startswith("speakerlab score: error: the calibration")
        assert re.search(message, error), error
    assert not (tmp_path / "bad").exists()  # refused before any output


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("campplus", embedding_size=32, growth_rate=8, bn_size=2, init_channels=16)
    path = tmp_path_factory.mktemp("model") / "model.ckpt"
    save_embedding_model(model.eval(), path)
    return path


@pytest.mark.slow  # three model loads, each probing the shortest input the model takes
def test_a_calibrated_model_carries_its_calibration_into_verify(small_model, tmp_path, capsys):
    calibration = Calibration(scale=20.0, offset=-10.0, p_target=0.05)
    out = write_calibrated_model(small_model, calibration, tmp_path / "calibrated.ckpt")
    assert read_model_calibration(out) == calibration
    assert read_model_calibration(small_model) is None
    # Every checkpoint reader loads it as before: same architecture, same weights.
    model, name, kwargs = load_embedding_model_spec(out)
    original, original_name, original_kwargs = load_embedding_model_spec(small_model)
    assert (name, kwargs) == (original_name, original_kwargs)
    for key, value in original.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)

    rng = np.random.default_rng(0)
    wavs = []
    for i in range(2):
        wavs.append(tmp_path / f"{i}.wav")
        soundfile.write(wavs[-1], (0.1 * rng.standard_normal(24000)).astype(np.float32), 16000)
    verifier = SpeakerVerifier.load(out)
    result = verifier.verify(*wavs)
    assert result.llr == pytest.approx(20.0 * result.score - 10.0, abs=1e-9)
    assert result.same_speaker == (result.llr >= math.log(19))
    assert result.threshold == pytest.approx((math.log(19) + 10.0) / 20.0)
    # An explicit threshold decides on the cosine score, as for any model.
    plain = verifier.verify(*wavs, threshold=0.3)
    assert plain.llr is None and plain.same_speaker == (plain.score >= 0.3)
    assert SpeakerVerifier.load(out, threshold=0.3).calibration is None
    # A calibration with durations: 1.5 s each side here.
    verifier.calibration = Calibration(scale=20.0, offset=-10.0, duration_weights=(1.0, 0.5))
    with_durations = verifier.verify(*wavs)
    expected = 20.0 * with_durations.score - 10.0 + 1.5 * math.log(1.5)
    assert with_durations.llr == pytest.approx(expected, abs=1e-9)

    verify_cli.main([str(wavs[0]), str(wavs[1]), "--model", str(out)])
    printed = capsys.readouterr().out
    assert f"llr: {result.llr:.4f} (calibrated; same speaker when llr >= 2.9444" in printed
    assert "p_target 0.05" in printed


def test_only_cosine_calibrations_go_into_models(small_model, tmp_path):
    calibration = Calibration(
        scale=2.0, offset=0.0, score_kind={"normalisation": "as-norm", "top_k": 3}
    )
    with pytest.raises(ConfigError, match="verification scores of a model"):
        write_calibrated_model(small_model, calibration, tmp_path / "x.ckpt")
    assert not (tmp_path / "x.ckpt").exists()


# --------------------------------------------------------------------------- recipe

RECIPE = Path(__file__).resolve().parents[1] / "egs" / "3dspeaker" / "sv-eres2net" / "run.sh"
# The mini experiment's own model for two short epochs: a model that has learnt a little, so that
# higher scores mean "same speaker" (a 4-channel full-depth model after 5 iterations sometimes did
# not, and calibration rightly refused it).
TINY_TRAINING = [
    "trainer.epochs=2",
    "trainer.batch_size=16",
    "data.crop_seconds=2.0",
    "data.num_workers=0",
    "trainer.progress_bar=false",
]


def run_recipe(*args):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    return run_bounded(["bash", str(RECIPE), *args], timeout=1200, env=env)


@pytest.mark.slow
def test_recipe_calibrates_on_held_out_speakers(tmp_path):
    """Stages 1-5 with --calibrate true on the CI mini corpus: the calibration speakers are not
    trained on, the calibrated table has Cllr and actual DCF, and the exported model carries
    the calibration."""
    paths = ["--raw_data", str(tmp_path / "raw"), "--data", str(tmp_path / "data")]
    exp = tmp_path / "exp"
    common = ["--corpus", "mini", "--mini_size", "ci", *paths, "--exp", str(exp)]
    result = run_recipe(*common, "--calibrate", "true", "--", *TINY_TRAINING)
    assert result.returncode == 0, result.stderr[-3000:]

    prepared = tmp_path / "data" / "3dspeaker"
    held = set(read_table(prepared / "calibration" / "utt2spk").values())
    trained = set(read_table(prepared / "train_fit" / "utt2spk").values())
    assert len(held) == 4 and not held & trained
    assert held | trained == set(read_table(prepared / "train" / "utt2spk").values())

    rows = json.loads((exp / "scores_calibrated" / "results.json").read_text())["results"]
    assert len(rows) == 3 and all("cllr" in row and "act_dcf" in row for row in rows)
    plain = json.loads((exp / "scores" / "results.json").read_text())["results"]
    for row, before in zip(rows, plain):  # an increasing affine map keeps the ranking
        assert row["eer"] == pytest.approx(before["eer"], abs=1e-9)
    calibration = Calibration.load(exp / "calibration.json")
    assert read_model_calibration(exp / "model_calibrated.ckpt") == calibration
    assert "Cllr" in result.stdout  # the calibrated table is printed

    # A model trained on every speaker cannot be calibrated on some of them.
    other = tmp_path / "exp_all"
    shutil.copytree(exp, other)
    config = other / "config.yaml"
    config.write_text(config.read_text().replace("train_fit", "train"))
    refused = run_recipe(*common[:-1], str(other), "--calibrate", "true", "--stage", "5")
    assert refused.returncode != 0 and "which holds the calibration speakers" in refused.stderr
    refused = run_recipe(*paths, "--pretrained", "x.ckpt", "--calibrate", "true")
    assert refused.returncode != 0 and "released model has seen every" in refused.stderr
