"""Scoring of trial lists: cosine scores, AS-Norm, calibration to log-likelihood ratios, score
files, the results table and the DET plot.

Scoring is vectorised end to end: utterance ids are mapped to rows of one L2-normalised
embedding matrix with a dict (one look-up per trial side), and cosine scores are row-wise dot
products of gathered rows, computed in cache-sized chunks. AS-Norm statistics are computed once
per utterance for all lists together, in chunks of utterances so that memory stays bounded.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from speakerlab.calibration import Calibration, trial_seconds
from speakerlab.data.kaldi_dir import read_utt2spk, spk2utt_from_utt2spk
from speakerlab.embedding_store import read_embeddings
from speakerlab.errors import DataError
from speakerlab.fileio import atomic_write, write_json_atomic, write_text_atomic
from speakerlab.metrics import (
    DEFAULT_P_TARGETS,
    ErrorRates,
    Metrics,
    compute_metrics,
    eer_from_rates,
)
from speakerlab.trials import LABEL_WORDS, Trials, read_trials

_SCORE_CHUNK = 512  # trials per gather: both gathered blocks stay in the CPU's L2 cache
_MAX_THREADS = 8
_MIN_TRIALS_PER_THREAD = 100_000  # below this, starting threads costs more than it saves
_COHORT_CHUNK = 1024  # utterances scored against the cohort at a time (bounds memory)
DEFAULT_TOP_K = 300


# --------------------------------------------------------------------------- embeddings


@dataclass
class EmbeddingTable:
    """L2-normalised embeddings as one ``(n, dim)`` float32 matrix with an id -> row map."""

    keys: list[str]
    matrix: np.ndarray
    index: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.index = {key: row for row, key in enumerate(self.keys)}

    def rows(self, ids: Sequence[str]) -> np.ndarray:
        """Row numbers of ``ids``; raises ``KeyError`` with the first unknown id."""
        return np.fromiter(map(self.index.__getitem__, ids), dtype=np.int64, count=len(ids))


def l2_normalise(
    matrix: np.ndarray, what: str = "embeddings", keys: Sequence[str] | None = None
) -> np.ndarray:
    """Rows scaled to unit length; a zero or non-finite row is an error naming its key."""
    matrix = np.asarray(matrix, dtype=np.float32)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    bad = np.flatnonzero(~np.isfinite(norms[:, 0]) | (norms[:, 0] == 0))
    if bad.size:
        name = keys[bad[0]] if keys is not None else f"row {bad[0]}"
        raise DataError(f"{what}: embedding of {name!r} is zero or not finite")
    return matrix / norms


def load_embeddings(scp_paths: str | Path | Sequence[str | Path]) -> EmbeddingTable:
    """Read one or more Kaldi embedding scp files into a normalised :class:`EmbeddingTable`.

    A key present in two files is an error (it would be ambiguous which embedding to score).
    """
    if isinstance(scp_paths, (str, Path)):
        scp_paths = [scp_paths]
    keys: list[str] = []
    vectors: list[np.ndarray] = []
    origin: dict[str, Path] = {}
    for scp in map(Path, scp_paths):
        if not scp.is_file():
            raise DataError(f"{scp}: embedding scp not found")
        for key, vector in read_embeddings(scp).items():
            if key in origin:
                raise DataError(
                    f"{scp}: utterance {key!r} already has an embedding in {origin[key]}"
                )
            origin[key] = scp
            keys.append(key)
            vectors.append(np.asarray(vector, dtype=np.float32).ravel())
    if not keys:
        raise DataError(f"{', '.join(map(str, scp_paths))}: no embeddings")
    dim = vectors[0].size
    odd = next((i for i, vector in enumerate(vectors) if vector.size != dim), None)
    if odd is not None:
        raise DataError(
            f"{origin[keys[odd]]}: embedding of {keys[odd]!r} has "
            f"{vectors[odd].size} dimensions, but {keys[0]!r} has {dim}"
        )
    matrix = l2_normalise(np.stack(vectors), "embeddings", keys)
    return EmbeddingTable(keys=keys, matrix=matrix)


def trial_rows(table: EmbeddingTable, trials: Trials) -> tuple[np.ndarray, np.ndarray]:
    """Embedding rows of each trial's enrol and test utterance.

    An utterance without an embedding raises a :class:`DataError` naming the trial line.
    """
    rows = []
    for side, ids in (("enrol", trials.enrol), ("test", trials.test)):
        try:
            rows.append(table.rows(ids))
        except KeyError:
            first = next(i for i, utt in enumerate(ids) if utt not in table.index)
            raise DataError(
                f"{trials.path}:{trials.line_numbers[first]}: {side} utterance "
                f"{ids[first]!r} has no embedding"
            ) from None
    return rows[0], rows[1]


# --------------------------------------------------------------------------- scoring


def _dot_rows_into(
    scores: np.ndarray, matrix: np.ndarray, enrol_rows: np.ndarray, test_rows: np.ndarray
) -> None:
    """``scores[i] = matrix[enrol_rows[i]] . matrix[test_rows[i]]``, one cache-sized chunk at
    a time (numpy releases the GIL here, so several of these run in parallel threads)."""
    dim = matrix.shape[1]
    enrol_buf = np.empty((_SCORE_CHUNK, dim), dtype=matrix.dtype)
    test_buf = np.empty((_SCORE_CHUNK, dim), dtype=matrix.dtype)
    for start in range(0, len(scores), _SCORE_CHUNK):
        stop = min(start + _SCORE_CHUNK, len(scores))
        n = stop - start
        np.take(matrix, enrol_rows[start:stop], axis=0, out=enrol_buf[:n])
        np.take(matrix, test_rows[start:stop], axis=0, out=test_buf[:n])
        np.einsum("ij,ij->i", enrol_buf[:n], test_buf[:n], out=scores[start:stop])


def cosine_scores(matrix: np.ndarray, enrol_rows: np.ndarray, test_rows: np.ndarray) -> np.ndarray:
    """Row-wise dot products ``matrix[enrol_rows] . matrix[test_rows]`` (cosines when the rows
    are unit length), split over one thread per CPU core for long lists."""
    num_trials = len(enrol_rows)
    scores = np.empty(num_trials, dtype=np.float32)
    num_threads = min(
        _MAX_THREADS, os.cpu_count() or 1, max(1, num_trials // _MIN_TRIALS_PER_THREAD)
    )
    bounds = np.linspace(0, num_trials, num_threads + 1).astype(int)
    blocks = [
        (scores[a:b], matrix, enrol_rows[a:b], test_rows[a:b])
        for a, b in zip(bounds[:-1], bounds[1:])
    ]
    if num_threads == 1:
        _dot_rows_into(*blocks[0])
    else:
        with ThreadPoolExecutor(num_threads) as pool:
            list(pool.map(lambda block: _dot_rows_into(*block), blocks))
    return scores


# --------------------------------------------------------------------------- AS-Norm


def load_cohort(
    scp_paths: str | Path | Sequence[str | Path], utt2spk: str | Path | None = None
) -> np.ndarray:
    """Normalised cohort embeddings; with ``utt2spk``, one mean embedding per speaker
    (the mean of its normalised utterance embeddings, normalised again)."""
    table = load_embeddings(scp_paths)
    if utt2spk is None:
        return table.matrix
    speakers = spk2utt_from_utt2spk(read_utt2spk(utt2spk))
    means = []
    for utts in speakers.values():
        rows = [table.index[u] for u in utts if u in table.index]
        if rows:
            means.append(table.matrix[rows].mean(axis=0))
    if not means:
        raise DataError(f"{utt2spk}: no utterance of the cohort utt2spk has an embedding")
    return l2_normalise(np.stack(means), "cohort speaker means")


def cohort_statistics(
    embeddings: np.ndarray, cohort: np.ndarray, top_k: int = DEFAULT_TOP_K
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (population) standard deviation of each embedding's ``top_k`` highest cosine
    scores against the cohort (all of it when the cohort is smaller)."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    k = min(top_k, cohort.shape[0])
    means = np.empty(len(embeddings), dtype=np.float64)
    stds = np.empty(len(embeddings), dtype=np.float64)
    for start in range(0, len(embeddings), _COHORT_CHUNK):
        block = embeddings[start : start + _COHORT_CHUNK] @ cohort.T
        top = np.partition(block, block.shape[1] - k, axis=1)[:, -k:].astype(np.float64)
        means[start : start + len(block)] = top.mean(axis=1)
        stds[start : start + len(block)] = top.std(axis=1)
    return means, stds


@dataclass
class AsNorm:
    """AS-Norm statistics of the rows of an embedding matrix (NaN for rows not computed)."""

    means: np.ndarray
    stds: np.ndarray

    @classmethod
    def for_rows(
        cls, matrix: np.ndarray, rows: np.ndarray, cohort: np.ndarray, top_k: int = DEFAULT_TOP_K
    ) -> AsNorm:
        """Statistics of each distinct row in ``rows`` against ``cohort``, computed once."""
        used = np.unique(rows)
        means = np.full(len(matrix), np.nan)
        stds = np.full(len(matrix), np.nan)
        means[used], stds[used] = cohort_statistics(matrix[used], cohort, top_k)
        np.maximum(stds, 1e-8, out=stds)  # a cohort of identical scores would divide by zero
        return cls(means, stds)

    def __call__(
        self, scores: np.ndarray, enrol_rows: np.ndarray, test_rows: np.ndarray
    ) -> np.ndarray:
        """``0.5 * ((s - mu_e) / sd_e + (s - mu_t) / sd_t)`` with each side's statistics over
        its ``top_k`` closest cohort embeddings (adaptive symmetric normalisation)."""
        scores = scores.astype(np.float64)
        enrol = (scores - self.means[enrol_rows]) / self.stds[enrol_rows]
        test = (scores - self.means[test_rows]) / self.stds[test_rows]
        return (0.5 * (enrol + test)).astype(np.float32)


def cohort_digest(cohort: np.ndarray) -> str:
    """SHA-256 of a cohort matrix (float32 values and shape): the identity of a cohort."""
    cohort = np.ascontiguousarray(cohort, dtype=np.float32)
    return hashlib.sha256(f"{cohort.shape}".encode() + cohort.tobytes()).hexdigest()


# --------------------------------------------------------------------------- outputs


def write_scores(path: str | Path, trials: Trials, scores: np.ndarray) -> Path:
    """Write ``enrol test label score`` lines (label as target/nontarget), atomically.
    A score that is not finite is an error naming its trial line; nothing is written then."""
    bad = np.flatnonzero(~np.isfinite(scores))
    if bad.size:
        raise DataError(
            f"{trials.path}:{trials.line_numbers[bad[0]]}: score is {scores[bad[0]]}; no score "
            f"file written"
        )
    label_words = [LABEL_WORDS[label] for label in trials.labels.tolist()]
    fields = zip(trials.enrol, trials.test, label_words, scores.tolist())
    lines = map("%s %s %s %.6f\n".__mod__, fields)  # %-formatting: the fastest in Python
    with atomic_write(path) as f:
        f.writelines(lines)
    return Path(path)


@dataclass
class TrialResult:
    """Metrics of one trial list."""

    name: str
    metrics: Metrics
    score_file: str | None = None

    def to_json(self) -> dict[str, Any]:
        m = self.metrics
        row: dict[str, Any] = {
            "trials": self.name,
            "num_trials": m.num_targets + m.num_nontargets,
            "num_targets": m.num_targets,
            "eer": m.eer,
            "eer_percent": 100.0 * m.eer,
            "min_dcf": {f"{p:g}": value for p, value in m.min_dcf.items()},
            "min_cllr": m.min_cllr,
        }
        if m.cllr is not None and m.act_dcf is not None:
            row["cllr"] = m.cllr
            row["act_dcf"] = {f"{p:g}": value for p, value in m.act_dcf.items()}
        row["score_file"] = self.score_file
        return row


def results_markdown(results: Sequence[TrialResult], title: str | None = None) -> str:
    """One Markdown table, a row per trial list: trials, EER (%) and minDCF per p_target; for
    calibrated scores also Cllr, min Cllr and actual DCF per p_target."""
    p_targets = list(results[0].metrics.min_dcf) if results else []
    calibrated = bool(results) and results[0].metrics.cllr is not None
    header = ["trials", "trials count", "EER (%)"] + [f"minDCF (p={p:g})" for p in p_targets]
    if calibrated:
        header += ["Cllr", "min Cllr"] + [f"actDCF (p={p:g})" for p in p_targets]
    lines = [f"## {title}", ""] if title else []
    lines.append("| " + " | ".join(header) + " |")
    lines.append("| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |")
    for r in results:
        m = r.metrics
        cells = [r.name, str(m.num_targets + m.num_nontargets), f"{100 * m.eer:.2f}"]
        cells += [f"{m.min_dcf[p]:.4f}" for p in p_targets]
        if calibrated:
            cells += [f"{m.cllr:.4f}", f"{m.min_cllr:.4f}"]
            cells += [f"{m.act_dcf[p]:.4f}" for p in p_targets]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(
    results: Sequence[TrialResult],
    out_dir: str | Path,
    settings: Mapping[str, object] | None = None,
    stem: str = "results",
) -> tuple[Path, Path]:
    """Write ``<stem>.md`` and ``<stem>.json`` (every list a row; ``settings`` describe how the
    scores were made, e.g. the normalisation)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path, json_path = out_dir / f"{stem}.md", out_dir / f"{stem}.json"
    write_text_atomic(md_path, results_markdown(results))
    payload = {"settings": dict(settings or {}), "results": [r.to_json() for r in results]}
    write_json_atomic(json_path, payload)
    return md_path, json_path


