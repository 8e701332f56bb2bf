"""Score calibration: an affine map from verification scores to log-likelihood ratios (LLRs).

    llr = scale * score + offset                                   (score only)
    llr = scale * score + offset + w1 * log(d_short) + w2 * log(d_long)   (with durations)

where ``d_short``/``d_long`` are the durations in seconds of the shorter and the longer recording
of the trial (quality measures in the manner of WeSpeaker's QMF; taking the shorter and the longer
side keeps the LLR symmetric in enrol and test, as the cosine score is).

The map is fitted by prior-weighted logistic regression (the linear calibration of BOSARIS):
with ``z = llr + logit(P)`` it minimises
``P * mean_t log(1 + e^-z) + (1 - P) * mean_n log(1 + e^z)``
over the target (t) and non-target (n) trials of a calibration list, whatever their proportion
in the list. The effective prior ``P`` defaults to 0.5: the objective is then Cllr (times
log 2), the metric that judges calibration over all operating points and that the results
report, with target and non-target trials weighed equally. A deployment that decides at one
operating point can fit at its own prior instead (``--prior``).

A :class:`Calibration` knows which scores it maps (``score_kind``: cosine, or AS-Norm with a given
cohort and top-k) and refuses other ones, and it carries the operating point ``p_target`` whose
Bayes threshold ``log((1 - p_target) / p_target)`` on the LLR decides verification trials. It is
saved as a small JSON file, or inside a model checkpoint (:func:`write_calibrated_model`), where
``speakerlab verify`` and ``SpeakerVerifier`` find and use it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import minimize

from speakerlab.errors import CheckpointError, ConfigError, DataError
from speakerlab.fileio import atomic_write, write_json_atomic
from speakerlab.metrics import bayes_threshold

FORMAT = "speakerlab-calibration"
VERSION = 1
DEFAULT_PRIOR = 0.5
DEFAULT_P_TARGET = 0.01
COSINE_SCORES: dict[str, Any] = {"normalisation": "none"}
CHECKPOINT_KEY = "calibration"  # top-level key of a calibrated model checkpoint
_MAX_NEWTON_ITERATIONS = 100
_GRADIENT_ACCEPTED = 1e-8  # of the loss in standardised coordinates (values of order 1)


@dataclass(frozen=True)
class Calibration:
    """An affine score-to-LLR map (see the module docstring)."""

    scale: float
    offset: float
    duration_weights: tuple[float, float] | None = None  # (log shorter, log longer) side
    score_kind: Mapping[str, Any] = field(default_factory=lambda: dict(COSINE_SCORES))
    prior: float = DEFAULT_PRIOR  # effective prior of the fit
    p_target: float = DEFAULT_P_TARGET  # operating point of decisions
    fitted_on: Mapping[str, Any] = field(default_factory=dict)  # what it was fitted on

    @property
    def uses_durations(self) -> bool:
        return self.duration_weights is not None

    def apply(
        self,
        scores: np.ndarray,
        enrol_seconds: np.ndarray | None = None,
        test_seconds: np.ndarray | None = None,
    ) -> np.ndarray:
        """LLRs (float64) of ``scores``; the durations of both sides are needed exactly when the
        calibration uses them."""
        with np.errstate(over="ignore"):  # an overflow is caught where scores are used
            llrs = self.scale * np.asarray(scores, dtype=np.float64) + self.offset
        if self.duration_weights is not None:
            if enrol_seconds is None or test_seconds is None:
                raise ConfigError(
                    "this calibration uses the durations of both recordings: give them "
                    "(--utt2dur or --wav-scp for score files)"
                )
            llrs += duration_features(enrol_seconds, test_seconds) @ np.array(self.duration_weights)
        return llrs

    def threshold_for(self, p_target: float | None = None) -> float:
        """LLR threshold of the Bayes decision at ``p_target`` (default: the calibration's)."""
        return bayes_threshold(self.p_target if p_target is None else p_target)

    def score_threshold(
        self,
        p_target: float | None = None,
        enrol_seconds: float | None = None,
        test_seconds: float | None = None,
    ) -> float:
        """The raw score at which the LLR reaches :meth:`threshold_for` (for a trial of these
        durations when the calibration uses them)."""
        base = float(self.apply(np.zeros(1), *_as_arrays(enrol_seconds, test_seconds))[0])
        return (self.threshold_for(p_target) - base) / self.scale

    def decide(
        self,
        scores: Sequence[float],
        enrol_seconds: np.ndarray | None = None,
        test_seconds: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For each trial: its LLR, the score at which that trial's LLR would reach the
        decision threshold, and the decision (same speaker when LLR >= threshold)."""
        scores = np.asarray(scores, dtype=np.float64)
        llrs = self.apply(scores, enrol_seconds, test_seconds)
        threshold = self.threshold_for()
        return llrs, scores + (threshold - llrs) / self.scale, llrs >= threshold

    def check_score_kind(self, score_kind: Mapping[str, Any], what: str = "these scores") -> None:
        """Refuse to map scores of another kind than the calibration was fitted on."""
        if dict(score_kind) != dict(self.score_kind):
            raise ConfigError(
                f"the calibration was fitted on scores made with {_describe(self.score_kind)}, "
                f"but {what} are made with {_describe(score_kind)}"
            )

    # ----------------------------------------------------------------- files

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "llr": {
                "scale": self.scale,
                "offset": self.offset,
                "duration_weights": None
                if self.duration_weights is None
                else dict(
                    zip(("log_shorter_seconds", "log_longer_seconds"), self.duration_weights)
                ),
            },
            "score_kind": dict(self.score_kind),
            "prior": self.prior,
            "p_target": self.p_target,
            "llr_threshold": self.threshold_for(),
            "fitted_on": dict(self.fitted_on),
        }

    @classmethod
    def from_json(cls, value: Any, source: str = "calibration") -> Calibration:
        """Read :meth:`to_json`'s form; a malformed value is a :class:`ConfigError` naming
        ``source`` and what is wrong."""
        try:
            if value.get("format") != FORMAT or value.get("version") != VERSION:
                raise ValueError(
                    f"not a {FORMAT} version {VERSION} "
                    f"(format {value.get('format')!r}, version {value.get('version')!r})"
                )
            llr = value["llr"]
            weights = llr.get("duration_weights")
            calibration = cls(
                scale=float(llr["scale"]),
                offset=float(llr["offset"]),
                duration_weights=None
                if weights is None
                else (float(weights["log_shorter_seconds"]), float(weights["log_longer_seconds"])),
                score_kind=dict(value["score_kind"]),
                prior=float(value["prior"]),
                p_target=float(value["p_target"]),
                fitted_on=dict(value.get("fitted_on") or {}),
            )
        except (AttributeError, KeyError, TypeError, ValueError) as err:
            detail = f"missing {err}" if isinstance(err, KeyError) else str(err)
            raise ConfigError(f"{source}: not a valid calibration ({detail})") from None
        calibration.validate(source)
        return calibration

    def validate(self, source: str = "calibration") -> None:
        numbers = [
            self.scale,
            self.offset,
            self.prior,
            self.p_target,
            *(self.duration_weights or ()),
        ]
        if not all(math.isfinite(x) for x in numbers):
            raise ConfigError(f"{source}: calibration parameters are not finite: {numbers}")
        if self.scale <= 0:
            raise ConfigError(f"{source}: calibration scale must be positive, got {self.scale}")
        for name in ("prior", "p_target"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ConfigError(f"{source}: {name} must lie in (0, 1), got {getattr(self, name)}")

    def save(self, path: str | Path) -> Path:
        """Write the calibration as JSON, atomically."""
        return write_json_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        path = Path(path)
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: calibration file not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ConfigError(f"{path}: not a readable calibration file ({err})") from None
        return cls.from_json(value, str(path))


def _as_arrays(*values: float | None) -> list[np.ndarray | None]:
    return [None if v is None else np.array([v], dtype=np.float64) for v in values]


def _describe(score_kind: Mapping[str, Any]) -> str:
    if score_kind.get("normalisation") == "as-norm":
        return (
            f"AS-Norm (top-k {score_kind.get('top_k')}, cohort of "
            f"{score_kind.get('cohort_size')} embeddings, digest "
            f"{str(score_kind.get('cohort'))[:12]})"
        )
    return "no normalisation (cosine)"


# --------------------------------------------------------------------------- fitting


def duration_features(enrol_seconds: np.ndarray, test_seconds: np.ndarray) -> np.ndarray:
    """``(n, 2)``: log seconds of the shorter and of the longer side of each trial."""
    enrol_seconds = np.asarray(enrol_seconds, dtype=np.float64)
    test_seconds = np.asarray(test_seconds, dtype=np.float64)
    if not (np.all(enrol_seconds > 0) and np.all(test_seconds > 0)):
        raise DataError("durations must be positive")
    return np.log(
        np.stack(
            [np.minimum(enrol_seconds, test_seconds), np.maximum(enrol_seconds, test_seconds)], 1
        )
    )


def _weighted_logistic(
    features: np.ndarray, is_target: np.ndarray, prior: float
) -> tuple[np.ndarray, float]:
    """Weights and bias minimising the prior-weighted logistic loss of ``features`` (columns
    standardised by the caller), the bias including ``logit(prior)``; Newton's method (the loss
    is convex and smooth; a handful of parameters)."""
    design = np.hstack([features, np.ones((len(features), 1))])
    sign = np.where(is_target, 1.0, -1.0)
    num_targets = int(is_target.sum())
    weight = np.where(is_target, prior / num_targets, (1 - prior) / (len(is_target) - num_targets))

    def loss(params: np.ndarray) -> float:
        return float(weight @ np.logaddexp(0.0, -sign * (design @ params)))

    def gradient(params: np.ndarray) -> np.ndarray:
        # d/dz log(1 + e^(-sign z)) = -sign * sigmoid(-sign z)
        return design.T @ (weight * -sign * _sigmoid(-sign * (design @ params)))

    def hessian(params: np.ndarray) -> np.ndarray:
        p = _sigmoid(design @ params)
        return design.T @ (design * (weight * p * (1 - p))[:, None])

    start = np.zeros(design.shape[1])
    start[-1] = math.log(prior / (1 - prior))
    result = minimize(
        loss,
        start,
        jac=gradient,
        hess=hessian,
        method="trust-exact",
        options={"gtol": 1e-10, "maxiter": _MAX_NEWTON_ITERATIONS},
    )
    # Near the optimum trust-exact may stop on rounding noise ("bad approximation") with the
    # gradient already negligible: the parameters are then exact to far below any tolerance.
    converged = result.success or np.linalg.norm(gradient(result.x)) < _GRADIENT_ACCEPTED
    if not converged or not np.all(np.isfinite(result.x)):
        raise DataError(
            f"the calibration fit did not converge ({result.message}); the calibration "
            "trials may be (nearly) separable: use a larger or harder list"
        )
    return result.x[:-1], float(result.x[-1])


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -x))


def fit_calibration(
    scores: np.ndarray,
    labels: np.ndarray,
    *,
    prior: float = DEFAULT_PRIOR,
    p_target: float = DEFAULT_P_TARGET,
    enrol_seconds: np.ndarray | None = None,
    test_seconds: np.ndarray | None = None,
    score_kind: Mapping[str, Any] | None = None,
    fitted_on: Mapping[str, Any] | None = None,
) -> Calibration:
    """Fit a :class:`Calibration` of ``scores`` (labels 1 target, 0 non-target) by
    prior-weighted logistic regression at the effective ``prior``; with the durations of both
    sides of each trial, their logs are extra inputs."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    is_target = np.asarray(labels).astype(bool).ravel()
    if scores.shape != is_target.shape:
        raise ValueError(f"{scores.size} scores but {is_target.size} labels")
    if not np.all(np.isfinite(scores)):
        raise DataError("calibration scores contain NaN or infinite values")
    num_targets = int(is_target.sum())
    if num_targets == 0 or num_targets == len(is_target):
        raise DataError("calibration needs both target and non-target trials")
    if scores[is_target].min() > scores[~is_target].max():
        raise DataError(
            "targets and non-targets are perfectly separated on the calibration list, so the "
            "likelihood ratio is unbounded: use a larger or harder list"
        )
    columns = [scores[:, None]]
    if (enrol_seconds is None) != (test_seconds is None):
        raise ValueError("give the durations of both sides or of none")
    if enrol_seconds is not None:
        columns.append(duration_features(enrol_seconds, test_seconds))
    features = np.hstack(columns)
    # Standardised columns keep Newton's steps well conditioned whatever the units.
    mean, std = features.mean(axis=0), features.std(axis=0)
    if np.any(std == 0):
        raise DataError("a calibration input is constant over the list (e.g. equal durations)")
    weights, bias = _weighted_logistic((features - mean) / std, is_target, prior)
    weights = weights / std
    offset = bias - float(weights @ mean) - math.log(prior / (1 - prior))
    calibration = Calibration(
        scale=float(weights[0]),
        offset=offset,
        duration_weights=None if len(weights) == 1 else (float(weights[1]), float(weights[2])),
        score_kind=dict(score_kind or COSINE_SCORES),
        prior=prior,
        p_target=p_target,
        fitted_on={
            "num_targets": num_targets,
            "num_nontargets": len(is_target) - num_targets,
            **(fitted_on or {}),
        },
    )
    if calibration.scale <= 0:
        raise DataError(
            "higher scores do not mean 'same speaker' more often on the calibration list "
            f"(fitted scale {calibration.scale:.4g}); check the list's labels"
        )
    calibration.validate()
    return calibration


# --------------------------------------------------------------------------- durations


def read_utt2dur(path: str | Path) -> dict[str, float]:
    """``utt seconds`` lines (Kaldi ``utt2dur``); a bad line is an error naming it."""
    from speakerlab.data.kaldi_dir import read_table

    durations = {}
    for utt, text in read_table(path).items():
        try:
            seconds = float(text)
        except ValueError:
            seconds = float("nan")
        if not (math.isfinite(seconds) and seconds > 0):
            raise DataError(f"{path}: duration of {utt!r} must be a positive number, got {text!r}")
        durations[utt] = seconds
    return durations


def durations_from_wav_scp(path: str | Path) -> dict[str, float]:
    """Seconds of every recording of a ``wav.scp``, from the audio headers."""
    from speakerlab.audio import audio_info
    from speakerlab.data.kaldi_dir import read_wav_scp

    durations = {}
    for utt, audio in read_wav_scp(path).items():
        info = audio_info(audio)
        if info.frames <= 0:
            raise DataError(f"{path}: {utt}: {audio} holds no samples")
        durations[utt] = info.frames / info.samplerate
    return durations


def trial_seconds(
    durations: Mapping[str, float], ids: Sequence[str], line_numbers: np.ndarray, where: str
) -> np.ndarray:
    """Durations of ``ids``; an id without one is an error naming its trial line."""
    try:
        return np.fromiter(map(durations.__getitem__, ids), dtype=np.float64, count=len(ids))
    except KeyError as err:
        first = next(i for i, utt in enumerate(ids) if utt not in durations)
        raise DataError(f"{where}:{line_numbers[first]}: no duration for {err.args[0]!r}") from None


# --------------------------------------------------------------------------- models


def write_calibrated_model(
    model_path: str | Path, calibration: Calibration, out_path: str | Path
) -> Path:
    """Write the embedding model of ``model_path`` with ``calibration`` inside, atomically.

    The file is a speakerlab checkpoint (``model``, ``model_name``, ``model_kwargs``) with one
    more top-level key, ``calibration`` (plain JSON values), so every reader of checkpoints loads
    the model as before, and the calibration cannot be separated from the weights by accident.
    Only calibrations of cosine scores are accepted: verification scores pairs by cosine.
    """
    import torch

    from speakerlab.models.checkpoint import load_embedding_model_spec

    calibration.check_score_kind(COSINE_SCORES, "the verification scores of a model")
    model, name, kwargs = load_embedding_model_spec(model_path)
    state = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    payload = {
        "model": state,
        "model_name": name,
        "model_kwargs": kwargs,
        CHECKPOINT_KEY: calibration.to_json(),
    }
    with atomic_write(out_path, "wb") as handle:
        torch.save(payload, handle)
    return Path(out_path)


def read_model_calibration(source: str | Path) -> Calibration | None:
    """The calibration inside a checkpoint file (see :func:`write_calibrated_model`), or None
    for registry ids, ONNX files and checkpoints without one."""
    import torch

    path = Path(source)
    if not path.is_file() or path.suffix == ".onnx":
        return None
    try:
        # mmap: the weights are not read, only the small calibration entry is.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # files in the legacy (non-zip) format cannot be mapped
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({err})") from None
    if not isinstance(checkpoint, dict) or CHECKPOINT_KEY not in checkpoint:
        return None
    return Calibration.from_json(checkpoint[CHECKPOINT_KEY], f"{path} ({CHECKPOINT_KEY})")