def _probit(rates: np.ndarray) -> np.ndarray:
    """Normal deviate of clipped rates (the DET axes); 0 and 1 map to the plot's edges."""
    from scipy.special import ndtri  # the normal quantile; scipy.stats takes long to import

    return ndtri(np.clip(rates, 1e-5, 1 - 1e-5))


def _thin_curve(x: np.ndarray, y: np.ndarray, step: float = 0.004) -> tuple[np.ndarray, np.ndarray]:
    """Drop points that would land in the same ``step``-sized cell as their predecessor, so a
    million-trial curve draws a few thousand points with no visible change."""
    cells = np.stack([np.round(x / step), np.round(y / step)])
    keep = np.ones(x.size, dtype=bool)
    keep[1:] = np.any(cells[:, 1:] != cells[:, :-1], axis=0)
    keep[-1] = True
    return x[keep], y[keep]


def plot_det(curves: Mapping[str, ErrorRates], path: str | Path, title: str | None = None) -> Path:
    """DET curves of several trial lists in one PNG (normal-deviate axes, EER marked)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # Good systems live below 40%; widen the view only when some list is that poor.
    worst_eer = max(eer_from_rates(rates) for rates in curves.values())
    upper = 0.6 if worst_eer < 0.25 else 0.95
    ticks = np.array([0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 0.9])
    ticks = ticks[ticks < upper]
    figure = Figure(figsize=(6, 6), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    for name, rates in curves.items():
        x, y = _thin_curve(_probit(rates.false_alarm), _probit(rates.miss))
        eer = eer_from_rates(rates)
        (line,) = axes.plot(x, y, linewidth=1.5, label=f"{name} (EER {100 * eer:.2f}%)")
        axes.plot(_probit(np.array([eer])), _probit(np.array([eer])), "o", color=line.get_color())
    limits = _probit(np.array([0.0005, upper]))
    axes.plot(limits, limits, ":", color="grey", linewidth=0.8)
    axes.set_xlim(*limits)
    axes.set_ylim(*limits)
    positions = _probit(ticks)
    labels = [f"{100 * t:g}" for t in ticks]
    axes.set_xticks(positions, labels)
    axes.set_yticks(positions, labels)
    axes.set_xlabel("false-alarm rate (%)")
    axes.set_ylabel("miss rate (%)")
    axes.grid(True, linewidth=0.5, alpha=0.5)
    axes.legend(loc="upper right", fontsize=8)
    axes.set_title(title or "DET curves")
    figure.tight_layout()
    with atomic_write(path, "wb") as handle:
        figure.savefig(handle, format="png")
    return Path(path)


# --------------------------------------------------------------------------- whole run


@dataclass
class ScoringSetup:
    """How to score: optional AS-Norm cohort, optional calibration to LLRs (with the durations
    of the utterances when it uses them), the p_target values and whether to draw the DET plot."""

    cohort: np.ndarray | None = None
    top_k: int = DEFAULT_TOP_K
    calibration: Calibration | None = None
    durations: Mapping[str, float] | None = None
    p_targets: Sequence[float] = DEFAULT_P_TARGETS
    det_plot: bool = True

    def score_kind(self) -> dict[str, Any]:
        """How the raw scores are made; a calibration applies only to scores of its kind."""
        if self.cohort is None:
            return {"normalisation": "none"}
        return {
            "normalisation": "as-norm",
            "top_k": min(self.top_k, len(self.cohort)),
            "cohort_size": len(self.cohort),
            "cohort": cohort_digest(self.cohort),
        }

    def check(self) -> None:
        """Fail before any work when the calibration cannot apply to these scores."""
        if self.calibration is not None:
            self.calibration.check_score_kind(self.score_kind())
            if self.calibration.uses_durations and self.durations is None:
                raise DataError(
                    "the calibration uses the durations of the recordings: give them "
                    "(utt2dur or wav.scp)"
                )

    def trial_seconds(self, trials: Trials) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Durations of the enrol and test side of each trial when the calibration uses them."""
        if self.calibration is None or not self.calibration.uses_durations:
            return None, None
        where = str(trials.path)
        return (
            trial_seconds(self.durations, trials.enrol, trials.line_numbers, where),
            trial_seconds(self.durations, trials.test, trials.line_numbers, where),
        )


def score_lists(
    table: EmbeddingTable, trial_lists: Sequence[Trials], setup: ScoringSetup
) -> list[np.ndarray]:
    """Scores of every list: cosine, AS-normalised when a cohort is given, then calibrated to
    LLRs when a calibration is given. Every id is checked before any score is computed."""
    setup.check()
    rows = [trial_rows(table, trials) for trials in trial_lists]
    seconds = [setup.trial_seconds(trials) for trials in trial_lists]
    norm = None
    if setup.cohort is not None:
        every_row = np.concatenate([np.concatenate(pair) for pair in rows])
        norm = AsNorm.for_rows(table.matrix, every_row, setup.cohort, setup.top_k)
    all_scores = []
    for (enrol_rows, test_rows), sides in zip(rows, seconds):
        scores = cosine_scores(table.matrix, enrol_rows, test_rows)
        if norm is not None:
            scores = norm(scores, enrol_rows, test_rows)
        if setup.calibration is not None:
            scores = setup.calibration.apply(scores, *sides)
        all_scores.append(scores)
    return all_scores


def list_metrics(trials: Trials, scores: np.ndarray, setup: ScoringSetup) -> Metrics:
    """Metrics of one scored list (calibration metrics when the scores are calibrated)."""
    try:
        return compute_metrics(
            scores, trials.labels, setup.p_targets, llr=setup.calibration is not None
        )
    except ValueError as err:
        raise DataError(f"{trials.path}: cannot compute metrics ({err})") from None


def score_trials(
    embedding_scps: str | Path | Sequence[str | Path],
    trial_paths: Sequence[str | Path],
    out_dir: str | Path,
    setup: ScoringSetup | None = None,
) -> list[TrialResult]:
    """Score every trial list against the embeddings and write, under ``out_dir``:
    ``<list>.score`` files, ``results.md``/``results.json`` and ``det.png``. Every input is
    read and every score computed and checked before the first output is written."""
    setup = setup or ScoringSetup()
    setup.check()
    trial_lists = [read_trials(p) for p in trial_paths]
    names = [t.name for t in trial_lists]
    if len(set(names)) != len(names):
        raise DataError(f"trial lists must have different file names, got {names}")
    table = load_embeddings(embedding_scps)
    all_scores = score_lists(table, trial_lists, setup)
    all_metrics = [list_metrics(t, s, setup) for t, s in zip(trial_lists, all_scores)]

    out_dir = Path(out_dir)
    results = []
    for trials, scores, metrics in zip(trial_lists, all_scores, all_metrics):
        score_file = write_scores(out_dir / f"{trials.name}.score", trials, scores)
        results.append(TrialResult(trials.name, metrics, str(score_file)))
    if isinstance(embedding_scps, (str, Path)):
        embedding_scps = [embedding_scps]
    settings: dict[str, Any] = {
        "embeddings": [str(p) for p in embedding_scps],
        "normalisation": "as-norm" if setup.cohort is not None else "none",
        "p_targets": [float(p) for p in setup.p_targets],
    }
    if setup.cohort is not None:
        settings.update(top_k=setup.top_k, cohort_size=int(setup.cohort.shape[0]))
    if setup.calibration is not None:
        settings["calibration"] = setup.calibration.to_json()
    write_results(results, out_dir, settings)
    if setup.det_plot:
        plot_det({r.name: r.metrics.rates for r in results}, out_dir / "det.png")
    return results
